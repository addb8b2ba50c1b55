// Scalar definitions of the transcendental and rounding steps that must be bit-identical across
// ISAs. SIMD kernels implement exactly these operations in exactly this order (FMA where an FMA
// is written here), which is why `ref` and `avx2` agree to the bit on quantised values.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qllm::kernels {

// IEEE min/max with the operand order of x86 minps/maxps: a NaN in `a` yields `b`.
inline float min_ps(float a, float b) { return a < b ? a : b; }
inline float max_ps(float a, float b) { return a > b ? a : b; }

// exp(x): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, times 2^n built in
// the exponent field. The clamp keeps n in [-126, 127] so 2^n is a normal float and the product
// cannot overflow (|p| < 1.42). Relative error about 1 ulp over the clamped range.
constexpr float kExpHi = 88.0f;
constexpr float kExpLo = -87.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;            // ln 2 split in two so that n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpC6 = 1.9875691500e-4f;         // Taylor-like minimax coefficients of e^r
constexpr float kExpC5 = 1.3981999507e-3f;
constexpr float kExpC4 = 8.3334519073e-3f;
constexpr float kExpC3 = 4.1665795894e-2f;
constexpr float kExpC2 = 1.6666665459e-1f;
constexpr float kExpC1 = 5.0000001201e-1f;

inline float exp_qllm(float x) {
  x = min_ps(x, kExpHi);
  x = max_ps(x, kExpLo);
  const float n = __builtin_nearbyintf(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = kExpC6;
  p = std::fma(p, r, kExpC5);
  p = std::fma(p, r, kExpC4);
  p = std::fma(p, r, kExpC3);
  p = std::fma(p, r, kExpC2);
  p = std::fma(p, r, kExpC1);
  const float r2 = r * r;
  p = std::fma(p, r2, r);
  p = p + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// silu(a) = a / (1 + exp(-a)), true division.
inline float silu_qllm(float a) { return a / (1.0f + exp_qllm(-a)); }

// f32 -> s8 step of SPEC section 0: rint(v * inv) clamped to [-127, 127] in the float domain.
// A NaN product maps to 0: it comes from a NaN input, or from 0 * inf when amax is so small
// (subnormal) that 127 / amax overflows, where 0 is the right answer for the zero elements.
inline int8_t quantize_one(float v, float inv) {
  float t = __builtin_nearbyintf(v * inv);
  if (!(t == t)) t = 0.0f;
  t = max_ps(t, -127.0f);
  t = min_ps(t, 127.0f);
  return static_cast<int8_t>(static_cast<int32_t>(t));
}

}  // namespace qllm::kernels
