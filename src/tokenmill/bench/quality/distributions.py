"""Saved next-token distributions (a reference run), and KL divergence against them.

A reference keeps, for every scored position, the whole vocabulary's log-probabilities,
as llama-perplexity's --kl-divergence-base file does, quantized to 16 bits relative to the
row's most likely token:

    code = 65535 - min(round((top_logprob - logprob) / STEP_NATS), 65535)
    STEP_NATS = SPAN_NATS / 65535 = 24 / 65535 = 3.7e-4 nats

Tokens more than SPAN_NATS = 24 nats below the top (probability < 3.8e-11 of the top
token's) are stored at that floor. Kept exactly beside the codes: the log-probability of
the token that actually follows (PPL and the PPL ratio are exact) and the most likely
token's id and log-probability (top-1 agreement is exact).

The error this introduces: every stored log-probability is off by at most STEP/2 = 1.8e-4
nats (0.018% in probability), and the floor adds at most vocab * e^-24 of mass (2e-6 for
a 49,152-token vocabulary). KL(P || Q) computed from the stored P is, to first order, off
by at most STEP * E_P|log p/q| per position, with zero mean, so it averages out over
positions; the stored row's own divergence from the exact one is ~STEP^2 / 24 = 6e-9
nats, which is what a run against its own reference reads (not exactly 0). Tests bound all
three; docs/quality.md shows measured values. Size: 2 bytes x vocab per position (96 KiB
for SmolLM2), written straight to disk as the run goes (memory-mapped .npy files).

KL sums run over whole rows in float32 with float64 accumulation, and both rows are
renormalized in float64 (a float32 log-softmax sums to 1 only within ~1e-7, which would
swamp divergences of that size): KL = sum e^a (a - b) / S_a - log S_a + log S_b for
log-probabilities a (reference) and b (candidate), S = sum e^(.).
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
_CODE_MAX = 65535
STEP_NATS = SPAN_NATS / _CODE_MAX
_ARRAYS = {  # name -> (dtype, per-position shape given the vocabulary size)
    "target_logprobs": (np.float32, lambda v: ()),  # log p(the token that follows), exact
    "top_ids": (np.int32, lambda v: ()),  # most likely token, exact
    "top_logprobs": (np.float32, lambda v: ()),  # its log-probability, exact
    "codes": (np.uint16, lambda v: (v,)),  # the whole row, quantized as above
}


def quantize_rows(logprobs: torch.Tensor) -> dict[str, np.ndarray]:
    """[N, vocab] float32 log-softmax rows -> top id, top logprob and codes (no target)."""
    top_values, top_ids = logprobs.max(dim=-1)  # [N]
    steps = (top_values[:, None] - logprobs).mul_(1.0 / STEP_NATS).round_().clamp_(max=_CODE_MAX)  # [N, vocab]
    codes = steps.neg_().add_(_CODE_MAX).to(torch.int32)
    return {"top_ids": top_ids.int().cpu().numpy(), "top_logprobs": top_values.float().cpu().numpy(),
            "codes": codes.cpu().numpy().astype(np.uint16)}


def dequantize_rows(codes: np.ndarray, top_logprobs: np.ndarray) -> torch.Tensor:
    """Codes [N, vocab] -> float32 log-probabilities [N, vocab] as stored (not renormalized)."""
    c = torch.from_numpy(np.asarray(codes).astype(np.float32))
    top = torch.from_numpy(np.array(top_logprobs, dtype=np.float32))[:, None]
    return c.sub_(_CODE_MAX).mul_(STEP_NATS).add_(top)


def _log_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """[N] float64 log sum exp of each row, accumulated in float64."""
    return torch.log(logprobs.exp().sum(dim=-1, dtype=torch.float64))


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> np.ndarray:
    """sum_i p_i (log p_i - log q_i) per row of float64 log-probabilities; p_i = 0 adds 0."""
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
    a = dequantize_rows(ref["codes"], ref["top_logprobs"])  # [N, vocab]
    b = logprobs.float().cpu()
    ea = a.exp()
    mass_a = ea.sum(dim=-1, dtype=torch.float64)
    cross = ea.mul_(a.sub_(b)).sum(dim=-1, dtype=torch.float64)  # sum e^a (a - b)
    kld = (cross / mass_a - torch.log(mass_a) + _log_mass(b)).numpy()
    same = (b.argmax(dim=-1).numpy() == ref["top_ids"]).astype(np.int8)
    return kld, same


@dataclass
class ListedRows:
    """Positions known only by the tokens a server listed (OpenAI logprobs)."""

    target_logprobs: np.ndarray  # [N] float32, exact
    ids: np.ndarray  # [N, M] int64 listed token ids, most likely first; -1: padding / id unknown
    logprobs: np.ndarray  # [N, M] float32; -inf where ids is -1
    top_ids: np.ndarray  # [N] most likely listed token; -1 when its id is unknown


def kl_against_listed(ref: dict[str, np.ndarray], cand: ListedRows) -> tuple[np.ndarray, np.ndarray]:
    """KL over the partition {each token the candidate listed, everything else}.

    By the log-sum inequality this never exceeds the full KL: it misses how differently the
    two spread the mass the candidate did not list.

    Returns:
        kld [N]; same_top [N] int8 (-1 where the candidate's top token id is unknown).
    """
    a = dequantize_rows(ref["codes"], ref["top_logprobs"])  # [N, vocab]
    ea = a.exp()
    mass = ea.sum(dim=-1, dtype=torch.float64)  # renormalizes the stored row
    known = torch.from_numpy(cand.ids >= 0)  # listed ids are distinct within a row
    ids = torch.from_numpy(cand.ids).clamp(min=0)  # unknown entries are masked below
    p_listed = (a.gather(1, ids).double() - torch.log(mass)[:, None]).masked_fill(~known, float("-inf"))  # [N, M]
    q_listed = torch.from_numpy(cand.logprobs.astype(np.float64)).masked_fill(~known, float("-inf"))
    # The same float32 terms summed in float64 twice: their difference is the rest's mass
    # to float64 precision, with no 1 - x cancellation of float32 sums.
    listed_mass = (ea.gather(1, ids).double() * known).sum(dim=-1)
    p_rest = torch.log((mass - listed_mass).clamp(min=1e-300) / mass)
    q_in = q_listed.exp().sum(dim=-1)
    q_rest = torch.log((1.0 - q_in).clamp(min=1e-30))
    kld = _kl(torch.cat([p_listed, p_rest[:, None]], 1), torch.cat([q_listed, q_rest[:, None]], 1))
    same = np.where(cand.top_ids < 0, -1, cand.top_ids == ref["top_ids"]).astype(np.int8)
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
