// CPU kernels for the decode hot path, built on first use (see kernels/__init__.py).
//
// Each kernel replaces a chain of small ATen ops whose dispatch cost dominated a decode
// step, or (attention) reads the paged KV cache in place instead of gathering it into
// a padded copy every layer. All compute in float32. The elementwise kernels round to the
// tensor dtype exactly where the PyTorch path in tokenmill/model/layers rounds, so both
// agree to the last bit wherever the reduction order allows; decode attention keeps its
// scores and probabilities in float32 where the PyTorch path rounds them to bfloat16.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
// bfloat16 <-> float32 written out with bit operations (same rounding as c10: to nearest
// even, NaN kept NaN) so that gcc vectorises the loops using them; c10's own conversion
// branches and kept every elementwise loop scalar (with std::exp, silu_and_mul was 8x slower).
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// Round-trip through the storage dtype: the value PyTorch would hold after an op.
template <typename T>
inline float round_to(float x) { return to_float(from_float<T>(x)); }

// exp(x) to about 1 ulp (Cephes' expf: 2^n times a degree-6 polynomial on
// [-ln2/2, ln2/2]). Unlike std::exp it inlines, so gcc vectorises the loops around it.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3365f), 88.3762f);
  const float n = std::nearbyint(x * 1.44269504088896341f);  // (std::floor does not vectorise)
  x -= n * 0.693359375f;
  x -= n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// Rows of at most this many elements keep their float32 copy on the stack.
constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kMaxGroup = 8;  // query heads per KV head

// The two inner loops of decode attention, over one cached token's K or V row and the
// `group` query heads that share it. Generic versions serve every dtype and head size;
// AVX-512 versions for bfloat16/float32 rows of 64 or 128 follow. Either way the row is
// widened to float32 once and reused by every head of the group.
template <typename T, int kHeadDim>
struct TokenRow {
  // scores[g * stride] = dot(q[g], k) for g < group; q: [group, head_dim] float32.
  static void score(const float* q, int64_t group, const T* k, int64_t head_dim, float* scores, int64_t stride) {
    float row[kMaxHeadDim];
    for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(k[d]);
    for (int64_t g = 0; g < group; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) s += q[g * head_dim + d] * row[d];
      scores[g * stride] = s;
    }
  }
  // acc[g] += p[g * stride] * v for g < group; acc: [group, head_dim] float32.
  static void accumulate(float* acc, int64_t group, const float* p, int64_t stride, const T* v, int64_t head_dim) {
    float row[kMaxHeadDim];
    for (int64_t d = 0; d < head_dim; ++d) row[d] = to_float(v[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float pg = p[g * stride];
      for (int64_t d = 0; d < head_dim; ++d) acc[g * head_dim + d] += pg * row[d];
    }
  }
};

#if defined(__AVX512F__)
inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16(const c10::BFloat16* x) {
  // bfloat16 is the top half of a float32: widen and shift.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename T, int kVecs>  // kVecs = head_dim / 16
struct TokenRowAvx512 {
  static void score(const float* q, int64_t group, const T* k, int64_t, float* scores, int64_t stride) {
    __m512 row[kVecs];
#pragma GCC unroll 8
    for (int i = 0; i < kVecs; ++i) row[i] = load16(k + 16 * i);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * 16 * kVecs;
      __m512 s = _mm512_mul_ps(load16(qg), row[0]);
#pragma GCC unroll 8
      for (int i = 1; i < kVecs; ++i) s = _mm512_fmadd_ps(load16(qg + 16 * i), row[i], s);
      scores[g * stride] = _mm512_reduce_add_ps(s);
    }
  }
  static void accumulate(float* acc, int64_t group, const float* p, int64_t stride, const T* v, int64_t) {
    __m512 row[kVecs];
#pragma GCC unroll 8
    for (int i = 0; i < kVecs; ++i) row[i] = load16(v + 16 * i);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * stride]);
      float* ag = acc + g * 16 * kVecs;
