"""compare: a synthetic 20% slowdown is flagged; identical distributions are not."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.compare import (
    IMPROVEMENT,
    NO_CHANGE,
    NOT_TESTED,
    REGRESSION,
    compare_runs,
    has_regression,
    parse_run_group,
)
from tokenmill.bench.schema import RequestSample, RunRecord
from tokenmill.bench.stats import mann_whitney_u, rankdata, welch_t_test


def synthetic_run(seed: int, slowdown: float = 1.0, n: int = 200, out_tps: float = 100.0) -> RunRecord:
    """Requests with lognormal TTFT and per-token gaps, all scaled by `slowdown`."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        ttft = rng.lognormal(np.log(0.2), 0.3) * slowdown
        itl = rng.lognormal(np.log(0.03), 0.2, size=15) * slowdown
        times = np.concatenate([[ttft], ttft + np.cumsum(itl)]).tolist()
        samples.append(RequestSample(i, 0.0, "ok", prompt_tokens=64, output_tokens=16,
                                     token_count_source="usage", chunk_times_s=times, chunk_tokens=[1] * 16))
    summary = {"request_throughput": out_tps / 16, "output_throughput": out_tps, "total_token_throughput": out_tps * 5,
               "goodput": None}
    return RunRecord("serve", "m", {}, summary, {"sku": "x"}, {}, samples=samples, id=seed)


def by_metric(comps):
    return {c.metric: c for c in comps}


def test_twenty_percent_slowdown_is_a_regression():
    comps = by_metric(compare_runs([synthetic_run(1)], [synthetic_run(2, slowdown=1.2)]))
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert comps[m].verdict == REGRESSION, comps[m]
        assert 1.05 < comps[m].ratio < 1.4  # TTFT medians of 200 lognormal draws are noisy
        assert comps[m].p_value < 0.01
    assert comps["output_throughput"].verdict == NOT_TESTED  # one run per side
    assert has_regression(comps.values())


def test_speedup_is_an_improvement():
    comps = by_metric(compare_runs([synthetic_run(1)], [synthetic_run(2, slowdown=0.8)]))
    assert comps["tpot"].verdict == IMPROVEMENT


def test_identical_distributions_are_not_flagged():
    for seed in range(5):
        comps = compare_runs([synthetic_run(10 + seed)], [synthetic_run(20 + seed)])
        assert not has_regression(comps)
        assert all(c.verdict in (NO_CHANGE, NOT_TESTED) for c in comps)


def test_small_but_significant_shift_needs_min_effect():
    comps = by_metric(compare_runs([synthetic_run(1, n=2000)], [synthetic_run(2, slowdown=1.03, n=2000)]))
    assert comps["itl"].p_value < 0.05 and comps["itl"].verdict == NO_CHANGE  # 3% < 5%
    comps = by_metric(compare_runs([synthetic_run(1, n=2000)], [synthetic_run(2, slowdown=1.03, n=2000)],
                                   min_effect=0.02))
    assert comps["itl"].verdict == REGRESSION


def test_groups_of_runs_test_throughput():
    base = [synthetic_run(s, out_tps=t) for s, t in ((1, 100.0), (2, 101.0), (3, 99.0))]
    slow = [synthetic_run(s, slowdown=1.2, out_tps=t) for s, t in ((4, 80.0), (5, 81.0), (6, 79.5))]
    comps = by_metric(compare_runs(base, slow))
    assert comps["output_throughput"].verdict == REGRESSION
    assert comps["ttft"].base_n == 600
    same = [synthetic_run(s, out_tps=t) for s, t in ((7, 100.5), (8, 99.5), (9, 100.2))]
    assert by_metric(compare_runs(base, same))["output_throughput"].verdict == NO_CHANGE


def test_mann_whitney_known_values():
    # Hand-checked: x all below y -> U=0; exact two-sided p = 2/C(6,3) = 0.1.
    r = mann_whitney_u(np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0]))
    assert r.statistic == 0 and r.p_value == pytest.approx(0.1) and r.method == "mwu-exact"
    r = mann_whitney_u(np.array([1.0, 2.0]), np.array([1.0, 2.0]))  # ties -> normal approximation
    assert r.statistic == 2.0 and r.p_value == pytest.approx(1.0) and r.method == "mwu-normal"
    assert rankdata(np.array([10.0, 20.0, 10.0, 30.0])).tolist() == [1.5, 3.0, 1.5, 4.0]


def test_welch_known_value():
    # Two-sample Welch t on (1..5) vs (3..7): t = 2 / sqrt(2.5/5 + 2.5/5) = 2, df = 8,
    # two-sided p = 0.0805 (t-table).
    r = welch_t_test(np.arange(1.0, 6.0), np.arange(3.0, 8.0))
    assert r.statistic == pytest.approx(2.0) and r.p_value == pytest.approx(0.08051, abs=2e-4)


def test_parse_run_group():
    assert parse_run_group("7") == [7]
    assert parse_run_group("3,4,5") == [3, 4, 5] == parse_run_group("3-5")
    with pytest.raises(ValueError):
        parse_run_group("x")


def test_tests_agree_with_scipy_on_random_inputs():
    """docs/bench.md's claim: our numpy tests equal scipy's (a test-only dependency)."""
    import scipy.stats as scipy_stats

    rng = np.random.default_rng(0)
    for i in range(300):
        nx, ny = (int(n) for n in rng.integers(2, 40, size=2))
        x, y = rng.normal(size=nx), rng.normal(0.5, size=ny)
        if i % 2:  # half the cases with ties
            x, y = np.round(x, 1), np.round(y, 1)
        ours = mann_whitney_u(x, y)
        method = "exact" if ours.method == "mwu-exact" else "asymptotic"
        ref = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
        assert ours.statistic == pytest.approx(ref.statistic)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
        ours = welch_t_test(x, y)
        ref = scipy_stats.ttest_ind(x, y, equal_var=False)
        assert ours.statistic == pytest.approx(-ref.statistic)  # ours is new (y) minus base (x)
        assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
