// AVX2 integer blocks for the quantized matmul (quant_matmul.h): 32 weight bytes in a
// __m256i, products by vpmaddubsw (unsigned x signed bytes -> int16 pairs) and vpmaddwd
// (-> int32), as llama.cpp does. Included inside the `avx2` and `avx512` namespaces of
// kernels_isa.cpp (the AVX-512 path runs these 256-bit forms too). Interface as
// qvec_generic.h.

struct I8x32 {
  __m256i v;
};
struct F8 {
  __m256 v;
};
struct I32x8 {
  __m256i v;
};

inline F8 f8_set1(float x) { return {_mm256_set1_ps(x)}; }
inline F8 f8_halves(float a, float b) { return {_mm256_setr_m128(_mm_set1_ps(a), _mm_set1_ps(b))}; }
inline F8 f8_mul(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline F8 f8_add(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline F8 f8_load_f16(const uint8_t* p) {  // 8 float16 values
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline F8 f8_load_bf16(const uint8_t* p) {  // 8 bfloat16 values
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
}
inline void f8_store(float* p, F8 a) { _mm256_storeu_ps(p, a.v); }
inline F8 f8_fmadd(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline float f8_sum(F8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline I8x32 i8_load(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
inline I8x32 i8_nibbles(const uint8_t* qs) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);  // high nibbles in the top half
  return {_mm256_and_si256(both, _mm256_set1_epi8(15))};
}
inline I8x32 i8_nibbles_shifted(const uint8_t* bytes, int shift) {
  const __m256i v = _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)), _mm_cvtsi32_si128(shift));
  return {_mm256_and_si256(v, _mm256_set1_epi8(15))};
}
inline I8x32 i8_q6(const uint8_t* ql, int lo_shift, const uint8_t* qh, int hi_shift) {
  const __m256i lo = _mm256_and_si256(
      _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql)), _mm_cvtsi32_si128(lo_shift)),
      _mm256_set1_epi8(15));
  const __m256i hi = _mm256_and_si256(
      _mm256_srl_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)), _mm_cvtsi32_si128(hi_shift)),
      _mm256_set1_epi8(3));
  return {_mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32))};
}

// vpmaddubsw's int16 pair sums cannot saturate here: weight magnitudes are at most 128
// (Q8_0's -128; 15 and 32 for the 4- and 6-bit formats) and activations at most 127:
// 2 * 128 * 127 = 32512 < 32767.
inline F8 dot_u8(I8x32 w, I8x32 x) {
  const __m256i pairs = _mm256_maddubs_epi16(w.v, x.v);
  return {_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
inline F8 dot_i8(I8x32 w, I8x32 x) {  // signed weights: |w| times x with w's sign
  return dot_u8({_mm256_sign_epi8(w.v, w.v)}, {_mm256_sign_epi8(x.v, w.v)});
}

// The interleaved layouts (quant_matmul.h, Rows8): lane i of an I32x8 is row i's sum.
inline I32x8 i32_zero() { return {_mm256_setzero_si256()}; }
inline F8 i32_to_f8(I32x8 a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline I8x32 i8_bcast4(const int8_t* p) {  // 4 bytes into every lane
  int32_t four;
  std::memcpy(&four, p, 4);
  return {_mm256_set1_epi32(four)};
}
inline I8x32 i8_low_nibbles(I8x32 a) { return {_mm256_and_si256(a.v, _mm256_set1_epi8(15))}; }
inline I8x32 i8_high_nibbles(I8x32 a) { return {_mm256_and_si256(_mm256_srli_epi16(a.v, 4), _mm256_set1_epi8(15))}; }
// acc + per lane i: sum over bytes 4i..4i+3 of w1 * x1 + w2 * x2, for weights 0..15: the
// int16 sum of both pairs is at most 4 * 15 * 127 < 32767, so one widening serves both.
inline I32x8 i32_add_dot_u4_pair(I32x8 acc, I8x32 w1, I8x32 x1, I8x32 w2, I8x32 x2) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w1.v, x1.v), _mm256_maddubs_epi16(w2.v, x2.v));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
// acc + per lane i: sum over bytes 4i..4i+3 of w * x, both signed.
inline I32x8 i32_add_dot_i8(I32x8 acc, I8x32 w, I8x32 x) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w.v, w.v), _mm256_sign_epi8(x.v, w.v));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}
