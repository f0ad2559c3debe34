// Quantized weights times int8-quantized activations (as llama.cpp multiplies them), on
// the integer blocks of qvec_*.h. Included inside each ISA's namespace after kernels_impl.h
// (no include guard).
//
// Each 32-value sub-block of a weight row is decoded once into 32 small integers w with a
// scale vector dw (one per 16-value half) and a min m, so that its values are dw * w + m.
// Against an activation block of 32 int8 q with scale d and dequantized sum s:
//     sum_j (dw w_j + m) (d q_j) = d * (dw . partial sums of w_j q_j) + m * s.
// The integer products are exact; rounding happens once per block, in float32.

// One decoded 32-value sub-block.
struct WeightBlock {
  I8x32 w;       // the integers (unsigned 0..15 for the nibble formats, signed otherwise)
  F8 scale;      // per 16-value half: lanes 0-3 scale values 0-15, lanes 4-7 values 16-31
  float min;     // added to every value (0 for the signed formats)
};

// A format: blocks of kBytes holding kSubBlocks 32-value sub-blocks of kSigned integers;
// header(block) reads what its sub-blocks share (the K formats' packed scales) once, and
// decode(block, header, i) returns sub-block i.
struct NoHeader {};

struct FormatQ4_0 {
  static constexpr int64_t kBytes = 18, kSubBlocks = 1;
  static constexpr bool kSigned = false;
  static NoHeader header(const uint8_t*) { return {}; }
  static WeightBlock decode(const uint8_t* b, NoHeader, int) {  // d * (q - 8) = d * q - 8 d
    const float d = f16_at(b);
    return {i8_nibbles(b + 2), f8_set1(d), -8.f * d};
  }
};
struct FormatQ4_1 {
  static constexpr int64_t kBytes = 20, kSubBlocks = 1;
  static constexpr bool kSigned = false;
  static NoHeader header(const uint8_t*) { return {}; }
  static WeightBlock decode(const uint8_t* b, NoHeader, int) {
    return {i8_nibbles(b + 4), f8_set1(f16_at(b)), f16_at(b + 2)};
  }
};
struct FormatQ8_0 {
  static constexpr int64_t kBytes = 34, kSubBlocks = 1;
  static constexpr bool kSigned = true;
  static NoHeader header(const uint8_t*) { return {}; }
  static WeightBlock decode(const uint8_t* b, NoHeader, int) { return {i8_load(b + 2), f8_set1(f16_at(b)), 0.f}; }
};
struct FormatQ4_K {  // (d * scale_i) * q - dmin * min_i, sub-block i in the nibbles of qs[32 * (i / 2)]
  static constexpr int64_t kBytes = 144, kSubBlocks = 8;
  static constexpr bool kSigned = false;
  struct Header {
    float scale[8], min[8];
  };
  static Header header(const uint8_t* b) {
    Header h;
    k_scales_mins(b + 4, f16_at(b), f16_at(b + 2), h.scale, h.min);
    return h;
  }
  static WeightBlock decode(const uint8_t* b, const Header& h, int i) {
    return {i8_nibbles_shifted(b + 16 + 32 * (i / 2), 4 * (i % 2)), f8_set1(h.scale[i]), -h.min[i]};
  }
};
struct FormatQ6_K {  // (d * scale_j) * (q - 32), one int8 scale per 16 values
  static constexpr int64_t kBytes = 210, kSubBlocks = 8;
  static constexpr bool kSigned = true;
  static float header(const uint8_t* b) { return f16_at(b + 208); }
  static WeightBlock decode(const uint8_t* b, float d, int i) {
    const int h = i / 4, f = i % 4;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + 2 * f;
    return {i8_q6(b + 64 * h + 32 * (f % 2), 4 * (f / 2), b + 128 + 32 * h, 2 * f),
            f8_halves(d * static_cast<float>(scales[0]), d * static_cast<float>(scales[1])), 0.f};
  }
};

// Tokens multiplied per decoded sub-block (their accumulators stay in registers).
constexpr int64_t kQuantTokens = 4;

