"""GroupedInts: a weight matrix as integer codes with a scale and a zero point per
(output row, group of input columns). Every integer layout (AWQ, GPTQ, tokenmill's int8)
is read into this form and written from it; the kernel repack works on it alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupedInts:
    """w[o, i] = scales[o, group[i]] * (codes[o, i] - zeros[o, group[i]])."""

    codes: torch.Tensor  # [out, in] int16: 0..2^bits-1 (int4), -127..127 (int8, zeros 0)
    scales: torch.Tensor  # [out, num_groups] float16 (or the checkpoint's float dtype)
    zeros: torch.Tensor  # [out, num_groups] int16
    group: torch.Tensor  # [in] int64: the group of each input column (GPTQ's g_idx)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """[out, in] float32; (codes - zeros) is a small integer, so this is one rounding
        (none for float16 scales: an 11-bit times a 9-bit significand fits in float32)."""
        g = self.group
        return self.scales.float()[:, g] * (self.codes - self.zeros[:, g]).float()


def contiguous_groups(num_cols: int, group_size: int) -> torch.Tensor:
    """[num_cols] group ids of consecutive groups of `group_size` columns (the last may be shorter)."""
    return torch.arange(num_cols) // group_size
