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


INT8_FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]


def test_activations_quantize_per_block_as_llama_cpp(isa):
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(1)) * 4
    x[1, :32] = 0.0  # an all-zero block: scale 0, no NaN
    q, d, s = ops.quantize_activations(x)
    blocks = x.view(3, 3, 32)
    want_d = blocks.abs().amax(-1) / 127
    assert torch.equal(d, want_d) and d[1, 0] == 0
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    xhat = q.float().view(3, 3, 32) * d[..., None]
    assert ((xhat - blocks).abs() <= d[..., None] / 2 * (1 + 1e-6)).all()  # round to nearest
    torch.testing.assert_close(s, xhat.sum(-1))


@pytest.mark.parametrize("name", INT8_FORMATS)
@pytest.mark.parametrize("tokens", [1, 6])  # 6: a tile of 4 tokens and two single ones
def test_quant_matmul_is_exact_on_the_quantized_activations(name, tokens, isa):
    """Integer products are exact: the result is float64's on the decoded weights and the
    dequantized activations up to float32 rounding; against the unquantized activations it
    differs by the activation quantization (about 1% here)."""
    rows, cols = 37, 512
    blocks, w = stored(name, rows, cols, seed=tokens + 7)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    q, d, s = ops.quantize_activations(x)
    out = torch.full((tokens, rows + 3), float("nan"))
    ops.quant_matmul(out[:, 3:], q, d, s, blocks, int(gguf.GGMLQuantizationType[name]))
    xhat = (q.double().view(tokens, -1, 32) * d.double()[..., None]).view(tokens, cols)
    w64 = torch.from_numpy(w).double()
    exact, full = xhat @ w64.T, x.double() @ w64.T
    scale = exact.abs().max().item()
    torch.testing.assert_close(out[:, 3:].double(), exact, atol=1e-6 * scale, rtol=1e-5)
    assert ((out[:, 3:].double() - full).abs().max() / scale) < 0.03
    assert out[:, :3].isnan().all()


ROWS8_FORMATS = ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"]


@pytest.mark.parametrize("name", ROWS8_FORMATS)
@pytest.mark.parametrize("tokens", [1, 6, 11])  # 6: a tile of 4 and singles; 11: 8 + 2 + 1 (16-bit tiles)
def test_rows_interleaved_by_8_give_the_row_layouts_products(name, tokens, isa):
    """repack_rows8 reorders the bytes (decode_rows reads every row back bit for bit); the
    interleaved kernels' products equal the row layout's up to float32 rounding (the
    integer sums are exact; the 16-bit products sum in another order)."""
    rows, cols, qtype = 40, 512, int(gguf.GGMLQuantizationType[name])
    blocks, w = stored(name, rows, cols, seed=tokens + 3)
    assert ops.can_repack_rows8(qtype, rows) and not ops.can_repack_rows8(qtype, 36)
    rows8 = ops.repack_rows8(blocks, qtype)
    assert rows8.shape == blocks.shape and not torch.equal(rows8, blocks)
    decoded = torch.empty(rows, cols)
    ops.decode_rows(decoded, rows8, torch.arange(rows).flip(0), qtype, True)
    assert np.array_equal(decoded.flip(0).numpy(), w)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
    want, out = torch.empty(tokens, rows), torch.full((tokens, rows + 3), float("nan"))
    if name in INT8_FORMATS:
        q, d, s = ops.quantize_activations(x)
        ops.quant_matmul(want, q, d, s, blocks, qtype)
        ops.quant_matmul(out[:, 3:], q, d, s, rows8, qtype, True)
    else:
        ops.weight_matmul(want, x, blocks, qtype)
        ops.weight_matmul(out[:, 3:], x, rows8, qtype, True)
    torch.testing.assert_close(out[:, 3:], want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert out[:, :3].isnan().all()
    fused = torch.empty(tokens, rows)  # what the model calls
    ops.stored_matmul(fused, x, rows8, qtype, True)
    assert torch.equal(fused, out[:, 3:])


def test_rows8_refuses_what_it_has_no_layout_for():
    blocks, _ = stored("Q4_K", 8, 512)
    with pytest.raises(RuntimeError, match="ggml type 12 has no interleaved layout"):
        ops.repack_rows8(blocks, 12)
    blocks, _ = stored("Q4_1", 12, 512)
    with pytest.raises(RuntimeError, match="groups of 8"):
        ops.repack_rows8(blocks, 3)
    with pytest.raises(RuntimeError, match="12 rows has no interleaved layout"):
        ops.stored_matmul(torch.empty(1, 12), torch.randn(1, 512), blocks, 3, True)
    blocks, _ = stored("Q8_0", 8, 512)  # a quantized layout is quant_matmul's, not weight_matmul's
    with pytest.raises(RuntimeError, match="no interleaved layout here"):
        ops.weight_matmul(torch.empty(1, 8), torch.randn(1, 512), ops.repack_rows8(blocks, 8), 8, True)


def test_quant_matmul_refuses_formats_without_an_integer_kernel():
    blocks, _ = stored("Q5_0", 4, 512)
    q, d, s = ops.quantize_activations(torch.randn(1, 512))
    with pytest.raises(RuntimeError, match="ggml type 6 has no integer kernel"):
        ops.quant_matmul(torch.empty(1, 4), q, d, s, blocks, 6)


def test_the_kernels_read_the_formats_the_gguf_reader_knows():
    """One table of block geometry in C++ (weight_ops.cpp), one in Python (quant_types.py)."""
    from tokenmill.model.gguf.quant_types import QUANT_TYPES

    table = {row[0]: (row[1], row[2]) for row in ops.weight_formats()}
    assert table == {t.ggml_type: (t.block_size, t.block_bytes) for t in QUANT_TYPES.values()}
    assert {row[0] for row in ops.weight_formats() if row[3]} == {
        int(gguf.GGMLQuantizationType[name]) for name in INT8_FORMATS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packs", [True, False])
def test_16_bit_linear_runs_through_the_kernels_where_onednn_cannot_pack(dtype, packs, monkeypatch):
    """Where oneDNN packs 16-bit weights (AVX-512) it keeps them; elsewhere the kernels'
    16-bit product takes them (forced both ways here, whatever this CPU is), with the same
    single rounding of the output as F.linear."""
    from tokenmill.model.layers import linear

    if packs and not linear.onednn_packs(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    monkeypatch.setattr(linear, "onednn_packs", lambda _dtype: packs)
    g = torch.Generator().manual_seed(3)
    layer = linear.Linear(96, 160, bias=True)
    layer.weight.data, layer.bias.data = torch.randn(160, 96, generator=g).to(dtype), torch.randn(160).to(dtype)
    x = torch.randn(7, 96, generator=g).to(dtype)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.finalize_for_cpu()
    assert [w.ggml_type for _, w in layer.stored] == ([] if packs else [{torch.float16: 1, torch.bfloat16: 30}[dtype]])
    got = layer(x)
    assert got.dtype == dtype
    step = 2**-7 if dtype == torch.bfloat16 else 2**-10  # one rounding of the output, then of the bias add
    torch.testing.assert_close(got, want, atol=4 * step, rtol=2 * step)
