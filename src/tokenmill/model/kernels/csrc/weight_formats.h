// Rows of stored weights -> float32, one function per storage format: 16-bit floats and
// ggml's quantized blocks (layouts of ggml-common.h). Each value is computed with the
// same float32 operations, in the same order, as the gguf package's reference
// dequantization, so a decoded row equals it bit for bit (the kernels build with
// -ffp-contract=off; tests compare with ==). Included inside each ISA's namespace of
// kernels_isa.cpp after kernels_impl.h's helpers: the loops vectorise for that ISA.

// The float16 stored at p (block scales).
inline float f16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return f16_value(bits);
}

// Value j < 16 of a 32-value block sits in the low nibble of byte j, value j + 16 in its
// high nibble (Q4_0, Q4_1, Q5_0, Q5_1).
inline void nibbles32(const uint8_t* qs, uint8_t* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = qs[j] & 0x0F;
    q[j + 16] = qs[j] >> 4;
  }
}

// Adds the fifth bit of each value: bit j of the little-endian 32-bit qh (Q5_0, Q5_1).
inline void fifth_bits32(const uint8_t* qh, uint8_t* q) {
  uint32_t bits;
  std::memcpy(&bits, qh, sizeof(bits));
  for (int j = 0; j < 32; ++j) q[j] |= static_cast<uint8_t>(((bits >> j) & 1u) << 4);
}

// The 8 six-bit scales and mins of a Q4_K / Q5_K block, packed in 12 bytes: bytes 0-3 hold
// scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same for the mins,
// bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble).
inline void k_scales_mins(const uint8_t* s, float d, float dmin, float* scale, float* min) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = d * static_cast<float>(s[j] & 0x3F);
    min[j] = dmin * static_cast<float>(s[j + 4] & 0x3F);
    scale[j + 4] = d * static_cast<float>((s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30));
    min[j + 4] = dmin * static_cast<float>((s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30));
  }
}

// Each decoder writes the `k` values of one row starting at `row`.
inline void decode_f32(const uint8_t* row, float* out, int64_t k) { std::memcpy(out, row, k * sizeof(float)); }
inline void decode_f16(const uint8_t* row, float* out, int64_t k) { widen(out, reinterpret_cast<const f16*>(row), k); }
inline void decode_bf16(const uint8_t* row, float* out, int64_t k) {
  widen(out, reinterpret_cast<const bf16*>(row), k);
}

inline void decode_q8_0(const uint8_t* row, float* out, int64_t k) {  // d f16 | 32 x int8
  for (int64_t b = 0; b < k / 32; ++b, row += 34, out += 32) {
    const FVec d = set1(f16_at(row));
    const int8_t* q = reinterpret_cast<const int8_t*>(row + 2);
    for (int i = 0; i < 32; i += kW) store(out + i, mul(load_i8(q + i), d));
  }
}

// Q4_0 / Q4_1: value = d * (q - 8), or d * q + m, with q the nibbles of 16 bytes.
template <bool kHasMin>
inline void decode_q4(const uint8_t* row, float* out, int64_t k) {
  constexpr int64_t kBytes = kHasMin ? 20 : 18;
  for (int64_t b = 0; b < k / 32; ++b, row += kBytes, out += 32) {
    const FVec d = set1(f16_at(row)), m = set1(kHasMin ? f16_at(row + 2) : 0.f), eight = set1(8.f);
    const uint8_t* qs = row + (kHasMin ? 4 : 2);
    for (int half = 0; half < 2; ++half) {
      for (int i = 0; i < 16; i += kW) {
        const FVec q = load_u4(qs + i, 4 * half);
        store(out + 16 * half + i, kHasMin ? add(mul(d, q), m) : mul(d, sub(q, eight)));
      }
    }
  }
}
inline void decode_q4_0(const uint8_t* row, float* out, int64_t k) { decode_q4<false>(row, out, k); }
inline void decode_q4_1(const uint8_t* row, float* out, int64_t k) { decode_q4<true>(row, out, k); }

inline void decode_q5_0(const uint8_t* row, float* out, int64_t k) {  // d f16 | qh u32 | 16 bytes of nibbles
  uint8_t q[32];
  for (int64_t b = 0; b < k / 32; ++b, row += 22, out += 32) {
    const float d = f16_at(row);
    nibbles32(row + 6, q);
    fifth_bits32(row + 2, q);
    for (int j = 0; j < 32; ++j) out[j] = d * (static_cast<float>(q[j]) - 16.f);
  }
}