#pragma GCC unroll 8
      for (int i = 0; i < kVecs; ++i) _mm512_storeu_ps(ag + 16 * i, _mm512_fmadd_ps(pg, row[i], load16(ag + 16 * i)));
    }
  }
};
template <> struct TokenRow<c10::BFloat16, 64> : TokenRowAvx512<c10::BFloat16, 4> {};
template <> struct TokenRow<c10::BFloat16, 128> : TokenRowAvx512<c10::BFloat16, 8> {};
template <> struct TokenRow<float, 64> : TokenRowAvx512<float, 4> {};
template <> struct TokenRow<float, 128> : TokenRowAvx512<float, 8> {};
#endif

// kHeadDim > 0 fixes the head size at compile time (the common 64 and 128), so the
// per-token loops unroll into registers; 0 means "read it from the tensor".
template <typename T, int kHeadDim>
void paged_decode_attention_impl(
    at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  const int64_t num_reqs = q.size(0), num_heads = q.size(1), q_stride = q.stride(0);
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : q.size(2);
  const int64_t num_kv_heads = kv_cache.size(1), num_blocks = kv_cache.size(2), block_size = kv_cache.size(3);
  const int64_t group = num_heads / num_kv_heads, max_blocks = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* kv_ptr = kv_cache.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t head_stride = num_blocks * block_size * head_dim;  // one KV head of the cache
  const int64_t v_offset = num_kv_heads * head_stride;             // K half -> V half
  const float scale_f = static_cast<float>(scale);

  // One work item = one (request, KV head): its K/V rows are read exactly once, for all
  // `group` query heads that share them.
  at::parallel_for(0, num_reqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, seq_len]
    alignas(64) float qf[kMaxGroup * kMaxHeadDim], acc[kMaxGroup * kMaxHeadDim];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t req = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t seq_len = lens[req];
      const int32_t* table = tables + req * max_blocks;
      scores.resize(group * seq_len);
      for (int64_t g = 0; g < group; ++g) {
        const T* qh = q_ptr + req * q_stride + (kv_head * group + g) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = to_float(qh[d]) * scale_f;
      }
      const T* k_head = kv_ptr + kv_head * head_stride;
      const T* v_head = k_head + v_offset;
      // Pass 1: scores of every cached token, a block at a time.
      for (int64_t start = 0; start < seq_len; start += block_size) {
        const T* k = k_head + static_cast<int64_t>(table[start / block_size]) * block_size * head_dim;
        const int64_t n = std::min(block_size, seq_len - start);
        for (int64_t i = 0; i < n; ++i, k += head_dim) {
          TokenRow<T, kHeadDim>::score(qf, group, k, head_dim, scores.data() + start + i, seq_len);
        }
      }
      // Softmax per query head (max-subtracted), unnormalised; divide at the end.
      float denom[kMaxGroup];
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * seq_len;
        float mx = -INFINITY;
        for (int64_t t = 0; t < seq_len; ++t) mx = std::max(mx, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < seq_len; ++t) {
          s[t] = fast_exp(s[t] - mx);
          sum += s[t];
        }
        denom[g] = sum;
      }
      // Pass 2: probability-weighted sum of the values.
      std::fill(acc, acc + group * head_dim, 0.f);
      for (int64_t start = 0; start < seq_len; start += block_size) {
        const T* v = v_head + static_cast<int64_t>(table[start / block_size]) * block_size * head_dim;
        const int64_t n = std::min(block_size, seq_len - start);
        for (int64_t i = 0; i < n; ++i, v += head_dim) {
          TokenRow<T, kHeadDim>::accumulate(acc, group, scores.data() + start + i, seq_len, v, head_dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out_ptr + (req * num_heads + kv_head * group + g) * head_dim;
        const float inv = 1.f / denom[g];
        for (int64_t d = 0; d < head_dim; ++d) o[d] = from_float<T>(acc[g * head_dim + d] * inv);
      }
    }
  });
}