template <typename Format, int kTokens>
inline void quant_row_tile(const QuantMatmulArgs& a, const uint8_t* row, int64_t t0, float* out) {
  const int64_t num_blocks = a.k / 32;
  F8 acc[kTokens];
  float acc_min[kTokens];
  for (int c = 0; c < kTokens; ++c) acc[c] = f8_set1(0.f), acc_min[c] = 0.f;
  for (int64_t j0 = 0; j0 < num_blocks; j0 += Format::kSubBlocks) {
    const uint8_t* block = row + (j0 / Format::kSubBlocks) * Format::kBytes;
    const auto header = Format::header(block);
    for (int i = 0; i < Format::kSubBlocks; ++i) {
      const int64_t j = j0 + i;
      const WeightBlock wb = Format::decode(block, header, i);
      for (int c = 0; c < kTokens; ++c) {
        const int64_t t = t0 + c;
        const I8x32 x = i8_load(a.xq + t * a.k + 32 * j);
        const F8 dots = Format::kSigned ? dot_i8(wb.w, x) : dot_u8(wb.w, x);
        acc[c] = f8_fmadd(f8_mul(wb.scale, f8_set1(a.xd[t * num_blocks + j])), dots, acc[c]);
        acc_min[c] += wb.min * a.xs[t * num_blocks + j];
      }
    }
  }
  for (int c = 0; c < kTokens; ++c) out[c * a.ldo] = f8_sum(acc[c]) + acc_min[c];
}

template <typename Format>
void quant_matmul_rows(const QuantMatmulArgs& a, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* row = a.w + n * a.row_bytes;
    int64_t t = 0;
    for (; t + kQuantTokens <= a.tokens; t += kQuantTokens) {
      quant_row_tile<Format, kQuantTokens>(a, row, t, a.out + t * a.ldo + n);
    }
    for (; t < a.tokens; ++t) quant_row_tile<Format, 1>(a, row, t, a.out + t * a.ldo + n);
  }
}

// Rows interleaved in groups of 8 (weight_ops.cpp's repack_rows8 writes them): per group
// and 32-value block, the 8 rows' float16 scales d[8] (Q4_1: then its mins m[8]), then the
// integers in 32-byte loads whose byte 4r + b belongs to row r: Q8_0 in 8 loads, load c
// holding values 4c + b; Q4_0 / Q4_1 in 4 loads, load c holding row r's block byte 4c + b
// (values 4c + b in the low nibble, 16 + 4c + b in the high one). Each integer dot product
// then lands in lane r of an 8-lane sum, so 8 rows share one float scaling per block and
// no row needs a horizontal sum: 2-3x fewer instructions than a row at a time.
template <WeightFormat F>
struct Rows8 {
  static constexpr bool kQ8 = F == kWQ8_0x8, kHasMin = F == kWQ4_1x8;
  static constexpr int64_t kScaleBytes = kHasMin ? 32 : 16;
  static constexpr int64_t kLoads = kQ8 ? 8 : 4;
  static constexpr int64_t kBytes = kScaleBytes + 32 * kLoads;  // 8 rows' blocks, as stored
};

