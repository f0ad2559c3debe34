"""The numbers a quality run reports, defined as llama-perplexity defines them.

- PPL = exp(mean NLL) over every scored token; its standard error by the delta method:
  PPL * sqrt(var(NLL) / (N - 1)), var with ddof=0 (tokens treated as independent, which
  understates the error a little: neighbouring tokens are correlated. The verdicts in
  verdict.py bootstrap over whole windows instead).
- Against a reference: PPL ratio = exp(mean(NLL - NLL_ref)), with the standard error of
  mean(NLL - NLL_ref); mean KL divergence with its standard error and percentiles over
  positions; "same top p" = the fraction of positions whose most likely token is the
  reference's, with the binomial standard error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tokenmill.bench.quality.scoring import ScoredPositions

KLD_PERCENTILES = {"max": 100.0, "p99.9": 99.9, "p99": 99.0, "p95": 95.0, "p90": 90.0, "median": 50.0}


def _se(values: np.ndarray) -> float:
    """Standard error of the mean as llama-perplexity computes it: sqrt(var0 / (N - 1))."""
    n = len(values)
    return math.sqrt(float(np.var(values)) / (n - 1)) if n > 1 else float("nan")


@dataclass(frozen=True)
class PerplexityStats:
    ppl: float
    ppl_se: float  # standard error of ppl
    mean_nll: float  # nats per token
    num_tokens: int  # scored tokens


@dataclass(frozen=True)
class DivergenceStats:
    """A run against its reference."""

    ref_ppl: float
    ppl_ratio: float  # PPL / PPL_ref
    ln_ppl_ratio: float  # mean(NLL - NLL_ref)
    ln_ppl_ratio_se: float
    mean_kld: float  # nats
    kld_se: float
    kld_percentiles: dict[str, float]  # "max", "p99.9", "p99", "p95", "p90", "median"
    same_top: float  # fraction 0..1 of judged positions
    same_top_se: float
    num_top_judged: int  # positions where both most likely tokens were known
    num_positions: int


def perplexity_stats(nll: np.ndarray) -> PerplexityStats:
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    return PerplexityStats(ppl, ppl * _se(nll), mean, len(nll))


def divergence_stats(scored: ScoredPositions) -> DivergenceStats:
    """Requires a run scored against a reference (kld, same_top and ref_nll set)."""
    assert scored.kld is not None and scored.same_top is not None and scored.ref_nll is not None
    diff = scored.nll - scored.ref_nll
    judged = scored.same_top[scored.same_top >= 0]
    same = float(np.mean(judged)) if len(judged) else float("nan")
    same_se = math.sqrt(same * (1 - same) / (len(judged) - 1)) if len(judged) > 1 else float("nan")
    kld = scored.kld
    return DivergenceStats(
        ref_ppl=math.exp(float(np.mean(scored.ref_nll))),
        ppl_ratio=math.exp(float(np.mean(diff))),
        ln_ppl_ratio=float(np.mean(diff)),
        ln_ppl_ratio_se=_se(diff),
        mean_kld=float(np.mean(kld)),
        kld_se=_se(kld),
        kld_percentiles={k: float(np.percentile(kld, q)) for k, q in KLD_PERCENTILES.items()},
        same_top=same,
        same_top_se=same_se,
        num_top_judged=len(judged),
        num_positions=len(kld),
    )


def chunk_means(values: np.ndarray, num_chunks: int) -> list[float]:
    """[P] per-position values -> one mean per window (the bootstrap's unit)."""
    return [float(v) for v in values.reshape(num_chunks, -1).mean(axis=1)]


def run_summary(scored: ScoredPositions, num_chunks: int) -> dict[str, Any]:
    """What the history stores about a run: headline numbers plus per-window means, from
    which `eval compare` bootstraps its intervals."""
    summary: dict[str, Any] = {"perplexity": asdict(perplexity_stats(scored.nll)),
                               "chunk_mean_nll": chunk_means(scored.nll, num_chunks)}
    if scored.kld is not None and scored.same_top is not None:
        summary["divergence"] = asdict(divergence_stats(scored))
        summary["chunk_mean_kld"] = chunk_means(scored.kld, num_chunks)
        per_chunk = scored.same_top.reshape(num_chunks, -1)
        summary["chunk_same_top"] = [int(v) for v in (per_chunk == 1).sum(axis=1)]
        summary["chunk_top_judged"] = [int(v) for v in (per_chunk >= 0).sum(axis=1)]
    return summary
