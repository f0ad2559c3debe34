"""Saved next-token distributions (a reference run), and KL divergence against them.

A reference keeps, for every scored position, the whole vocabulary's log-probabilities,
as llama-perplexity's --kl-divergence-base file does, quantized to 16 bits:

    code = 65535 - round((top_logprob - logprob) / STEP_NATS), STEP_NATS = SPAN_NATS / 65534

so a row is stored relative to its most likely token, in steps of 3.7e-4 nats over a span of
SPAN_NATS = 24 nats; tokens more than 24 nats below the top (probability < 4e-11 of the
top token's) get code 0 and count as probability 0. Exactly kept beside the codes: the log-
probability of the token that actually follows (PPL and the PPL ratio are exact), and the
most likely token's id and log-probability (top-1 agreement is exact).

The error this introduces, per position: every log-probability is off by at most STEP/2 =
1.8e-4 nats (0.018% in probability); the dequantized row is renormalized, so the KL
divergence of the stored row from the exact one is about STEP^2 / 24 = 6e-9 nats, and the
mass dropped below the span is at most vocab * e^-24 (2e-6 for a 49,152-token vocabulary).
A run against its own reference therefore reads KLD ~1e-8, not exactly 0 (tests bound it;
docs/quality.md shows measured values). Size: 2 bytes x vocab per position (96 KiB for
SmolLM2), written straight to disk as the run goes (numpy memory-mapped .npy files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "tokenmill-logits/1"
SPAN_NATS = 24.0
STEP_NATS = SPAN_NATS / 65534
_CODE_MAX = 65535
_ARRAYS = {  # name -> (dtype, per-position shape given the vocabulary size)
    "target_logprobs": (np.float32, lambda v: ()),  # log p(the token that follows), exact
    "top_ids": (np.int32, lambda v: ()),  # most likely token, exact
    "top_logprobs": (np.float32, lambda v: ()),  # its log-probability, exact
    "codes": (np.uint16, lambda v: (v,)),  # the whole row, quantized as above
}


def quantize_rows(logprobs: torch.Tensor) -> dict[str, np.ndarray]:
    """[N, vocab] float32 log-softmax rows -> top id, top logprob and codes (no target)."""
    top_values, top_ids = logprobs.max(dim=-1)  # [N]
    below = (top_values[:, None] - logprobs) / STEP_NATS  # [N, vocab] steps below the top
    codes = torch.where(below <= 65534.0, _CODE_MAX - torch.round(below).clamp(max=65534.0), 0.0)
    return {"top_ids": top_ids.int().cpu().numpy(), "top_logprobs": top_values.float().cpu().numpy(),
            "codes": codes.to(torch.int32).cpu().numpy().astype(np.uint16)}


def _normalized(logprobs: torch.Tensor) -> torch.Tensor:
    """Rows as float64 log-probabilities that sum to 1 in float64: a float32 log-softmax
    sums to 1 only within ~1e-7, which would swamp KL divergences of that size."""
    lp = logprobs.double()
    return lp - torch.logsumexp(lp, dim=-1, keepdim=True)


def dequantize_rows(codes: np.ndarray, top_logprobs: np.ndarray) -> torch.Tensor:
    """Codes [N, vocab] -> normalized float64 log-probabilities [N, vocab] (-inf for code 0)."""
    c = torch.from_numpy(np.array(codes, dtype=np.int32))
    top = torch.from_numpy(np.array(top_logprobs, dtype=np.float64))[:, None]
    lp = (top - (_CODE_MAX - c) * STEP_NATS).masked_fill(c == 0, float("-inf"))
    return _normalized(lp)


@dataclass
class ListedRows:
    """Positions known only by the tokens a server listed (OpenAI logprobs)."""

    target_logprobs: np.ndarray  # [N] float32, exact
    ids: np.ndarray  # [N, M] int64 listed token ids, most likely first; -1: padding / id unknown
    logprobs: np.ndarray  # [N, M] float32; -inf where ids is -1
    top_ids: np.ndarray  # [N] most likely listed token; -1 when its id is unknown


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> np.ndarray:
    """sum_i p_i (log p_i - log q_i) per row (float64 inputs); terms with p_i = 0 are 0."""
    terms = torch.where(torch.isneginf(p_log), 0.0, p_log.exp() * (p_log - q_log))
    return terms.sum(dim=-1).numpy()


def kl_against_full(ref: dict[str, np.ndarray], logprobs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """KL(ref || candidate) and top-1 agreement for candidate rows known in full.

    Args:
        ref: the reference's arrays for these positions (top_ids, top_logprobs, codes).
        logprobs: [N, vocab] the candidate's log-softmax rows.

    Returns:
        kld [N] float64, and same_top [N] int8 (1: same most likely token, 0: not).
    """
    p_log = dequantize_rows(ref["codes"], ref["top_logprobs"])
    kld = _kl(p_log, _normalized(logprobs.cpu()))
    same = (logprobs.argmax(dim=-1).cpu().numpy() == ref["top_ids"]).astype(np.int8)
    return kld, same


def kl_against_listed(ref: dict[str, np.ndarray], cand: ListedRows) -> tuple[np.ndarray, np.ndarray]:
    """KL over the partition {each token the candidate listed, everything else}.

    By the log-sum inequality this never exceeds the full KL: it misses how differently the
    two spread the mass the candidate did not list.

    Returns:
        kld [N]; same_top [N] int8 (-1 where the candidate's top token id is unknown).
    """
    p_full = dequantize_rows(ref["codes"], ref["top_logprobs"])  # [N, vocab]
    known = torch.from_numpy(cand.ids >= 0)
    ids = torch.from_numpy(cand.ids).clamp(min=0)  # unknown entries are masked below
    p_listed = p_full.gather(1, ids).masked_fill(~known, float("-inf"))  # [N, M]
    q_listed = torch.from_numpy(cand.logprobs.astype(np.float64)).masked_fill(~known, float("-inf"))
    # The reference's rest is summed from its own small terms (no 1 - x cancellation).
    is_listed = torch.zeros(p_full.shape, dtype=torch.int32).scatter_add_(1, ids, known.int()) > 0
    p_rest = torch.logsumexp(p_full.masked_fill(is_listed, float("-inf")), dim=-1)
    q_in = q_listed.exp().sum(dim=-1)
    q_rest = torch.log((1.0 - q_in).clamp(min=1e-30))
    kld = _kl(torch.cat([p_listed, p_rest[:, None]], 1), torch.cat([q_listed, q_rest[:, None]], 1))
    same = np.where(cand.top_ids < 0, -1, cand.top_ids == ref["top_ids"]).astype(np.int8)
    # A row where the reference's listed mass is all -inf would still give 0; that is right.
    return kld, same


class LogitsWriter:
    """A reference being written: a folder of .npy files filled as positions are scored."""

    def __init__(self, path: str | Path, num_positions: int, vocab_size: int) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "meta.json").unlink(missing_ok=True)  # written last: marks a complete file
        self.arrays = {
            name: np.lib.format.open_memmap(self.path / f"{name}.npy", mode="w+", dtype=dtype,
                                            shape=(num_positions, *shape(vocab_size)))
            for name, (dtype, shape) in _ARRAYS.items()
        }

    def write(self, start: int, logprobs: torch.Tensor, target_logprobs: np.ndarray) -> None:
        """Rows for positions start .. start + N - 1."""
        stop = start + len(target_logprobs)
        self.arrays["target_logprobs"][start:stop] = target_logprobs
        for name, values in quantize_rows(logprobs).items():
            self.arrays[name][start:stop] = values

    def close(self, meta: dict[str, Any]) -> None:
        for a in self.arrays.values():
            a.flush()
        (self.path / "meta.json").write_text(json.dumps({**meta, "format": FORMAT}, indent=1))


@dataclass
class LogitsFile:
    """A saved reference, memory-mapped for reading."""

    arrays: dict[str, np.ndarray]  # as _ARRAYS, [num_positions, ...]
    meta: dict[str, Any]  # format, protocol (with fingerprint), model, config, id, run_id

    @property
    def num_positions(self) -> int:
        return len(self.arrays["target_logprobs"])

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: a[start:stop] for name, a in self.arrays.items()}

    @classmethod
    def load(cls, path: str | Path) -> LogitsFile:
        root = Path(path)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{root}: not a complete tokenmill logits folder (no meta.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{root}: format {meta.get('format')!r}, expected {FORMAT!r}")
        arrays = {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return cls(arrays, meta)