template <WeightFormat F, int kTokens>
inline void quant_rows8_tile(const QuantMatmulArgs& a, const uint8_t* group, int64_t t0, float* out) {
  using L = Rows8<F>;
  const int64_t num_blocks = a.k / 32;
  F8 acc[kTokens];
  for (int c = 0; c < kTokens; ++c) acc[c] = f8_set1(0.f);
  for (int64_t j = 0; j < num_blocks; ++j) {
    const uint8_t* block = group + j * L::kBytes;
    const uint8_t* ints = block + L::kScaleBytes;
    for (int64_t line = 0; line < L::kBytes; line += 64) __builtin_prefetch(block + 8 * L::kBytes + line);
    I32x8 dots[kTokens];
    for (int c = 0; c < kTokens; ++c) dots[c] = i32_zero();
    for (int64_t load = 0; load < L::kLoads; ++load) {
      const I8x32 w = i8_load(ints + 32 * load);
      if constexpr (L::kQ8) {
        for (int c = 0; c < kTokens; ++c) {
          dots[c] = i32_add_dot_i8(dots[c], w, i8_bcast4(a.xq + (t0 + c) * a.k + 32 * j + 4 * load));
        }
      } else {
        const I8x32 lo = i8_low_nibbles(w), hi = i8_high_nibbles(w);
        for (int c = 0; c < kTokens; ++c) {
          const int8_t* x = a.xq + (t0 + c) * a.k + 32 * j + 4 * load;
          dots[c] = i32_add_dot_u4_pair(dots[c], lo, i8_bcast4(x), hi, i8_bcast4(x + 16));
        }
      }
    }
    const F8 d = f8_load_f16(block);
    const F8 m = L::kHasMin ? f8_load_f16(block + 16) : f8_set1(0.f);
    for (int c = 0; c < kTokens; ++c) {
      const int64_t xb = (t0 + c) * num_blocks + j;
      acc[c] = f8_fmadd(f8_mul(d, f8_set1(a.xd[xb])), i32_to_f8(dots[c]), acc[c]);
      if constexpr (L::kHasMin) {
        acc[c] = f8_fmadd(m, f8_set1(a.xs[xb]), acc[c]);
      } else if constexpr (!L::kQ8) {  // Q4_0: d * (q - 8), the -8 d against the block's sum
        acc[c] = f8_fmadd(d, f8_set1(-8.f * a.xs[xb]), acc[c]);
      }
    }
  }
  for (int c = 0; c < kTokens; ++c) f8_store(out + c * a.ldo, acc[c]);
}

// Items are groups of 8 rows.
template <WeightFormat F>
void quant_matmul_rows8(const QuantMatmulArgs& a, int64_t begin, int64_t end) {
  const int64_t group_bytes = 8 * a.row_bytes;
  for (int64_t g = begin; g < end; ++g) {
    const uint8_t* group = a.w + g * group_bytes;
    int64_t t = 0;
    for (; t + kQuantTokens <= a.tokens; t += kQuantTokens) {
      quant_rows8_tile<F, kQuantTokens>(a, group, t, a.out + t * a.ldo + 8 * g);
    }
    for (; t < a.tokens; ++t) quant_rows8_tile<F, 1>(a, group, t, a.out + t * a.ldo + 8 * g);
  }
}

inline void quant_matmul(const QuantMatmulArgs& a, int64_t begin, int64_t end) {
  switch (a.format) {
    case kWQ4_0x8: return quant_matmul_rows8<kWQ4_0x8>(a, begin, end);
    case kWQ4_1x8: return quant_matmul_rows8<kWQ4_1x8>(a, begin, end);
    case kWQ8_0x8: return quant_matmul_rows8<kWQ8_0x8>(a, begin, end);
    case kWQ4_0: return quant_matmul_rows<FormatQ4_0>(a, begin, end);
    case kWQ4_1: return quant_matmul_rows<FormatQ4_1>(a, begin, end);
    case kWQ8_0: return quant_matmul_rows<FormatQ8_0>(a, begin, end);
    case kWQ4_K: return quant_matmul_rows<FormatQ4_K>(a, begin, end);
    case kWQ6_K: return quant_matmul_rows<FormatQ6_K>(a, begin, end);
    default: return;  // the bindings only send kIntFormats
  }
}

// Per 32-value block of each token: d = max|x| / 127, q = round(x / d), s = d * sum(q).
inline void quantize_activations(const QuantizeActivationsArgs& a, int64_t begin, int64_t end) {
  const int64_t num_blocks = a.k / 32;
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t j = 0; j < num_blocks; ++j) {
      const float* x = a.x + t * a.k + 32 * j;
      int8_t* q = a.q + t * a.k + 32 * j;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < 32; ++i) {
        const float r = std::nearbyint(x[i] * inv);
        const int32_t v = r == r ? static_cast<int32_t>(r) : 0;  // NaN input: 0, not undefined
        q[i] = static_cast<int8_t>(v);
        sum += v;
      }
      a.d[t * num_blocks + j] = d;
      a.s[t * num_blocks + j] = d * static_cast<float>(sum);
    }
  }
}
