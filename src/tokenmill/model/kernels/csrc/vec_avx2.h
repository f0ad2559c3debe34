// AVX2 + FMA + F16C vector type: eight float32 lanes in a __m256. bfloat16 rows widen by
// a shift and narrow with integer round-to-nearest-even; float16 rows use F16C's
// conversions (also round-to-nearest-even). Included inside the `avx2` namespace of
// kernels_isa.cpp under `#pragma GCC target("avx2,fma,f16c")`; same interface as
// vec_generic.h.

struct FVec {
  static constexpr int kWidth = 8;
  __m256 v;
};
constexpr int64_t kW = FVec::kWidth;

inline FVec set1(float x) { return {_mm256_set1_ps(x)}; }
inline FVec load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline FVec load(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
inline FVec load(const f16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }

// The bfloat16 bit pattern of each lane in the low half of a 32-bit integer, rounded to
// nearest even, NaN as 0x7FC0 (as from_float<bf16>).
inline __m256i bf16_bits(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
}
inline void store(float* p, FVec x) { _mm256_storeu_ps(p, x.v); }
inline void store(bf16* p, FVec x) {
  // Pack 8 x int32 -> 8 x uint16: packus works per 128-bit half, the permute joins them.
  const __m256i packed = _mm256_packus_epi32(bf16_bits(x.v), _mm256_setzero_si256());
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}
inline void store(f16* p, FVec x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}

inline FVec add(FVec a, FVec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline FVec sub(FVec a, FVec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline FVec mul(FVec a, FVec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline FVec div(FVec a, FVec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline FVec neg(FVec a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.f))}; }
inline FVec max(FVec a, FVec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline FVec fmadd(FVec a, FVec b, FVec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }

// fast_exp (scalar.h) lane by lane, with the same operations in the same order (no fused
// multiply-adds), so vector lanes and scalar tails agree to the bit.
inline FVec exp(FVec a) {
  __m256 x = _mm256_min_ps(_mm256_max_ps(a.v, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  x = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = _mm256_add_ps(_mm256_mul_ps(y, x), _mm256_set1_ps(c));
  }
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(y, x), x), x), _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return {_mm256_mul_ps(y, _mm256_castsi256_ps(scale))};
}

template <typename T>
inline FVec round_to(FVec a);
template <>
inline FVec round_to<float>(FVec a) { return a; }
template <>
inline FVec round_to<bf16>(FVec a) { return {_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(a.v), 16))}; }
template <>
inline FVec round_to<f16>(FVec a) { return {_mm256_cvtph_ps(_mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT))}; }

// Small integers of stored weights as floats, 8 at a time (see vec_generic.h).
inline __m256i load_u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline FVec load_u4(const uint8_t* p, int shift) {
  const __m256i q = _mm256_and_si256(_mm256_srl_epi32(load_u8x8(p), _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(15));
  return {_mm256_cvtepi32_ps(q)};
}
inline FVec load_q6(const uint8_t* ql, int lo_shift, const uint8_t* qh, int hi_shift) {
  const __m256i lo = _mm256_and_si256(_mm256_srl_epi32(load_u8x8(ql), _mm_cvtsi32_si128(lo_shift)), _mm256_set1_epi32(15));
  const __m256i hi = _mm256_and_si256(_mm256_srl_epi32(load_u8x8(qh), _mm_cvtsi32_si128(hi_shift)), _mm256_set1_epi32(3));
  return {_mm256_cvtepi32_ps(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)))};
}
inline FVec load_i8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}

// One float16 (block scales of stored weights): exact in every path.
inline float f16_value(uint16_t bits) { return _cvtsh_ss(bits); }

inline float reduce_add(FVec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float reduce_max(FVec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
