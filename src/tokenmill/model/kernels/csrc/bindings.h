// What the two binding files (bindings.cpp: ISA choice and the decode kernels;
// weight_ops.cpp: stored-weight products) share: the chosen kernel table, argument checks
// and the thread loop.
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
