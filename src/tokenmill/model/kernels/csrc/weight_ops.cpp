// torch operators over stored weights (16-bit floats and ggml blocks, read in place):
// stored_matmul (what the model calls) = weight_matmul (decoded to float32 inside the
// product) or quantize_activations + quant_matmul (integer products against int8
// activations), by format; decode_rows (embedding lookups).

#include <ATen/Parallel.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
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

// The formats repack_rows8 interleaves: ggml type -> its interleaved kernel format, and the
// bytes of a row's 32-value block before its integers and of the integers (for 16-bit
// floats: none, and 64).
struct Rows8Format {
  int64_t ggml_type;
  tmk::WeightFormat format;
  int64_t header_bytes, int_bytes;
  bool floats16;
  int64_t block_bytes() const { return header_bytes + int_bytes; }
};
constexpr Rows8Format kRows8Formats[] = {{2, tmk::kWQ4_0x8, 2, 16, false},  {3, tmk::kWQ4_1x8, 4, 16, false},
                                         {8, tmk::kWQ8_0x8, 2, 32, false},  {1, tmk::kWF16x8, 0, 64, true},
                                         {30, tmk::kWBF16x8, 0, 64, true}};

const Rows8Format* rows8_format(int64_t ggml_type) {
  for (const auto& f : kRows8Formats) {
    if (f.ggml_type == ggml_type) return &f;
  }
  return nullptr;
}

// The interleaved layout in one place, for both directions: calls move(offset in the
// group's 8 blocks, offset in row r's block, bytes) for each piece of row r's 32-value block.
// Quantized formats: the 8 scales (Q4_1: then the 8 mins), then 4 bytes of each row at a
// time (quant_matmul.h, Rows8). 16-bit floats: column-major, 8 rows' values per column
// (weight_matmul.h), so a group is [k][8] values.
template <typename Move>
void for_each_rows8_piece(const Rows8Format& r8, int64_t r, Move move) {
  if (r8.floats16) {
    for (int64_t c = 0; c < 32; ++c) move(2 * (8 * c + r), 2 * c, 2);
    return;
  }
  for (int64_t h = 0; h < r8.header_bytes / 2; ++h) move(16 * h + 2 * r, 2 * h, 2);  // d (Q4_1: then m)
  for (int64_t c = 0; c < r8.int_bytes / 4; ++c) move(8 * r8.header_bytes + 32 * c + 4 * r, r8.header_bytes + 4 * c, 4);
}

bool can_repack_rows8(int64_t ggml_type, int64_t rows) { return rows % 8 == 0 && rows8_format(ggml_type) != nullptr; }

// Tokens per pass over the weights: their activations (64 x k float32) stay in L2 while
// every panel of rows is multiplied by them.
constexpr int64_t kTokenBlock = 64;

void weight_matmul(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t ggml_type, bool rows8) {
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
  TORCH_CHECK(!rows8 || (can_repack_rows8(ggml_type, n) && rows8_format(ggml_type)->floats16), op, ": ggml type ",
              ggml_type, " with ", n, " rows has no interleaved layout here (quant_matmul reads the quantized ones)");
  const int64_t ldo = out.stride(0);
  // Work items: groups of 8 interleaved rows, or panels of kPanelRows rows.
  const int64_t items = rows8 ? n / 8 : (n + tmk::kPanelRows - 1) / tmk::kPanelRows;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
    const tmk::WeightMatmulArgs args{out.data_ptr<float>() + t0 * ldo, x.data_ptr<float>() + t0 * k,
                                     w.data_ptr<uint8_t>(), std::min(kTokenBlock, tokens - t0), n, k, w.size(1), ldo,
                                     rows8 ? rows8_format(ggml_type)->format : f.format};
    run(selected()->weight_matmul, args, items, 1);
  }
}

