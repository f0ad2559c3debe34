// The kernels of kernels_impl.h compiled once per instruction set, each in its own
// namespace under its own target options, into one library: a portable build that picks
// the widest set the CPU runs (bindings.cpp) instead of one -march=native build per CPU.
// Only this file sees the wide instruction sets, and it includes no torch header, so no
// shared inline function can carry AVX-512 code into a path an AVX2 CPU runs.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernel_api.h"
#include "scalar.h"

// Target pragmas are GCC's; other compilers build the generic path only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TM_X86_TARGETS 1
#include <immintrin.h>
#else
#define TM_X86_TARGETS 0
#endif

namespace tmk {

namespace generic {
#include "vec_generic.h"
#include "qvec_generic.h"
#define TM_ISA_NAME "generic"
#include "kernels_impl.h"
#undef TM_ISA_NAME
}  // namespace generic
const KernelTable* generic_kernels() { return &generic::kTable; }

#if TM_X86_TARGETS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "vec_avx2.h"
#include "qvec_avx2.h"
#define TM_ISA_NAME "avx2"
#include "kernels_impl.h"
#undef TM_ISA_NAME
}  // namespace avx2
#pragma GCC pop_options
const KernelTable* avx2_kernels() { return &avx2::kTable; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "vec_avx512.h"
#include "qvec_avx2.h"  // 256-bit integer blocks
#define TM_ISA_NAME "avx512"
#include "kernels_impl.h"
#undef TM_ISA_NAME
}  // namespace avx512
#pragma GCC pop_options
const KernelTable* avx512_kernels() { return &avx512::kTable; }
#else
const KernelTable* avx2_kernels() { return nullptr; }
const KernelTable* avx512_kernels() { return nullptr; }
#endif

}  // namespace tmk
