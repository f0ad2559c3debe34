"""`tokenmill quantize`: a float checkpoint (safetensors directory or GGUF file) -> a
quantized safetensors checkpoint directory that LLM() / serve load.

Only the decoder layers' projections (q/k/v/o, gate/up/down) are quantized; embeddings,
norms and lm_head keep the source's float dtype (float32 for a GGUF source, which is
dequantized first). int4 is written in AutoAWQ's gemm layout with its
quantization_config, so AWQ-reading tools load it too; int8 in tokenmill's own layout
(quant/layouts.py).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.quant import hf_files
from tokenmill.quant.config import TOKENMILL_INT8, awq_config, read_quant_config
from tokenmill.quant.layouts import pack_awq, pack_int8
from tokenmill.quant.rtn import fake_quantize, quantize

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str  # "int8" (per output channel) | "int4" (per group, with zero points)
    group_size: int = 128  # int4: input columns per scale
    awq: bool = False  # activation-aware scales searched on calibration_text
    calibration_text: str | None = None
    calibration_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got {self.group_size}.")
        if self.awq and not self.calibration_text:
            raise ValueError("AWQ needs a calibration text (--calibration-text FILE).")
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be positive; got {self.calibration_tokens}.")

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """w [out, in] -> its values after quantization and dequantization (float32)."""
        return fake_quantize(w, self.method, self.group_size)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_float_tensors(src: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, every tensor by Hugging Face name) of a float checkpoint; a GGUF file
    is dequantized to float32 by the loader's own path."""
    from tokenmill.model.gguf import is_gguf_file
    from tokenmill.model.hf_config import load_model_config
    from tokenmill.model.loader import checkpoint_tensors

    if not is_gguf_file(src) and read_quant_config(src) is not None:
        raise ValueError(f"{src}: already quantized (config.json has a quantization_config); quantize a float checkpoint.")
    cfg = load_model_config(src)
    return cfg, dict(checkpoint_tensors(src, cfg, keep_stored=False))


def quantize_checkpoint(src: str | Path, dst: str | Path, options: QuantizeOptions,
                        progress: Callable[[str], None] = _stderr) -> None:
    """Write the quantized checkpoint of `src` to the directory `dst` (created; must be empty).

    Raises:
        ValueError: a bad option, an already quantized source, or shapes the layout cannot hold.
        FileExistsError: dst exists and is not an empty directory.
    """
    from tokenmill.model.gguf import is_gguf_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: exists and is not an empty directory.")
    start = time.monotonic()
    progress(f"reading {src}")
    cfg, tensors = read_float_tensors(src)
    if options.awq:
        from tokenmill.quant.awq import fold_scales, search_scales
        from tokenmill.quant.calibration import capture_layer_inputs

        inputs = capture_layer_inputs(str(src), options.calibration_text, options.calibration_tokens,
                                      progress=progress)
        fold_scales(tensors, search_scales(tensors, cfg, inputs, options.fake_quantize, progress))
    out: dict[str, torch.Tensor] = {}
    names = {n for n in tensors if _PROJECTION.fullmatch(n)}
    progress(f"quantizing {len(names)} projections to {options.method}"
             + (f", groups of {options.group_size}" if options.method == "int4" else ""))
    for name, t in tensors.items():
        if name not in names:
            out[name] = t.contiguous()
            continue
        g = quantize(t, options.method, options.group_size)
        module = name.removesuffix(".weight")
        if options.method == "int4" and g.shape[0] % 8:
            raise ValueError(f"{name}: {g.shape[0]} output rows; AWQ's layout packs 8 per int32 word.")
        packed = pack_awq(g) if options.method == "int4" else pack_int8(g)
        out.update({f"{module}.{leaf}": v for leaf, v in packed.items()})
    if options.method == "int4" and any(tensors[n].shape[1] % options.group_size for n in names):
        progress(f"note: some projections' input width is not a multiple of {options.group_size}: their last group is "
                 "shorter. tokenmill loads this; AutoAWQ's own loader requires whole groups.")
    dst.mkdir(parents=True, exist_ok=True)
    progress(f"writing {dst}")
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dst / "model.safetensors", 0o666 & ~umask)  # safetensors creates it owner-only
    quant_config = awq_config(options.group_size) if options.method == "int4" else dict(TOKENMILL_INT8)
    if is_gguf_file(src):
        config = hf_files.config_json(cfg, "float32")
        hf_files.write_gguf_tokenizer(src, dst, cfg)
    else:
        config = json.loads((src / "config.json").read_text())
        hf_files.copy_tokenizer_files(src, dst)
    hf_files.write_json(dst / "config.json", {**config, "quantization_config": quant_config})
    progress(f"done in {time.monotonic() - start:.0f} s")