// out[r] = weight * round(x[r] * rsqrt(mean(x[r]^2) + eps)), in float32, rounded like
// RMSNorm.forward's reference (normalise in float32, scale in the input dtype).
template <typename T>
inline void rms_norm_row(T* __restrict__ out, const float* __restrict__ x, const T* __restrict__ weight, int64_t dim,
                         float eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < dim; ++i) sq += x[i] * x[i];
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = from_float<T>(to_float(weight[i]) * round_to<T>(x[i] * inv));
}

template <typename T>
void rms_norm_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  const T* x_ptr = x.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(dim);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < dim; ++i) xf[i] = to_float(x_ptr[r * dim + i]);
      rms_norm_row(o_ptr + r * dim, xf.data(), w_ptr, dim, static_cast<float>(eps));
    }
  });
}

// residual += x; x = rms_norm(residual). Both in place: one pass instead of an add,
// a cast, a norm, a cast and a multiply.
template <typename T>
void add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  T* x_ptr = x.data_ptr<T>();
  T* r_ptr = residual.data_ptr<T>();
  const T* w_ptr = weight.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dim);
    for (int64_t r = begin; r < end; ++r) {
      T* __restrict__ xr = x_ptr + r * dim;
      T* __restrict__ rr = r_ptr + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float h = round_to<T>(to_float(xr[i]) + to_float(rr[i]));
        rr[i] = from_float<T>(h);  // exact: h is already representable
        sum[i] = h;
      }
      rms_norm_row(xr, sum.data(), w_ptr, dim, static_cast<float>(eps));
    }
  });
}

// out = silu(gate) * up over gate_up = [gate | up], rounding after the silu like the
// two-op reference.
template <typename T>
void silu_and_mul_impl(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t rows = gate_up.size(0), dim = gate_up.size(1) / 2;
  const T* in = gate_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = in + r * 2 * dim;
      const T* u = g + dim;
      T* orow = o + r * dim;
      for (int64_t i = 0; i < dim; ++i) {
        const float gf = to_float(g[i]);
        orow[i] = from_float<T>(round_to<T>(gf / (1.f + fast_exp(-gf))) * to_float(u[i]));
      }
    }
  });
}

// Rotate the query and key heads of qkv in place (rotate-half layout) and store this
// step's keys and values in their cache slots: one pass over the fused projection
// output instead of a roll, three elementwise ops, a split and two index_copy_ calls.
// Rounds like the reference: round(round(x * cos) + round(roll(x) * signed_sin)).
template <typename T>
void rotary_and_cache_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin,
                           at::Tensor& kv_cache, const at::Tensor& slots, int64_t num_heads) {
  const int64_t tokens = qkv.size(0), num_kv_heads = kv_cache.size(1), head_dim = kv_cache.size(4);
  const int64_t cache_slots = kv_cache.size(2) * kv_cache.size(3), half = head_dim / 2;
  const int64_t row = qkv.size(1);
  T* qkv_ptr = qkv.data_ptr<T>();
  const T* cos_ptr = cos.data_ptr<T>();
  const T* sin_ptr = signed_sin.data_ptr<T>();
  T* cache = kv_cache.data_ptr<T>();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < cache_slots, "rotary_and_cache: slot ", slot_ptr[t], " out of range");
  }
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    float x[kMaxHeadDim];
    for (int64_t t = begin; t < end; ++t) {
      T* token = qkv_ptr + t * row;
      const T* c = cos_ptr + t * head_dim;
      const T* sn = sin_ptr + t * head_dim;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
        T* __restrict__ head = token + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) x[d] = to_float(head[d]);
        for (int64_t d = 0; d < head_dim; ++d) {
          const float rolled = x[d < half ? d + half : d - half];
          head[d] = from_float<T>(round_to<T>(x[d] * to_float(c[d])) + round_to<T>(rolled * to_float(sn[d])));
        }
      }
      const int64_t slot = slot_ptr[t];
      for (int64_t kv = 0; kv < 2; ++kv) {
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          const T* src = token + (num_heads + kv * num_kv_heads + h) * head_dim;
          T* dst = cache + ((kv * num_kv_heads + h) * cache_slots + slot) * head_dim;
          std::memcpy(dst, src, head_dim * sizeof(T));
        }
      }
    }
  });
}

