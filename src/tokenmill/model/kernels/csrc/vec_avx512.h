// AVX-512 (F, BW, VL, DQ) vector type: sixteen float32 lanes in a __m512. Same
// conversions and rounding as vec_avx2.h. Included inside the `avx512` namespace of
// kernels_isa.cpp under `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,...")`.

struct FVec {
  static constexpr int kWidth = 16;
  __m512 v;
};
constexpr int64_t kW = FVec::kWidth;

inline FVec set1(float x) { return {_mm512_set1_ps(x)}; }
inline FVec load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline FVec load(const bf16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))};
}
inline FVec load(const f16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }

inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7FC0));
}
inline void store(float* p, FVec x) { _mm512_storeu_ps(p, x.v); }
inline void store(bf16* p, FVec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(x.v)));
}
inline void store(f16* p, FVec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}

inline FVec add(FVec a, FVec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline FVec sub(FVec a, FVec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline FVec mul(FVec a, FVec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline FVec div(FVec a, FVec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline FVec neg(FVec a) { return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)))}; }
inline FVec max(FVec a, FVec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline FVec fmadd(FVec a, FVec b, FVec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }

// fast_exp (scalar.h) lane by lane, same operations in the same order.
inline FVec exp(FVec a) {
  __m512 x = _mm512_min_ps(_mm512_max_ps(a.v, _mm512_set1_ps(-87.3365f)), _mm512_set1_ps(88.3762f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  x = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    y = _mm512_add_ps(_mm512_mul_ps(y, x), _mm512_set1_ps(c));
  }
  y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(y, x), x), x), _mm512_set1_ps(1.f));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(y, _mm512_castsi512_ps(scale))};
}

template <typename T>
inline FVec round_to(FVec a);
template <>
inline FVec round_to<float>(FVec a) { return a; }
template <>
inline FVec round_to<bf16>(FVec a) { return {_mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(a.v), 16))}; }
template <>
inline FVec round_to<f16>(FVec a) { return {_mm512_cvtph_ps(_mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT))}; }

// Small integers of stored weights as floats, 16 at a time (see vec_generic.h).
inline __m512i load_u8x16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline FVec load_u4(const uint8_t* p, int shift) {
  const __m512i q = _mm512_and_si512(_mm512_srl_epi32(load_u8x16(p), _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(15));
  return {_mm512_cvtepi32_ps(q)};
}
inline FVec load_q6(const uint8_t* ql, int lo_shift, const uint8_t* qh, int hi_shift) {
  const __m512i lo = _mm512_and_si512(_mm512_srl_epi32(load_u8x16(ql), _mm_cvtsi32_si128(lo_shift)), _mm512_set1_epi32(15));
  const __m512i hi = _mm512_and_si512(_mm512_srl_epi32(load_u8x16(qh), _mm_cvtsi32_si128(hi_shift)), _mm512_set1_epi32(3));
  return {_mm512_cvtepi32_ps(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)))};
}
inline FVec load_i8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}

// One float16 (block scales of stored weights): exact in every path.
inline float f16_value(uint16_t bits) { return _cvtsh_ss(bits); }

inline float reduce_add(FVec a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(FVec a) { return _mm512_reduce_max_ps(a.v); }
