// Scalar helpers shared by every instruction set's kernels: 16-bit float conversions,
// exp/log polynomials and the keyed uniform draws of the sampler.
//
// Compiled without target options, so the inline copies the linker may keep run on any
// x86-64 CPU; kernels for wider instruction sets inline them and vectorise around them.
// The file is compiled with -ffp-contract=off: each line below is the exact sequence of
// IEEE float32 operations that tokenmill/model/layers/sampler.py repeats with torch ops,
// so the kernel and the PyTorch fallback draw the same tokens for the same seed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_api.h"

namespace tmk {

// Forced inline: GCC does not inline a plain `inline` function into a caller compiled for
// a wider instruction set (the AVX2 / AVX-512 kernels), and a call per element would
// stop the loops around it from vectorising.
#define TM_INLINE inline __attribute__((always_inline))

TM_INLINE float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
TM_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

TM_INLINE float to_float(float x) { return x; }
// bfloat16 is the top half of a float32.
TM_INLINE float to_float(bf16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
TM_INLINE float to_float(f16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1Fu, mantissa = x.bits & 0x3FFu;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

template <typename T>
TM_INLINE T from_float(float x);
template <>
TM_INLINE float from_float<float>(float x) {
  return x;
}
// Round to nearest even, NaN stays NaN (what torch's conversions do). Written with
// integer operations so that loops using it vectorise.
template <>
TM_INLINE bf16 from_float<bf16>(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return bf16{static_cast<uint16_t>(x != x ? 0x7FC0u : rounded)};
}
template <>
TM_INLINE f16 from_float<f16>(float x) {
  uint32_t bits = float_to_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  bits &= 0x7FFFFFFFu;
  if (bits >= 0x7F800000u) return f16{static_cast<uint16_t>(sign | (bits > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (bits >= 0x477FF000u) return f16{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds past 65504: inf
  if (bits < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 leaves the float32 ulp at 2^-24,
    // the half subnormal step, so the hardware add rounds to nearest even for us.
    const uint32_t sum = float_to_bits(bits_to_float(bits) + 0.5f);
    return f16{static_cast<uint16_t>(sign | (sum - 0x3F000000u))};
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = (bits + 0xC8000FFFu + ((bits >> 13) & 1u)) >> 13;
  return f16{static_cast<uint16_t>(sign | rounded)};
}

// The value PyTorch holds after an op whose result is stored in T.
template <typename T>
TM_INLINE float round_to(float x) {
  return to_float(from_float<T>(x));
}

// exp(x) to about 1 ulp (Cephes' expf: 2^n times a degree-6 polynomial on
// [-ln2/2, ln2/2]). Unlike std::exp it inlines, so the loops around it vectorise.
TM_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.3365f), 88.3762f);
  // Round to nearest even by adding and removing 1.5 * 2^23 (exact for |v| < 2^22): unlike
  // std::nearbyint it vectorises without SSE4.1, and it equals torch.round.
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.f;
  return y * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// log(x) for normal x > 0 to about 1 ulp (Cephes' logf), inlined so loops vectorise.
TM_INLINE float fast_log(float x) {
  uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 126);
  const float m0 = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool small = m0 < 0.707106781186547524f;
  e = e - (small ? 1.f : 0.f);  // selects on values, not branches: the loops vectorise
  const float m = (small ? m0 + m0 : m0) - 1.f;
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
  y = y + -2.12194440e-4f * e;
  y = y + -0.5f * z;
  return m + y + 0.693359375f * e;
}

// A 32-bit integer hash with full avalanche (two multiply-xorshift rounds; the
// "lowbias32" constants of Chris Wellons' hash-prospector search).
TM_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// A uniform draw in (0, 1) that depends only on (key, index): 23 random bits as the
// mantissa of a float in [1, 2), minus 1, plus half a step, so never 0 or 1 (every step
// exact). 32-bit integer operations and no int -> float conversion, so the PyTorch twin is
// cheap too.
TM_INLINE float uniform_at(uint64_t key, uint32_t index) {
  uint32_t x = mix32(index * 0x9E3779B9u + static_cast<uint32_t>(key));
  x = mix32(x ^ static_cast<uint32_t>(key >> 32));
  return bits_to_float(0x3F800000u | (x >> 9)) - 1.f + 5.9604644775390625e-8f;
}

}  // namespace tmk
