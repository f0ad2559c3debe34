"""decode_layers (a decode step's layers in one kernel call) against the Python modules it
replaces, on the real model: the same kernels in the same order, so the same bits."""

from __future__ import annotations

import pytest
from gguf_factory import real_model_path

from tokenmill import LLM, SamplingParams
from tokenmill.model.decode_layers import DecodeLayers

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,", "Hello", "Rivers"]


@pytest.mark.usefixtures("requires_cpu_kernels")
def test_decode_steps_in_one_call_equal_the_modules_bit_for_bit(monkeypatch):
    llm = LLM(model=real_model_path(), max_model_len=256, max_num_seqs=8)
    model = llm.engine.runner.model
    assert model.decode_layers is not None  # Q4_1 / Q8_0 projections, float32: the path applies
    calls = []
    fused_call = DecodeLayers.__call__
    monkeypatch.setattr(DecodeLayers, "__call__", lambda self, *a: calls.append(a[0].shape[0]) or fused_call(self, *a))
    # Six requests: decode batches of 6 (a tile of 4 tokens and two single ones), then fewer
    # as the lengths end; logprobs compare the hidden states' bits, not just the argmax.
    params = [SamplingParams(max_tokens=8 + 4 * i, temperature=0.0, logprobs=3, ignore_eos=True) for i in range(6)]

    def run():
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, params)]

    fused = run()
    assert 6 in calls and 1 in calls
    model.decode_layers = None
    calls.clear()
    modules = run()
    assert not calls
    assert fused == modules


def test_the_path_declines_what_it_does_not_cover(checkpoint_factory):
    """A float32 checkpoint (oneDNN-packed weights, no stored parts) and a Qwen3 one (q/k
    norms) keep the module path."""
    for arch in ("llama", "qwen3"):
        llm = LLM(model=str(checkpoint_factory(arch)), max_model_len=64)
        assert llm.engine.runner.model.decode_layers is None
