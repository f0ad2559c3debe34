"""The quality lab's pure parts: protocol, stored distributions and their error, KL over
listed tokens, server response parsing, statistics and verdicts. No model needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenmill.bench.quality.distributions import (
    SPAN_NATS,
    STEP_NATS,
    ListedRows,
    LogitsFile,
    LogitsWriter,
    dequantize_rows,
    kl_against_full,
    kl_against_listed,
    quantize_rows,
)
from tokenmill.bench.quality.protocol import Protocol, make_windows
from tokenmill.bench.quality.server import parse_window
from tokenmill.bench.quality.summary import perplexity_stats
from tokenmill.bench.quality.verdict import OK, REGRESSION, compare_quality, has_regression
from tokenmill.bench.schema import RunRecord
from tokenmill.bench.stats import bootstrap_ci


def exact_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> np.ndarray:
    """KL(P || Q) in float64, each row renormalized (float32 rows sum to 1 within ~1e-7)."""
    p, q = (x.double() - torch.logsumexp(x.double(), -1, keepdim=True) for x in (p_log, q_log))
    return torch.where(torch.isneginf(p), 0.0, p.exp() * (p - q)).sum(-1).numpy()


def rows(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vocab, generator=g) * scale, dim=-1)  # [n, vocab]


# ---- protocol ------------------------------------------------------------------------------


def test_windows_are_non_overlapping_with_bos_first_and_second_half_scored():
    tokens = list(range(100, 135))  # 35 tokens: 4 windows of 8, 3 left over
    w = make_windows(tokens, Protocol(ctx_size=8), bos_token_id=1)
    assert w.num_chunks == 4
    assert w.token_ids[1].tolist() == [1, *range(109, 116)]  # window 1 = tokens 8..15, BOS at 0
    assert w.protocol.first_scored_position == 4 and w.protocol.num_scored_per_chunk == 3
    assert w.targets[1].tolist() == [113, 114, 115]  # predicted by positions 4, 5, 6
    assert w.num_scored == 12
    bounded = make_windows(tokens, Protocol(ctx_size=8, num_chunks=2), bos_token_id=None)
    assert bounded.num_chunks == 2 and bounded.token_ids[1, 0] == 108  # no BOS substituted
    assert bounded.fingerprint != w.fingerprint
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(tokens[:7], Protocol(ctx_size=8), None)


# ---- stored distributions ------------------------------------------------------------------


def test_quantized_rows_stay_within_half_a_step_and_floor_only_the_far_tail():
    lp = rows(64, 3000, seed=0, scale=4.0)
    q = quantize_rows(lp.clone())
    assert (q["top_ids"] == lp.argmax(-1).numpy()).all()
    back = dequantize_rows(q["codes"], q["top_logprobs"])
    below = lp.max(-1, keepdim=True).values - lp
    far = below > SPAN_NATS
    assert far.any() and (q["codes"][far.numpy()] == 0).all()
    assert torch.allclose(back[far], (lp.max(-1, keepdim=True).values - SPAN_NATS).expand_as(lp)[far], atol=1e-5)
    assert float((back - lp)[~far].abs().max()) <= STEP_NATS / 2 + 1e-5  # + float32 rounding
    kld = exact_kl(back, lp)
    assert 0 <= kld.max() < 1e-7  # about STEP^2 / 24 = 6e-9


def test_kl_against_stored_reference_matches_exact_kl(tmp_path):
    ref, cand = rows(40, 500, seed=1), rows(40, 500, seed=2)
    cand = torch.log_softmax(ref + 0.05 * cand, dim=-1)  # a close candidate, like bf16 vs f32
    writer = LogitsWriter(tmp_path / "ref", 40, 500)
    writer.write(0, ref, np.zeros(40, np.float32))
    writer.close({"protocol": {}})
    stored = LogitsFile.load(tmp_path / "ref")
    kld, same = kl_against_full(stored.rows(0, 40), cand)
    exact = exact_kl(ref, cand)
    # First order, the rounding (at most STEP/2 per value) moves KL by at most
    # STEP * E_P|log p/q| per position, with zero mean: it averages out over positions.
    p = ref.double().exp()
    bound = STEP_NATS * (p * (ref.double() - cand.double()).abs()).sum(-1).numpy() + 1e-8
    assert (np.abs(kld - exact) <= bound).all()
    assert abs(kld.mean() - exact.mean()) < 0.1 * bound.mean()
    assert (same == (ref.argmax(-1) == cand.argmax(-1)).numpy()).all()
    self_kld, self_same = kl_against_full(stored.rows(0, 40), ref)
    assert np.abs(self_kld).max() < 1e-7 and (self_same == 1).all()


def test_kl_over_listed_tokens_is_a_lower_bound_and_exact_when_all_are_listed():
    ref, cand = rows(16, 200, seed=3), rows(16, 200, seed=4, scale=2.0)
    stored = {**quantize_rows(ref), "target_logprobs": np.zeros(16, np.float32)}
    exact = exact_kl(ref, cand)
    rounding = STEP_NATS * (ref.double().exp() * (ref - cand).double().abs()).sum(-1).numpy() + 1e-8
    for num_listed in (200, 20, 1):
        values, ids = cand.topk(num_listed, dim=-1)
        listed = ListedRows(np.zeros(16, np.float32), ids.numpy(), values.numpy(), ids[:, 0].numpy())
        kld, same = kl_against_listed(stored, listed)
        assert (kld <= exact + rounding).all() and (kld >= -1e-9).all()
        if num_listed == 200:
            assert (np.abs(kld - exact) <= rounding).all()
        else:
            assert (kld < exact - rounding).all()  # a real under-estimate, not rounding
        assert (same == (ref.argmax(-1) == cand.argmax(-1)).numpy()).all()


def test_kl_over_listed_tokens_ignores_tokens_whose_id_is_unknown():
    ref = rows(4, 50, seed=5)
    stored = quantize_rows(ref)
    values, ids = ref.topk(5, dim=-1)
    ids = ids.clone()
    ids[:, 0] = -1  # the top token's text was ambiguous
    listed = ListedRows(np.zeros(4, np.float32), ids.numpy(), values.numpy(), ids[:, 0].numpy())
    kld, same = kl_against_listed(stored, listed)
    assert np.abs(kld).max() < 1e-6  # same distribution: still no divergence
    assert (same == -1).all()  # top-1 agreement cannot be judged


# ---- a server's logprobs -------------------------------------------------------------------


class FakeTokenizer:
    texts = {0: "<s>", 1: "a", 2: "b", 3: "\ufffd", 4: "\ufffd", 5: "c"}

    def decode_token(self, token_id: int) -> str:
        return self.texts[token_id]


def test_parse_window_maps_texts_to_ids_and_keeps_the_target_of_an_ambiguous_text():
    window = np.array([0, 1, 3, 2])  # ctx 4: scored positions 2 (predicts id 2)... first = 2
    text_index = {"<s>": 0, "a": 1, "b": 2, "\ufffd": -1, "c": 5}
    logprobs = {
        "token_logprobs": [None, -1.0, -2.0, -0.5],
        "top_logprobs": [None, {"a": -1.0}, {"\ufffd": -2.0, "a": -0.3},
                         {"b": -0.5, "token_id:5": -1.5, "\ufffd": -2.5}],
    }
    parsed = parse_window(logprobs, window, first=2, text_index=text_index, target_texts=["b"])
    assert parsed.target_logprobs.tolist() == [-0.5]
    assert parsed.ids.tolist() == [[2, 5, -1]] and parsed.top_ids.tolist() == [2]
    assert parsed.logprobs[0, 2] == -np.inf  # the ambiguous text counts as "everything else"
    with pytest.raises(RuntimeError, match="echo"):
        parse_window({"token_logprobs": [None, -1.0]}, window, 2, text_index, ["b"])


# ---- statistics ----------------------------------------------------------------------------


def test_perplexity_and_its_standard_error_as_llama_perplexity():
    nll = np.array([1.0, 2.0, 3.0, 2.5])
    st = perplexity_stats(nll)
    mean = nll.mean()
    se = math.sqrt(((nll**2).mean() - mean**2) / (len(nll) - 1))
    assert st.ppl == pytest.approx(math.exp(mean)) and st.ppl_se == pytest.approx(math.exp(mean) * se)


def test_bootstrap_interval_covers_the_mean_and_keeps_pairs():
    x = np.random.default_rng(0).normal(5.0, 1.0, 200)
    low, high = bootstrap_ci((x,), lambda a: a.mean(axis=-1))
    assert low < 5.0 < high and high - low == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.25)
    # Paired columns that differ by a constant: the difference has no spread at all.
    assert bootstrap_ci((x, x + 0.1), lambda a, b: (b - a).mean(axis=-1)) == pytest.approx((0.1, 0.1))


# ---- verdicts ------------------------------------------------------------------------------


def quality_run(run_id: int, chunk_nll: list[float], fingerprint: str = "f", **summary) -> RunRecord:
    return RunRecord(kind="quality", model="m", workload={"protocol": {"fingerprint": fingerprint}},
                     summary={"chunk_mean_nll": chunk_nll, **summary}, hardware={}, software={}, id=run_id)


def test_verdict_flags_a_real_ppl_increase_and_passes_noise():
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.3, 40).tolist()
    same = quality_run(2, [v + d for v, d in zip(base, rng.normal(0, 1e-4, 40))])
    worse = quality_run(3, [v + 0.03 + d for v, d in zip(base, rng.normal(0, 0.005, 40))])  # PPL +3%
    b = quality_run(1, base)
    assert [c.verdict for c in compare_quality(b, same)] == [OK]
    checks = compare_quality(b, worse, max_ppl_increase=0.01)
    assert checks[0].verdict == REGRESSION and has_regression(checks)
    assert checks[0].ci_low > 1.0 and checks[0].value == pytest.approx(math.exp(0.03), rel=5e-3)
    assert not has_regression(compare_quality(b, worse, max_ppl_increase=0.05))  # within the limit
    with pytest.raises(ValueError, match="different token windows"):
        compare_quality(b, quality_run(4, base, fingerprint="g"))


def test_verdict_judges_kld_only_against_the_run_that_saved_the_reference():
    base = quality_run(1, [3.0] * 10, logits_id="abc")
    kld = {"chunk_mean_kld": [2e-4] * 10, "chunk_same_top": [95] * 10, "chunk_top_judged": [100] * 10}
    new = quality_run(2, [3.0] * 10, reference={"id": "abc"}, **kld)
    checks = {c.metric: c for c in compare_quality(base, new, max_kld=1e-4, min_same_top=0.99)}
    assert checks["mean_kld"].verdict == REGRESSION and checks["same_top"].verdict == REGRESSION
    assert checks["same_top"].value == pytest.approx(0.95)
    other = quality_run(3, [3.0] * 10, reference={"id": "zzz"}, **kld)
    assert [c.metric for c in compare_quality(base, other, max_kld=1e-4)] == ["ppl_ratio"]
