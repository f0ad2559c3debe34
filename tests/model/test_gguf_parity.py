"""Parity on the real model: SmolLM2-135M-Instruct (Q4_1 GGUF) in tokenmill float32 against
transformers loading the same file dequantized to float32. tokenmill dequantizes it too
(quantization="none"); the native path, which multiplies the blocks against int8
activations as llama.cpp does, is measured against this one in test_native_quantized.py.

Greedy continuations of 20 varied prompts x 64 tokens must be token-identical, and every
position's top-5 logprobs within 1e-4 -- with the default engine, and with chunked prefill,
prefix caching and preemption all forced on. The real file must be installed: these tests
fail (never skip) without it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from gguf_factory import real_model_path

from tokenmill import LLM, SamplingParams
from tokenmill.model.gguf.reader import GGUFFile
from tokenmill.tokenizer import Tokenizer

NUM_NEW_TOKENS = 64
TOP_K = 5

CHAT_QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Write a Python function that reverses a string.",
    "List three primary colors.",
    "Explain gravity to a five-year-old.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Give me a short poem about the sea.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I make a cup of tea?",
    "What are the benefits of regular exercise?",
    "Name a famous scientist and one discovery they made.",
    "Write a SQL query that counts the rows of a table named users.",
]
COMPLETIONS = [
    "Once upon a time, in a small village by the mountains,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "1, 2, 3, 5, 8, 13,",
    "The three laws of thermodynamics are",
    "Paris, Berlin, Madrid, Rome and",
    "Q: Why is the sky blue?\nA:",
    "<html>\n<head>\n  <title>",
    "Les fruits que je préfère sont",
]


@pytest.fixture(scope="session")
def real_model() -> str:
    return real_model_path()


@pytest.fixture(scope="session")
def prompts(real_model) -> list[list[int]]:
    tok = Tokenizer.load(real_model)
    chats = [tok.encode_chat([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
    return chats + [tok.encode(t) for t in COMPLETIONS]


@pytest.fixture(scope="session")
def reference(real_model, prompts):
    """transformers' greedy tokens and per-position log-probs, all prompts in one batch.

    Returns (tokens [N][64], logprobs [N, 64, vocab]). transformers' own generate() runs
    with left padding; eos is disabled (not suppressed) so every row runs 64 steps of plain
    argmax, like tokenmill with ignore_eos.
    """
    from transformers import AutoModelForCausalLM

    path = Path(real_model)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    pad = 2
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    # One thread: on a machine shared with other busy processes, OpenMP's spin-waiting
    # made transformers' small matmuls ~10x slower with two.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NUM_NEW_TOKENS,
                                 pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    finally:
        torch.set_num_threads(threads)
    tokens = out.sequences[:, width:].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # [N, 64, vocab]
    return tokens, logprobs


def run_tokenmill(real_model, prompts, **engine_args):
    llm = LLM(real_model, dtype="float32", quantization="none", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return llm, outs


def assert_matches_reference(outs, reference) -> None:
    ref_tokens, ref_logprobs = reference
    mismatched = [i for i, (o, ref) in enumerate(zip(outs, ref_tokens)) if o.outputs[0].token_ids != ref]
    assert not mismatched, f"greedy tokens differ from transformers for prompts {mismatched}"
    worst = 0.0
    for i, out in enumerate(outs):
        for pos, position_logprobs in enumerate(out.outputs[0].logprobs):
            ref = ref_logprobs[i, pos]
            top = torch.topk(ref, TOP_K)
            assert set(top.indices.tolist()) <= set(position_logprobs), (i, pos)
            for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
                worst = max(worst, abs(position_logprobs[token_id].logprob - value))
    assert worst < 1e-4, f"largest top-{TOP_K} logprob difference {worst:.2e}"


def test_loads_in_a_few_seconds(real_model):
    """Reading and dequantizing every tensor of the 98 MB file (the rest of a load is the
    engine's, the same for any checkpoint)."""
    from tokenmill.model.gguf.config import model_config_from_gguf
    from tokenmill.model.gguf.weights import iter_gguf_weights

    start = time.perf_counter()
    f = GGUFFile(real_model)
    cfg = model_config_from_gguf(f)
    num_values = sum(w.numel() for _, w in iter_gguf_weights(f, cfg))
    elapsed = time.perf_counter() - start
    assert num_values == 134_515_008
    assert elapsed < 10.0, f"reading + dequantizing took {elapsed:.1f} s"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0


def test_real_tensors_dequantize_bit_exact(real_model):
    """Every Q4_1 / Q8_0 / F32 tensor of the real file against gguf-py's reference."""
    import gguf
    import numpy as np

    from tokenmill.model.gguf.dequant import dequantize

    ours = GGUFFile(real_model)
    seen = set()
    for t in gguf.GGUFReader(real_model).tensors:
        info = ours.tensors[t.name]
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(info.shape)
        got = dequantize(ours.raw_blocks(t.name), info.ggml_type, info.shape)
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32)), t.name
        seen.add(t.tensor_type.name)
    assert seen == {"F32", "Q4_1", "Q8_0"}


def test_greedy_and_logprobs_match_transformers(real_model, prompts, reference, kernel_path):
    _, outs = run_tokenmill(real_model, prompts)
    assert_matches_reference(outs, reference)


def test_chunked_prefill_prefix_caching_and_preemption_match(real_model, prompts, reference):
    """16 tokens a step (the 14 prompts longer than that are prefilled in chunks, chunks of
    several requests share a step), blocks of 16 shared through the chat prompts' common
    system prefix, and too few blocks for all 20 requests at once (the newest are preempted
    and recomputed)."""
    llm, outs = run_tokenmill(real_model, prompts, max_num_batched_tokens=16, block_size=16, num_kv_blocks=40,
                              enable_prefix_caching=True, max_model_len=256)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert sum(len(p) > 16 for p in prompts) == 14
    assert_matches_reference(outs, reference)


def test_chat_answer(real_model):
    """The README's example: a greedy answer to a one-word question."""
    llm = LLM(real_model, dtype="float32")
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                   SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"  # on <|im_end|>
