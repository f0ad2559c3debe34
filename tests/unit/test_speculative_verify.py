"""Speculative decoding's pieces: verification follows the target's distribution exactly
(chi-square over many samples on a small vocabulary), prompt lookup, the adaptive
proposal length, and the scheduler's room for proposals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from tokenmill.config import SchedulerConfig, SpeculativeConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import EngineCoreRequest, Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import ModelRunnerOutput
from tokenmill.model.layers.sampler import SamplingState
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.ngram import propose_ngram
from tokenmill.spec_decode.policy import AcceptanceEstimate, SpecPolicy
from tokenmill.spec_decode.rejection import SpecGroup, verify

VOCAB = 6
K = 2  # proposals per request
NUM_REQUESTS = 12_000


def _target_logits(prev: int) -> torch.Tensor:
    """A fixed Markov chain over 6 tokens: the target's logits for the token after `prev`."""
    g = torch.Generator().manual_seed(100 + prev)
    return torch.randn(VOCAB, generator=g) * 1.5


def _expected(prev: int, params: SamplingParams) -> np.ndarray:
    """The distribution the target samples the next token from, computed independently:
    temperature, then top-k, then top-p on what is left."""
    p = torch.softmax(_target_logits(prev).double() / params.temperature, dim=-1).numpy()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(VOCAB, dtype=bool)
    k = params.top_k if params.top_k > 0 else VOCAB
    cum = 0.0
    for rank, tok in enumerate(order[:k]):
        kept_mass = p[order[:k]].sum()
        if rank > 0 and cum >= params.top_p * kept_mass - 1e-12:
            break
        keep[tok] = True
        cum += p[tok]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _verify_many(params: SamplingParams, draft: str) -> list:
    """NUM_REQUESTS requests, all verified in one call. Every request starts after token 0
    and has K proposals drawn from a draft distribution unlike the target's, or a fixed
    guess (a point mass, as ngram's)."""
    gen = torch.Generator().manual_seed(1)
    logits_rows, states, groups = [], [], []
    for _ in range(NUM_REQUESTS):
        prev, drafts, probs = 0, [], []
        for _ in range(K):
            if draft == "model":
                q = torch.softmax(torch.randn(VOCAB, generator=gen), dim=-1)  # a poor draft
                token = int(torch.multinomial(q, 1, generator=gen))
                probs.append(q)
            else:
                token = (prev + 1) % VOCAB
            drafts.append(token)
            prev = token
        groups.append(SpecGroup(len(states), drafts, torch.stack(probs) if probs else None))
        context = [0] + drafts
        for j in range(K + 1):
            logits_rows.append(_target_logits(context[j]))
            states.append(SamplingState(params, None, [0], drafts[:j]))
    out = verify(torch.stack(logits_rows), states, groups)
    assert all(1 <= len(v.token_ids) <= K + 1 for v in out)
    return out


@pytest.mark.parametrize("draft", ["model", "ngram"])
@pytest.mark.parametrize("settings", [
    {"temperature": 1.0},
    {"temperature": 0.6},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 1.0, "top_k": 3},
])
def test_sampled_outputs_follow_the_target_distribution(draft, settings):
    params = SamplingParams(**settings)
    torch.manual_seed(0)
    out = _verify_many(params, draft)
    # The first token over all requests: p(. | 0).
    first = np.bincount([v.token_ids[0] for v in out], minlength=VOCAB)
    expected_first = _expected(0, params) * NUM_REQUESTS
    support = expected_first > 0
    assert first[~support].sum() == 0
    assert chisquare(first[support], expected_first[support]).pvalue > 1e-3
    # The second token given the first, over the requests whose step yielded one (a step
    # that stops at a resampled token leaves the next token to the next step).
    for a in range(VOCAB):
        seconds = [v.token_ids[1] for v in out if v.token_ids[0] == a and len(v.token_ids) > 1]
        if len(seconds) < 500:
            continue
        counts = np.bincount(seconds, minlength=VOCAB)
        expected = _expected(a, params) * len(seconds)
        ok = expected > 0
        assert counts[~ok].sum() == 0
        assert chisquare(counts[ok], expected[ok]).pvalue > 1e-3


def test_greedy_keeps_the_longest_agreeing_prefix_then_the_targets_token():
    params = SamplingParams(temperature=0)
    logits = torch.full((4, 5), -5.0)
    logits[0, 2] = logits[1, 3] = logits[2, 0] = logits[3, 4] = 5.0  # argmaxes 2, 3, 0, 4
    states = [SamplingState(params, None, [1], []) for _ in range(4)]
    [out] = verify(logits.clone(), states, [SpecGroup(0, [2, 3, 1])])
    assert out.token_ids == [2, 3, 0]  # third proposal refused: the target's argmax instead
    [out] = verify(logits.clone(), states, [SpecGroup(0, [2, 3, 0])])
    assert out.token_ids == [2, 3, 0, 4]  # all kept, plus the token after them


