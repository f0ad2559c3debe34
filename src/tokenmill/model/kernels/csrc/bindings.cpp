// torch operators (torch.ops.tokenmill.*) over the kernels of kernels_isa.cpp: argument
// checks, dtype dispatch, threads (torch's own OpenMP pool via at::parallel_for), and the
// choice of instruction set. The stored-weight operators are in weight_ops.cpp. Registered with TORCH_LIBRARY rather than pybind11: the
// library builds in a quarter of the time (torch/library.h instead of torch/extension.h).

#include <torch/library.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <atomic>
#include <string>
#include <vector>

#include "bindings.h"

namespace {

#if defined(__x86_64__)
// CPUID feature bits, and whether the OS saves the AVX / AVX-512 register state.
bool cpu_has_avx2() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), f16c = c & (1u << 29), osxsave = c & (1u << 27);
  if (!(fma && f16c && osxsave)) return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0x6u) != 0x6u) return false;  // XMM and YMM state
  __cpuid_count(7, 0, a, b, c, d);
  return b & (1u << 5);
}
bool cpu_has_avx512() {
  if (!cpu_has_avx2()) return false;
  unsigned a, b, c, d, lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & 0xE6u) != 0xE6u) return false;  // + opmask and ZMM state
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
  return (b & (f | dq | bw | vl)) == (f | dq | bw | vl);
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

// The instruction sets this library holds and this CPU runs, narrowest first.
std::vector<const tmk::KernelTable*> runnable_tables() {
  std::vector<const tmk::KernelTable*> tables{tmk::generic_kernels()};
  if (tmk::avx2_kernels() != nullptr && cpu_has_avx2()) tables.push_back(tmk::avx2_kernels());
  if (tmk::avx512_kernels() != nullptr && cpu_has_avx512()) tables.push_back(tmk::avx512_kernels());
  return tables;
}

std::atomic<const tmk::KernelTable*>& selected_table() {
  static std::atomic<const tmk::KernelTable*> table{runnable_tables().back()};
  return table;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const auto* t : runnable_tables()) names.emplace_back(t->name);
  return names;
}

std::string cpu_isa() { return tmk_bind::selected()->name; }

void set_cpu_isa(const std::string& name) {
  for (const auto* t : runnable_tables()) {
    if (name == t->name) {
      selected_table().store(t, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK(false, "CPU kernel path '", name, "' cannot run on this CPU; available: ", c10::Join(", ", cpu_isas()));
}

std::vector<int64_t> kernel_limits() { return {tmk::kMaxGroup, tmk::kMaxHeadDim}; }

tmk::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return tmk::kF32;
    case at::kBFloat16: return tmk::kBF16;
    case at::kHalf: return tmk::kF16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
}

using tmk_bind::check_cpu_contiguous;
using tmk_bind::run;
using tmk_bind::selected;

}  // namespace

// The operators decode_layers.cpp also calls (declared in bindings.h).
namespace tmk_ops {

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  const char* op = "paged_decode_attention";
  check_cpu_contiguous({&out, &kv_cache, &block_tables, &seq_lens}, op);
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(1) > 0 &&
                  block_tables.dim() == 2,
              op, ": bad shapes");
  // q may be a view into the fused q|k rows: only its head rows must be dense.
  TORCH_CHECK(q.device().is_cpu() && q.stride(2) == 1 && q.stride(1) == q.size(2), op, ": q layout");
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's shape");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(2) <= tmk::kMaxHeadDim, op, ": head_dim");
  TORCH_CHECK(q.size(1) % kv_cache.size(1) == 0 && q.size(1) / kv_cache.size(1) <= tmk::kMaxGroup, op,
              ": query heads per KV head must be at most ", tmk::kMaxGroup);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, op,
              ": block tables and lengths must be int32");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == q.scalar_type(), op, ": dtype mismatch");
  const int64_t num_reqs = q.size(0), max_blocks = block_tables.size(1), num_blocks = kv_cache.size(2);
  const int64_t block_size = kv_cache.size(3);
  TORCH_CHECK(block_tables.size(0) == num_reqs && seq_lens.numel() == num_reqs, op,
              ": one block table and one length per request");
  // Every block the kernel will read must exist: a bad table is an error, not a stray read.
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < num_reqs; ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= max_blocks * block_size, op, ": seq_len ", lens[r], " out of range");
    for (int64_t b = 0; b * block_size < lens[r]; ++b) {
      const int32_t id = tables[r * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": block id ", id, " out of range");
    }
  }
  const tmk::DecodeAttentionArgs args{out.data_ptr(), q.data_ptr(), kv_cache.data_ptr(), tables, lens,
                                     q.size(1), kv_cache.size(1), q.size(2), q.stride(0), num_blocks, block_size,
                                     max_blocks, static_cast<float>(scale)};
  run(selected()->decode_attention[dtype_of(q, op)], args, num_reqs * kv_cache.size(1), 1);
}