// log(x) for normal x > 0 to about 1 ulp (Cephes' logf), inlined so loops vectorise.
inline float fast_log(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 126);
  bits = (bits & 0x807FFFFFu) | 0x3F000000u;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.f : e;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// A uniform draw in (0, 1) that depends only on (key, index): splitmix64's finaliser of a
// Weyl sequence. 24 random bits, centred, so never 0 or 1.
inline float uniform_at(uint64_t key, uint64_t index) {
  uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return (static_cast<float>(z >> 40) + 0.5f) * (1.f / 16777216.f);
}

// One sample per row of softmax(logits): the exponential race argmax_v p_v / E_v with
// E_v = -log(U_v) ~ Exp(1) picks v with probability p_v. The draws come from the row's
// key, so a request seeded with its own generator gets the same tokens whatever else is
// in the batch. Replaces softmax, a uniform_ over every logit (the slow part: torch's
// generator is sequential), log, neg, div and argmax.
void sample_exponential_race_impl(at::Tensor& out, const at::Tensor& logits, const at::Tensor& keys) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float* l_ptr = logits.data_ptr<float>();
  const int64_t* key_ptr = keys.data_ptr<int64_t>();
  int64_t* out_ptr = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(vocab);
    for (int64_t r = begin; r < end; ++r) {
      const float* l = l_ptr + r * vocab;
      const uint64_t key = static_cast<uint64_t>(key_ptr[r]);
      float mx = -INFINITY;
      for (int64_t v = 0; v < vocab; ++v) mx = std::max(mx, l[v]);
      float* sc = score.data();
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) {
        const float p = l[v] == -INFINITY ? 0.f : fast_exp(l[v] - mx);  // masked stays impossible
        sc[v] = p / -fast_log(uniform_at(key, static_cast<uint64_t>(v)));
      }
      float best = -1.f;
      for (int64_t v = 0; v < vocab; ++v) best = std::max(best, sc[v]);
      int64_t pick = 0;
      while (pick < vocab - 1 && sc[pick] != best) ++pick;
      out_ptr[r] = pick;
    }
  });
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

#define DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                   \
  switch (DTYPE) {                                                               \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }           \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }         \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE);            \
  }

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache, at::Tensor block_tables,
                            at::Tensor seq_lens, double scale) {
  for (auto* p : {&out, &kv_cache, &block_tables, &seq_lens}) check_cpu_contiguous(*p, "paged_decode_attention");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode_attention: bad shapes");
  // q may be a view into the fused q|k rows: only its head rows must be dense.
  TORCH_CHECK(q.device().is_cpu() && q.stride(2) == 1 && q.stride(1) == q.size(2), "paged_decode_attention: q layout");
  TORCH_CHECK(out.sizes() == q.sizes(), "paged_decode_attention: out must have q's shape");
  TORCH_CHECK(q.size(2) == kv_cache.size(4) && q.size(2) <= kMaxHeadDim, "paged_decode_attention: head_dim");
  TORCH_CHECK(q.size(1) % kv_cache.size(1) == 0 && q.size(1) / kv_cache.size(1) <= kMaxGroup,
              "paged_decode_attention: query heads per KV head must be at most ", kMaxGroup);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "tables must be int32");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type() && out.scalar_type() == q.scalar_type(), "dtype mismatch");
  const int64_t num_reqs = q.size(0), max_blocks = block_tables.size(1), num_blocks = kv_cache.size(2);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_reqs && seq_lens.numel() == num_reqs,
              "paged_decode_attention: one block table and one length per request");
  // Every block the kernel will read must exist: a bad table is an error, not a stray read.
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < num_reqs; ++r) {
    TORCH_CHECK(lens[r] >= 1 && lens[r] <= max_blocks * kv_cache.size(3), "paged_decode_attention: seq_len ", lens[r],
                " out of range");
    for (int64_t b = 0; b * kv_cache.size(3) < lens[r]; ++b) {
      const int32_t id = tables[r * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode_attention: block id ", id, " out of range");
    }
  }
  const int64_t head_dim = q.size(2);
  DISPATCH_FLOAT_TYPES(q.scalar_type(), "paged_decode_attention", [&] {
    if (head_dim == 64) {
      paged_decode_attention_impl<scalar_t, 64>(out, q, kv_cache, block_tables, seq_lens, scale);
    } else if (head_dim == 128) {
      paged_decode_attention_impl<scalar_t, 128>(out, q, kv_cache, block_tables, seq_lens, scale);
    } else {
      paged_decode_attention_impl<scalar_t, 0>(out, q, kv_cache, block_tables, seq_lens, scale);
    }
  });
}

