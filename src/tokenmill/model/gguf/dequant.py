"""Dequantization of ggml blocks to float32, vectorised with numpy.

Bit-exact with the `gguf` package's reference (`gguf.quants.dequantize`): every value is
computed with the same float32 operations in the same order (e.g. Q4_K is
`(d * scale) * q - dmin * min`, never a fused multiply-add), so the tests compare with `==`.
Block layouts are ggml's (ggml-common.h); each function takes `[num_blocks, block_bytes]`
uint8 and returns `[num_blocks, block_size]` float32.

numpy rather than torch: on these small-integer ops over chunks that fit in cache it
measured 5-15x faster here (torch paid per-op allocation and unvectorised uint8 kernels).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tokenmill.model.gguf.quant_types import (
    BF16,
    F16,
    F32,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QUANT_TYPES,
)

# Blocks per chunk: small enough that each chunk's temporaries stay in cache.
_CHUNK_BLOCKS = 8192


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte `start` of each block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[..., k] bytes -> [..., 2, k]: low nibbles (first half of the values), then high ones."""
    return np.stack((packed & 0x0F, packed >> 4), axis=-2)


def _bits(packed: np.ndarray, num_bits: int = 8, width: int = 1) -> np.ndarray:
    """[..., k] bytes -> [..., num_bits // width, k]: field i holds bits i*width.. of each byte."""
    shifts = np.arange(0, num_bits, width, dtype=np.uint8).reshape(-1, 1)
    return (packed[..., None, :] >> shifts) & np.uint8((1 << width) - 1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    # d f16 | 16 bytes: value j (< 16) in the low nibble of byte j, value j + 16 in its high one
    q = _nibbles(b[:, 2:18]).reshape(-1, 32).astype(np.float32) - 8
    return _f16(b, 0) * q


def _q4_1(b: np.ndarray) -> np.ndarray:
    # d f16 | m f16 | 16 bytes of nibbles as Q4_0
    q = _nibbles(b[:, 4:20]).reshape(-1, 32).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _q5_high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian u32) -> [n, 32]: bit j is the fifth bit of value j."""
    return _bits(qh).swapaxes(-1, -2).reshape(-1, 32)


def _q5_0(b: np.ndarray) -> np.ndarray:
    # d f16 | qh u32 | 16 bytes of low nibbles as Q4_0
    q = _nibbles(b[:, 6:22]).reshape(-1, 32) | (_q5_high_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.astype(np.float32) - 16)


def _q5_1(b: np.ndarray) -> np.ndarray:
    # d f16 | m f16 | qh u32 | 16 bytes of low nibbles
    q = _nibbles(b[:, 8:24]).reshape(-1, 32) | (_q5_high_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:
    # d f16 | 32 int8
    return b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in 12 bytes -> two [n, 8] uint8.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7; bytes 4-7 the
    same for the mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7.
    """
    sc_lo, m_lo, mixed = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate((sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)), axis=1)
    mins = np.concatenate((m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 2) & 0x30)), axis=1)
    return scales, mins


def _k_scaled(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: d f16 | dmin f16 | 12 scale bytes; q [n, 8, 32] -> [n, 256]."""
    scales, mins = _k_scales_mins(b[:, 4:16])
    d = (_f16(b, 0) * scales.astype(np.float32))[..., None]  # [n, 8, 1]
    dm = (_f16(b, 2) * mins.astype(np.float32))[..., None]
    return (d * q.astype(np.float32) - dm).reshape(-1, 256)


def _q4_k(b: np.ndarray) -> np.ndarray:
    # ... | 128 bytes: each 32 bytes hold two sub-blocks of 32 (low nibbles, then high ones)
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_scaled(b, q)


def _q5_k(b: np.ndarray) -> np.ndarray:
    # ... | 32 bytes qh: bit i of byte j is the fifth bit of value j of sub-block i | 128 bytes as Q4_K
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return _k_scaled(b, low | (_bits(b[:, 16:48]) << 4))


def _q6_k(b: np.ndarray) -> np.ndarray:
    # 128 bytes low nibbles | 64 bytes of 2-bit highs | 16 int8 scales | d f16; two halves of 128
    low = _nibbles(b[:, 0:128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), width=2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).astype(np.float32) - 32).reshape(-1, 16, 16)
    d = (_f16(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32))[..., None]  # [n, 16, 1]
    return (d * q).reshape(-1, 256)


_BLOCK_DEQUANT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k,
}


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored bytes -> float32 tensor of `shape`.

    Args:
        raw: [rows, bytes per row] uint8, as `GGUFFile.raw_blocks` returns it.
        ggml_type: the tensor's ggml type id (one of `QUANT_TYPES`).
        shape: the tensor's shape, torch order.

    Returns:
        float32 values; for F32 a view of `raw` (no copy).
    """
    if ggml_type == F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape))
    if ggml_type == F16:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32).reshape(shape))
    if ggml_type == BF16:
        # bfloat16 is the top half of a float32: widen by shifting into the high bits.
        return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape))
    fn = _BLOCK_DEQUANT.get(ggml_type)
    if fn is None:
        raise ValueError(f"no dequantization for ggml type {ggml_type}.")
    qt = QUANT_TYPES[ggml_type]
    blocks = raw.reshape(-1, qt.block_bytes)  # [num_blocks, block_bytes]
    out = np.empty((blocks.shape[0], qt.block_size), dtype=np.float32)
    # A NaN or inf scale stored in the file gives NaN values, as in the reference; no warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            out[start : start + _CHUNK_BLOCKS] = fn(blocks[start : start + _CHUNK_BLOCKS])
    return torch.from_numpy(out.reshape(shape))
