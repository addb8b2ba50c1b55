// AVX2 int8 GEMM over packed panels, exact s8 x s8 -> s32.
//
// Why s16 vpmaddwd and not the vpmaddubsw idiom: vpmaddubsw multiplies u8 x s8 and adds pairs
// into s16 with saturation, which is wrong for full-range s8 data (and the sign trick breaks on
// -128). Widening both operands to s16 makes vpmaddwd's pair sums exact (|sum| <= 2 * 128 * 128
// fits s32), at one multiply per 16 MACs instead of two per 32: the same multiplier throughput,
// paid for with a widening shuffle per weight load.
//
// Microkernel: 6 rows x 16 columns. 12 accumulators + 2 weight registers + 1 broadcast = 15 of
// the 16 ymm registers. Per k-pair it does 2 widening loads (16 weight bytes each), 6 32-bit
// broadcasts of an activation pair and 12 vpmaddwd + 12 vpaddd, so the multiply ports, not
// loads or shuffles, are the limit. The whole depth k runs with accumulators in registers (no
// k blocking): the 16-column panel (k * 16 bytes, 112 KiB at k = 7168) stays in L2 while the row
// strips of a block pass over it, and the activation strip streams from L2/L3 at a few bytes per
// cycle, far below what those caches deliver.
#include <immintrin.h>

#include <cstring>

#include "kernels/kernels.h"
#include "kernels/x86/avx2/int8_common.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels::avx2 {

namespace {

constexpr int kMR = 6;

// pf: where to prefetch, advancing with the weights (nullptr: no prefetch). One prefetch per
// 64-byte line, i.e. every second k-pair.
template <int MR>
inline void tile(const int16_t* a, int64_t lda, const int8_t* bp, int64_t kp, int32_t* c, const int8_t* pf) {
  __m256i acc0[MR], acc1[MR];
  const int16_t* ar[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm256_setzero_si256();
    acc1[r] = _mm256_setzero_si256();
    ar[r] = a + r * lda;
  }
  for (int64_t q = 0; q < kp; ++q) {
    if (pf && (q & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + q * 32), _MM_HINT_T0);
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp)));
    const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bp + 16)));
    bp += 32;
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, ar[r] + 2 * q, 4);
      const __m256i av = _mm256_set1_epi32(pair);
      acc0[r] = _mm256_add_epi32(acc0[r], _mm256_madd_epi16(av, b0));
      acc1[r] = _mm256_add_epi32(acc1[r], _mm256_madd_epi16(av, b1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kPanel), acc0[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * kPanel + 8), acc1[r]);
  }
}

void run_tile(int mr, const int16_t* a, int64_t lda, const int8_t* bp, int64_t kp, int32_t* c, const int8_t* pf) {
  switch (mr) {
    case 1: tile<1>(a, lda, bp, kp, c, pf); break;
    case 2: tile<2>(a, lda, bp, kp, c, pf); break;
    case 3: tile<3>(a, lda, bp, kp, c, pf); break;
    case 4: tile<4>(a, lda, bp, kp, c, pf); break;
    case 5: tile<5>(a, lda, bp, kp, c, pf); break;
    default: tile<6>(a, lda, bp, kp, c, pf); break;
  }
}

}  // namespace

// Applies the epilogue to an mr x 16 s32 tile of panel p whose rows start at row r0.
// Shared with the AVX-512 kernel (int8_common.h).
void int8_epilogue(const int32_t* c, int mr, int64_t r0, int64_t p, const Int8Epilogue& ep) {
  if (ep.kind == Epi::swiglu) {
    const int64_t col0 = p * (kPanel / 2);
    const int64_t ncols = ep.out_cols - col0 < kPanel / 2 ? ep.out_cols - col0 : kPanel / 2;
    const __m256 sg = _mm256_loadu_ps(ep.col_scale + p * kPanel);
    const __m256 su = _mm256_loadu_ps(ep.col_scale + p * kPanel + 8);
    for (int r = 0; r < mr; ++r) {
      const __m256 rs = _mm256_set1_ps(ep.row_scale ? ep.row_scale[r0 + r] : 1.0f);
      const __m256 g = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * kPanel))), sg), rs);
      const __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * kPanel + 8))), su), rs);
      const __m256 y = _mm256_mul_ps(u, silu8(g));
      float* out = static_cast<float*>(ep.out) + (r0 + r) * ep.ldo + col0;
      if (ncols == 8) _mm256_storeu_ps(out, y);
      else store8_partial(DType::f32, out, y, static_cast<int>(ncols));
    }
    return;
  }
  const int64_t col0 = p * kPanel;
  const int64_t ncols = ep.out_cols - col0 < kPanel ? ep.out_cols - col0 : kPanel;
  if (ep.kind == Epi::s32) {
    for (int r = 0; r < mr; ++r) {
      int32_t* out = static_cast<int32_t*>(ep.out) + (r0 + r) * ep.ldo + col0;
      std::memcpy(out, c + r * kPanel, ncols * sizeof(int32_t));
    }
    return;
  }
  // dequant: the scale vector of the last, partial panel is copied so no load reads past n.
  alignas(32) float cs[kPanel] = {};
  const float* scale = ep.col_scale + col0;
  if (ncols < kPanel) {
    std::memcpy(cs, scale, ncols * sizeof(float));
    scale = cs;
  }
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  for (int r = 0; r < mr; ++r) {
    const __m256 rs = _mm256_set1_ps(ep.row_scale ? ep.row_scale[r0 + r] : 1.0f);
    const __m256 v0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * kPanel))), s0), rs);
    const __m256 v1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * kPanel + 8))), s1), rs);
    store16(ep.out_dtype, offset(ep.out, ep.out_dtype, (r0 + r) * ep.ldo + col0), v0, v1, ncols);
  }
}

void int8_gemm(const void* a_bytes, int64_t lda_bytes, int64_t rows, const Int8Panels& b, int64_t p0,
               int64_t p1, const Int8Epilogue& ep) {
  const int16_t* a = static_cast<const int16_t*>(a_bytes);
  const int64_t lda = lda_bytes / static_cast<int64_t>(sizeof(int16_t));
  alignas(64) int32_t c[kMR * kPanel];
  int8_panel_loop<kMR>(rows, b, p0, p1, c, ep, [&](int mr, int64_t r0, int64_t, const int8_t* bp, const int8_t* pf) {
    run_tile(mr, a + r0 * lda, lda, bp, b.kg, c, pf);
  });
}

}  // namespace qllm::kernels::avx2
