// Stored weights (any format of weight_formats.h) times float32 activations: each panel of
// output rows is decoded once into float32 and multiplied by every token. Included inside
// each ISA's namespace by kernels_impl.h (no include guard).

// acc[r][c] = panel row r . x row c, for kRows panel rows and kTokens tokens: the
// register tile of the weight matmul (4 x 2 accumulators: 8 + 2 + 1 of 16 AVX2 registers).
template <int kTokens>
inline void panel_tile(const float* panel, const float* x, int64_t k, int64_t ldx, float* out, int64_t ldo,
                       int64_t rows) {
  FVec acc[kPanelRows][kTokens];
  for (auto& row : acc) for (auto& v : row) v = set1(0.f);
  for (int64_t i = 0; i < k; i += kW) {  // k is a multiple of 32 (every format's block)
    FVec xv[kTokens];
    for (int c = 0; c < kTokens; ++c) xv[c] = load(x + c * ldx + i);
    for (int r = 0; r < kPanelRows; ++r) {
      const FVec w = load(panel + r * k + i);
      for (int c = 0; c < kTokens; ++c) acc[r][c] = fmadd(w, xv[c], acc[r][c]);
    }
  }
  for (int c = 0; c < kTokens; ++c) {
    for (int64_t r = 0; r < rows; ++r) out[c * ldo + r] = reduce_add(acc[r][c]);
  }
}

// 16-bit weights with rows interleaved in groups of 8 (weight_ops.cpp's repack_rows8): a
// group is [k][8] values, so column i of its 8 rows is one 16-byte load, widened to float32
// in registers and multiplied by token x[t][i] broadcast: an outer-product tile of 8 rows x
// kTokens tokens in kTokens accumulators, no horizontal sums, no decoded panel in memory.
template <bool kBF16, int kTokens>
inline void half_rows8_tile(const WeightMatmulArgs& a, const uint8_t* group, int64_t t0, float* out) {
  // One token: 4 accumulators over alternating columns, so the multiply-adds do not wait
  // on each other; more tokens are independent already.
  constexpr int kChains = kTokens == 1 ? 4 : 1;
  F8 acc[kTokens][kChains];
  for (auto& row : acc) for (auto& v : row) v = f8_set1(0.f);
  const float* x = a.x + t0 * a.k;
  for (int64_t i = 0; i < a.k; i += kChains) {  // k is a multiple of 32
    for (int j = 0; j < kChains; ++j) {
      const uint8_t* col = group + 16 * (i + j);
      const F8 w = kBF16 ? f8_load_bf16(col) : f8_load_f16(col);
      for (int c = 0; c < kTokens; ++c) acc[c][j] = f8_fmadd(w, f8_set1(x[c * a.k + i + j]), acc[c][j]);
    }
  }
  for (int c = 0; c < kTokens; ++c) {
    F8 sum = acc[c][0];
    for (int j = 1; j < kChains; ++j) sum = f8_add(sum, acc[c][j]);
    f8_store(out + c * a.ldo, sum);
  }
}

// Items are groups of 8 rows.
template <bool kBF16>
void half_rows8_matmul(const WeightMatmulArgs& a, int64_t begin, int64_t end) {
  constexpr int kTile = 8;  // 8 accumulators + weights + broadcasts fit AVX2's 16 registers
  for (int64_t g = begin; g < end; ++g) {
    const uint8_t* group = a.w + g * 8 * a.row_bytes;
    int64_t t = 0;
    for (; t + kTile <= a.tokens; t += kTile) half_rows8_tile<kBF16, kTile>(a, group, t, a.out + t * a.ldo + 8 * g);
    for (; t + 2 <= a.tokens; t += 2) half_rows8_tile<kBF16, 2>(a, group, t, a.out + t * a.ldo + 8 * g);
    if (t < a.tokens) half_rows8_tile<kBF16, 1>(a, group, t, a.out + t * a.ldo + 8 * g);
  }
}

// Items are panels of kPanelRows output rows. A panel's rows are decoded once into a
// float32 buffer that stays in L1, then multiplied by every token, two at a time.
inline void weight_matmul(const WeightMatmulArgs& a, int64_t begin, int64_t end) {
  if (a.format == kWBF16x8) return half_rows8_matmul<true>(a, begin, end);
  if (a.format == kWF16x8) return half_rows8_matmul<false>(a, begin, end);
  std::vector<float> panel(kPanelRows * a.k);
  const RowDecoder decode = kDecoders[a.format];
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n0 = p * kPanelRows, rows = std::min(kPanelRows, a.n - n0);
    for (int64_t r = 0; r < rows; ++r) decode(a.w + (n0 + r) * a.row_bytes, panel.data() + r * a.k, a.k);
    std::fill(panel.begin() + rows * a.k, panel.end(), 0.f);  // the last panel's missing rows
    int64_t t = 0;
    for (; t + 2 <= a.tokens; t += 2) panel_tile<2>(panel.data(), a.x + t * a.k, a.k, a.k, a.out + t * a.ldo + n0, a.ldo, rows);
    if (t < a.tokens) panel_tile<1>(panel.data(), a.x + t * a.k, a.k, a.k, a.out + t * a.ldo + n0, a.ldo, rows);
  }
}

inline void decode_rows(const DecodeRowsArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) kDecoders[a.format](a.w + a.rows[i] * a.row_bytes, a.out + i * a.k, a.k);
}
