// AVX2 norm / rope kernels: the same lane-order sums as kernels/ref/norm.cc (bit-identical).
// Tails use a lane mask so that lanes past h add exactly 0, as the scalar version does.
#include <immintrin.h>

#include <cmath>

#include "kernels/norm.h"

namespace qllm::kernels {

namespace {

__m256i tail_mask(int64_t n) {  // lanes [0, n) set, n in [0, 8]
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

float tree(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  return lane_tree8(a);
}

float sum_sq(const float* x, int64_t h, float shift) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), sh);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  if (i < h) {
    const __m256i m = tail_mask(h - i);
    const __m256 d = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), sh), _mm256_castsi256_ps(m));
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  return tree(acc);
}

void rms_norm_row(const float* x, const float* gamma, int64_t h, float eps, float* y) {
  const float ms = sum_sq(x, h, 0.0f) / static_cast<float>(h);
  const float r = 1.0f / std::sqrt(ms + eps);
  const __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= h; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(gamma + i)));
  for (; i < h; ++i) y[i] = (x[i] * r) * gamma[i];
}

void layer_norm_row(const float* x, const float* gamma, const float* beta, int64_t h, float eps, float* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  if (i < h) acc = _mm256_add_ps(acc, _mm256_maskload_ps(x + i, tail_mask(h - i)));
  const float mean = tree(acc) / static_cast<float>(h);
  const float var = sum_sq(x, h, mean) / static_cast<float>(h);
  const float r = 1.0f / std::sqrt(var + eps);
  const __m256 mv = _mm256_set1_ps(mean), rv = _mm256_set1_ps(r);
  i = 0;
  for (; i + 8 <= h; i += 8) {
    __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv), rv), _mm256_loadu_ps(gamma + i));
    if (beta) t = _mm256_add_ps(t, _mm256_loadu_ps(beta + i));
    _mm256_storeu_ps(y + i, t);
  }
  for (; i < h; ++i) {
    float t = ((x[i] - mean) * r) * gamma[i];
    if (beta) t = t + beta[i];
    y[i] = t;
  }
}

void rope_row(float* x, const float* c, const float* s, int64_t half, bool neox) {
  int64_t i = 0;
  if (neox) {
    for (; i + 8 <= half; i += 8) {
      const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
      const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
      _mm256_storeu_ps(x + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
      _mm256_storeu_ps(x + half + i, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
    }
  } else {
    // 4 interleaved pairs per vector: [a0 b0 a1 b1 ...]. cos duplicated per pair, sin with the
    // sign of its use (-s for the a slot, +s for the b slot), pairs swapped: a*c + b*(-s) is
    // a*c - b*s exactly (negation is exact), so this matches the scalar form bit for bit.
    const __m256 neg_even = _mm256_setr_ps(-0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f);
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    for (; i + 4 <= half; i += 4) {
      const __m256 v = _mm256_loadu_ps(x + 2 * i);
      const __m256 cv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + i)), dup);
      const __m256 sv = _mm256_xor_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + i)), dup), neg_even);
      const __m256 sw = _mm256_permute_ps(v, 0xB1);  // [b0 a0 b1 a1 ...]
      _mm256_storeu_ps(x + 2 * i, _mm256_add_ps(_mm256_mul_ps(v, cv), _mm256_mul_ps(sw, sv)));
    }
  }
  for (; i < half; ++i) {
    float* pa = neox ? x + i : x + 2 * i;
    float* pb = neox ? x + i + half : x + 2 * i + 1;
    const float a = *pa, b = *pb;
    *pa = a * c[i] - b * s[i];
    *pb = b * c[i] + a * s[i];
  }
}

}  // namespace

const NormKernels& norm_kernels_avx2() {
  static const NormKernels t{rms_norm_row, layer_norm_row, rope_row};
  return t;
}

}  // namespace qllm::kernels