void norm(at::Tensor& out, const at::Tensor& x, at::Tensor* residual, const at::Tensor& weight, double eps,
          const char* op) {
  check_cpu_contiguous({&out, &x, &weight}, op);
  TORCH_CHECK(x.dim() == 2 && weight.numel() == x.size(1) && out.sizes() == x.sizes(), op, ": shapes");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), op, ": dtype mismatch");
  if (residual != nullptr) {
    check_cpu_contiguous({residual}, op);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), op, ": residual");
  }
  const tmk::RmsNormArgs args{out.data_ptr(), x.data_ptr(), residual ? residual->data_ptr() : nullptr,
                             weight.data_ptr(), x.size(1), static_cast<float>(eps)};
  run(selected()->rms_norm[dtype_of(x, op)], args, x.size(0), 16);
}

void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  norm(out, x, nullptr, weight, eps, "rms_norm");
}

void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  norm(x, x, &residual, weight, eps, "add_rms_norm");
}

void silu_and_mul(at::Tensor& out, const at::Tensor& gate_up) {
  const char* op = "silu_and_mul";
  check_cpu_contiguous({&out, &gate_up}, op);
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1),
              op, ": out must be [rows, dim] for gate_up [rows, 2 * dim]");
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), op, ": dtype mismatch");
  const tmk::SiluAndMulArgs args{out.data_ptr(), gate_up.data_ptr(), out.size(1)};
  run(selected()->silu_and_mul[dtype_of(out, op)], args, out.size(0), 4);
}

void rotary_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor& kv_cache,
                      const at::Tensor& slots, int64_t num_heads) {
  const char* op = "rotary_and_cache";
  check_cpu_contiguous({&qkv, &cos, &signed_sin, &kv_cache, &slots}, op);
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, op, ": kv_cache shape");
  const int64_t num_kv_heads = kv_cache.size(1), head_dim = kv_cache.size(4);
  const int64_t cache_slots = kv_cache.size(2) * kv_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, op, ": qkv shape");
  TORCH_CHECK(cos.numel() == qkv.size(0) * head_dim && signed_sin.numel() == cos.numel(), op, ": cos/sin");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0), op, ": slots");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= tmk::kMaxHeadDim, op, ": head_dim");
  TORCH_CHECK(qkv.scalar_type() == kv_cache.scalar_type() && cos.scalar_type() == qkv.scalar_type() &&
                  signed_sin.scalar_type() == qkv.scalar_type(),
              op, ": dtype mismatch");
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < qkv.size(0); ++t) {
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < cache_slots, op, ": slot ", slot_ptr[t], " out of range");
  }
  const tmk::RotaryCacheArgs args{qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), kv_cache.data_ptr(),
                                 slot_ptr,       num_heads,      num_kv_heads,          head_dim,
                                 cache_slots};
  run(selected()->rotary_and_cache[dtype_of(qkv, op)], args, qkv.size(0), 8);
}

}  // namespace tmk_ops

namespace {

using namespace tmk_ops;

void sample_exponential_race(at::Tensor& out, const at::Tensor& logits, const at::Tensor& keys) {
  const char* op = "sample_exponential_race";
  check_cpu_contiguous({&out, &logits, &keys}, op);
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, op, ": logits must be float32 [rows, vocab]");
  TORCH_CHECK(keys.scalar_type() == at::kLong && out.scalar_type() == at::kLong && keys.numel() == logits.size(0) &&
                  out.numel() == logits.size(0),
              op, ": one int64 key and one int64 output per row");
  const tmk::SampleArgs args{out.data_ptr<int64_t>(), logits.data_ptr<float>(), keys.data_ptr<int64_t>(),
                            logits.size(1)};
  run(selected()->sample, args, logits.size(0), 1);
}

}  // namespace

const tmk::KernelTable* tmk_bind::selected() { return selected_table().load(std::memory_order_relaxed); }

TORCH_LIBRARY(tokenmill, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> ()",
        &paged_decode_attention);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()", &add_rms_norm);
  m.def("silu_and_mul(Tensor(a!) out, Tensor gate_up) -> ()", &silu_and_mul);
  m.def("rotary_and_cache(Tensor(a!) qkv, Tensor cos, Tensor signed_sin, Tensor(b!) kv_cache, Tensor slots, "
        "int num_heads) -> ()",
        &rotary_and_cache);
  m.def("sample_exponential_race(Tensor(a!) out, Tensor logits, Tensor keys) -> ()", &sample_exponential_race);
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("set_cpu_isa(str name) -> ()", &set_cpu_isa);
  m.def("kernel_limits() -> int[]", &kernel_limits);
}
