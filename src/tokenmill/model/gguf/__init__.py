"""GGUF checkpoints: reading (reader), dequantization (dequant), model config (config),
tensor names and layout (weights), tokenizer (vocab)."""

from __future__ import annotations

from pathlib import Path

_MAGIC = b"GGUF"


def is_gguf_file(path: str | Path) -> bool:
    """True for an existing file that starts with the GGUF magic (whatever its suffix)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == _MAGIC
