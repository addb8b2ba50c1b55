// AVX2 MoE row kernels (kernels/moe.h): 8 lanes at a time, tails through the scalar definitions.
#include "kernels/moe.h"

#include <immintrin.h>

#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {
namespace {

using avx2::exp8;

void score_row(const float* x, int64_t E, Score f, float* out) {
  int64_t e = 0;
  if (f == Score::sigmoid) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; e + 8 <= E; e += 8) {
      const __m256 t = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(x + e)));
      _mm256_storeu_ps(out + e, _mm256_div_ps(one, _mm256_add_ps(one, t)));
    }
    for (; e < E; ++e) out[e] = 1.0f / (1.0f + exp_qllm(-x[e]));
    return;
  }
  // max is order-independent, so one vector pass and a scalar fold give ref's value.
  __m256 vm = _mm256_set1_ps(x[0]);
  for (; e + 8 <= E; e += 8) vm = _mm256_max_ps(_mm256_loadu_ps(x + e), vm);
  alignas(32) float l[8];
  _mm256_store_ps(l, vm);
  float m = x[0];
  for (float v : l) m = max_ps(v, m);
  for (; e < E; ++e) m = max_ps(x[e], m);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  e = 0;
  for (; e + 8 <= E; e += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + e), mv));
    _mm256_storeu_ps(out + e, p);
    vs = _mm256_add_ps(vs, p);
  }
  _mm256_store_ps(l, vs);
  float sum = 0.0f;
  for (float v : l) sum += v;
  for (int64_t t = e; t < E; ++t) {
    out[t] = exp_qllm(x[t] - m);
    sum += out[t];
  }
  const __m256 sv = _mm256_set1_ps(sum);
  e = 0;
  for (; e + 8 <= E; e += 8) _mm256_storeu_ps(out + e, _mm256_div_ps(_mm256_loadu_ps(out + e), sv));
  for (; e < E; ++e) out[e] = out[e] / sum;
}

void scale_acc_row(const int32_t* acc, int64_t n, float rs, const float* cs, float* out, bool accumulate) {
  const __m256 r = _mm256_set1_ps(rs);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + c)));
    __m256 v = _mm256_mul_ps(_mm256_mul_ps(a, r), _mm256_loadu_ps(cs + c));
    if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(out + c), v);
    _mm256_storeu_ps(out + c, v);
  }
  for (; c < n; ++c) {
    const float v = (static_cast<float>(acc[c]) * rs) * cs[c];
    out[c] = accumulate ? out[c] + v : v;
  }
}

void axpy_row(float w, const float* x, int64_t n, float* y) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_loadu_ps(y + c), _mm256_mul_ps(wv, _mm256_loadu_ps(x + c))));
  for (; c < n; ++c) y[c] = y[c] + w * x[c];
}

void add_row(const float* a, const float* b, int64_t n, float* y) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(y + c, _mm256_add_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c)));
  for (; c < n; ++c) y[c] = a[c] + b[c];
}

}  // namespace

const MoeKernels& moe_avx2_kernels() {
  static const MoeKernels k{score_row, scale_acc_row, axpy_row, add_row};
  return k;
}

}  // namespace qllm::kernels