inline void decode_q5_1(const uint8_t* row, float* out, int64_t k) {  // d f16 | m f16 | qh u32 | nibbles
  uint8_t q[32];
  for (int64_t b = 0; b < k / 32; ++b, row += 24, out += 32) {
    const float d = f16_at(row), m = f16_at(row + 2);
    nibbles32(row + 8, q);
    fifth_bits32(row + 4, q);
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]) + m;
  }
}

// Q4_K / Q5_K: 256 values in 8 sub-blocks of 32: value = (d * scale) * q - (dmin * min).
// Each 32 bytes of qs hold two sub-blocks: low nibbles, then high nibbles. Q5_K adds bit s
// of qh[j] as the fifth bit of value j of sub-block s.
inline void decode_k4(const uint8_t* block, const uint8_t* qs, const uint8_t* qh, float* out) {
  float scale[8], min[8];
  k_scales_mins(block + 4, f16_at(block), f16_at(block + 2), scale, min);
  for (int s = 0; s < 8; ++s, out += 32) {
    const uint8_t* bytes = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    if (qh == nullptr) {  // Q4_K
      for (int i = 0; i < 32; i += kW) store(out + i, sub(mul(set1(scale[s]), load_u4(bytes + i, shift)), set1(min[s])));
      continue;
    }
    for (int j = 0; j < 32; ++j) {  // Q5_K
      const uint8_t q = static_cast<uint8_t>(((bytes[j] >> shift) & 0x0F) | (((qh[j] >> s) & 1u) << 4));
      out[j] = scale[s] * static_cast<float>(q) - min[s];
    }
  }
}

inline void decode_q4_k(const uint8_t* row, float* out, int64_t k) {  // d | dmin | scales[12] | qs[128]
  for (int64_t b = 0; b < k / 256; ++b, row += 144, out += 256) decode_k4(row, row + 16, nullptr, out);
}

inline void decode_q5_k(const uint8_t* row, float* out, int64_t k) {  // ... | qh[32] | qs[128]
  for (int64_t b = 0; b < k / 256; ++b, row += 176, out += 256) decode_k4(row, row + 48, row + 16, out);
}

// Q6_K: ql[128] low nibbles | qh[64] 2-bit highs | scales[16] int8 | d f16. Two halves of
// 128 values; in half h, value j of quarter f takes the low (f < 2) or high (f >= 2) nibble
// of ql[64h + 32(f % 2) + j] and bits 2f..2f+1 of qh[32h + j]; value = (d * scale) * (q - 32)
// with one scale per 16 values.
inline void decode_q6_k(const uint8_t* row, float* out, int64_t k) {
  for (int64_t b = 0; b < k / 256; ++b, row += 210, out += 256) {
    const float d = f16_at(row + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(row + 192);
    for (int h = 0; h < 2; ++h) {
      for (int f = 0; f < 4; ++f) {
        const uint8_t* ql = row + 64 * h + 32 * (f % 2);
        const uint8_t* qh = row + 128 + 32 * h;
        const int lo_shift = 4 * (f / 2), hi_shift = 2 * f;
        float* o = out + 128 * h + 32 * f;
        const float scale0 = d * static_cast<float>(scales[8 * h + 2 * f]);
        const float scale1 = d * static_cast<float>(scales[8 * h + 2 * f + 1]);
        const FVec thirty_two = set1(32.f);
        for (int i = 0; i < 32; i += kW) {  // one scale per 16 values (kW divides 16)
          const FVec q = load_q6(ql + i, lo_shift, qh + i, hi_shift);
          store(o + i, mul(set1(i < 16 ? scale0 : scale1), sub(q, thirty_two)));
        }
      }
    }
  }
}

// In WeightFormat order (kernel_api.h).
constexpr RowDecoder kDecoders[kNumWeightFormats] = {
    decode_f16, decode_bf16, decode_q4_0, decode_q4_1, decode_q5_0,
    decode_q5_1, decode_q8_0, decode_q4_k, decode_q5_k, decode_q6_k, decode_f32,
};
