// The portable vector type: eight float32 lanes as a plain array. Every operation is a
// loop over lanes that the compiler vectorises for whatever the target offers (SSE2 on
// any x86-64, NEON on arm64). Included inside the `generic` namespace of
// kernels_isa.cpp (no include guard); same interface as vec_avx2.h and vec_avx512.h.

struct FVec {
  static constexpr int kWidth = 8;
  float lane[kWidth];
};
constexpr int64_t kW = FVec::kWidth;

#define TM_LANES(expr)                                 \
  FVec r;                                              \
  for (int i = 0; i < kW; ++i) r.lane[i] = (expr);     \
  return r

inline FVec set1(float x) { TM_LANES(x); }
template <typename T>
inline FVec load(const T* p) { TM_LANES(to_float(p[i])); }
template <typename T>
inline void store(T* p, FVec v) {
  for (int i = 0; i < kW; ++i) p[i] = from_float<T>(v.lane[i]);
}
inline FVec add(FVec a, FVec b) { TM_LANES(a.lane[i] + b.lane[i]); }
inline FVec sub(FVec a, FVec b) { TM_LANES(a.lane[i] - b.lane[i]); }
inline FVec mul(FVec a, FVec b) { TM_LANES(a.lane[i] * b.lane[i]); }
inline FVec div(FVec a, FVec b) { TM_LANES(a.lane[i] / b.lane[i]); }
inline FVec neg(FVec a) { TM_LANES(-a.lane[i]); }
inline FVec max(FVec a, FVec b) { TM_LANES(a.lane[i] > b.lane[i] ? a.lane[i] : b.lane[i]); }
// a * b + c (two roundings here; one where the CPU has fused multiply-add).
inline FVec fmadd(FVec a, FVec b, FVec c) { TM_LANES(a.lane[i] * b.lane[i] + c.lane[i]); }
inline FVec exp(FVec a) { TM_LANES(fast_exp(a.lane[i])); }
template <typename T>
inline FVec round_to(FVec a) { TM_LANES(tmk::round_to<T>(a.lane[i])); }
// Small integers of stored weights as floats, kW at a time: ((p[i] >> shift) & 15) (4-bit
// values), ((ql[i] >> lo_shift) & 15) | ((qh[i] >> hi_shift) & 3) << 4 (Q6_K's 6-bit values),
// and signed bytes.
inline FVec load_u4(const uint8_t* p, int shift) { TM_LANES(static_cast<float>((p[i] >> shift) & 15)); }
inline FVec load_q6(const uint8_t* ql, int lo_shift, const uint8_t* qh, int hi_shift) {
  TM_LANES(static_cast<float>(((ql[i] >> lo_shift) & 15) | (((qh[i] >> hi_shift) & 3) << 4)));
}
inline FVec load_i8(const int8_t* p) { TM_LANES(static_cast<float>(p[i])); }
#undef TM_LANES

// One float16 (block scales of stored weights): exact in every path.
inline float f16_value(uint16_t bits) { return to_float(f16{bits}); }

inline float reduce_add(FVec a) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += a.lane[i];
  return s;
}
inline float reduce_max(FVec a) {
  float m = a.lane[0];
  for (int i = 1; i < kW; ++i) m = a.lane[i] > m ? a.lane[i] : m;
  return m;
}
