// Scalar reference of the norm / rope kernels (the lane-order sums of kernels/norm.h).
#include <cmath>

#include "kernels/norm.h"
#include "qllm/core/error.h"

namespace qllm::kernels {

namespace {

float lane_sum_sq(const float* x, int64_t h, float shift) {
  float acc[8] = {};
  for (int64_t i = 0; i < h; ++i) {
    const float d = x[i] - shift;
    acc[i % 8] = std::fma(d, d, acc[i % 8]);
  }
  return lane_tree8(acc);
}

void rms_norm_row_ref(const float* x, const float* gamma, int64_t h, float eps, float* y) {
  const float ms = lane_sum_sq(x, h, 0.0f) / static_cast<float>(h);
  const float r = 1.0f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < h; ++i) y[i] = (x[i] * r) * gamma[i];
}

void layer_norm_row_ref(const float* x, const float* gamma, const float* beta, int64_t h, float eps, float* y) {
  float acc[8] = {};
  for (int64_t i = 0; i < h; ++i) acc[i % 8] += x[i];
  const float mean = lane_tree8(acc) / static_cast<float>(h);
  const float var = lane_sum_sq(x, h, mean) / static_cast<float>(h);
  const float r = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < h; ++i) {
    float t = ((x[i] - mean) * r) * gamma[i];
    if (beta) t = t + beta[i];
    y[i] = t;
  }
}

void rope_row_ref(float* x, const float* c, const float* s, int64_t half, bool neox) {
  for (int64_t i = 0; i < half; ++i) {
    float* pa = neox ? x + i : x + 2 * i;
    float* pb = neox ? x + i + half : x + 2 * i + 1;
    const float a = *pa, b = *pb;
    *pa = a * c[i] - b * s[i];
    *pb = b * c[i] + a * s[i];
  }
}

}  // namespace

const NormKernels& norm_kernels_ref() {
  static const NormKernels t{rms_norm_row_ref, layer_norm_row_ref, rope_row_ref};
  return t;
}

const NormKernels& norm_kernels(Isa isa) {
#if QLLM_HAVE_AVX2
  if (isa == Isa::avx2 || isa == Isa::avx512) return norm_kernels_avx2();
#endif
  if (isa != Isa::ref) throw_invalid("qllm", "isa", "ISA ", isa_name(isa), " was not compiled into this build");
  return norm_kernels_ref();
}

}  // namespace qllm::kernels