def test_a_proposal_the_target_never_samples_is_always_rejected():
    params = SamplingParams(temperature=1.0, top_k=1)
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    states = [SamplingState(params, None, [0], []), SamplingState(params, None, [0], [0])]
    for _ in range(50):
        [out] = verify(logits.clone(), states, [SpecGroup(0, [0])])
        assert out.token_ids == [1]


def test_ngram_proposes_what_followed_the_most_recent_longest_match():
    tokens = [5, 6, 7, 8, 1, 5, 6, 7, 9, 2, 3, 6, 7]
    # Suffix [6, 7] last occurred before at index 5..6, followed by 9, 2, 3.
    assert propose_ngram(tokens, 3, 1, 3) == [9, 2, 3]
    # Longest match first: suffix [5, 6, 7] ... is not the tail; [x, 6, 7] with x=3 never occurred.
    assert propose_ngram([1, 2, 3, 1, 2, 3], 2, 2, 3) == [1, 2]
    assert propose_ngram([1, 2, 3, 4], 3, 1, 3) == []
    assert propose_ngram([4, 4, 4, 4], 2, 1, 2) == [4]  # the match may run into the tail
    assert propose_ngram(tokens, 0, 1, 3) == []
    # Token ids whose bytes overlap a boundary are not matched off it.
    assert propose_ngram([256, 1, 0, 0, 1], 2, 1, 1) == [0, 0]


def test_ngram_is_fast_on_long_sequences():
    import time

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, 4096).tolist()
    start = time.perf_counter()
    for _ in range(100):
        propose_ngram(tokens, 4, 1, 3)
    assert (time.perf_counter() - start) / 100 < 2e-3


def test_adaptive_length_follows_acceptance_and_probes_when_off():
    policy = SpecPolicy(SpeculativeConfig(method="ngram", num_speculative_tokens=5, disable_by_batch_size=8))
    estimate = AcceptanceEstimate()
    assert policy.num_proposals(estimate, room=10, num_running=1) == 5
    assert policy.num_proposals(estimate, room=2, num_running=1) == 2
    assert policy.num_proposals(estimate, room=10, num_running=9) == 0  # above the crossover
    for _ in range(10):
        estimate.observe(5, 0)
    proposals = [policy.num_proposals(estimate, room=10, num_running=1) for _ in range(16)]
    assert proposals.count(0) == 14 and proposals.count(1) == 2  # a probe every 8 steps
    for _ in range(10):
        estimate.observe(1, 1)
    assert policy.num_proposals(estimate, room=10, num_running=1) >= 4


def test_a_draft_model_gets_fewer_proposals_when_it_is_slow():
    cfg = SpeculativeConfig(method="draft_model", model="x", num_speculative_tokens=6)
    fast, slow = SpecPolicy(cfg), SpecPolicy(cfg)
    for _ in range(30):
        fast.observe_step_times(0.001, 0.010)
        slow.observe_step_times(0.006, 0.010)
    estimate = AcceptanceEstimate(accepted=0.8, rejected=0.2)
    assert fast.num_proposals(estimate, 10, 1) > slow.num_proposals(estimate, 10, 1) > 0


def _spec_scheduler(num_blocks: int, k: int, max_model_len: int) -> tuple[Scheduler, KVCacheManager]:
    """A scheduler that proposes k tokens wherever there is room (blocks of 4 tokens)."""
    kv = KVCacheManager(num_blocks=num_blocks, block_size=4)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k, adaptive=False, disable_by_batch_size=None)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=max_model_len),
                     kv, spec), kv


def test_scheduler_gives_room_only_where_free_and_rolls_back():
    s, kv = _spec_scheduler(num_blocks=6, k=3, max_model_len=24)
    req = Request(EngineCoreRequest("a", list(range(7)), SamplingParams(max_tokens=10, ignore_eos=True)), 10, 4)
    s.add_request(req)
    out = s.schedule()  # prefill: no room for proposals
    assert out.scheduled[0].num_draft_slots == 0
    s.update_from_output(out, ModelRunnerOutput({"a": [7]}, {}, {}))
    out = s.schedule()
    [sr] = out.scheduled
    assert sr.num_draft_slots == 3 and len(kv.block_ids("a")) == 3  # positions 7..10
    sr.draft_token_ids = [8, 9, 10]
    # The target kept 8, refused 9 and said 11 instead.
    s.update_from_output(out, ModelRunnerOutput({"a": [8, 11]}, {}, {}))
    assert req.output_token_ids == [7, 8, 11] and req.num_computed_tokens == 9
    assert len(kv.block_ids("a")) == 3 and kv.pool.num_free_blocks == 3
    # Room for proposals never preempts: with 1 free block only the plain decode fits.
    kv.pool.allocate(3)
    out = s.schedule()
    assert out.scheduled[0].num_draft_slots == 0 and not out.preempted_req_ids


