"""Token embedding: a float table, or stored rows decoded on lookup by the CPU kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.stored_weight import StoredWeight


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.stored: StoredWeight | None = None
        self.dtype = torch.float32  # the run dtype, for stored rows

    def set_stored(self, weight: StoredWeight, dtype: torch.dtype) -> None:
        """Keep the table in its storage format; looked-up rows are decoded to `dtype`."""
        self.stored, self.dtype = weight, dtype
        self.weight = None  # type: ignore[assignment]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.stored is not None:
            return self.stored.decode_rows(ids).to(self.dtype)  # [T, dim]
        return F.embedding(ids, self.weight)
