// Element types and exact scalar conversions.
//
// f16 and bf16 are stored as raw uint16 bits. Every f32 -> f16/bf16 conversion rounds to nearest
// even (SPEC section 0); these scalar versions are the ground truth the SIMD paths are tested on.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace qllm {

enum class DType : uint8_t { f32, f16, bf16, s8, s32, s64, u8, s4x2 };

// Bytes per element; s4x2 reports 1 (one byte holds two values along the contiguous axis).
constexpr int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: case DType::s32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::s64: return 8;
    case DType::s8: case DType::u8: case DType::s4x2: return 1;
  }
  return 0;
}

const char* dtype_name(DType t);
// Parses "float32"/"f32", "float16"/"f16", "bfloat16"/"bf16", "int8"/"s8", "int32"/"s32",
// "int64"/"s64", "uint8"/"u8", "s4x2"; throws Error naming `op` and `arg` otherwise.
DType parse_dtype(const std::string& name, const char* op, const char* arg);

constexpr bool is_float(DType t) { return t == DType::f32 || t == DType::f16 || t == DType::bf16; }

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// f32 -> f16, round to nearest even, overflow to inf, NaN stays NaN (quiet), subnormals exact.
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u | ((absx >> 13) & 0x3ffu) : 0u));
  }
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (absx < 0x38800000u) {  // result is f16 subnormal or zero: value * 2^24, rounded to integer
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    const uint32_t exp = absx >> 23;           // 102..112
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;         // 14..24
    uint32_t v = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (v & 1u))) ++v;
    return static_cast<uint16_t>(sign | v);
  }
  // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  uint32_t v = absx - 0x38000000u;
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    // Subnormal: value = mant * 2^-24, exactly representable in f32.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// f32 -> bf16, round to nearest even; NaN is kept a (quiet) NaN rather than rounded to inf.
inline uint16_t f32_to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// Round half to even (rint, torch.round). qllm never changes the FP rounding mode, so the
// default round-to-nearest-even mode that nearbyint uses is the one in force.
inline float round_half_even(float v) { return __builtin_nearbyintf(v); }

}  // namespace qllm
