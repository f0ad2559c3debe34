"""The client-side tokenizer: makes random prompts and counts tokens a server did not report.

Only the `tokenizers` package is used (no transformers at run time). The default is the
default model's tokenizer (SmolLM2-135M-Instruct, from its GGUF file), so `bench serve` works
against tokenmill without flags; for another server's model pass `--tokenizer PATH` (a folder
with tokenizer.json, the file itself, or a .gguf file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"


class TokenizerLike(Protocol):
    """What the bench needs from a tokenizer (tests pass tiny stand-ins)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_ids(self) -> set[int]: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` seen through TokenizerLike; no special tokens added."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        if file.suffix == ".gguf":  # the vocabulary in the file's metadata
            from tokenmill.tokenizer import Tokenizer as ModelTokenizer

            self._tok = ModelTokenizer.from_gguf(file).backend
        else:
            self._tok = Tokenizer.from_file(str(file))
        self.path = str(file)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        # Random prompts must not contain BOS/EOS/chat markers: a server could stop on them.
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}


def load_tokenizer(path: str | Path | None) -> HFTokenizer | None:
    """Load the tokenizer to use for prompts and token counting.

    Args:
        path: a folder holding tokenizer.json, the file itself, or a .gguf file; None: the
            default model's (the demo model's where the default model is not installed).

    Returns:
        The tokenizer, or None when path is None and neither model is there (the caller
        then sends token ids and counts one token per streamed chunk).

    Raises:
        FileNotFoundError: an explicit path holds no tokenizer.
    """
    if path is not None:
        return HFTokenizer(path)
    from tokenmill.model.default_model import default_model_path

    try:
        return HFTokenizer(default_model_path())
    except FileNotFoundError:
        pass
    if (DEMO_MODEL_DIR / "tokenizer.json").is_file():
        return HFTokenizer(DEMO_MODEL_DIR)
    return None
