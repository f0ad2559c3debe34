// Portable integer blocks for the quantized matmul (quant_matmul.h): 32 int8 values of a
// weight block and 8-lane float32 partial sums, as plain arrays. Same interface as
// qvec_avx2.h. Included inside the `generic` namespace of kernels_isa.cpp (no guard).

struct I8x32 {
  int8_t v[32];
};
struct F8 {
  float v[8];
};
struct I32x8 {
  int32_t v[8];
};

inline F8 f8_set1(float x) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = x;
  return r;
}
// Lanes 0-3 a, lanes 4-7 b (the two 16-value halves of a block, see dot_*).
inline F8 f8_halves(float a, float b) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = i < 4 ? a : b;
  return r;
}
inline F8 f8_mul(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
inline F8 f8_load_f16(const uint8_t* p) {  // 8 float16 values
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint16_t bits;
    std::memcpy(&bits, p + 2 * i, 2);
    r.v[i] = f16_value(bits);
  }
  return r;
}
inline F8 f8_load_bf16(const uint8_t* p) {  // 8 bfloat16 values
  F8 r;
  for (int i = 0; i < 8; ++i) {
    uint32_t bits = 0;
    std::memcpy(&bits, p + 2 * i, 2);
    bits <<= 16;
    std::memcpy(&r.v[i], &bits, 4);
  }
  return r;
}
inline void f8_store(float* p, F8 a) { std::memcpy(p, a.v, sizeof(a.v)); }
inline F8 f8_add(F8 a, F8 b) {
  for (int i = 0; i < 8; ++i) a.v[i] += b.v[i];
  return a;
}
inline F8 f8_fmadd(F8 a, F8 b, F8 c) {
  for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i];
  return c;
}
inline float f8_sum(F8 a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a.v[i];
  return s;
}

inline I8x32 i8_load(const void* p) {
  I8x32 r;
  std::memcpy(r.v, p, 32);
  return r;
}
// Q4_0/Q4_1: value j < 16 is the low nibble of byte j, value j + 16 its high nibble.
inline I8x32 i8_nibbles(const uint8_t* qs) {
  I8x32 r;
  for (int j = 0; j < 16; ++j) {
    r.v[j] = static_cast<int8_t>(qs[j] & 15);
    r.v[j + 16] = static_cast<int8_t>(qs[j] >> 4);
  }
  return r;
}
// Q4_K: ((bytes[j] >> shift) & 15) for 32 bytes.
inline I8x32 i8_nibbles_shifted(const uint8_t* bytes, int shift) {
  I8x32 r;
  for (int j = 0; j < 32; ++j) r.v[j] = static_cast<int8_t>((bytes[j] >> shift) & 15);
  return r;
}
// Q6_K, signed: (((ql[j] >> lo_shift) & 15) | ((qh[j] >> hi_shift) & 3) << 4) - 32.
inline I8x32 i8_q6(const uint8_t* ql, int lo_shift, const uint8_t* qh, int hi_shift) {
  I8x32 r;
  for (int j = 0; j < 32; ++j) r.v[j] = static_cast<int8_t>((((ql[j] >> lo_shift) & 15) | (((qh[j] >> hi_shift) & 3) << 4)) - 32);
  return r;
}

// Partial sums of w[j] * x[j]: lane i holds values 4i..4i+3 (so lanes 0-3 cover the first
// 16 values, 4-7 the last 16), exact in int32 then converted.
inline F8 dot_i8(I8x32 w, I8x32 x) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    int32_t s = 0;
    for (int j = 4 * i; j < 4 * i + 4; ++j) s += static_cast<int32_t>(w.v[j]) * x.v[j];
    r.v[i] = static_cast<float>(s);
  }
  return r;
}
// Weights in 0..255 (the unsigned formats): the same sums.
inline F8 dot_u8(I8x32 w, I8x32 x) {
  F8 r;
  for (int i = 0; i < 8; ++i) {
    int32_t s = 0;
    for (int j = 4 * i; j < 4 * i + 4; ++j) s += static_cast<int32_t>(static_cast<uint8_t>(w.v[j])) * x.v[j];
    r.v[i] = static_cast<float>(s);
  }
  return r;
}

// The interleaved layouts (quant_matmul.h, Rows8): lane i of an I32x8 is row i's sum.
inline I32x8 i32_zero() { return {}; }
inline F8 i32_to_f8(I32x8 a) {
  F8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(a.v[i]);
  return r;
}
inline I8x32 i8_bcast4(const int8_t* p) {  // 4 bytes into every lane
  I8x32 r;
  for (int i = 0; i < 32; ++i) r.v[i] = p[i % 4];
  return r;
}
inline I8x32 i8_low_nibbles(I8x32 a) {
  for (auto& b : a.v) b = static_cast<int8_t>(static_cast<uint8_t>(b) & 15);
  return a;
}
inline I8x32 i8_high_nibbles(I8x32 a) {
  for (auto& b : a.v) b = static_cast<int8_t>(static_cast<uint8_t>(b) >> 4);
  return a;
}
// acc + per lane i: sum over bytes 4i..4i+3 of w1 * x1 + w2 * x2 (weights 0..15).
inline I32x8 i32_add_dot_u4_pair(I32x8 acc, I8x32 w1, I8x32 x1, I8x32 w2, I8x32 x2) {
  for (int j = 0; j < 32; ++j) acc.v[j / 4] += w1.v[j] * x1.v[j] + w2.v[j] * x2.v[j];
  return acc;
}
// acc + per lane i: sum over bytes 4i..4i+3 of w * x, both signed.
inline I32x8 i32_add_dot_i8(I32x8 acc, I8x32 w, I8x32 x) {
  for (int j = 0; j < 32; ++j) acc.v[j / 4] += w.v[j] * x.v[j];
  return acc;
}
