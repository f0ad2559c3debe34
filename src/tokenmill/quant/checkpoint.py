"""A quantized safetensors checkpoint (AWQ, GPTQ, tokenmill int8) -> (Hugging Face name,
StoredWeight or float tensor) for the loader.

Each quantized module's tensors (`qweight`/`qzeros`/`scales`/`g_idx`, or `weight` int8 +
`weight_scale`) become one `<module>.weight`: a StoredWeight in a kernel format
(ggml_blocks.py) when `keep_stored`, else (no kernels, quantization="none", GPU) or where
no kernel format holds it, the float32 dequantization. Other tensors pass through.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from tokenmill.model.stored_weight import StoredWeight
from tokenmill.model.weights import iter_weights
from tokenmill.quant.config import QuantConfig
from tokenmill.quant.ggml_blocks import to_stored
from tokenmill.quant.grouped import GroupedInts
from tokenmill.quant.layouts import unpack_awq, unpack_gptq, unpack_int8

# The tensors that make up one quantized module, by method; the first one marks it.
_PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_INT8_PARTS = ("weight_scale", "weight")


def _decode(q: QuantConfig, module: str, parts: dict[str, torch.Tensor]) -> GroupedInts:
    def need(leaf: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = parts.get(leaf)
        if t is None:
            raise ValueError(f"{q.source}: quantized module {module!r} has no tensor {module}.{leaf}.")
        if dtype is not None and t.dtype != dtype:
            raise ValueError(f"{q.source}: tensor {module}.{leaf} is {t.dtype}, the {q.method} layout has {dtype}.")
        return t

    if q.method == "tokenmill":
        weight, scale = need("weight", torch.int8), need("weight_scale")
        _expect(q, module, "weight_scale", scale, (weight.shape[0],), (weight.shape[0], 1))
        return unpack_int8(weight, scale)
    qweight, scales = need("qweight", torch.int32), need("scales")
    if q.method == "awq":  # qweight [in, out/8]
        cols, out, per_word = qweight.shape[0], qweight.shape[1] * 8, 8
    else:  # qweight [in * bits / 32, out]
        per_word = 32 // q.bits
        cols, out = qweight.shape[0] * per_word, qweight.shape[1]
    num_groups = -(-cols // q.group_size_for(cols))
    _expect(q, module, "scales", scales, (num_groups, out))
    qzeros = parts.get("qzeros")
    if qzeros is not None or q.method == "gptq" or q.zero_point:
        qzeros = need("qzeros", torch.int32)
        _expect(q, module, "qzeros", qzeros, (num_groups, out // per_word))
    if q.method == "awq":
        return unpack_awq(qweight, qzeros, scales, q.group_size_for(cols))
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        _expect(q, module, "g_idx", g_idx, (cols,))
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= num_groups:
            raise ValueError(f"{q.source}: {module}.g_idx names groups outside 0..{num_groups - 1}.")
    return unpack_gptq(qweight, qzeros, scales, g_idx, q.bits, q.group_size_for(cols), q.v1_zeros)


def _expect(q: QuantConfig, module: str, leaf: str, t: torch.Tensor, *shapes: tuple[int, ...]) -> None:
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{q.source}: tensor {module}.{leaf} has shape {tuple(t.shape)}; with the other tensors "
                         f"and group_size {q.group_size} the {q.method} layout implies {shapes[0]}.")


def iter_quantized_weights(
    model_dir: str | Path, q: QuantConfig, keep_stored: bool
) -> Iterator[tuple[str, torch.Tensor | StoredWeight]]:
    """Yield (Hugging Face name, tensor) for every parameter of a quantized checkpoint.

    Raises:
        ValueError: a quantized module misses a tensor or its tensors disagree (names it).
    """
    tensors = dict(iter_weights(model_dir))  # memory-mapped views: nothing is read yet
    marker, parts = (_INT8_PARTS[0], _INT8_PARTS) if q.method == "tokenmill" else ("qweight", _PACKED_PARTS)
    modules = [name.removesuffix("." + marker) for name in tensors if name.endswith("." + marker)]
    for module in modules:
        found = {leaf: tensors.pop(f"{module}.{leaf}") for leaf in parts if f"{module}.{leaf}" in tensors}
        g = _decode(q, module, found)
        stored = to_stored(g, q.bits) if keep_stored else None
        yield f"{module}.weight", stored if stored is not None else g.dequantize()
    yield from tensors.items()
