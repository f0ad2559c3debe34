"""tokenmill: LLM inference engine, OpenAI-compatible server and bench lab."""

from tokenmill.config import EngineConfig, create_engine_config
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it lazily so `tokenmill --help`
    # and the bench client stay quick to start.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(name)


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
