"""Activation-aware weight scaling (AWQ, Lin et al. 2023; AutoAWQ's procedure).

Input channels that carry large activations matter most to a projection's output. AWQ
multiplies those weight columns by s > 1 before quantizing (their relative rounding error
shrinks) and divides the input by s, folded exactly into whatever produces that input:

- q/k/v: the input RMSNorm weight; gate/up: the post-attention RMSNorm weight;
- down: the rows of up_proj (silu(gate) * up is linear in up);
- o: the rows of v_proj, only when v and o are square to each other (no grouped-query
  attention), as AutoAWQ does (attention mixes whole value vectors, so a per-channel
  scale of v passes through it).

s = mean|x|^alpha per input channel (normalised so that sqrt(max * min) = 1), with alpha
on a grid of 20 points in [0, 1) chosen to minimise the mean squared error of the
quantized projections' outputs against the float ones on the calibration inputs. alpha = 0
is plain round-to-nearest, so the search never does worse on those inputs. Simplifications
against AutoAWQ, all documented in docs/quantization.md: the error is measured on the
projections' outputs (AutoAWQ measures q/k/v through the whole attention block), and there
is no weight-clipping search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.quant.calibration import LayerInputs

GRID_POINTS = 20


@dataclass(frozen=True)
class ScaleGroup:
    """Projections that share one input, and what their inverse scale folds into."""

    input_name: str  # the captured input: our fused module (model.layers.{i}.self_attn.qkv_proj, ...)
    linears: tuple[str, ...]  # checkpoint weights whose columns are multiplied by s
    divided: tuple[str, ...]  # checkpoint tensors divided by s along their output (a norm weight, rows, biases)


@dataclass(frozen=True)
class ScaleSearch:
    group: ScaleGroup
    scales: torch.Tensor  # [in] float32
    alpha: float
    plain_error: float  # output MSE at alpha = 0 (round-to-nearest)
    error: float  # output MSE at the chosen alpha


def scale_groups(cfg: ModelConfig, tensor_names: set[str], layer: int) -> list[ScaleGroup]:
    """AutoAWQ's Llama scaling groups of one decoder layer, in its order."""
    p = f"model.layers.{layer}."
    attn, mlp = p + "self_attn.", p + "mlp."

    def with_bias(weight: str) -> tuple[str, ...]:
        bias = weight.removesuffix(".weight") + ".bias"
        return (weight, bias) if bias in tensor_names else (weight,)

    groups = [ScaleGroup(attn + "qkv_proj", tuple(f"{attn}{x}_proj.weight" for x in "qkv"),
                         (p + "input_layernorm.weight",))]
    if cfg.num_kv_heads == cfg.num_heads:
        groups.append(ScaleGroup(attn + "o_proj", (attn + "o_proj.weight",), with_bias(attn + "v_proj.weight")))
    groups.append(ScaleGroup(mlp + "gate_up_proj", (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                             (p + "post_attention_layernorm.weight",)))
    groups.append(ScaleGroup(mlp + "down_proj", (mlp + "down_proj.weight",), with_bias(mlp + "up_proj.weight")))
    return groups


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared difference of x @ w^T and x @ w_hat^T; w, w_hat [out, in], x [n, in]."""
    return float(((x @ (w_hat - w).t()) ** 2).mean())


def search_scale(weights: list[torch.Tensor], inputs: LayerInputs,
                 fake_quantize: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float, float, float]:
    """Grid search of alpha for one group. Returns (s [in], alpha, error at alpha 0, best error).

    fake_quantize: w [out, in] -> its quantized-then-dequantized float32 values.
    """
    w = torch.cat([t.float() for t in weights])  # [sum of outs, in]
    x = inputs.rows
    mean = inputs.abs_mean.clamp(min=1e-8)
    best = (torch.ones_like(mean), 0.0, float("inf"))
    plain = float("nan")
    for step in range(GRID_POINTS):
        alpha = step / GRID_POINTS
        s = mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = output_error(w, fake_quantize(w * s) / s, x)
        if step == 0:
            plain = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], plain, best[2]


def search_scales(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, inputs: dict[str, LayerInputs],
    fake_quantize: Callable[[torch.Tensor], torch.Tensor], progress: Callable[[str], None] = lambda _: None,
) -> list[ScaleSearch]:
    """The best scale of every group, searched on the original (unscaled) weights."""
    results = []
    for layer in range(cfg.num_layers):
        found = []
        for group in scale_groups(cfg, set(tensors), layer):
            s, alpha, plain, error = search_scale([tensors[n] for n in group.linears], inputs[group.input_name],
                                                  fake_quantize)
            found.append(ScaleSearch(group, s, alpha, plain, error))
        gain = 1 - sum(r.error for r in found) / max(sum(r.plain_error for r in found), 1e-30)
        alphas = ", ".join(f"{r.group.input_name.rsplit('.', 1)[1]} {r.alpha:.2f}" for r in found)
        progress(f"awq layer {layer + 1}/{cfg.num_layers}: alpha {alphas}; projection output error -{gain:.0%}")
        results += found
    return results


def fold_scales(tensors: dict[str, torch.Tensor], searches: list[ScaleSearch]) -> None:
    """Apply the scales in place: columns of the group's projections times s, the tensors
    producing their input divided by s. The float model computes the same function."""
    for r in searches:
        s = r.scales
        for name in r.group.linears:
            tensors[name] = tensors[name].float() * s  # [out, in] * [in]
        for name in r.group.divided:
            t = tensors[name].float()
            tensors[name] = t / s if t.dim() == 1 else t / s[:, None]  # a norm weight or bias [in]; rows [in, cols]
