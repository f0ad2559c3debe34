"""Host values onto the model's device without waiting for the copy."""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values) on `device`. `torch.tensor(values, device="cuda")` waits for its
    copy (a host sync per call, several per step); this copies asynchronously instead (from
    pageable memory, staged before the call returns, so the host tensor may go at once)."""
    t = torch.tensor(values, dtype=dtype)
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
