// AVX-512 large-m rows kernel of the 2:4 sparse matmul (kernels/sparse24.h, layout unchanged).
//
// Same arithmetic as avx2::s24_float_rows and ref::s24_float_rows (per output one FMA chain in
// ascending k, the block's kept terms in the order g0.v0, g0.v1, g1.v0, g1.v1), so all three agree
// to the bit. What changes is the register tiling: a 64-row panel is 4 zmm per channel, and the 32
// zmm registers could hold the accumulators of NP pairs (2 NP channels, 8 NP zmm) at once. On Zen 4
// a zmm FMA occupies both 256-bit FMA pipes, so 4 cycles of latency need 4 chains in flight; one
// pair (8 zmm chains) already has 2x slack, and NP = 2 measured slower. Per kept weight: one
// vpermps from the block's values register + 4 FMAs with zmm x operands (half the instructions of
// the AVX2 kernel per useful FMA; f16 gains most: see docs/design.md).
#include <immintrin.h>

#include "kernels/sparse24.h"
#include "kernels/x86/avx2/simd.h"
#include "kernels/x86/s24_rows_walk.h"

// g++ 12 warns about the undefined upper half inside its own _mm512 permute intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qllm::kernels::avx512 {

namespace {

// NP pairs of one super-panel (vals: the first pair's 16 values of the chunk's first step,
// vstride floats per step, pair j at + 16 j; meta: the first pair's meta u32 of the first step,
// mstride bytes per step, pair j at + 4 j), over blocks [kb0, kb1). acc[(2 j + c) * 64 + r].
template <int NP>
void rows_pairs(const float* xp, const float* vals, int64_t vstride, const uint8_t* meta, int64_t mstride,
                int64_t kb0, int64_t kb1, float* acc) {
  __m512 a[2 * NP][4];
  for (int ch = 0; ch < 2 * NP; ++ch)
    for (int q = 0; q < 4; ++q) a[ch][q] = _mm512_loadu_ps(acc + ch * kRowPanel + 16 * q);
  for (int64_t kb = kb0; kb < kb1; kb += 2, vals += vstride, meta += mstride) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t* xb = reinterpret_cast<const uint8_t*>(xp + (kb + h) * 8 * kRowPanel);
      for (int j = 0; j < NP; ++j)
        for (int c = 0; c < 2; ++c) {
          // Position i of group g of the block is row 4g + i: i * 256 bytes past the group.
          const uint32_t m = meta[4 * j + 2 * h + c];
          const uint32_t off[4] = {(m << 8) & 0x300u, (m << 6) & 0x300u, ((m << 4) & 0x300u) + 0x400u,
                                   ((m << 2) & 0x300u) + 0x400u};
          const float* v = vals + 16 * j + 8 * h;
          const int vi[4] = {2 * c, 2 * c + 1, 4 + 2 * c, 5 + 2 * c};
          // The block's 8 values are loaded once and each kept weight broadcast from the register
          // (vpermps on the otherwise idle shuffle pipe): 4 x loads per 4 FMAs instead of 5 loads.
          const __m512 vb = _mm512_castps256_ps512(_mm256_loadu_ps(v));
          for (int t = 0; t < 4; ++t) {
            const __m512 wb = _mm512_permutexvar_ps(_mm512_set1_epi32(vi[t]), vb);
            const float* xr = reinterpret_cast<const float*>(xb + off[t]);
            for (int q = 0; q < 4; ++q) a[2 * j + c][q] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(xr + 16 * q), a[2 * j + c][q]);
          }
        }
    }
  }
  for (int ch = 0; ch < 2 * NP; ++ch)
    for (int q = 0; q < 4; ++q) _mm512_storeu_ps(acc + ch * kRowPanel + 16 * q, a[ch][q]);
}

// The chunk walk (prefetches, f16/bf16 widening) is x86/s24_rows_walk.h, shared with the AVX2
// kernel; one pair (8 zmm accumulators) at a time: two pairs (16 accumulators) measured slower
// (123-150 ms against 101 ms, f32 k = 7168), so the chain slack is not what limits.
template <DType DT>
void frows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc) {
  x86::s24_rows_walk<DT>(xp, w, p0, p1, kb0, kb1, acc,
                         [&](const float* vals, int64_t vstride, const uint8_t* meta, int64_t mstride, float* a) {
                           rows_pairs<1>(xp, vals, vstride, meta, mstride, kb0, kb1, a);
                         });
}

}  // namespace

void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc) {
  static_assert(kRowPanel == 64, "rows_pairs holds 64 rows in 4 zmm per channel");
  switch (w.dtype) {
    case DType::f16: frows<DType::f16>(xp, w, p0, p1, kb0, kb1, acc); break;
    case DType::bf16: frows<DType::bf16>(xp, w, p0, p1, kb0, kb1, acc); break;
    default: frows<DType::f32>(xp, w, p0, p1, kb0, kb1, acc); break;
  }
}

}  // namespace qllm::kernels::avx512
