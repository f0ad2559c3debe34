"""Speculative decoding in the engine: greedy outputs token-identical with it on and off
(ngram and a draft model; chunked prefill, prefix caching, forced preemption, n > 1, stop
strings, logprobs, structured output), seeded runs reproducible, and no KV block leaked
after many mixed requests with aborts."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tokenmill import LLM, SamplingParams
from tokenmill.config import DEMO_MODEL_DIR, create_engine_config
from tokenmill.engine.core import EngineCore
from tokenmill.engine.request import EngineCoreRequest

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
# Speculate at any batch size and always propose all k: the tests want every path taken.
ALWAYS = {"disable_by_batch_size": None, "adaptive": False}

PROMPTS = [
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "ROMEO: But soft, what light",
    "KING HENRY: Once more unto the breach, dear friends, once more; KING HENRY: Once more",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "MENENIUS:",
]


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    """The demo model cut to its first 2 of 6 layers: same vocabulary, a different (worse)
    distribution, so its proposals are sometimes rejected."""
    out = tmp_path_factory.mktemp("draft")
    for f in Path(DEMO_MODEL_DIR).iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((Path(DEMO_MODEL_DIR) / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(Path(DEMO_MODEL_DIR) / "model.safetensors"))
    kept = {k: v for k, v in tensors.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    save_file(kept, str(out / "model.safetensors"))
    return str(out)


def _draft(draft_dir: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": draft_dir, "num_speculative_tokens": k}


def _generate(spec: dict | None, prompts=PROMPTS, params=None, **engine_args):
    engine_args.setdefault("max_model_len", 512)
    llm = LLM(DEMO_MODEL_DIR, speculative_config=spec, **engine_args)
    params = params or SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    return llm, llm.generate(prompts, params, use_tqdm=False)


def _tokens(outputs):
    return [[o.token_ids for o in out.outputs] for out in outputs]


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 24},  # prompts prefilled in chunks, proposals share steps with them
    # Too few blocks for all: preemption mid-output. A preempted request's K/V is recomputed
    # by a prefill, and the reference and the speculative run are preempted at different
    # moments; in bf16 the recomputed K/V differ in the last bits from what decode steps
    # wrote (PyTorch's GEMMs round by batch shape: with TOKENMILL_CPU_KERNELS=0 a near-tie
    # flipped). Token identity across recomputation is a float32 claim.
    {"num_kv_blocks": 14, "block_size": 8, "max_model_len": 112, "dtype": "float32"},
], ids=["plain", "chunked_prefill", "preemption"])
def test_greedy_outputs_identical_with_ngram_and_draft_model(draft_dir, engine_args):
    _, reference = _generate(None, **engine_args)
    for spec in (NGRAM | ALWAYS, _draft(draft_dir) | ALWAYS):
        llm, outputs = _generate(spec, **engine_args)
        assert _tokens(outputs) == _tokens(reference), spec["method"]
        stats = llm.engine.stats()
        assert stats.spec_decode.num_accepted_tokens > 0  # speculation did happen
        assert stats.spec_decode.num_accepted_tokens < stats.spec_decode.num_draft_tokens  # and was rejected too
        if "num_kv_blocks" in engine_args:
            assert stats.num_preemptions > 0
        assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_kv_blocks


def test_prefix_cache_hits_with_a_draft_model(draft_dir):
    # The same prompts twice: the second round's prompts come from the prefix cache; the
    # draft recomputes its own K/V for them (it never trusts what it did not write).
    _, reference = _generate(None)
    llm = LLM(DEMO_MODEL_DIR, speculative_config=_draft(draft_dir) | ALWAYS, max_model_len=512)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    for _ in range(2):
        assert _tokens(llm.generate(PROMPTS, params, use_tqdm=False)) == _tokens(reference)
    assert llm.engine.stats().prefix_cache_hits > 0


def test_n_stop_strings_max_tokens_and_logprobs_match(draft_dir):
    params = SamplingParams(n=2, max_tokens=23, temperature=0, stop=["\n\n"], logprobs=2)
    _, reference = _generate(None, params=params)
    for spec in (NGRAM | ALWAYS, _draft(draft_dir) | ALWAYS):
        _, outputs = _generate(spec, params=params)
        for out, ref in zip(outputs, reference):
            for o, r in zip(out.outputs, ref.outputs):
                assert (o.text, o.finish_reason) == (r.text, r.finish_reason)
                assert len(o.token_ids) <= 23
                # The target's own logprobs, whether a token was proposed or not.
                assert len(o.logprobs) == len(r.logprobs) == len(o.token_ids)
                for a, b in zip(o.logprobs, r.logprobs):
                    assert a.keys() == b.keys()
                    for tok in a:
                        assert a[tok].logprob == pytest.approx(b[tok].logprob, abs=1e-4)


def test_penalties_and_min_tokens_see_the_proposals_before_each_position(draft_dir):
    # Penalised rows depend on every earlier token, proposals included; min_tokens masks
    # eos by the output length at each row.
    params = SamplingParams(max_tokens=40, temperature=0, repetition_penalty=1.3, frequency_penalty=0.4,
                            presence_penalty=0.2, min_tokens=30)
    _, reference = _generate(None, params=params)
    for spec in (NGRAM | ALWAYS, _draft(draft_dir) | ALWAYS):
        _, outputs = _generate(spec, params=params)
        assert _tokens(outputs) == _tokens(reference), spec["method"]


def test_structured_output_under_speculation_is_valid_and_identical():
    regex = r"(ROMEO|JULIET): [a-z ]{5,40}\."
    params = SamplingParams(max_tokens=40, temperature=0, structured_outputs={"regex": regex})
    prompts = ["ROMEO: But soft! ROMEO: But soft! JULIET:", "Who speaks? ROMEO: ROMEO:"]
    _, reference = _generate(None, prompts, params)
    _, outputs = _generate(NGRAM | ALWAYS, prompts, params)
    assert _tokens(outputs) == _tokens(reference)
    import re

    for out in outputs:
        assert re.fullmatch(regex, out.outputs[0].text), out.outputs[0].text


def test_seeded_sampling_is_reproducible_with_speculation(draft_dir):
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, seed=7)
    for spec in (NGRAM | ALWAYS, _draft(draft_dir) | ALWAYS):
        llm = LLM(DEMO_MODEL_DIR, speculative_config=spec, max_model_len=512)
        first = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
        assert first == again and len(first) == 40


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_no_block_leaks_after_1000_mixed_requests_with_aborts(draft_dir, method):
    spec = (NGRAM if method == "ngram" else _draft(draft_dir, k=2)) | ALWAYS
    config = create_engine_config(DEMO_MODEL_DIR, max_model_len=128, num_kv_blocks=48, block_size=8,
                                  max_num_seqs=16, max_num_batched_tokens=96, speculative_config=spec)
    core = EngineCore(config)
    rng = random.Random(0)
    base = [rng.randrange(10, 4000) for _ in range(40)]
    live: set[str] = set()
    finished = 0
    for i in range(1000):
        # Repeats inside the prompt (ngram finds proposals) and shared prefixes (cache hits).
        prompt = base[: rng.randrange(2, 20)] * rng.randrange(1, 3) + [rng.randrange(10, 4000)]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=rng.choice([0.0, 1.0]),
                                seed=rng.choice([None, i]), ignore_eos=rng.random() < 0.5)
        params.all_stop_token_ids = set() if params.ignore_eos else {1, 6}
        core.add_request(EngineCoreRequest(f"r{i}", prompt, params))
        live.add(f"r{i}")
        if rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            core.abort_requests([victim])
            live.discard(victim)
        if i % 4 == 3:
            for out in core.step():
                if out.finish_reason:
                    live.discard(out.request_id)
                    finished += 1
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finish_reason:
                finished += 1
    pool = core.kv.pool
    assert finished > 700
    assert pool.num_free_blocks == core.num_kv_blocks and not any(pool.ref_counts)
    assert core.stats().spec_decode.num_drafts > 50


def test_speculative_config_is_checked():
    with pytest.raises(ValueError, match="method"):
        create_engine_config(DEMO_MODEL_DIR, speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="needs \"model\""):
        create_engine_config(DEMO_MODEL_DIR, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="unknown speculative_config key"):
        create_engine_config(DEMO_MODEL_DIR, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                                  "lookahead": 3})
    with pytest.raises(ValueError, match="vocabulary"):
        from tokenmill.model.default_model import default_model_path

        create_engine_config(DEMO_MODEL_DIR, speculative_config={"method": "draft_model", "num_speculative_tokens": 2,
                                                                  "model": default_model_path()})


def test_rejected_proposals_give_their_blocks_back_at_once(draft_dir):
    # One token per block: every proposal had a block of its own. After each step a
    # request holds exactly the blocks of its computed tokens, as without proposals.
    config = create_engine_config(DEMO_MODEL_DIR, max_model_len=300, num_kv_blocks=600, block_size=1,
                                  speculative_config=_draft(draft_dir, k=4) | ALWAYS)
    core = EngineCore(config)
    for i, prompt in enumerate(PROMPTS[:2]):
        core.add_request(EngineCoreRequest(f"r{i}", list(prompt.encode()), SamplingParams(max_tokens=50, ignore_eos=True)))
    rejected = 0
    while core.has_unfinished_requests():
        core.step()
        for req in core.scheduler.running:
            assert len(core.kv.block_ids(req.request_id)) == req.num_computed_tokens
        spec = core.stats().spec_decode
        rejected = spec.num_draft_tokens - spec.num_accepted_tokens
    assert rejected > 0
    assert core.kv.pool.num_free_blocks == 600
