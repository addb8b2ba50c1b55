// Kernels of the norm / rope family (SPEC section 8), one table per ISA.
//
// Every kernel works on f32 rows (ops/ converts). Sums are taken the way an 8-lane SIMD unit
// takes them: element i is accumulated (FMA) into lane i % 8, and the 8 lanes are added in the
// fixed tree of lane_tree8. The ref kernels do exactly that in scalar code, so ref and avx2
// agree to the bit and the tests compare them exactly.
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"

namespace qllm::kernels {

// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): the order of the AVX2 hadd reduction.
inline float lane_tree8(const float* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

struct NormKernels {
  // y = (x * r) * gamma with r = 1 / sqrt(sum(x^2) / h + eps).
  void (*rms_norm_row)(const float* x, const float* gamma, int64_t h, float eps, float* y);
  // mean = sum(x) / h, var = sum((x - mean)^2) / h, r = 1 / sqrt(var + eps),
  // y = ((x - mean) * r) * gamma + beta (beta may be null: + 0 skipped).
  void (*layer_norm_row)(const float* x, const float* gamma, const float* beta, int64_t h, float eps, float* y);
  // In-place rotation of one head's first 2 * half dims: neox pairs (i, i + half), gptj pairs
  // (2i, 2i + 1); (a, b) -> (a * c - b * s, b * c + a * s), c/s = cos/sin[i], no FMA.
  void (*rope_row)(float* x, const float* cos, const float* sin, int64_t half, bool neox);
};

const NormKernels& norm_kernels(Isa isa);
const NormKernels& norm_kernels_ref();
const NormKernels& norm_kernels_avx2();  // QLLM_HAVE_AVX2 builds only

}  // namespace qllm::kernels
