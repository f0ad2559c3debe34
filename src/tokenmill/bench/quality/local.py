"""Score windows with the tokenmill engine, or with Hugging Face transformers as a reference.

The engine path is the real one: every window is an ordinary request (max_tokens=0,
prompt_logprobs=0) through the scheduler, chunked prefill, the KV cache and the same
kernels as served traffic. Only the full log-softmax rows are tapped, inside the runner
(ModelRunner.prompt_logprobs_sink), because the request outputs carry top-k lists, not
vocabulary-sized rows. Windows run concurrently as the scheduler batches them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenmill.bench.quality.protocol import Windows
from tokenmill.bench.quality.scoring import Accumulator

ChunkDone = Callable[[int], None]  # called with a window's index when it is fully scored


def score_with_engine(llm: Any, windows: Windows, acc: Accumulator, on_chunk: ChunkDone) -> None:
    """Run every window through an `LLM`'s engine.

    Args:
        llm: a tokenmill.LLM (its EngineCore is driven directly; its output processor is
            not needed since nothing is generated).
        windows: the windows to score.
        acc: receives the rows.
        on_chunk: progress callback.
    """
    from tokenmill.engine.request import EngineCoreRequest
    from tokenmill.sampling_params import SamplingParams

    core = llm.engine
    runner = core.runner
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0.0)
    chunk_of = {f"ppl-{i}": i for i in range(windows.num_chunks)}

    def sink(request_id: str, first_position: int, logprobs: torch.Tensor) -> None:
        chunk = chunk_of.get(request_id)
        if chunk is not None and acc.add_full(chunk, first_position, logprobs):
            on_chunk(chunk)

    requests = [(rid, windows.token_ids[i].tolist()) for rid, i in chunk_of.items()]
    for _, token_ids in requests:
        core.validate_prompt(token_ids)
    runner.prompt_logprobs_sink = sink
    try:
        for rid, token_ids in requests:
            core.add_request(EngineCoreRequest(rid, token_ids, params))
        while core.has_unfinished_requests():
            core.step()
    finally:
        runner.prompt_logprobs_sink = None
        if core.has_unfinished_requests():  # interrupted: leave the engine empty
            core.abort_requests(list(chunk_of))


def _hf_dtype(name: str) -> torch.dtype:
    table = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {list(table)}, got {name!r}")
    return table[name]


def load_transformers_model(model_path: str, dtype: str, show_progress: bool = True) -> Any:
    """transformers' model for a checkpoint folder, or a .gguf file (dequantized)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        raise RuntimeError("--backend hf needs transformers: pip install -e '.[dev]'") from exc
    if not show_progress:  # --no-progress covers transformers' loading bars too
        transformers.utils.logging.disable_progress_bar()
    path = Path(model_path)
    kwargs: dict[str, Any] = {"dtype": _hf_dtype(dtype)}
    if path.suffix == ".gguf":
        kwargs["gguf_file"] = path.name
        path = path.parent
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.eval()


def score_with_transformers(model: Any, windows: Windows, acc: Accumulator, on_chunk: ChunkDone) -> None:
    """One forward pass per window (batch of one, no padding, no cache)."""
    first = windows.protocol.first_scored_position
    last = windows.protocol.ctx_size - 1
    for i in range(windows.num_chunks):
        ids = torch.from_numpy(windows.token_ids[i: i + 1])  # [1, ctx_size]
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, first:last].float()  # [num_scored, vocab]
            acc.add_full(i, first, torch.log_softmax(logits, dim=-1))
        on_chunk(i)
