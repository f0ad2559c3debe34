"""Sampler: masks exact on hand-made distributions, seeded reproducibility, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.model.layers import sampler as sampler_module
from tokenmill.model.layers.sampler import (
    Sampler,
    SamplingState,
    _apply_penalties,
    gather_logprobs,
    make_generator,
)
from tokenmill.sampling_params import SamplingParams

PROBS = [0.5, 0.3, 0.15, 0.05]
NUM_DRAWS = 4000


def _state(params: SamplingParams, prompt=(), output=()) -> SamplingState:
    generator = make_generator(params.seed) if params.seed is not None else None
    return SamplingState(params, generator, list(prompt), list(output))


def _draw_counts(params: SamplingParams, probs=PROBS, num_draws=NUM_DRAWS) -> list[int]:
    """Sample num_draws rows of the same distribution in one batch; count each token."""
    torch.manual_seed(1234)
    logits = torch.tensor(probs).log().repeat(num_draws, 1)  # [num_draws, vocab]
    out = Sampler().sample(logits, [_state(params) for _ in range(num_draws)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(probs)).tolist()


def _assert_frequencies(counts: list[int], expected: list[float]) -> None:
    """Each token's frequency within 5 binomial standard deviations; impossible ones never."""
    n = sum(counts)
    for count, p in zip(counts, expected, strict=True):
        if p == 0:
            assert count == 0
        else:
            sigma = math.sqrt(p * (1 - p) / n)
            assert abs(count / n - p) < 5 * sigma + 1e-9, (counts, expected)


def _renormalised(keep: list[int], probs=PROBS) -> list[float]:
    total = sum(probs[i] for i in keep)
    return [probs[i] / total if i in keep else 0.0 for i in range(len(probs))]


# ---- masks on a hand-made distribution -------------------------------------------------------


def test_plain_sampling_follows_the_distribution(kernel_path):
    _assert_frequencies(_draw_counts(SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize("top_k, keep", [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (4, [0, 1, 2, 3]), (0, [0, 1, 2, 3])])
def test_top_k(top_k, keep):
    _assert_frequencies(_draw_counts(SamplingParams(top_k=top_k)), _renormalised(keep))


@pytest.mark.parametrize("top_p, keep", [(0.3, [0]), (0.45, [0]), (0.7, [0, 1]), (0.9, [0, 1, 2]), (0.97, [0, 1, 2, 3])])
def test_top_p(top_p, keep):
    _assert_frequencies(_draw_counts(SamplingParams(top_p=top_p)), _renormalised(keep))


@pytest.mark.parametrize("min_p, keep", [(0.05, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (0.7, [0])])
def test_min_p(min_p, keep):
    _assert_frequencies(_draw_counts(SamplingParams(min_p=min_p)), _renormalised(keep))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # Among the top 3, token 2 follows 0.8/0.95 = 0.84 of the mass: top_p=0.83 drops it,
    # which it would not on the raw distribution (0.8 before it).
    _assert_frequencies(_draw_counts(SamplingParams(top_k=3, top_p=0.83)), _renormalised([0, 1]))
    _assert_frequencies(_draw_counts(SamplingParams(top_k=3, top_p=0.86)), _renormalised([0, 1, 2]))


def test_temperature_sharpens():
    sharpened = [p**2 for p in PROBS]  # temperature 0.5 squares the probabilities
    expected = [p / sum(sharpened) for p in sharpened]
    _assert_frequencies(_draw_counts(SamplingParams(temperature=0.5)), expected)


def test_rows_with_different_settings_in_one_batch():
    torch.manual_seed(0)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.7), SamplingParams(min_p=0.5), SamplingParams()]
    rows = params * 1000
    logits = torch.tensor(PROBS).log().repeat(len(rows), 1)
    tokens = torch.tensor(Sampler().sample(logits, [_state(p) for p in rows]).token_ids).view(-1, 4)
    assert set(tokens[:, 0].tolist()) == {0}
    assert set(tokens[:, 1].tolist()) == {0, 1}
    assert set(tokens[:, 2].tolist()) == {0, 1}
    assert set(tokens[:, 3].tolist()) == {0, 1, 2, 3}


def test_seeded_draws_follow_the_distribution(kernel_path):
    params = [SamplingParams(seed=s, top_k=3) for s in range(2000)]
    logits = torch.tensor(PROBS).log().repeat(len(params), 1)
    out = Sampler().sample(logits, [_state(p) for p in params])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).tolist()
    _assert_frequencies(counts, _renormalised([0, 1, 2]))


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    expected = logits.argmax(dim=-1).tolist()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_k=5),
        SamplingParams(temperature=0.0, top_p=0.1),  # greedy ignores top_p
        SamplingParams(seed=3, top_p=0.5),
        SamplingParams(temperature=1e-6),  # below the greedy threshold
        SamplingParams(min_p=0.3),
    ]
    out = Sampler().sample(logits.clone(), [_state(p) for p in params])
    assert [out.token_ids[i] for i in (0, 2, 4)] == [expected[i] for i in (0, 2, 4)]
    assert out.logprobs == [None] * 6


