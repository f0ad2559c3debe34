"""Memory-mapped safetensors reading: single file or sharded with an index.

We parse the (tiny) safetensors header ourselves and wrap the mapped file with
`torch.frombuffer`: nothing is read up front, the OS pages weights in on first use, and
tensors already in the run dtype can stay mapped. Errors name the file and what is wrong.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards listed
    in model.safetensors.index.json."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r}).") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: listed in {index.name} but missing.")
        return files
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if found:
        return [model_dir / n for n in found]
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json found "
        "(only safetensors checkpoints are supported)."
    )


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes).")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"{path}: corrupt safetensors header length {header_len}.")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e}).") from None
        # ACCESS_COPY gives a private, writable view (torch.frombuffer wants writable
        # memory); pages are only copied if written, which we never do.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
    data_start = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * itemsize or data_start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} spans bytes {begin}..{end} but needs "
                f"{numel * itemsize} bytes within a {size}-byte file (truncated or corrupt)."
            )
        if numel == 0:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=data_start + begin)
        yield name, t.view(shape)


def iter_weights(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF tensor name, tensor) for every tensor of the checkpoint, memory-mapped."""
    for path in checkpoint_files(model_dir):
        yield from _read_file(path)
