"""The keyed exponential race as torch ops: the sampler's draws where the CPU kernel does
not run (no compiler, TOKENMILL_CPU_KERNELS=0, CUDA).

The same draws as the kernel (kernels/csrc/scalar.h and kernels_impl.h `sample`), so both
pick the same token for the same key: a seed's output does not depend on whether the
kernels were built. The kernel's exp and log are polynomials; repeating them over every
logit costs ~40 torch ops, so the race is screened with torch.exp/log first (both within a
few ulps of the polynomials) and only the near-winners are scored with the exact same
float32 operations as the kernel.
"""

from __future__ import annotations

import torch

# Candidates are within this relative distance of the screened best score: far wider than
# the few-ulp (~1e-6) difference between torch's exp/log and the kernel's polynomials.
_SCREEN_MARGIN = 1e-4


def _i32(u32: int) -> int:
    return u32 - (1 << 32) if u32 >= 1 << 31 else u32


_PHI, _MIX1, _MIX2 = _i32(0x9E3779B9), _i32(0x21F0AAAD), _i32(0x735A2D97)


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """scalar.h's mix32 in place on int32 bit patterns (multiplication wraps; `>>` is
    arithmetic on int32, so each logical shift masks the sign copies away)."""
    for bits, factor in ((16, _MIX1), (15, _MIX2), (15, None)):
        torch.bitwise_right_shift(x, bits, out=scratch)
        scratch &= (1 << (32 - bits)) - 1
        x ^= scratch
        if factor is not None:
            x *= factor
    return x


def keyed_uniform(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniform draws in (0, 1) for each (key, index) pair, as scalar.h's uniform_at.

    Args:
        keys: int64 keys (62 random bits), broadcastable against `index`.
        index: integer token ids.
    Returns:
        float32 of the broadcast shape. Every step is in place (on CPU each fresh
        [rows, vocab] buffer costs its page faults).
    """
    x = index.to(torch.int32) * _PHI + (keys & 0xFFFFFFFF).to(torch.int32)  # wraps to the same 32 bits
    scratch = torch.empty_like(x)
    _mix32_(x, scratch)
    x ^= (keys >> 32).to(torch.int32)
    _mix32_(x, scratch)
    x >>= 9
    x &= 0x7FFFFF
    x |= 0x3F800000  # the bit pattern of a float in [1, 2)
    u = x.view(torch.float32)
    u -= 1.0
    u += 5.9604644775390625e-8
    return u


def _fast_exp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(-87.3365, 88.3762)
    n = torch.round(x * 1.44269504088896341)
    x = x - n * 0.693359375
    x = x - n * -2.12194440e-4
    y = torch.full_like(x, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * x + c
    y = y * x * x + x + 1.0
    return y * ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def _fast_log(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32)
    e = (((bits >> 23) & 0xFF) - 126).float()
    m0 = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m0 < 0.707106781186547524
    e = torch.where(small, e - 1.0, e)
    m = torch.where(small, m0 + m0 - 1.0, m0 - 1.0)
    z = m * m
    y = torch.full_like(m, 7.0376836292e-2)
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
              2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * m + c
    y = y * m * z
    y = y + -2.12194440e-4 * e
    y = y + -0.5 * z
    return m + y + 0.693359375 * e


def exponential_race(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of softmax(logits) [rows, vocab] float32, noise keyed by keys [rows]."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    row_max = logits.amax(dim=-1, keepdim=True)  # [rows, 1]
    # Screen: p / E with torch's exp and log (exp(-inf) = 0 keeps masked tokens out).
    scores = (logits - row_max).exp_()  # [rows, vocab]
    scores /= keyed_uniform(keys[:, None], torch.arange(vocab_size, device=device)[None, :]).log_().neg_()
    near_best = scores >= scores.amax(dim=-1, keepdim=True) * (1 - _SCREEN_MARGIN)
    rows, cols = near_best.nonzero(as_tuple=True)  # [num_candidates] each
    # Score the candidates exactly as the kernel does.
    logit = logits[rows, cols]
    probs = torch.where(logit == float("-inf"), 0.0, _fast_exp(logit - row_max[rows, 0]))
    exact = probs / -_fast_log(keyed_uniform(keys[rows], cols))
    best = torch.full((num_rows,), -1.0, device=device).scatter_reduce(0, rows, exact, "amax")
    # The kernel keeps the first of equal scores: the lowest token id (and token 0 for a
    # row with every token masked, which the engine never sends).
    winners = exact == best[rows]
    picks = torch.zeros(num_rows, dtype=torch.long, device=device)
    return picks.scatter_reduce(0, rows[winners], cols[winners], "amin", include_self=False)
