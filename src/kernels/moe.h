// Row kernels of the MoE routing operators (SPEC section 4): expert scoring, the dequant of a
// routed matmul's accumulators, and the weighted combine. One implementation per ISA with the
// same signatures; kernels/ref is the ground truth and the AVX2 versions reproduce it bit for
// bit (same operations in the same order; no FMA contraction where ref has none).
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"

namespace qllm::kernels {

enum class Score : uint8_t { softmax, sigmoid };

struct MoeKernels {
  // out[e] = softmax(logits)[e] or sigmoid(logits[e]), in f32, over one token's E logits.
  // softmax: m = max, p = exp(x - m), sum in 8 interleaved partial sums (lane e % 8 over the
  // first E - E % 8 values, lanes added in order, then the tail), out = p / sum.
  void (*score_row)(const float* logits, int64_t E, Score f, float* out);
  // out[c] = (f32(acc[c]) * row_scale) * col_scale[c]  (SPEC section 4's order), or out[c] += that.
  void (*scale_acc_row)(const int32_t* acc, int64_t n, float row_scale, const float* col_scale,
                        float* out, bool accumulate);
  // y[c] += w * x[c]  (a multiply then an add: two roundings, no FMA).
  void (*axpy_row)(float w, const float* x, int64_t n, float* y);
  // y[c] = a[c] + b[c]
  void (*add_row)(const float* a, const float* b, int64_t n, float* y);
};

const MoeKernels& moe_kernels(Isa isa);
const MoeKernels& moe_ref_kernels();
const MoeKernels& moe_avx2_kernels();  // x86 builds only (QLLM_HAVE_AVX2); avx512 uses these too

}  // namespace qllm::kernels
