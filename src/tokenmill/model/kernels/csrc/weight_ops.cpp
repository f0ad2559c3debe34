// torch operators over stored weights (16-bit floats and ggml blocks, read in place):
// weight_matmul (decoded to float32 inside the product), quantize_activations + quant_matmul
// (integer products against int8 activations), decode_rows (embedding lookups).

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "bindings.h"

namespace {

using tmk_bind::check_cpu_contiguous;
using tmk_bind::run;
using tmk_bind::selected;

// ggml type id -> (format, values per block, bytes per block, multiplied in integers by
// quant_matmul). The one table of the stored formats; Python reads it (weight_formats()).
struct StoredFormat {
  int64_t ggml_type;
  tmk::WeightFormat format;
  int64_t block_values, block_bytes;
  bool int8_activations;
};
constexpr StoredFormat kStoredFormats[] = {
    {0, tmk::kWF32, 1, 4, false},       {1, tmk::kWF16, 1, 2, false},      {30, tmk::kWBF16, 1, 2, false},
    {2, tmk::kWQ4_0, 32, 18, true},     {3, tmk::kWQ4_1, 32, 20, true},    {6, tmk::kWQ5_0, 32, 22, false},
    {7, tmk::kWQ5_1, 32, 24, false},    {8, tmk::kWQ8_0, 32, 34, true},    {12, tmk::kWQ4_K, 256, 144, true},
    {13, tmk::kWQ5_K, 256, 176, false}, {14, tmk::kWQ6_K, 256, 210, true},
};

// [ggml_type, values per block, bytes per block, int8 activations] per format.
std::vector<std::vector<int64_t>> weight_formats() {
  std::vector<std::vector<int64_t>> rows;
  for (const auto& f : kStoredFormats) rows.push_back({f.ggml_type, f.block_values, f.block_bytes, f.int8_activations});
  return rows;
}

const StoredFormat& stored_format(int64_t ggml_type, int64_t k, const at::Tensor& w, const char* op) {
  for (const auto& f : kStoredFormats) {
    if (f.ggml_type != ggml_type) continue;
    TORCH_CHECK(k % 32 == 0 && k % f.block_values == 0, op, ": rows of ", k, " values are not whole blocks");
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.size(1) == k / f.block_values * f.block_bytes, op,
                ": weights must be uint8 [rows, ", k / f.block_values * f.block_bytes, "] for ", k, " values per row");
    return f;
  }
  TORCH_CHECK(false, op, ": no kernel reads ggml type ", ggml_type);
}

// Tokens per pass over the weights: their activations (64 x k float32) stay in L2 while
// every panel of rows is multiplied by them.
constexpr int64_t kTokenBlock = 64;

void weight_matmul(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t ggml_type) {
  const char* op = "weight_matmul";
  check_cpu_contiguous({&x, &w}, op);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat, op,
              ": x and out must be float32 matrices");
  const int64_t tokens = x.size(0), k = x.size(1), n = w.size(0);
  const StoredFormat& f = stored_format(ggml_type, k, w, op);
  // out may be a column slice of a wider output (one part of a fused projection).
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == tokens && out.size(1) == n &&
                  out.stride(1) == 1,
              op, ": out must be [tokens, rows] with contiguous rows");
  const int64_t ldo = out.stride(0);
  const int64_t panels = (n + tmk::kPanelRows - 1) / tmk::kPanelRows;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
    const tmk::WeightMatmulArgs args{out.data_ptr<float>() + t0 * ldo, x.data_ptr<float>() + t0 * k,
                                     w.data_ptr<uint8_t>(), std::min(kTokenBlock, tokens - t0), n, k, w.size(1), ldo,
                                     f.format};
    run(selected()->weight_matmul, args, panels, 1);
  }
}

void decode_rows(at::Tensor& out, const at::Tensor& w, const at::Tensor& rows, int64_t ggml_type) {
  const char* op = "decode_rows";
  check_cpu_contiguous({&out, &w, &rows}, op);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && rows.scalar_type() == at::kLong &&
                  rows.numel() == out.size(0),
              op, ": out must be float32 [len(rows), k], rows int64");
  const StoredFormat& f = stored_format(ggml_type, out.size(1), w, op);
  const int64_t* ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < w.size(0), op, ": row ", ids[i], " out of range");
  }
  const tmk::DecodeRowsArgs args{out.data_ptr<float>(), w.data_ptr<uint8_t>(), ids, out.size(1), w.size(1), f.format};
  run(selected()->decode_rows, args, rows.numel(), 16);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x) {
  const char* op = "quantize_activations";
  check_cpu_contiguous({&x}, op);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0, op,
              ": x must be float32 [tokens, k] with k a multiple of 32");
  const int64_t tokens = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({tokens, k}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({tokens, k / 32}, x.options());
  at::Tensor s = at::empty({tokens, k / 32}, x.options());
  const tmk::QuantizeActivationsArgs args{x.data_ptr<float>(), q.data_ptr<int8_t>(), d.data_ptr<float>(),
                                          s.data_ptr<float>(), k};
  run(selected()->quantize_activations, args, tokens, 16);
  return {q, d, s};
}

void quant_matmul(at::Tensor& out, const at::Tensor& xq, const at::Tensor& xd, const at::Tensor& xs,
                  const at::Tensor& w, int64_t ggml_type) {
  const char* op = "quant_matmul";
  check_cpu_contiguous({&xq, &xd, &xs, &w}, op);
  const int64_t tokens = xq.size(0), k = xq.size(1), n = w.size(0);
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xd.scalar_type() == at::kFloat &&
                  xs.scalar_type() == at::kFloat && xd.numel() == tokens * (k / 32) && xs.numel() == xd.numel(),
              op, ": activations must come from quantize_activations");
  const StoredFormat& f = stored_format(ggml_type, k, w, op);
  TORCH_CHECK(f.int8_activations, op, ": ggml type ", ggml_type, " has no integer kernel (use weight_matmul)");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == tokens &&
                  out.size(1) == n && out.stride(1) == 1,
              op, ": out must be float32 [tokens, rows] with contiguous rows");
  const int64_t ldo = out.stride(0), num_blocks = k / 32;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
    const tmk::QuantMatmulArgs args{out.data_ptr<float>() + t0 * ldo, xq.data_ptr<int8_t>() + t0 * k,
                                    xd.data_ptr<float>() + t0 * num_blocks, xs.data_ptr<float>() + t0 * num_blocks,
                                    w.data_ptr<uint8_t>(), std::min(kTokenBlock, tokens - t0), n, k, w.size(1), ldo,
                                    f.format};
    run(selected()->quant_matmul, args, n, 4);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("weight_formats() -> int[][]", &weight_formats);
  m.def("weight_matmul(Tensor(a!) out, Tensor x, Tensor w, int ggml_type) -> ()", &weight_matmul);
  m.def("decode_rows(Tensor(a!) out, Tensor w, Tensor rows, int ggml_type) -> ()", &decode_rows);
  m.def("quantize_activations(Tensor x) -> (Tensor, Tensor, Tensor)", &quantize_activations);
  m.def("quant_matmul(Tensor(a!) out, Tensor xq, Tensor xd, Tensor xs, Tensor w, int ggml_type) -> ()",
        &quant_matmul);
}
