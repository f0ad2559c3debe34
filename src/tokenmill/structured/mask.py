"""A step's token masks, applied to the logits rows of the constrained requests only."""

from __future__ import annotations

from typing import Any

import torch

_BITS = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i


def apply_token_masks(logits: torch.Tensor, matchers: list[Any]) -> None:
    """In place: each row with a matcher gets -inf where its grammar forbids the token.

    Args:
        logits: [R, V] float32, one row per sampled request.
        matchers: the row's llguidance matcher, or None for an unconstrained row.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[1]
    # [n, words] int32 bitmasks (llguidance's layout: token t is bit t % 32 of word t // 32)
    words = torch.stack([torch.frombuffer(bytearray(matchers[i].compute_bitmask()), dtype=torch.int32) for i in rows])
    allowed = ((words.unsqueeze(-1) >> _BITS) & 1).view(len(rows), -1)[:, :vocab].bool()  # [n, V]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