void decode_rows(at::Tensor& out, const at::Tensor& w, const at::Tensor& rows, int64_t ggml_type, bool rows8) {
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
  if (rows8) {  // gather the rows back into their stored layout, then decode those
    TORCH_CHECK(can_repack_rows8(ggml_type, w.size(0)), op, ": ggml type ", ggml_type, " has no interleaved layout");
    const Rows8Format& r8 = *rows8_format(ggml_type);
    const int64_t row_bytes = w.size(1), bb = r8.block_bytes(), num_blocks = row_bytes / bb;
    at::Tensor gathered = at::empty({rows.numel(), row_bytes}, w.options());
    const uint8_t* src = w.data_ptr<uint8_t>();
    uint8_t* dst = gathered.data_ptr<uint8_t>();
    for (int64_t i = 0; i < rows.numel(); ++i) {
      for (int64_t j = 0; j < num_blocks; ++j) {
        const uint8_t* group_block = src + ((ids[i] / 8) * num_blocks + j) * 8 * bb;
        uint8_t* row_block = dst + i * row_bytes + j * bb;
        for_each_rows8_piece(r8, ids[i] % 8, [&](int64_t in_group, int64_t in_row, int64_t bytes) {
          std::memcpy(row_block + in_row, group_block + in_group, bytes);
        });
      }
    }
    at::Tensor in_order = at::arange(rows.numel(), rows.options());
    return decode_rows(out, gathered, in_order, ggml_type, false);
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

// w [n, row_bytes] in rows -> the same bytes with rows interleaved by 8, block by block
// (for_each_rows8_piece says where each piece goes). Done once at load.
at::Tensor repack_rows8(const at::Tensor& w, int64_t ggml_type) {
  const char* op = "repack_rows8";
  check_cpu_contiguous({&w}, op);
  const Rows8Format* r8 = rows8_format(ggml_type);
  TORCH_CHECK(r8 != nullptr, op, ": ggml type ", ggml_type, " has no interleaved layout (Q4_0, Q4_1, Q8_0, F16, BF16 do)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 8 == 0, op, ": rows must come in groups of 8, got ", w.sizes());
  const int64_t n = w.size(0), row_bytes = w.size(1), bb = r8->block_bytes();
  stored_format(ggml_type, row_bytes / bb * 32, w, op);  // checks the row length
  const int64_t num_blocks = row_bytes / bb;
  at::Tensor out = at::empty_like(w);
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 8, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t j = 0; j < num_blocks; ++j) {
        uint8_t* group_block = dst + (g * num_blocks + j) * 8 * bb;
        for (int64_t r = 0; r < 8; ++r) {
          const uint8_t* row_block = src + (8 * g + r) * row_bytes + j * bb;
          for_each_rows8_piece(*r8, r, [&](int64_t in_group, int64_t in_row, int64_t bytes) {
            std::memcpy(group_block + in_group, row_block + in_row, bytes);
          });
        }
      }
    }
  });
  return out;
}

void quant_matmul(at::Tensor& out, const at::Tensor& xq, const at::Tensor& xd, const at::Tensor& xs,
                  const at::Tensor& w, int64_t ggml_type, bool rows8) {
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
  TORCH_CHECK(!rows8 || can_repack_rows8(ggml_type, n), op, ": ggml type ", ggml_type, " with ", n,
              " rows has no interleaved layout");
  const tmk::WeightFormat format = rows8 ? rows8_format(ggml_type)->format : f.format;
  const int64_t ldo = out.stride(0), num_blocks = k / 32;
  for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
    const tmk::QuantMatmulArgs args{out.data_ptr<float>() + t0 * ldo, xq.data_ptr<int8_t>() + t0 * k,
                                    xd.data_ptr<float>() + t0 * num_blocks, xs.data_ptr<float>() + t0 * num_blocks,
                                    w.data_ptr<uint8_t>(), std::min(kTokenBlock, tokens - t0), n, k, w.size(1), ldo,
                                    format};
    run(selected()->quant_matmul, args, rows8 ? n / 8 : n, rows8 ? 1 : 4);  // items: groups of 8, or rows
  }
}

}  // namespace

namespace tmk_ops {

// out = x @ w^T for any stored format, the one entry the model calls: the integer formats
// quantize x and multiply in integers, the others decode w to float32 in the product. One
// operator call per projection: at one token, dispatching quantize_activations and
// quant_matmul separately from Python cost as much as the product of a small layer.
void stored_matmul(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t ggml_type, bool rows8) {
  const char* op = "stored_matmul";
  check_cpu_contiguous({&x}, op);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be a float32 matrix");
  if (!stored_format(ggml_type, x.size(1), w, op).int8_activations) return weight_matmul(out, x, w, ggml_type, rows8);
  const auto [q, d, s] = quantize_activations(x);
  quant_matmul(out, q, d, s, w, ggml_type, rows8);
}

}  // namespace tmk_ops

using tmk_ops::stored_matmul;

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("weight_formats() -> int[][]", &weight_formats);
  m.def("weight_matmul(Tensor(a!) out, Tensor x, Tensor w, int ggml_type, bool rows8=False) -> ()", &weight_matmul);
  m.def("decode_rows(Tensor(a!) out, Tensor w, Tensor rows, int ggml_type, bool rows8=False) -> ()", &decode_rows);
  m.def("quantize_activations(Tensor x) -> (Tensor, Tensor, Tensor)", &quantize_activations);
  m.def("quant_matmul(Tensor(a!) out, Tensor xq, Tensor xd, Tensor xs, Tensor w, int ggml_type, bool rows8=False) -> ()",
        &quant_matmul);
  m.def("stored_matmul(Tensor(a!) out, Tensor x, Tensor w, int ggml_type, bool rows8=False) -> ()", &stored_matmul);
  m.def("can_repack_rows8(int ggml_type, int rows) -> bool", &can_repack_rows8);
  m.def("repack_rows8(Tensor w, int ggml_type) -> Tensor", &repack_rows8);
}
