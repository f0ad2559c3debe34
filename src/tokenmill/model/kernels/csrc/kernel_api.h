// The contract between the torch bindings (bindings.cpp) and the kernels compiled once
// per instruction set (kernels_isa.cpp). No torch header here: the kernel translation
// unit sees raw pointers and sizes only, so nothing inline from torch can be compiled
// with AVX-512 instructions and then shared with code that runs on an AVX2 CPU.
#pragma once

#include <cstdint>

namespace tmk {

// Storage types of 16-bit floats (bit patterns; the kernels widen them to float32).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };

constexpr int64_t kMaxHeadDim = 512;  // rows this long keep their float32 copy on the stack
constexpr int64_t kMaxGroup = 8;      // query heads per KV head in decode attention

// out[r, h] = softmax(q[r, h] . K[r]^T * scale) V[r] for one query token per request,
// reading K and V from the paged cache in place.
struct DecodeAttentionArgs {
  void* out;                    // [num_reqs, num_heads, head_dim]
  const void* q;                // [num_reqs, num_heads, head_dim], row stride q_stride
  const void* kv_cache;         // [2, num_kv_heads, num_blocks, block_size, head_dim]
  const int32_t* block_tables;  // [num_reqs, max_blocks]
  const int32_t* seq_lens;      // [num_reqs]
  int64_t num_heads, num_kv_heads, head_dim, q_stride, num_blocks, block_size, max_blocks;
  float scale;
};

// x = RMSNorm(x [+ residual]) * weight per row; with residual, residual += x first
// (both in place). Without residual, the result goes to out.
struct RmsNormArgs {
  void* out;         // [rows, dim]; equals x for the residual form
  const void* x;     // [rows, dim]
  void* residual;    // [rows, dim] or nullptr
  const void* weight;  // [dim]
  int64_t dim;
  float eps;
};

// out = silu(gate) * up over gate_up = [gate | up].
struct SiluAndMulArgs {
  void* out;            // [rows, dim]
  const void* gate_up;  // [rows, 2 * dim]
  int64_t dim;
};

// Rotate q and k heads of qkv in place (rotate-half layout) and store k, v in the cache.
struct RotaryCacheArgs {
  void* qkv;               // [tokens, (num_heads + 2 * num_kv_heads) * head_dim]
  const void* cos;         // [tokens, head_dim]
  const void* signed_sin;  // [tokens, head_dim], first half negated
  void* kv_cache;          // [2, num_kv_heads, cache_slots, head_dim]
  const int64_t* slots;    // [tokens]
  int64_t num_heads, num_kv_heads, head_dim, cache_slots;
};

// One token per row of softmax(logits) by the keyed exponential race.
struct SampleArgs {
  int64_t* out;          // [rows]
  const float* logits;   // [rows, vocab]
  const int64_t* keys;   // [rows]
  int64_t vocab;
};

// Stored weight formats the weight kernels read in place: 32- and 16-bit floats and ggml's
// quantized blocks (ggml type ids in the bindings' table; layouts in weight_formats.h).
enum WeightFormat : int {
  kWF16 = 0, kWBF16, kWQ4_0, kWQ4_1, kWQ5_0, kWQ5_1, kWQ8_0, kWQ4_K, kWQ5_K, kWQ6_K, kWF32,
  // Rows interleaved in groups of 8: Q4_0, Q4_1 and Q8_0 for quant_matmul (quant_matmul.h,
  // Rows8), float16 and bfloat16 for weight_matmul (weight_matmul.h).
  kWQ4_0x8, kWQ4_1x8, kWQ8_0x8, kWF16x8, kWBF16x8, kNumWeightFormats
};

// Writes the k float32 values of one stored row.
using RowDecoder = void (*)(const uint8_t* row, float* out, int64_t k);

// out[t, n] = sum_k x[t, k] * W[n, k], W stored as `format` rows of row_bytes. Work items
// are panels of kPanelRows output rows: each panel is decoded once into float32 (in L1)
// and multiplied by every token.
constexpr int64_t kPanelRows = 4;
struct WeightMatmulArgs {
  float* out;          // [tokens, n], row stride ldo
  const float* x;      // [tokens, k]
  const uint8_t* w;    // [n, row_bytes]
  int64_t tokens, n, k, row_bytes, ldo;
  WeightFormat format;
};

// out[i] = decoded row rows[i] of W (embedding lookups, tests).
struct DecodeRowsArgs {
  float* out;             // [num_rows, k]
  const uint8_t* w;       // [n, row_bytes]
  const int64_t* rows;    // [num_rows]
  int64_t k, row_bytes;
  WeightFormat format;
};

// Activations quantized per 32-value block for integer dot products with quantized
// weights (as llama.cpp's Q8_1): q = round(x / d), d = max|x| / 127, s = d * sum(q).
struct QuantizeActivationsArgs {
  const float* x;  // [tokens, k]
  int8_t* q;       // [tokens, k]
  float* d;        // [tokens, k / 32]
  float* s;        // [tokens, k / 32]
  int64_t k;
};

// out[t, n] = sum over blocks of W[n] . (d * q)[t], with the weight blocks' integers
// multiplied by the activations' in int8/int16/int32 and scaled once per block. Formats:
// Q4_0, Q4_1, Q8_0, Q4_K, Q6_K (int8_activations in weight_ops.cpp's table), and the first
// three with rows interleaved by 8. Work items are output rows (groups of 8 rows when
// interleaved).
struct QuantMatmulArgs {
  float* out;          // [tokens, n], row stride ldo
  const int8_t* xq;    // [tokens, k]
  const float* xd;     // [tokens, k / 32]
  const float* xs;     // [tokens, k / 32]
  const uint8_t* w;    // [n, row_bytes]
  int64_t tokens, n, k, row_bytes, ldo;
  WeightFormat format;
};

// Every kernel processes items [begin, end) (requests x KV heads, rows or tokens): the
// caller owns the threads, so all kernels share torch's one OpenMP pool.
template <typename Args>
using KernelFn = void (*)(const Args&, int64_t begin, int64_t end);

struct KernelTable {
  const char* name;
  KernelFn<DecodeAttentionArgs> decode_attention[kNumDTypes];
  KernelFn<RmsNormArgs> rms_norm[kNumDTypes];
  KernelFn<SiluAndMulArgs> silu_and_mul[kNumDTypes];
  KernelFn<RotaryCacheArgs> rotary_and_cache[kNumDTypes];
  KernelFn<SampleArgs> sample;
  KernelFn<WeightMatmulArgs> weight_matmul;
  KernelFn<DecodeRowsArgs> decode_rows;
  KernelFn<QuantizeActivationsArgs> quantize_activations;
  KernelFn<QuantMatmulArgs> quant_matmul;
};

// The tables compiled into this library; nullptr where the compiler could not build
// that instruction set (e.g. not x86-64). Whether the CPU can run one is the caller's check.
const KernelTable* generic_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace tmk
