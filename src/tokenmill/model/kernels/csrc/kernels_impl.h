// The kernels, written once against the vector interface (FVec, kW, load, store, fmadd,
// exp, round_to, reduce_*) and compiled once per instruction set: kernels_isa.cpp
// includes this file inside each ISA's namespace after that ISA's vec_*.h. No include
// guard. Scalar tails use the scalar.h functions with the same rounding as the lanes.
//
// All arithmetic is float32. The elementwise kernels round to the storage dtype exactly
// where the PyTorch ops in tokenmill/model/layers do; decode attention keeps its scores
// and probabilities in float32 where the PyTorch path rounds them to the dtype.

// Where the whole-vector part of an n-element loop ends (the rest is the scalar tail).
inline int64_t vec_end(int64_t n) { return n - n % kW; }

// dst[i] = float(src[i]) for i < n.
template <typename T>
inline void widen(float* dst, const T* src, int64_t n) {
  int64_t i = 0;
  for (const int64_t vend = vec_end(n); i < vend; i += kW) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  FVec acc = set1(0.f);
  int64_t i = 0;
  for (const int64_t vend = vec_end(n); i < vend; i += kW) acc = fmadd(load(a + i), load(b + i), acc);
  float s = reduce_add(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// acc[i] += p * x[i] for i < n.
inline void axpy(float* acc, float p, const float* x, int64_t n) {
  const FVec pv = set1(p);
  int64_t i = 0;
  for (const int64_t vend = vec_end(n); i < vend; i += kW) store(acc + i, fmadd(pv, load(x + i), load(acc + i)));
  for (; i < n; ++i) acc[i] += p * x[i];
}

// x[i] = exp(x[i] - shift) for i < n; returns their sum.
inline float exp_shifted_sum(float* x, float shift, int64_t n) {
  const FVec sv = set1(shift);
  FVec sum = set1(0.f);
  int64_t i = 0;
  for (const int64_t vend = vec_end(n); i < vend; i += kW) {
    const FVec e = exp(sub(load(x + i), sv));
    store(x + i, e);
    sum = add(sum, e);
  }
  float s = reduce_add(sum);
  for (; i < n; ++i) s += (x[i] = fast_exp(x[i] - shift));
  return s;
}

inline float max_of(const float* x, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
  if (n >= kW) {
    FVec mv = load(x);
    for (i = kW; i < vec_end(n); i += kW) mv = max(mv, load(x + i));
    m = reduce_max(mv);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// kHeadDim > 0 fixes the head size at compile time (the common 64 and 128), so the loops
// over a row unroll; 0 reads it from the arguments.
template <typename T, int kHeadDim>
void decode_attention(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : a.head_dim;
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t head_stride = a.num_blocks * a.block_size * head_dim;  // one KV head of the cache
  const T* kv = static_cast<const T*>(a.kv_cache);
  const T* q_all = static_cast<const T*>(a.q);
  T* out_all = static_cast<T*>(a.out);
  std::vector<float> scores;  // [group, seq_len]
  alignas(64) float qf[kMaxGroup * kMaxHeadDim], acc[kMaxGroup * kMaxHeadDim], row[kMaxHeadDim];
  // One work item = one (request, KV head): its K/V rows are read and widened once, for
  // all `group` query heads that share them.
  for (int64_t item = begin; item < end; ++item) {
    const int64_t req = item / a.num_kv_heads, kv_head = item % a.num_kv_heads;
    const int64_t seq_len = a.seq_lens[req];
    const int32_t* table = a.block_tables + req * a.max_blocks;
    scores.resize(group * seq_len);
    for (int64_t g = 0; g < group; ++g) {
      float* qg = qf + g * head_dim;
      widen(qg, q_all + req * a.q_stride + (kv_head * group + g) * head_dim, head_dim);
      for (int64_t d = 0; d < head_dim; ++d) qg[d] *= a.scale;
    }
    const T* k_head = kv + kv_head * head_stride;
    const T* v_head = k_head + a.num_kv_heads * head_stride;
    // Pass 1: the score of every cached token for every query head, a block at a time.
    for (int64_t start = 0; start < seq_len; start += a.block_size) {
      const T* k = k_head + static_cast<int64_t>(table[start / a.block_size]) * a.block_size * head_dim;
      const int64_t n = std::min(a.block_size, seq_len - start);
      for (int64_t i = 0; i < n; ++i, k += head_dim) {
        widen(row, k, head_dim);
        for (int64_t g = 0; g < group; ++g) scores[g * seq_len + start + i] = dot(qf + g * head_dim, row, head_dim);
      }
    }
    // Softmax per query head, left unnormalised: the sum divides the output at the end.
    float denom[kMaxGroup];
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores.data() + g * seq_len;
      denom[g] = exp_shifted_sum(s, max_of(s, seq_len), seq_len);
    }
    // Pass 2: the probability-weighted sum of the values.
    std::fill(acc, acc + group * head_dim, 0.f);
    for (int64_t start = 0; start < seq_len; start += a.block_size) {
      const T* v = v_head + static_cast<int64_t>(table[start / a.block_size]) * a.block_size * head_dim;
      const int64_t n = std::min(a.block_size, seq_len - start);
      for (int64_t i = 0; i < n; ++i, v += head_dim) {
        widen(row, v, head_dim);
        for (int64_t g = 0; g < group; ++g) axpy(acc + g * head_dim, scores[g * seq_len + start + i], row, head_dim);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      T* o = out_all + (req * a.num_heads + kv_head * group + g) * head_dim;
      const float* ag = acc + g * head_dim;
      const float inv = 1.f / denom[g];
      int64_t d = 0;
      for (const int64_t vend = vec_end(head_dim); d < vend; d += kW) store(o + d, mul(load(ag + d), set1(inv)));
      for (; d < head_dim; ++d) o[d] = from_float<T>(ag[d] * inv);
    }
  }
}

template <typename T>
void decode_attention_any(const DecodeAttentionArgs& a, int64_t begin, int64_t end) {
  if (a.head_dim == 64) return decode_attention<T, 64>(a, begin, end);
  if (a.head_dim == 128) return decode_attention<T, 128>(a, begin, end);
  decode_attention<T, 0>(a, begin, end);
}

// Per row: [residual += x;] out = weight * round(h * rsqrt(mean(h^2) + eps)), normalising in
// float32 and scaling in the dtype, like RMSNorm._norm (and HF).
template <typename T>
void rms_norm(const RmsNormArgs& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  const T* weight = static_cast<const T*>(a.weight);
  std::vector<float> h(dim);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * dim;
    T* out = static_cast<T*>(a.out) + r * dim;
    if (a.residual != nullptr) {
      T* res = static_cast<T*>(a.residual) + r * dim;
      int64_t i = 0;
      for (const int64_t vend = vec_end(dim); i < vend; i += kW) {
        const FVec sum = round_to<T>(add(load(x + i), load(res + i)));
        store(res + i, sum);  // exact: already representable in T
        store(h.data() + i, sum);
      }
      for (; i < dim; ++i) {
        h[i] = tmk::round_to<T>(to_float(x[i]) + to_float(res[i]));
        res[i] = from_float<T>(h[i]);
      }
    } else {
      widen(h.data(), x, dim);
    }
    const float inv = 1.f / std::sqrt(dot(h.data(), h.data(), dim) / static_cast<float>(dim) + a.eps);
    int64_t i = 0;
    for (const int64_t vend = vec_end(dim); i < vend; i += kW) {
      store(out + i, mul(load(weight + i), round_to<T>(mul(load(h.data() + i), set1(inv)))));
    }
    for (; i < dim; ++i) out[i] = from_float<T>(to_float(weight[i]) * tmk::round_to<T>(h[i] * inv));
  }
}

// out = round(silu(gate)) * up, rounding after the silu like the two-op reference.
template <typename T>
void silu_and_mul(const SiluAndMulArgs& a, int64_t begin, int64_t end) {
  const int64_t dim = a.dim;
  const FVec one = set1(1.f);
  for (int64_t r = begin; r < end; ++r) {
    const T* gate = static_cast<const T*>(a.gate_up) + r * 2 * dim;
    const T* up = gate + dim;
    T* out = static_cast<T*>(a.out) + r * dim;
    int64_t i = 0;
    for (const int64_t vend = vec_end(dim); i < vend; i += kW) {
      const FVec g = load(gate + i);
      store(out + i, mul(round_to<T>(div(g, add(one, exp(neg(g))))), load(up + i)));
    }
    for (; i < dim; ++i) {
      const float g = to_float(gate[i]);
      out[i] = from_float<T>(tmk::round_to<T>(g / (1.f + fast_exp(-g))) * to_float(up[i]));
    }
  }
}

// head[d] = round(round(x[d] * cos[d]) + round(x[d + shift] * signed_sin[d])) for d in
// [d0, d1): one half of rotate-half rotary.
template <typename T>
inline void rotate_half_range(T* head, const float* x, const T* cos, const T* sin, int64_t d0, int64_t d1,
                              int64_t shift) {
  int64_t d = d0;
  for (const int64_t vend = d0 + vec_end(d1 - d0); d < vend; d += kW) {
    const FVec a = round_to<T>(mul(load(x + d), load(cos + d)));
    const FVec b = round_to<T>(mul(load(x + d + shift), load(sin + d)));
    store(head + d, add(a, b));
  }
  for (; d < d1; ++d) {
    head[d] = from_float<T>(tmk::round_to<T>(x[d] * to_float(cos[d])) +
                            tmk::round_to<T>(x[d + shift] * to_float(sin[d])));
  }
}

// Rotates the q and k heads of each token in place and copies its k and v heads into
// the token's cache slot: one pass instead of a roll, three elementwise ops, a split and
// two index_copy_ calls.
template <typename T>
void rotary_and_cache(const RotaryCacheArgs& a, int64_t begin, int64_t end) {
  const int64_t head_dim = a.head_dim, half = head_dim / 2;
  const int64_t row = (a.num_heads + 2 * a.num_kv_heads) * head_dim;
  alignas(64) float x[kMaxHeadDim];
  for (int64_t t = begin; t < end; ++t) {
    T* token = static_cast<T*>(a.qkv) + t * row;
    const T* cos = static_cast<const T*>(a.cos) + t * head_dim;
    const T* sin = static_cast<const T*>(a.signed_sin) + t * head_dim;
    for (int64_t h = 0; h < a.num_heads + a.num_kv_heads; ++h) {
      T* head = token + h * head_dim;
      widen(x, head, head_dim);
      rotate_half_range(head, x, cos, sin, 0, half, half);
      rotate_half_range(head, x, cos, sin, half, head_dim, -half);
    }
    T* cache = static_cast<T*>(a.kv_cache);
    for (int64_t kv = 0; kv < 2; ++kv) {
      for (int64_t h = 0; h < a.num_kv_heads; ++h) {
        const T* src = token + (a.num_heads + kv * a.num_kv_heads + h) * head_dim;
        T* dst = cache + ((kv * a.num_kv_heads + h) * a.cache_slots + a.slots[t]) * head_dim;
        std::memcpy(dst, src, head_dim * sizeof(T));
      }
    }
  }
}

// One sample per row of softmax(logits): the exponential race argmax_v p_v / E_v with
// E_v = -log(U_v) ~ Exp(1) picks v with probability p_v. The draws come from the row's
// key, so a request seeded with its own generator gets the same tokens whatever else is
// in the batch. The scalar loop vectorises under this ISA's target; it must stay the
// same operations as the PyTorch fallback in layers/sampler.py (the same tokens).
inline void sample(const SampleArgs& a, int64_t begin, int64_t end) {
  const int64_t vocab = a.vocab;
  std::vector<float> score(vocab);
  for (int64_t r = begin; r < end; ++r) {
    const float* l = a.logits + r * vocab;
    const uint64_t key = static_cast<uint64_t>(a.keys[r]);
    const float mx = max_of(l, vocab);
    float* sc = score.data();
#pragma omp simd
    for (int64_t v = 0; v < vocab; ++v) {
      const float e = fast_exp(l[v] - mx);
      const float p = l[v] == -INFINITY ? 0.f : e;  // masked stays impossible
      sc[v] = p / -fast_log(uniform_at(key, static_cast<uint32_t>(v)));
    }
    const float best = max_of(sc, vocab);
    int64_t pick = 0;
    while (pick < vocab - 1 && sc[pick] != best) ++pick;
    a.out[r] = pick;
  }
}

#include "weight_formats.h"
#include "weight_matmul.h"
#include "quant_matmul.h"

const KernelTable kTable = {
    TM_ISA_NAME,
    {decode_attention_any<float>, decode_attention_any<bf16>, decode_attention_any<f16>},
    {rms_norm<float>, rms_norm<bf16>, rms_norm<f16>},
    {silu_and_mul<float>, silu_and_mul<bf16>, silu_and_mul<f16>},
    {rotary_and_cache<float>, rotary_and_cache<bf16>, rotary_and_cache<f16>},
    sample,
    weight_matmul,
    decode_rows,
    quantize_activations,
    quant_matmul,
};