void rms_norm(at::Tensor out, at::Tensor x, at::Tensor weight, double eps) {
  for (auto* p : {&out, &x, &weight}) check_cpu_contiguous(*p, "rms_norm");
  DISPATCH_FLOAT_TYPES(x.scalar_type(), "rms_norm", [&] { rms_norm_impl<scalar_t>(out, x, weight, eps); });
}

void add_rms_norm(at::Tensor x, at::Tensor residual, at::Tensor weight, double eps) {
  for (auto* p : {&x, &residual, &weight}) check_cpu_contiguous(*p, "add_rms_norm");
  DISPATCH_FLOAT_TYPES(x.scalar_type(), "add_rms_norm", [&] { add_rms_norm_impl<scalar_t>(x, residual, weight, eps); });
}

void silu_and_mul(at::Tensor out, at::Tensor gate_up) {
  for (auto* p : {&out, &gate_up}) check_cpu_contiguous(*p, "silu_and_mul");
  DISPATCH_FLOAT_TYPES(gate_up.scalar_type(), "silu_and_mul", [&] { silu_and_mul_impl<scalar_t>(out, gate_up); });
}

void rotary_and_cache(at::Tensor qkv, at::Tensor cos, at::Tensor signed_sin, at::Tensor kv_cache, at::Tensor slots,
                      int64_t num_heads) {
  for (auto* p : {&qkv, &cos, &signed_sin, &kv_cache, &slots}) check_cpu_contiguous(*p, "rotary_and_cache");
  const int64_t num_kv_heads = kv_cache.size(1), head_dim = kv_cache.size(4);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, "rotary_and_cache: qkv shape");
  TORCH_CHECK(cos.numel() == qkv.size(0) * head_dim && signed_sin.numel() == cos.numel(), "rotary_and_cache: cos/sin");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0), "rotary_and_cache: slots");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= kMaxHeadDim, "rotary_and_cache: head_dim");
  TORCH_CHECK(qkv.scalar_type() == kv_cache.scalar_type() && cos.scalar_type() == qkv.scalar_type(), "dtype mismatch");
  DISPATCH_FLOAT_TYPES(qkv.scalar_type(), "rotary_and_cache",
                       [&] { rotary_and_cache_impl<scalar_t>(qkv, cos, signed_sin, kv_cache, slots, num_heads); });
}

void sample_exponential_race(at::Tensor out, at::Tensor logits, at::Tensor keys) {
  for (auto* p : {&out, &logits, &keys}) check_cpu_contiguous(*p, "sample_exponential_race");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sample_exponential_race: float32 [rows, vocab]");
  TORCH_CHECK(keys.scalar_type() == at::kLong && out.scalar_type() == at::kLong && keys.numel() == logits.size(0) &&
                  out.numel() == logits.size(0),
              "sample_exponential_race: one int64 key and one int64 output per row");
  sample_exponential_race_impl(out, logits, keys);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("MAX_QUERY_HEADS_PER_KV_HEAD") = kMaxGroup;
  m.attr("MAX_HEAD_DIM") = kMaxHeadDim;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache, in place");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * weight");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; x = RMSNorm(residual) * weight (both in place)");
  m.def("rotary_and_cache", &rotary_and_cache,
        "rotate q and k heads of qkv in place and store k, v in their cache slots");
  m.def("sample_exponential_race", &sample_exponential_race,
        "one sample per row of softmax(logits), draws keyed per row");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(gate) * up over [gate | up]");
}
