"""The sampler's random path in Triton: the keyed exponential race argmax_v p_v / E_v.

The same float32 operations as the CPU kernel (csrc/scalar.h: fast_exp, fast_log,
uniform_at) and its PyTorch twin (layers/keyed_race.py), launched with floating-point
contraction off, so a key draws the same token on every device. One program per row, two
passes over the vocabulary (the row's max, then the race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    # scalar.h's mix32 on uint32 (shifts are logical, products wrap).
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _uniform_at(key_lo, key_hi, index):
    x = _mix32(index.to(tl.uint32) * 0x9E3779B9 + key_lo)
    x = _mix32(x ^ key_hi)
    bits = (x >> 9) | 0x3F800000
    return bits.to(tl.float32, bitcast=True) - 1.0 + 5.9604644775390625e-8


@triton.jit
def _fast_exp(x):
    x = tl.minimum(tl.maximum(x, -87.3365), 88.3762)
    n = (x * 1.44269504088896341 + 12582912.0) - 12582912.0  # round to nearest even
    x = x - n * 0.693359375
    x = x - n * -2.12194440e-4
    y = x * 0.0 + 1.9875691500e-4
    y = y * x + 1.3981999507e-3
    y = y * x + 8.3334519073e-3
    y = y * x + 4.1665795894e-2
    y = y * x + 1.6666665459e-1
    y = y * x + 5.0000001201e-1
    y = y * x * x + x + 1.0
    return y * ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _fast_log(x):
    bits = x.to(tl.uint32, bitcast=True)
    e = (((bits >> 23) & 0xFF).to(tl.int32) - 126).to(tl.float32)
    m0 = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m0 < 0.707106781186547524
    e = tl.where(small, e - 1.0, e)
    m = tl.where(small, m0 + m0, m0) - 1.0
    z = m * m
    y = m * 0.0 + 7.0376836292e-2
    y = y * m - 1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m - 1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m - 1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m - 2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    y = y + -2.12194440e-4 * e
    y = y + -0.5 * z
    return m + y + 0.693359375 * e


@triton.jit
def _race_kernel(out_ptr, logits_ptr, keys_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + row * vocab
    key = tl.load(keys_ptr + row)
    key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
    key_hi = (key >> 32).to(tl.uint32)
    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for v0 in range(0, vocab, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        row_max = tl.maximum(row_max, tl.load(logits + v, mask=v < vocab, other=float("-inf")))
    mx = tl.max(row_max, axis=0)
    best = tl.full([BLOCK], -1.0, tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, vocab, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        vmask = v < vocab
        logit = tl.load(logits + v, mask=vmask, other=float("-inf"))
        p = tl.where(logit == float("-inf"), 0.0, _fast_exp(logit - mx))  # masked stays impossible
        score = tl.div_rn(p, -_fast_log(_uniform_at(key_lo, key_hi, v)))  # IEEE division, as the CPU's
        score = tl.where(vmask, score, -1.0)
        # Per lane, a later chunk wins only if strictly better: each lane keeps its lowest id.
        better = score > best
        best = tl.where(better, score, best)
        best_id = tl.where(better, v, best_id)
    top = tl.max(best, axis=0)
    # Of equal scores the lowest token id wins, as in the CPU kernel.
    pick = tl.min(tl.where(best == top, best_id, vocab), axis=0)
    tl.store(out_ptr + row, pick.to(tl.int64))


def sample_exponential_race(sampled: torch.Tensor, logits: torch.Tensor, keys: torch.Tensor) -> None:
    """sampled [rows] int64 = one draw per row of softmax(logits [rows, vocab] float32),
    the noise keyed by keys [rows] int64."""
    rows, vocab = logits.shape
    if rows:
        keys = keys.to(logits.device, non_blocking=True)
        _race_kernel[(rows,)](sampled, logits, keys, vocab, BLOCK=1024, enable_fp_fusion=False)