def test_all_greedy_fast_path():
    logits = torch.randn(3, 20)
    out = Sampler().sample(logits.clone(), [_state(SamplingParams(temperature=0.0)) for _ in range(3)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert all(isinstance(t, int) for t in out.token_ids)


def test_bfloat16_logits_are_accepted():
    logits = torch.randn(2, 20).to(torch.bfloat16)
    out = Sampler().sample(logits, [_state(SamplingParams(temperature=0.0)), _state(SamplingParams(seed=1))])
    assert out.token_ids[0] == logits.float().argmax(dim=-1)[0].item()


# ---- seeds -----------------------------------------------------------------------------------


def _seeded_run(seed: int, batch: list[SamplingParams], position: int, steps: int = 8) -> list[int]:
    """Sample `steps` tokens for a seeded request placed at `position` among `batch`."""
    torch.manual_seed(99)
    target = _state(SamplingParams(seed=seed, temperature=1.0, top_k=40))
    others = [_state(p) for p in batch]
    row_logits = torch.randn(200)  # the target's logits, the same at every step and in every batch
    tokens = []
    for _ in range(steps):
        states = others[:position] + [target] + others[position:]
        logits = torch.randn(len(states), 200)
        logits[position] = row_logits
        tokens.append(Sampler().sample(logits, states).token_ids[position])
    return tokens


def test_seeded_request_is_independent_of_batch_and_position(kernel_path):
    alone = _seeded_run(7, [], 0)
    mixed = [
        SamplingParams(),  # unseeded: draws from the default generator
        SamplingParams(seed=7),  # same seed, but its own generator
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5, repetition_penalty=1.3),  # forces the sort path
        SamplingParams(seed=1, min_p=0.1, logprobs=2),
    ]
    assert _seeded_run(7, mixed, 0) == alone
    assert _seeded_run(7, mixed, 3) == alone
    assert _seeded_run(7, mixed, 5) == alone
    assert _seeded_run(7, mixed[:2], 1) == alone
    assert len(set(alone)) > 1  # it really samples


def test_same_seed_same_tokens_different_seed_different_tokens(kernel_path):
    assert _seeded_run(11, [], 0) == _seeded_run(11, [], 0)
    runs = {tuple(_seeded_run(s, [], 0, steps=10)) for s in range(5)}
    assert len(runs) == 5


def test_n_children_seeds_give_different_streams():
    parent = SamplingParams(n=3, seed=5)
    children = [parent.clone_for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [5, 6, 7]
    logits = torch.zeros(3, 1000)
    out = Sampler().sample(logits, [_state(c) for c in children])
    assert len(set(out.token_ids)) == 3


# ---- penalties -------------------------------------------------------------------------------


def test_penalties_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # Prompt: token 0 (and 5); output: token 2 twice, token 3 once.
    _apply_penalties(logits, [_state(params, prompt=[0, 5], output=[2, 2, 3])])
    expected = [
        2.0 / 2,  # prompt, positive: divided
        -1.0,  # unseen
        0.5 / 2 - 0.5 * 2 - 0.25,  # output twice: repetition, frequency x2, presence
        -0.5 * 2 - 0.5 * 1 - 0.25,  # output once, negative: multiplied
        1.0,  # unseen
        3.0 / 2,  # prompt only: no frequency/presence
    ]
    assert logits[0].tolist() == pytest.approx(expected)


def test_penalties_only_touch_rows_that_use_them():
    logits = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    states = [
        _state(SamplingParams(), prompt=[0], output=[1, 1]),
        _state(SamplingParams(frequency_penalty=1.0), prompt=[0], output=[1, 1]),
        _state(SamplingParams(presence_penalty=-1.0), prompt=[2], output=[]),
    ]
    _apply_penalties(logits, states)
    assert logits.tolist() == [[1.0, 2.0, 3.0], [1.0, 0.0, 3.0], [1.0, 2.0, 3.0]]


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler().sample(logits.clone(), [_state(greedy)]).token_ids == [0]
    assert Sampler().sample(logits.clone(), [_state(greedy, prompt=[0])]).token_ids == [1]
    assert Sampler().sample(logits.clone(), [_state(greedy, output=[0])]).token_ids == [1]


# ---- min_tokens ------------------------------------------------------------------------------


def test_min_tokens_masks_every_stop_token():
    eos, stop_id = 0, 1
    logits = torch.tensor([[10.0, 9.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])
    params.all_stop_token_ids = {eos, stop_id, 999}  # ids past the vocab are ignored
    assert Sampler().sample(logits.clone(), [_state(params, output=[2])]).token_ids == [2]
    assert Sampler().sample(logits.clone(), [_state(params, output=[2, 2, 3])]).token_ids == [0]
    random = SamplingParams(min_tokens=2)
    random.all_stop_token_ids = {eos}
    torch.manual_seed(0)
    out = Sampler().sample(logits.repeat(200, 1), [_state(random) for _ in range(200)])
    assert eos not in out.token_ids


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    raw = torch.log_softmax(logits, dim=-1)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(seed=4, temperature=0.7, top_k=5, repetition_penalty=1.5, logprobs=0),
        SamplingParams(),  # no logprobs
        SamplingParams(top_p=0.5, logprobs=5),
    ]
    out = Sampler().sample(logits.clone(), [_state(p, prompt=[1, 2]) for p in params])
    assert out.logprobs[2] is None
    for row, k in ((0, 3), (1, 0), (3, 5)):
        lp = out.logprobs[row]
        token = out.token_ids[row]
        assert lp.token_ids[0] == token
        assert len(lp.token_ids) == len(lp.logprobs) == len(lp.ranks) == k + 1
        assert lp.logprobs[0] == pytest.approx(raw[row, token].item(), abs=1e-6)
        assert lp.ranks[0] == int((raw[row] > raw[row, token]).sum()) + 1
        top = raw[row].topk(k)
        assert lp.token_ids[1:] == top.indices.tolist()
        assert lp.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert lp.ranks[1:] == list(range(1, k + 1))
    assert out.logprobs[0].ranks[0] == 1  # greedy picks the most likely token


def test_gather_logprobs_for_prompt_tokens():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), dim=-1)
    out = gather_logprobs(logprobs, torch.tensor([0, 0]), num_top=2)
    assert [o.token_ids for o in out] == [[0, 2, 1], [0, 0, 1]]
    assert [o.ranks for o in out] == [[3, 1, 2], [1, 1, 2]]
    assert out[0].logprobs == pytest.approx([logprobs[0, 0].item(), logprobs[0, 2].item(), logprobs[0, 1].item()])


