// Structured output's token masks, applied in place: -inf wherever a grammar's bitmask
// has a 0 bit (llguidance's layout: token t is bit t % 32 of the 32-bit word t / 32).
// One pass over the constrained rows of the logits; the byte-lookup into a dense 0/-inf
// penalty and an add that it replaces made three passes (12 MB each at 64 rows of 49,152
// tokens). No instruction-set variants: words that are all 0 (most of them, under a JSON
// grammar) become a fill the compiler vectorizes, and words that are all 1 are skipped.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace {

void apply_token_bitmask(at::Tensor& logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  const char* op = "apply_token_bitmask";
  TORCH_CHECK(logits.is_cpu() && logits.is_contiguous() && logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              op, ": logits must be contiguous float32 [rows, vocab] on the CPU");
  TORCH_CHECK(bitmask.is_cpu() && bitmask.is_contiguous() && bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt,
              op, ": bitmask must be contiguous int32 [masks, words] on the CPU");
  TORCH_CHECK(rows.is_cpu() && rows.is_contiguous() && rows.scalar_type() == at::kLong &&
                  rows.numel() == bitmask.size(0),
              op, ": one int64 row index per mask");
  const int64_t vocab = logits.size(1), words = bitmask.size(1), num_masks = rows.numel();
  TORCH_CHECK(words * 32 >= vocab, op, ": a mask of ", words, " words cannot cover ", vocab, " tokens");
  const int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < num_masks; ++i) {
    TORCH_CHECK(row[i] >= 0 && row[i] < logits.size(0), op, ": row ", row[i], " is outside the logits");
  }
  float* out = logits.data_ptr<float>();
  const auto* bits = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, num_masks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* x = out + row[i] * vocab;
      const uint32_t* mask = bits + i * words;
      for (int64_t w = 0, base = 0; base < vocab; ++w, base += 32) {
        const uint32_t word = mask[w];
        if (word == 0xFFFFFFFFu) continue;  // every token of the word allowed
        const int64_t count = std::min<int64_t>(32, vocab - base);
        if (word == 0) {
          std::fill(x + base, x + base + count, neg_inf);
          continue;
        }
        for (int64_t k = 0; k < count; ++k) {
          if (!((word >> k) & 1u)) x[base + k] = neg_inf;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()", &apply_token_bitmask);
}
