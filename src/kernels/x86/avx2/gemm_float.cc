// AVX2 float GEMM over packed panels (f32, f16 or bf16 weights, f32 activations, f32 FMA).
//
// Microkernel 6 x 16: 12 accumulators + 2 weight registers + 1 broadcast. Zen 3 and recent Intel
// cores issue two FMAs a cycle with a 4-cycle latency, so at least 8 independent accumulators
// are needed to keep both FMA pipes busy; 12 leaves headroom for the loads. Each output lane
// accumulates k in order with one FMA per term, exactly as the reference does, so the two agree
// to the bit. f16/bf16 weights are widened in registers (vcvtph2ps / shift), never in memory.
#include <immintrin.h>

#include "kernels/kernels.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels::avx2 {

namespace {

constexpr int kMR = 6;

template <DType DT, int MR>
void tile(const float* a, int64_t lda, const void* bpanel, int64_t k, float* c) {
  __m256 acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  const uint8_t* bp = static_cast<const uint8_t*>(bpanel);
  constexpr int64_t step = kPanel * dtype_size(DT);
  for (int64_t kk = 0; kk < k; ++kk, bp += step) {
    // The panel is one sequential stream; 2 KB ahead keeps it in flight. It used to be issued for
    // MR <= 2 only, but 3-6 rows are too little compute to hide the misses either: bench wq-gemm
    // (dense f16 peer, avx2, n = 4096, k = 7168 / 14336, alternated runs) m = 4 3.0-3.6 / 5.4-5.9
    // -> 1.9-2.2 / 3.6-4.1 ms, m = 6 4.1-4.2 / 7.6-7.8 -> 2.2-2.6 / 4.1-4.5 ms; f32 10-20 % (its
    // rows are a line per step, so 2 KB is only 32 steps ahead; 4 KB or 64 steps were no better).
    _mm_prefetch(reinterpret_cast<const char*>(bp + 2048), _MM_HINT_T0);
    const __m256 b0 = load8(DT, bp);
    const __m256 b1 = load8(DT, bp + 8 * dtype_size(DT));
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * kPanel, acc0[r]);
    _mm256_storeu_ps(c + r * kPanel + 8, acc1[r]);
  }
}

template <DType DT>
void run_tile(int mr, const float* a, int64_t lda, const void* bp, int64_t k, float* c) {
  switch (mr) {
    case 1: tile<DT, 1>(a, lda, bp, k, c); break;
    case 2: tile<DT, 2>(a, lda, bp, k, c); break;
    case 3: tile<DT, 3>(a, lda, bp, k, c); break;
    case 4: tile<DT, 4>(a, lda, bp, k, c); break;
    case 5: tile<DT, 5>(a, lda, bp, k, c); break;
    default: tile<DT, 6>(a, lda, bp, k, c); break;
  }
}

template <DType DT>
void gemm(const float* a, int64_t lda, int64_t rows, const FloatPanels& b, int64_t p0, int64_t p1,
          const FloatEpilogue& ep) {
  alignas(64) float c[kMR * kPanel];
  for (int64_t p = p0; p < p1; ++p) {
    const void* bp = offset(b.data, DT, p * b.panel_elems());
    const int64_t col0 = p * kPanel;
    const int64_t ncols = b.n - col0 < kPanel ? b.n - col0 : kPanel;
    alignas(32) float bias[kPanel] = {};
    if (ep.bias)
      for (int64_t j = 0; j < ncols; ++j) bias[j] = ep.bias[col0 + j];
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int mr = static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR);
      run_tile<DT>(mr, a + r0 * lda, lda, bp, b.k, c);
      for (int r = 0; r < mr; ++r) {
        __m256 v0 = _mm256_loadu_ps(c + r * kPanel), v1 = _mm256_loadu_ps(c + r * kPanel + 8);
        if (ep.bias) {
          v0 = _mm256_add_ps(v0, _mm256_load_ps(bias));
          v1 = _mm256_add_ps(v1, _mm256_load_ps(bias + 8));
        }
        store16(ep.out_dtype, offset(ep.out, ep.out_dtype, (r0 + r) * ep.ldo + col0), v0, v1, ncols);
      }
    }
  }
}

}  // namespace

void float_gemm(const float* a, int64_t lda, int64_t rows, const FloatPanels& b, int64_t p0,
                int64_t p1, const FloatEpilogue& ep) {
  switch (b.dtype) {
    case DType::f16: gemm<DType::f16>(a, lda, rows, b, p0, p1, ep); break;
    case DType::bf16: gemm<DType::bf16>(a, lda, rows, b, p0, p1, ep); break;
    default: gemm<DType::f32>(a, lda, rows, b, p0, p1, ep); break;
  }
}

}  // namespace qllm::kernels::avx2
