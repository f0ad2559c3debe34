"""Layer-input statistics of the float model on a calibration text, for AWQ.

The model runs in the engine itself (float32, weights dequantized): forward pre-hooks on
each decoder layer's projections see exactly the activations the served model computes.
Every projection's input comes from the float model, as in AutoAWQ, whose layer-by-layer
pass feeds each layer the float output of the one before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# Our fused modules whose input AWQ scales (one input for q/k/v, one for gate/up).
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
WINDOW_TOKENS = 512  # AutoAWQ's calibration block length


@dataclass(frozen=True)
class LayerInputs:
    """What the scale search needs of one projection's input."""

    abs_mean: torch.Tensor  # [in] float32: mean |x| per input channel over every calibration token
    rows: torch.Tensor  # [num_rows, in] float32: evenly spaced tokens' inputs, for the output error


class _Collector:
    def __init__(self, stride: int) -> None:
        self.stride, self.abs_sum, self.count, self.rows = stride, None, 0, []

    def __call__(self, _module, args) -> None:
        x = args[0].detach().float()  # [T, in]
        s = x.abs().sum(0, dtype=torch.float64)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        self.rows.append(x[:: self.stride].clone())

    def result(self, max_rows: int) -> LayerInputs:
        return LayerInputs((self.abs_sum / max(self.count, 1)).float(), torch.cat(self.rows)[:max_rows])


def calibration_windows(token_ids: list[int], num_tokens: int, window: int) -> list[list[int]]:
    """The first `num_tokens` ids in windows of `window` tokens (the last may be shorter)."""
    ids = token_ids[:num_tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window)]


def capture_layer_inputs(
    model_path: str, text_path: str | Path, num_tokens: int, max_rows: int = 512,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, LayerInputs]:
    """Run the float model over the first `num_tokens` tokens of the text and return the
    input statistics of every decoder projection, by module name
    (`model.layers.{i}.self_attn.qkv_proj`, ...).

    Raises:
        ValueError: the text is shorter than one window of tokens.
    """
    from tokenmill import LLM, SamplingParams

    llm = LLM(model_path, dtype="float32", quantization="none", enable_prefix_caching=False)
    window = min(WINDOW_TOKENS, llm.config.scheduler.max_model_len - 1)
    # Enough characters for the tokens asked for (English prose: ~4 characters per token).
    with open(text_path, encoding="utf-8") as f:
        text = f.read(num_tokens * 8)
    ids = llm.get_tokenizer().encode(text)
    if len(ids) < min(num_tokens, window):
        raise ValueError(f"{text_path}: {len(ids)} tokens; calibration needs at least {min(num_tokens, window)}.")
    windows = calibration_windows(ids, num_tokens, window)
    total = sum(len(w) for w in windows)
    model = llm.engine.runner.model
    collectors, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for leaf in PROJECTIONS:
            c = collectors[f"model.layers.{i}.{leaf}"] = _Collector(max(1, total // max_rows))
            handles.append(layer.get_submodule(leaf).register_forward_pre_hook(c))
    progress(f"calibration: {total} tokens of {text_path} in {len(windows)} windows of up to {window}")
    try:
        llm.generate([{"prompt_token_ids": w} for w in windows], SamplingParams(max_tokens=1, temperature=0.0),
                     use_tqdm=False)
    finally:
        for h in handles:
            h.remove()
    return {name: c.result(max_rows) for name, c in collectors.items()}
