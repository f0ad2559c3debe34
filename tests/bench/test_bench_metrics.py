"""Metric arithmetic on hand-made samples: every number is computed by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmill.bench.metrics import (
    latency_stats,
    meets_slos,
    parse_slos,
    request_itls_s,
    request_tpot_s,
    summarize,
)
from tokenmill.bench.schema import RequestSample


def sample(times, tokens=None, status="ok", prompt=10, out=None, index=0) -> RequestSample:
    tokens = tokens or [1] * len(times)
    return RequestSample(index=index, start_s=0.0, status=status, prompt_tokens=prompt,
                         output_tokens=sum(tokens) if out is None else out,
                         chunk_times_s=list(times), chunk_tokens=list(tokens))


def test_per_request_metrics_one_token_per_chunk():
    s = sample([0.5, 0.6, 0.8, 0.9])  # TTFT 0.5, gaps 0.1 0.2 0.1, E2E 0.9
    assert s.ttft_s == 0.5 and s.e2e_s == 0.9
    assert request_tpot_s(s) == pytest.approx((0.9 - 0.5) / 3)
    assert request_itls_s(s) == pytest.approx([0.1, 0.2, 0.1])


def test_k_token_chunk_counts_as_k_tokens_over_its_gap():
    # chunks: 1 token at 0.2, 3 tokens at 0.5 (gap 0.3), 1 token at 0.6 (gap 0.1)
    s = sample([0.2, 0.5, 0.6], tokens=[1, 3, 1])
    assert request_itls_s(s) == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert request_tpot_s(s) == pytest.approx((0.6 - 0.2) / 4)
    # Mean ITL equals TPOT when the first chunk has one token.
    assert np.mean(request_itls_s(s)) == pytest.approx(request_tpot_s(s))


def test_tokens_in_first_chunk_add_no_itl():
    s = sample([0.2, 0.4], tokens=[2, 1])  # 3 tokens: TPOT = 0.2 / 2, one ITL sample of 0.2
    assert request_itls_s(s) == pytest.approx([0.2])
    assert request_tpot_s(s) == pytest.approx(0.1)


def test_single_token_request_has_no_tpot():
    assert request_tpot_s(sample([0.3])) is None


def test_summary_numbers_and_failed_requests_kept_apart():
    samples = [
        sample([0.1, 0.2, 0.3], prompt=10, index=0),  # ttft .1, e2e .3, tpot .1, itl .1 .1
        sample([0.3, 0.5, 0.7, 0.9], prompt=20, index=1),  # ttft .3, e2e .9, tpot .2, itl .2 x3
        sample([], status="error", prompt=99, out=0, index=2),
        sample([5.0, 9.0], status="incomplete", prompt=99, index=3),  # must not enter latencies
    ]
    s = summarize(samples, duration_s=2.0, percentiles=(50, 90, 99))
    assert (s.num_completed, s.num_failed, s.num_incomplete) == (2, 1, 1)
    assert s.total_input_tokens == 30 and s.total_output_tokens == 7
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.5)
    assert s.total_token_throughput == pytest.approx(18.5)
    assert s.ttft.mean_ms == pytest.approx(200.0) and s.ttft.median_ms == pytest.approx(200.0)
    assert s.ttft.std_ms == pytest.approx(100.0)  # population std of (100, 300)
    assert s.ttft.percentiles_ms["p90"] == pytest.approx(280.0)  # linear interpolation
    assert s.e2el.max_ms == pytest.approx(900.0) and s.e2el.min_ms == pytest.approx(300.0)
    assert s.tpot.mean_ms == pytest.approx(150.0)
    assert s.itl.count == 5 and s.itl.mean_ms == pytest.approx((0.1 * 2 + 0.2 * 3) / 5 * 1000)
    assert s.itl.percentiles_ms["p50"] == pytest.approx(200.0)
    assert s.goodput is None and s.slo_attainment is None


def test_goodput_and_attainment():
    samples = [
        sample([0.1, 0.2, 0.3], index=0),  # ttft 100 ms, tpot 100 ms
        sample([0.3, 0.5, 0.7], index=1),  # ttft 300 ms, tpot 200 ms
        sample([0.05], index=2),  # one token: tpot counts as met (vLLM)
        sample([], status="error", out=0, index=3),
    ]
    slos = {"ttft": 300.0, "tpot": 150.0}
    assert [meets_slos(x, slos) for x in samples] == [True, False, True, False]
    s = summarize(samples, duration_s=4.0, slos_ms=slos)
    assert s.goodput == pytest.approx(2 / 4.0)
    assert s.slo_attainment == pytest.approx(2 / 4)  # failed requests count against attainment
    assert meets_slos(samples[1], {"ttft": 300.0})  # bounds are inclusive


def test_empty_stats_are_zero_with_count_zero():
    st = latency_stats(np.array([]))
    assert st.count == 0 and st.mean_ms == 0.0 and st.percentiles_ms["p99"] == 0.0


def test_parse_slos_forms():
    assert parse_slos("ttft=500,tpot=50") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slos(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slos("e2el=2s ttft=0.25s") == {"e2el": 2000.0, "ttft": 250.0}
    assert parse_slos(None) == {}
    for bad in ("itl=5", "ttft", "ttft=-1", "ttft=abc"):
        with pytest.raises(ValueError):
            parse_slos(bad)