def test_mismatched_states_are_rejected():
    with pytest.raises(ValueError, match="2 sampling states for 3 rows"):
        Sampler().sample(torch.zeros(3, 5), [_state(SamplingParams())] * 2)


# ---- top-k / top-p masks against a brute-force reference -------------------------------------


def _reference_keep(logits_row: list[float], top_k: int, top_p: float) -> set[int]:
    """Tokens top-k then top-p keep, by the definitions (ties at a cut are kept)."""
    order = sorted(range(len(logits_row)), key=lambda i: -logits_row[i])
    if top_k:
        kth = logits_row[order[top_k - 1]]
        order = [i for i in order if logits_row[i] >= kth]
    if top_p < 1.0:
        top = max(logits_row[i] for i in order)
        weights = [math.exp(logits_row[i] - top) for i in order]
        total, mass, kept = sum(weights), 0.0, []
        for i, w in zip(order, weights, strict=True):
            if mass >= top_p * total:
                break
            kept.append(i)
            mass += w
        last = logits_row[kept[-1]]
        order = [i for i in order if logits_row[i] >= last]
    return set(order)


@pytest.mark.parametrize("vocab_size", [50, 3000])
def test_top_k_top_p_masks_match_the_definition(monkeypatch, vocab_size):
    sampler = sampler_module
    torch.manual_seed(0)
    # Few candidates, so the flat rows need the full-sort fallback and the peaked ones do not.
    monkeypatch.setattr(sampler, "_TOP_P_CANDIDATES", 40)
    settings = [(0, 0.5), (0, 0.9), (0, 0.995), (5, 0.9), (20, 0.3), (7, 1.0), (0, 1.0), (1, 0.99)]
    scale = torch.tensor([0.3, 3.0, 0.3, 3.0, 1.0, 1.0, 1.0, 0.3])[:, None]
    logits = torch.randn(len(settings), vocab_size) * scale
    logits[:, :6] = logits[:, :6].round()  # some ties
    processed = logits.clone()
    top_k = [k for k, _ in settings]
    if any(top_k):
        sampler._apply_top_k(processed, top_k)
    sampler._apply_top_p(processed, [p for _, p in settings])
    for row, (k, p) in enumerate(settings):
        kept = set(torch.nonzero(processed[row] > float("-inf")).flatten().tolist())
        assert kept == _reference_keep(logits[row].tolist(), k, p), (row, k, p)
        assert (processed[row][list(kept)] == logits[row][list(kept)]).all()


def test_top_p_keeps_tokens_tied_at_the_cut():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    sampler_module._apply_top_p(logits, [0.5])  # token 0 holds ~0.45: the cut falls among the ties
    assert (logits[0] > float("-inf")).tolist() == [True, True, True, True, False]


def test_more_logprobs_than_vocab_are_capped():
    out = Sampler().sample(torch.randn(1, 3), [_state(SamplingParams(temperature=0.0, logprobs=10))])
    assert len(out.logprobs[0].token_ids) == 4  # the sampled token + all 3 alternatives
