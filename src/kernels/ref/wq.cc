// Scalar reference of the weight-only quantised matmul: the test oracle. Every output is
// sum_kk fma(x[kk], W'[kk, c]) in kk order from 0, then + bias, with W' = (f32(q) + offset) * scale
// computed per element exactly as SPEC section 5 writes it.
#include <cmath>

#include "kernels/kernels.h"
#include "kernels/wq.h"

namespace qllm::kernels {

namespace {

float wq_at(const WqPanels& w, int64_t kk, int64_t c) {
  const int64_t p = c / kWqPanel, g = kk / w.kgroup;
  const int s = static_cast<int>(c % kWqPanel);
  const float q = static_cast<float>(w.q(p, kk, s));
  const float sc = w.scale(p, g)[s];
  return w.has_offset ? (q + w.offset(p, g)[s]) * sc : q * sc;
}

void store_out(DType dt, void* out, int64_t i, float v) {
  switch (dt) {
    case DType::f16: static_cast<uint16_t*>(out)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(out)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

int64_t prep_floats_ref(const WqPanels&) { return 0; }
void prepare_ref(const WqPanels&, const float*, float*, int64_t, int64_t) {}

void gemv_ref(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1, const FloatEpilogue& ep) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = p0 * kWqPanel; c < p1 * kWqPanel && c < w.n; ++c) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < w.k; ++kk) acc = std::fma(x.x[r * x.ldx + kk], wq_at(w, kk, c), acc);
      if (ep.bias) acc += ep.bias[c];
      store_out(ep.out_dtype, ep.out, r * ep.ldo + c, acc);
    }
}

void dequant_ref(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile) {
  for (int64_t kk = k0; kk < k1; ++kk)
    for (int s = 0; s < kWqPanel; ++s)
      tile[(kk - k0) * kWqPanel + s] = p * kWqPanel + s < w.n ? wq_at(w, kk, p * kWqPanel + s) : 0.0f;
}

void micro_ref(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, bool accumulate) {
  for (int r = 0; r < rows; ++r)
    for (int s = 0; s < kWqPanel; ++s) {
      float acc = accumulate ? c[r * ldc + s] : 0.0f;
      for (int64_t kk = 0; kk < kc; ++kk) acc = std::fma(a[kk * kWqMR + r], b[kk * kWqPanel + s], acc);
      c[r * ldc + s] = acc;
    }
}

}  // namespace

const WqKernels& wq_ref_kernels() {
  static const WqKernels t{Isa::ref, prep_floats_ref, prepare_ref, gemv_ref, dequant_ref, micro_ref};
  return t;
}

int64_t wq_vnni_prep_floats(const WqPanels& w) { return WqVnniGeometry(w).floats; }

const WqKernels& wq_kernels(Isa isa) {
#if QLLM_HAVE_AVX2
  // VNNI matrix-vector path, AVX2 GEMM path (only where the CPU has AVX-512: workspace sizing
  // asks for every ISA).
  if (isa == Isa::avx512 && isa_supported(Isa::avx512)) return wq_avx512_kernels();
  if (isa == Isa::avx512) return wq_avx2_kernels();
  if (isa == Isa::avx2) return wq_avx2_kernels();
#endif
  (void)isa;
  return wq_ref_kernels();
}

}  // namespace qllm::kernels
