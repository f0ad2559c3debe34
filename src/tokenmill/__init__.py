"""tokenmill: LLM inference engine, OpenAI-compatible server and bench lab."""

import importlib

__version__ = "0.1.0"

# Imported on first use: the engine's modules pull in torch (2 s and ~200 MB), which the
# gateway, the bench client and `tokenmill --help` never need.
_LAZY = {
    "LLM": "tokenmill.engine.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "EngineConfig": "tokenmill.config",
    "create_engine_config": "tokenmill.config",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
    "Logprob": "tokenmill.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")


__all__ = [
    "LLM",
    "SamplingParams",
    "EngineConfig",
    "create_engine_config",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "__version__",
]
