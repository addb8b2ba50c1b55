// AVX2 helpers shared by the AVX2 kernel files: conversions and the vector form of the
// bit-exact math in kernels/ref/math.h (same operations, same order, same FMAs).
// Only included by files compiled with -mavx2 -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/ref/math.h"
#include "qllm/core/dtype.h"

namespace qllm::kernels::avx2 {

inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(kExpHi));
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpLo));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC6);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC5));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  const __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline __m256 silu8(__m256 a) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
  return _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// 8 f32 -> 8 bf16 (round to nearest even; NaN stays a quiet NaN), as f32_to_bf16.
inline __m128i cvt_bf16(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40));
  const __m256i isnan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, qnan, isnan);
  // Pack 8 x u32 (each < 2^16) to 8 x u16; packus works per 128-bit lane, so fix the order.
  const __m256i packed = _mm256_packus_epi32(r, r);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

// Stores 8 f32 as `dt` (f32, f16 or bf16) at element index 0 of `out`.
inline void store8(DType dt, void* out, __m256 v) {
  switch (dt) {
    case DType::f16:
      _mm_storeu_si128(static_cast<__m128i*>(out), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::bf16: _mm_storeu_si128(static_cast<__m128i*>(out), cvt_bf16(v)); break;
    default: _mm256_storeu_ps(static_cast<float*>(out), v); break;
  }
}

// Stores the first `n` (< 8 allowed) of 8 f32 as `dt`.
inline void store8_partial(DType dt, void* out, __m256 v, int n) {
  alignas(32) uint16_t h[8];
  alignas(32) float f[8];
  switch (dt) {
    case DType::f16:
      _mm_store_si128(reinterpret_cast<__m128i*>(h), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      for (int i = 0; i < n; ++i) static_cast<uint16_t*>(out)[i] = h[i];
      break;
    case DType::bf16:
      _mm_store_si128(reinterpret_cast<__m128i*>(h), cvt_bf16(v));
      for (int i = 0; i < n; ++i) static_cast<uint16_t*>(out)[i] = h[i];
      break;
    default:
      _mm256_store_ps(f, v);
      for (int i = 0; i < n; ++i) static_cast<float*>(out)[i] = f[i];
      break;
  }
}

// Stores one 16-column row of a tile (v0: columns 0-7, v1: 8-15) as `dt`, only the first
// `ncols` columns when the panel is the last, partial one.
inline void store16(DType dt, void* out, __m256 v0, __m256 v1, int64_t ncols) {
  const int64_t es = dtype_size(dt);
  void* out8 = static_cast<uint8_t*>(out) + 8 * es;
  if (ncols >= 16) {
    store8(dt, out, v0);
    store8(dt, out8, v1);
    return;
  }
  store8_partial(dt, out, v0, static_cast<int>(ncols < 8 ? ncols : 8));
  if (ncols > 8) store8_partial(dt, out8, v1, static_cast<int>(ncols - 8));
}

inline __m256 load8(DType dt, const void* p) {
  switch (dt) {
    case DType::f16: return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    case DType::bf16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16));
    default: return _mm256_loadu_ps(static_cast<const float*>(p));
  }
}

inline void* offset(void* p, DType dt, int64_t i) {
  return static_cast<uint8_t*>(p) + i * dtype_size(dt);
}
inline const void* offset(const void* p, DType dt, int64_t i) {
  return static_cast<const uint8_t*>(p) + i * dtype_size(dt);
}

// Stores the first mr rows of a row-major mr x 16 f32 tile to out (rows ldo elements apart,
// ncols <= 16 valid columns), adding bias[0, ncols) first when given (matrix-vector epilogues).
inline void store_rows16(const float* tile, int mr, const float* bias, DType dt, void* out, int64_t ldo, int64_t ncols) {
  alignas(32) float b[16] = {};
  if (bias)
    for (int64_t j = 0; j < ncols; ++j) b[j] = bias[j];
  for (int r = 0; r < mr; ++r) {
    __m256 v0 = _mm256_load_ps(tile + r * 16), v1 = _mm256_load_ps(tile + r * 16 + 8);
    if (bias) {
      v0 = _mm256_add_ps(v0, _mm256_load_ps(b));
      v1 = _mm256_add_ps(v1, _mm256_load_ps(b + 8));
    }
    store16(dt, offset(out, dt, r * ldo), v0, v1, ncols);
  }
}

}  // namespace qllm::kernels::avx2
