"""The weight kernels that read stored weights in place (16-bit floats and ggml's
quantized blocks): rows decoded bit-exact with the gguf package's reference
dequantization, and matrix products against float64 on those decoded weights, on every
instruction-set path this CPU runs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from tokenmill.model import kernels

ops = kernels.cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="CPU kernels could not be built here (see the log)")

QUANTIZABLE = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# gguf-py cannot quantize K-quants: random blocks with finite float16 scales stand in.
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}
FORMATS = QUANTIZABLE + list(K_QUANTS)


def stored(name: str, rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(blocks uint8 [rows, row_bytes], the reference's float32 [rows, cols])."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[name]
    if name in K_QUANTS:
        block_bytes, scale_offsets = K_QUANTS[name]
        raw = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
        for off in scale_offsets:
            scales = rng.uniform(-0.05, 0.05, size=(rows, cols // 256)).astype(np.float16)
            raw[:, :, off : off + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
        raw = raw.reshape(rows, -1)
    else:
        raw = quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype).view(np.uint8).reshape(rows, -1)
    return torch.from_numpy(raw.copy()), dequantize(raw, qtype).astype(np.float32)


@pytest.mark.parametrize("name", FORMATS)
def test_decoded_rows_equal_the_reference_bit_for_bit(name, isa):
    blocks, want = stored(name, 7, 512)
    rows = torch.tensor([6, 0, 3, 3])
    out = torch.empty(4, 512)
    ops.decode_rows(out, blocks, rows, int(gguf.GGMLQuantizationType[name]))
    assert np.array_equal(out.numpy(), want[rows.numpy()])


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 70])  # 70: crosses the kernel's 64-token blocks
def test_weight_matmul_matches_float64_on_the_decoded_weights(name, tokens, isa):
    rows, cols = 37, 512  # 37: the last panel of 4 rows is partial
    blocks, w = stored(name, rows, cols, seed=tokens)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    # Written into columns 5..41 of a wider output, as one part of a fused projection.
    out = torch.full((tokens, rows + 9), float("nan"))
    ops.weight_matmul(out[:, 5 : 5 + rows], x, blocks, int(gguf.GGMLQuantizationType[name]))
    want = x.double() @ torch.from_numpy(w).double().T
    scale = want.abs().max().item()
    torch.testing.assert_close(out[:, 5 : 5 + rows].double(), want, atol=2e-6 * scale, rtol=1e-5)
    assert out[:, :5].isnan().all() and out[:, 5 + rows :].isnan().all()  # nothing outside its columns


def test_weight_kernels_refuse_bad_input():
    blocks, _ = stored("Q4_1", 4, 512)
    with pytest.raises(RuntimeError, match=r"uint8 \[rows, 320\] for 512 values"):
        ops.weight_matmul(torch.empty(1, 4), torch.randn(1, 512), blocks[:, :100].contiguous(), 3)
    with pytest.raises(RuntimeError, match="no kernel reads ggml type 10"):
        ops.weight_matmul(torch.empty(1, 4), torch.randn(1, 512), blocks, 10)
    with pytest.raises(RuntimeError, match="row 4 out of range"):
        ops.decode_rows(torch.empty(1, 512), blocks, torch.tensor([4]), 3)
