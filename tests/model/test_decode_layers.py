"""decode_layers (a decode step's layers in one kernel call) against the Python modules it
replaces, on the real model: the same kernels in the same order, so the same bits."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from gguf_factory import real_model_path

from tokenmill import LLM, SamplingParams
from tokenmill.model.decode_layers import DecodeLayers

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,", "Hello", "Rivers"]


@pytest.mark.usefixtures("requires_cpu_kernels")
def test_decode_steps_in_one_call_equal_the_modules_bit_for_bit(monkeypatch):
    # float32 named: "auto" is bfloat16 on CPUs with bf16 instructions, where the path does not apply.
    llm = LLM(model=real_model_path(), max_model_len=256, max_num_seqs=8, dtype="float32")
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


def _mapped_rss_bytes(path: str) -> dict[str, int]:
    """Resident bytes of each of this process's mappings of `path`, by address range
    (/proc/self/smaps)."""
    rss: dict[str, int] = {}
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            mapping = fields[0] if line.endswith(path) else None
        elif mapping is not None and fields[0] == "Rss:":
            rss[mapping] = int(fields[1]) * 1024
    return rss


@pytest.mark.usefixtures("requires_cpu_kernels")
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_the_files_pages_do_not_stay_resident_beside_their_copies():
    """The projections are copied at load (interleaved rows, merged parts); the file's
    pages those copies read are released, so the weights' resident memory stays about the
    file size instead of twice it. Only what is still read (looked-up embedding rows)
    pages back in. Counts only the mappings this load made (other tests' models may still
    be mapped in this process)."""
    path = real_model_path()
    resolved = str(Path(path).resolve())
    # Start from the file out of the page cache: another process that served it for long
    # (a benchmark) can leave it in large folios, which a kernel maps back whole on the
    # first touch (36 MB seen), whatever this load releases.
    fd = os.open(resolved, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = set(_mapped_rss_bytes(resolved))
    llm = LLM(model=path, max_model_len=256)
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))
    gc.collect()  # the tokenizer's read of the file's metadata is done and unmapped
    new = {m: b for m, b in _mapped_rss_bytes(resolved).items() if m not in before}
    assert new, "the model's mapping of the file was not found"
    # Not 0: the looked-up embedding rows page back in, and a kernel that maps the page
    # cache's large folios whole (2 MiB each, seen here) brings their neighbours with them.
    # Without the release all 98 MB stay resident.
    assert sum(new.values()) < 0.25 * Path(path).stat().st_size
