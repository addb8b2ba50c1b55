// Scalar ground truth of the MoE row kernels (kernels/moe.h).
#include "kernels/moe.h"

#include "kernels/ref/math.h"
#include "qllm/core/error.h"

namespace qllm::kernels {
namespace {

void score_row_ref(const float* x, int64_t E, Score f, float* out) {
  if (f == Score::sigmoid) {
    for (int64_t e = 0; e < E; ++e) out[e] = 1.0f / (1.0f + exp_qllm(-x[e]));
    return;
  }
  float m = x[0];
  for (int64_t e = 1; e < E; ++e) m = max_ps(x[e], m);
  // Eight partial sums, as the AVX2 kernel keeps them in one register.
  float lanes[8] = {};
  const int64_t e8 = E - E % 8;
  for (int64_t e = 0; e < E; ++e) out[e] = exp_qllm(x[e] - m);
  for (int64_t e = 0; e < e8; ++e) lanes[e % 8] += out[e];
  float sum = 0.0f;
  for (float l : lanes) sum += l;
  for (int64_t e = e8; e < E; ++e) sum += out[e];
  for (int64_t e = 0; e < E; ++e) out[e] = out[e] / sum;
}

void scale_acc_row_ref(const int32_t* acc, int64_t n, float rs, const float* cs, float* out, bool accumulate) {
  for (int64_t c = 0; c < n; ++c) {
    const float v = (static_cast<float>(acc[c]) * rs) * cs[c];
    out[c] = accumulate ? out[c] + v : v;
  }
}

void axpy_row_ref(float w, const float* x, int64_t n, float* y) {
  for (int64_t c = 0; c < n; ++c) y[c] = y[c] + w * x[c];
}

void add_row_ref(const float* a, const float* b, int64_t n, float* y) {
  for (int64_t c = 0; c < n; ++c) y[c] = a[c] + b[c];
}

}  // namespace

const MoeKernels& moe_ref_kernels() {
  static const MoeKernels k{score_row_ref, scale_acc_row_ref, axpy_row_ref, add_row_ref};
  return k;
}

const MoeKernels& moe_kernels(Isa isa) {
  switch (isa) {
    case Isa::ref: return moe_ref_kernels();
    case Isa::avx2:
    case Isa::avx512:
#if QLLM_HAVE_AVX2
      return moe_avx2_kernels();
#else
      break;
#endif
  }
  throw_invalid("qllm", "isa", "ISA ", isa_name(isa), " was not compiled into this build");
}

}  // namespace qllm::kernels
