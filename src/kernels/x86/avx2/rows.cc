// AVX2 row kernels: widening, conversions, per-token quantisation, SwiGLU, dequant. Tails
// shorter than a vector call the scalar definitions in kernels/ref/math.h, never a copy of them.
#include <immintrin.h>

#include <cmath>

#include "kernels/kernels.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels::avx2 {

void int8_gemm(const void*, int64_t, int64_t, const Int8Panels&, int64_t, int64_t, const Int8Epilogue&);
void float_gemm(const float*, int64_t, int64_t, const FloatPanels&, int64_t, int64_t, const FloatEpilogue&);

namespace {

void s8_to_s16(const int8_t* x, int64_t k, int16_t* out, int64_t kpad) {
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < kpad; ++i) out[i] = i < k ? x[i] : 0;
}

void prepare_a(const int8_t* x, int64_t k, void* out) {
  s8_to_s16(x, k, static_cast<int16_t*>(out), a_bytes_pairs(k) / 2);
}

void to_f32(const void* x, DType dt, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(dt, offset(x, dt, i)));
  for (; i < n; ++i) {
    switch (dt) {
      case DType::f16: out[i] = f16_to_f32(static_cast<const uint16_t*>(x)[i]); break;
      case DType::bf16: out[i] = bf16_to_f32(static_cast<const uint16_t*>(x)[i]); break;
      default: out[i] = static_cast<const float*>(x)[i]; break;
    }
  }
}

void from_f32(const float* x, int64_t n, DType dt, void* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(dt, offset(out, dt, i), _mm256_loadu_ps(x + i));
  if (i < n) {
    alignas(32) float t[8] = {};
    for (int64_t j = i; j < n; ++j) t[j - i] = x[j];
    store8_partial(dt, offset(out, dt, i), _mm256_load_ps(t), static_cast<int>(n - i));
  }
}

float quantize_row(const float* v, const float* smooth, int64_t n, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    if (smooth) x = _mm256_mul_ps(x, _mm256_loadu_ps(smooth + i));
    vmax = _mm256_max_ps(_mm256_andnot_ps(sign, x), vmax);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.0f;
  for (float l : lanes) amax = max_ps(l, amax);
  for (; i < n; ++i) amax = max_ps(std::fabs(smooth ? v[i] * smooth[i] : v[i]), amax);
  if (amax == 0.0f) {
    for (int64_t j = 0; j < n; ++j) q[j] = 0;
    return 0.0f;
  }
  const float inv_s = 127.0f / amax;
  const __m256 inv = _mm256_set1_ps(inv_s);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i qi[4];
    for (int u = 0; u < 4; ++u) {
      __m256 x = _mm256_loadu_ps(v + i + 8 * u);
      if (smooth) x = _mm256_mul_ps(x, _mm256_loadu_ps(smooth + i + 8 * u));
      __m256 t = _mm256_round_ps(_mm256_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q));  // NaN -> 0, as quantize_one
      t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
      qi[u] = _mm256_cvtps_epi32(t);
    }
    // s32 -> s16 -> s8 packs interleave the 128-bit lanes; one cross-lane permute restores order.
    const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]);
    const __m256i w23 = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i b = _mm256_packs_epi16(w01, w23);
    const __m256i ordered = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), ordered);
  }
  for (; i < n; ++i) q[i] = quantize_one(smooth ? v[i] * smooth[i] : v[i], inv_s);
  return amax / 127.0f;
}

void swiglu_row(const float* x, int64_t h, bool activate_left, float* y) {
  const float* a = activate_left ? x : x + h;
  const float* b = activate_left ? x + h : x;
  int64_t j = 0;
  for (; j + 8 <= h; j += 8)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_loadu_ps(b + j), silu8(_mm256_loadu_ps(a + j))));
  for (; j < h; ++j) y[j] = b[j] * silu_qllm(a[j]);
}

void dequant_row(const int32_t* acc, int64_t n, const float* scale, float row_scale, DType dt, void* y) {
  const __m256 rs = _mm256_set1_ps(row_scale);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 v = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c)));
    store8(dt, offset(y, dt, c), _mm256_mul_ps(_mm256_mul_ps(v, _mm256_loadu_ps(scale + c)), rs));
  }
  if (c < n) {
    alignas(32) float t[8] = {};
    for (int64_t j = c; j < n; ++j) t[j - c] = (static_cast<float>(acc[j]) * scale[j]) * row_scale;
    store8_partial(dt, offset(y, dt, c), _mm256_load_ps(t), static_cast<int>(n - c));
  }
}

}  // namespace
}  // namespace qllm::kernels::avx2

namespace qllm::kernels {

const KernelTable& avx2_table() {
  static const KernelTable t{Isa::avx2,          avx2::int8_gemm,     Int8Layout::pairs,
                             a_bytes_pairs,       avx2::prepare_a,     avx2::float_gemm,
                             avx2::s8_to_s16,     avx2::to_f32,        avx2::from_f32,
                             avx2::quantize_row,  avx2::swiglu_row,    avx2::dequant_row};
  return t;
}

}  // namespace qllm::kernels
