// What the binding files (bindings.cpp: ISA choice and the decode kernels; weight_ops.cpp:
// stored-weight products; decode_layers.cpp: a decode step's layers in one call) share:
// the chosen kernel table, argument checks, the thread loop and each other's operators.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <initializer_list>

#include "kernel_api.h"

namespace tmk_bind {

// The kernel table of the instruction set in use (set_cpu_isa changes it; an atomic
// because an engine thread may be reading it).
const tmk::KernelTable* selected();

inline void check_cpu_contiguous(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), op, " needs CPU tensors");
    TORCH_CHECK(t->is_contiguous(), op, " needs contiguous tensors");
  }
}

// fn over items [0, items) on torch's OpenMP pool.
template <typename Args>
void run(tmk::KernelFn<Args> fn, const Args& args, int64_t items, int64_t grain) {
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

}  // namespace tmk_bind

// Operators one binding file defines and another calls (decode_layers.cpp runs a whole
// decode step through them).
namespace tmk_ops {

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);
void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void silu_and_mul(at::Tensor& out, const at::Tensor& gate_up);
void rotary_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor& kv_cache,
                      const at::Tensor& slots, int64_t num_heads);
void stored_matmul(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t ggml_type, bool rows8);

}  // namespace tmk_ops
