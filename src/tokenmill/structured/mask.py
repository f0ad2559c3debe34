"""A step's token masks, applied to the logits rows of the constrained requests only."""

from __future__ import annotations

from typing import Any

import torch

# Byte -> what its 8 bits add to the logits (0 allowed, -inf forbidden), least significant
# bit first: llguidance's masks are little-endian words in which token t is bit t % 32 of
# word t // 32, so byte b holds tokens 8b..8b+7. One gather and one add per step: a boolean
# mask with masked_fill measured 4x slower on 64 rows of 49,152 tokens.
_PENALTY_OF_BYTE = torch.where(((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))


def apply_token_masks(logits: torch.Tensor, matchers: list[Any]) -> None:
    """In place: each row with a matcher gets -inf where its grammar forbids the token.

    Args:
        logits: [R, V] float32, one row per sampled request.
        matchers: the row's llguidance matcher, or None for an unconstrained row.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    masks = bytearray().join(matchers[i].compute_bitmask() for i in rows)  # writable, for frombuffer
    packed = torch.frombuffer(masks, dtype=torch.uint8).long()  # [n * bytes]
    penalty = _PENALTY_OF_BYTE.index_select(0, packed).view(len(rows), -1)[:, : logits.shape[1]]  # [n, V]
    penalty = penalty.to(logits.device)
    if len(rows) == logits.shape[0]:  # every row constrained
        logits.add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), penalty)