def test_proposals_stop_at_max_tokens_and_the_context():
    s, kv = _spec_scheduler(num_blocks=20, k=4, max_model_len=40)
    req = Request(EngineCoreRequest("a", list(range(5)), SamplingParams(max_tokens=3, ignore_eos=True)), 3, 4)
    s.add_request(req)
    s.update_from_output(out := s.schedule(), ModelRunnerOutput({"a": [1]}, {}, {}))
    out = s.schedule()
    assert out.scheduled[0].num_draft_slots == 1  # 2 outputs left: 1 proposal + the target's token
    out.scheduled[0].draft_token_ids = [2]
    outputs = s.update_from_output(out, ModelRunnerOutput({"a": [2, 3]}, {}, {}))
    assert outputs[0].new_token_ids == [2, 3] and outputs[0].finish_reason == "length"


def test_speculative_config_from_dict_reads_vllm_keys():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5,
                                       "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 2, 4)
    for bad, match in [({"method": "ngram"}, "num_speculative_tokens"),
                       ({"num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "at least 1"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4}, "prompt_lookup")]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)
    assert list(itertools.islice(iter(cfg.to_dict()), 1)) == ["method"]


def test_a_proposal_the_grammar_refused_is_a_certain_rejection():
    # The draft drew its next proposal from q; the grammar refused it, so the proposal was
    # cut. The position must draw from max(0, p - q), not from p, to stay exact.
    params = SamplingParams(temperature=1.0)
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([[0.1, 0.3, 0.6]])
    logits = torch.log(p)[None].repeat(4000, 1)
    states = [SamplingState(params, None, [0], []) for _ in range(4000)]
    groups = [SpecGroup(i, [], q) for i in range(4000)]
    first = [v.token_ids[0] for v in verify(logits, states, groups)]
    # Overall: q(refused) = 0.6 of draws get here; what they draw must make the whole p.
    # Here every draw was refused, so the residual alone: (0.4, 0.2) / 0.6.
    share = first.count(0) / len(first)
    assert abs(share - 2 / 3) < 0.04 and 2 not in first


def test_logprobs_wider_than_the_vocabulary_are_capped():
    params = SamplingParams(temperature=0, logprobs=50)
    logits = torch.randn(2, VOCAB)
    states = [SamplingState(params, None, [0], []), SamplingState(params, None, [0], [1])]
    [out] = verify(logits, states, [SpecGroup(0, [int(logits[0].argmax())])])
    assert len(out.logprobs) == 2 and len(out.logprobs[0].token_ids) == VOCAB + 1


def test_proposals_never_take_blocks_another_running_request_needs():
    # 5 blocks of 4: two running requests need one more block each to decode; proposals
    # may only use what is left after both.
    s, kv = _spec_scheduler(num_blocks=5, k=3, max_model_len=24)
    for rid, n in (("a", 7), ("b", 8)):
        s.add_request(Request(EngineCoreRequest(rid, [1000 * ord(rid) + i for i in range(n)],
                                                SamplingParams(max_tokens=10, ignore_eos=True)), 10, 4))
    out = s.schedule()
    s.update_from_output(out, ModelRunnerOutput({"a": [1], "b": [2]}, {}, {}))
    out = s.schedule()
    assert not out.preempted_req_ids
    assert [r.request_id for r in out.scheduled] == ["a", "b"]
    # a's proposals would need a third block, which b's own token takes; b's fit in the
    # block its token needs anyway (positions 8..11).
    assert [r.num_draft_slots for r in out.scheduled] == [0, 3] and kv.pool.num_free_blocks == 0


def test_the_draft_trusts_only_the_proposals_the_target_kept():
    from types import SimpleNamespace

    from tokenmill.spec_decode.proposers import DraftModelProposer

    # It computed 5 known positions and wrote proposals 7, 8, 9 after them.
    fake = SimpleNamespace(_written={"a": (5, [7, 8, 9])})
    valid = lambda tokens: DraftModelProposer._num_valid(fake, "a", tokens)  # noqa: E731
    assert valid([0, 1, 2, 3, 4, 7, 8, 9, 10]) == 8  # all kept
    assert valid([0, 1, 2, 3, 4, 7, 5, 9, 10, 11]) == 6  # 8 rejected: 9 at its old place is not trusted
    assert valid([0, 1, 2, 3, 4, 7]) == 6
    assert DraftModelProposer._num_valid(SimpleNamespace(_written={}), "new", [1, 2, 3]) == 0
