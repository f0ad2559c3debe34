"""RMSNorm, computed in float32 like the reference implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual).

        The residual form is how decoder layers use it (as in vLLM): the add and the norm
        are one pass of the CPU kernel instead of six ops. The kernel works in place: it
        overwrites x and residual, which the caller no longer needs.
        """
        ops = kernels.for_tensor(x) if x.dim() == 2 and x.is_contiguous() else None
        if residual is None:
            if ops is not None:
                out = torch.empty_like(x)
                ops.rms_norm(out, x, self.weight, self.eps)
                return out
            return self._norm(x)
        if ops is not None:
            ops.add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for stability, scale in the input dtype (as HF does);
        # F.rms_norm is one fused op where the formula written out is five.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)
