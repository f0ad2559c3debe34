"""GGUF container reading: header, metadata and tensor directory, tensor bytes memory-mapped.

Our own parser instead of `gguf.GGUFReader`: that one builds a numpy view per metadata item
and took ~8 s on the 49,152-token vocabulary of a 135M model; this one reads the same
metadata in a fraction of a second. Tensor data is never read up front: `raw_blocks`
returns a uint8 view of the mapped file, so quantized blocks run as they are stored
(model/stored_weight.py).

Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64;
metadata as (key string, value type u32, value); then per tensor (name, n_dims u32,
dims u64 x n_dims innermost first, ggml type u32, offset u64 from the data section); the
data section starts at the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.model.gguf.quant_types import QUANT_TYPES, ggml_type_name

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Metadata value types with a fixed width: type id -> struct format.
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is stored."""

    name: str
    shape: tuple[int, ...]  # torch order: outermost first (GGUF lists dims innermost first)
    ggml_type: int
    offset_bytes: int  # from the start of the file
    num_bytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; errors name the file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def _need(self, num_bytes: int, what: str) -> None:
        if self.pos + num_bytes > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF file while reading {what} at byte {self.pos}.")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        self._need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        # Vocabularies hold byte fragments that are not valid UTF-8 on their own; keep them
        # readable (surrogates) rather than failing the whole file.
        return raw.decode("utf-8", errors="surrogateescape")

    def value(self, value_type: int, what: str) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type], what)
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                self._need(size * count, what)
                items = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += size * count
                return items
            return [self.value(item_type, what) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {value_type} in {what}.")


class GGUFFile:
    """An opened GGUF file: `metadata` (key -> value) and `tensors` (name -> info), in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: GGUF file not found.")
        with open(self.path, "rb") as f:
            if self.path.stat().st_size < 24:
                raise ValueError(f"{self.path}: too small to be a GGUF file.")
            # ACCESS_COPY: a private writable view (torch.from_numpy wants writable memory);
            # pages are only copied if written, which we never do.
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        cur = _Cursor(self._mm, self.path)
        magic = bytes(self._mm[:4])
        if magic != _MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {_MAGIC!r}).")
        cur.pos = 4
        self.version: int = cur.unpack("<I", "the version")
        if self.version not in _SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.path}: GGUF version {self.version} is not supported (versions "
                f"{', '.join(map(str, _SUPPORTED_VERSIONS))} are)."
            )
        num_tensors = cur.unpack("<Q", "the tensor count")
        num_kv = cur.unpack("<Q", "the metadata count")
        self.metadata: dict[str, Any] = {}
        for i in range(num_kv):
            key = cur.string(f"metadata key #{i}")
            self.metadata[key] = cur.value(cur.unpack("<I", key), key)

        raw_infos = []
        for i in range(num_tensors):
            name = cur.string(f"tensor name #{i}")
            num_dims = cur.unpack("<I", name)
            dims = [cur.unpack("<Q", name) for _ in range(num_dims)]
            raw_infos.append((name, tuple(reversed(dims)), cur.unpack("<I", name), cur.unpack("<Q", name)))
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"{self.path}: invalid general.alignment {alignment!r}.")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in raw_infos:
            start = data_start + offset
            num_bytes = _tensor_num_bytes(shape, ggml_type)
            if num_bytes is not None and start + num_bytes > len(self._mm):
                raise ValueError(
                    f"{self.path}: tensor {name!r} ({ggml_type_name(ggml_type)}, shape {list(shape)}) "
                    f"needs bytes {start}..{start + num_bytes} of a {len(self._mm)}-byte file (truncated?)."
                )
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, num_bytes or 0)

    def release_resident_pages(self) -> None:
        """Drop this process's resident copies of the file's pages (MADV_DONTNEED). The
        mapping is only ever read, so a page still in use faults back in from the file on
        its next read. Called once the loader has copied what it reorders (interleaved
        rows, merged projections): the file's share of resident memory is then what is
        still read (the embedding rows looked up), not every page the copies touched."""
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw_blocks(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, [rows, bytes per row] uint8, memory-mapped (no copy).

        Rows are the tensor's innermost dimension; each row is a whole number of blocks.
        """
        info = self.tensors[name]
        if info.ggml_type not in QUANT_TYPES:
            raise ValueError(
                f"{self.path}: tensor {name!r} has type {info.type_name}, which tokenmill cannot read "
                f"(supported: {', '.join(t.name for t in QUANT_TYPES.values())})."
            )
        row_len = info.shape[-1] if info.shape else 1
        num_rows = info.num_bytes // max(1, QUANT_TYPES[info.ggml_type].row_bytes(row_len))
        flat = np.frombuffer(self._mm, dtype=np.uint8, count=info.num_bytes, offset=info.offset_bytes)
        return flat.reshape(num_rows, -1)


def _tensor_num_bytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes a tensor occupies, or None for a type we do not know (refused when read)."""
    qt = QUANT_TYPES.get(ggml_type)
    if qt is None:
        return None
    row_len = shape[-1] if shape else 1
    num_rows = 1
    for d in shape[:-1]:
        num_rows *= d
    return num_rows * qt.row_bytes(row_len)
