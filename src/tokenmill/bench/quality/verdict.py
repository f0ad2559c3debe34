"""`eval compare`: is run NEW's quality worse than run BASE's, beyond what the user accepts?

Both runs must have scored the same windows (same text, tokenizer, --ctx-size, --chunks).
The unit of resampling is the window: tokens within a window are correlated, windows are
close to independent, so a percentile bootstrap over windows (paired: the same windows
drawn for both runs) gives honest intervals where per-token standard errors would be too
narrow.

Checks (each is judged only when its threshold is given):
- PPL ratio NEW/BASE = exp(mean over windows of the NLL difference); regression when the
  increase exceeds --max-ppl-increase and the interval lies above 1.
- mean KL divergence (needs NEW scored with --reference = BASE's --save-logits); regression
  when it exceeds --max-kld and the interval lies above 0.
- same top token (same condition); regression when below --min-same-top and the interval
  lies below 1.
As in `bench compare`: the change must be both beyond the threshold and distinguishable
from no change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tokenmill.bench.schema import RunRecord
from tokenmill.bench.stats import bootstrap_ci

REGRESSION, OK, IMPROVEMENT, NOT_JUDGED = "regression", "ok", "improvement", "not judged"


@dataclass(frozen=True)
class QualityCheck:
    metric: str  # "ppl_ratio" | "mean_kld" | "same_top"
    value: float  # NEW/BASE PPL, or NEW's mean KLD (nats) / same-top fraction against BASE
    ci_low: float
    ci_high: float
    threshold: float | None  # the limit the verdict used: max ratio, max KLD, min fraction
    verdict: str


def _fingerprint(run: RunRecord) -> str | None:
    return (run.workload.get("protocol") or {}).get("fingerprint")


def _reference_of(new: RunRecord, base: RunRecord) -> bool:
    """Was NEW scored against the logits BASE saved?"""
    ref_id = (new.summary.get("reference") or {}).get("id")
    return ref_id is not None and ref_id == base.summary.get("logits_id")


def compare_quality(base: RunRecord, new: RunRecord, max_ppl_increase: float | None = 0.01,
                    max_kld: float | None = None, min_same_top: float | None = None,
                    confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0) -> list[QualityCheck]:
    """Judge NEW against BASE (both quality runs from the history).

    Args:
        max_ppl_increase: largest acceptable relative PPL increase (0.01 = 1%); None: shown only.
        max_kld: largest acceptable mean KL divergence in nats; None: shown only.
        min_same_top: smallest acceptable same-top-token fraction; None: shown only.
        confidence: coverage of the bootstrap intervals.

    Raises:
        ValueError: not quality runs, or they scored different windows.
    """
    for run in (base, new):
        if run.kind != "quality":
            raise ValueError(f"run {run.id} is a {run.kind} run, not a quality run (tokenmill eval)")
    if _fingerprint(base) != _fingerprint(new):
        raise ValueError(f"runs {base.id} and {new.id} scored different token windows (text, tokenizer, "
                         "--ctx-size or --chunks differ): their perplexities are not comparable")
    boot = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    diff = np.asarray(new.summary["chunk_mean_nll"]) - np.asarray(base.summary["chunk_mean_nll"])
    ratio = math.exp(float(diff.mean()))
    low, high = bootstrap_ci((diff,), lambda d: np.exp(d.mean(axis=-1)), **boot)
    if max_ppl_increase is None:
        verdict = NOT_JUDGED
    elif ratio - 1.0 > max_ppl_increase and low > 1.0:
        verdict = REGRESSION
    else:
        verdict = IMPROVEMENT if high < 1.0 else OK
    limit = None if max_ppl_increase is None else 1.0 + max_ppl_increase
    checks = [QualityCheck("ppl_ratio", ratio, low, high, limit, verdict)]
    if not _reference_of(new, base):
        return checks
    kld = np.asarray(new.summary["chunk_mean_kld"])
    low, high = bootstrap_ci((kld,), lambda k: k.mean(axis=-1), **boot)
    mean_kld = float(kld.mean())
    verdict = NOT_JUDGED if max_kld is None else REGRESSION if mean_kld > max_kld and low > 0 else OK
    checks.append(QualityCheck("mean_kld", mean_kld, low, high, max_kld, verdict))
    same = np.asarray(new.summary["chunk_same_top"], dtype=np.float64)
    judged = np.asarray(new.summary["chunk_top_judged"], dtype=np.float64)
    if judged.sum() > 0:
        low, high = bootstrap_ci((same, judged), lambda s, j: s.sum(axis=-1) / np.maximum(j.sum(axis=-1), 1), **boot)
        fraction = float(same.sum() / judged.sum())
        verdict = (NOT_JUDGED if min_same_top is None
                   else REGRESSION if fraction < min_same_top and high < 1.0 else OK)
        checks.append(QualityCheck("same_top", fraction, low, high, min_same_top, verdict))
    return checks


def has_regression(checks: list[QualityCheck]) -> bool:
    return any(c.verdict == REGRESSION for c in checks)
