// AVX2 weight-only quantised matmul (W8A16 / W4A16) on the packed panels of kernels/wq.h.
//
// Matrix-vector path (m <= 8, memory-bound): the goal is to decode weights as fast as DRAM
// delivers them. A k-block (64 bytes: 16 columns x KB k) is two 32-byte loads; value i of every
// column is `vpand` with the bits of value i + `vcvtdq2ps`, which yields u * 2^(iB) exactly (the
// layout stores values biased and the top value signed, see wq.h), and one FMA against x[k]
// pre-multiplied by 2^(-iB) (exact: a power of two). So 3 vector ops per 8 weights, no shifts and
// no sign extension. Per group the kernel accumulates dot = sum_k x'[k] * stored[k] and applies
//   y += scale * (dot - bias_q * sum_{biased k} x + offset * sum_k x)
// once per group and column, with both sums prepared per row (wq_prepare). With one row the
// FMA chain latency (4 cycles) would bound the loop, so m = 1 keeps 4 independent accumulator
// sets (8 chains), m = 2 two.
//
// GEMM path (large m): `dequant` expands a (k-block x 16) tile to f32 W' with exactly the
// reference's operations ((f32(q) + offset) * scale), and `micro` is a 6 x 16 FMA microkernel
// (12 accumulators; see gemm_float.cc for why 6 x 16) that accumulates in k order, so the GEMM
// path matches the scalar reference bit for bit.
#include <immintrin.h>

#include "kernels/kernels.h"
#include "kernels/wq.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace avx2 {
namespace {

inline float pow2(int e) {  // 2^e for small |e|, exact
  return e >= 0 ? static_cast<float>(1u << e) : 1.0f / static_cast<float>(1u << -e);
}

// Per row: x'[kk] = x[kk] * 2^(-i*B) for the groups * kgroup padded k (zero past k), then per
// group {-bias_q * sum of x over biased positions, sum of x}. Sums in double: they correct the
// dot products, so their rounding should not add to the kernel's.
int64_t prep_floats(const WqPanels& w) {
  const int64_t f = w.groups * w.kgroup + 2 * w.groups;
  return (f + 15) / 16 * 16;  // keep every row 64-byte aligned
}

void prepare(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1) {
  const int KB = w.kb_k();
  float* sums = prep + w.groups * w.kgroup;
  for (int64_t g = g0; g < g1; ++g) {
    double biased = 0, all = 0;
    for (int64_t j = 0; j < w.kgroup; ++j) {
      const int64_t kk = g * w.kgroup + j;
      const int i = static_cast<int>(j % KB);
      const float v = kk < w.k ? x[kk] : 0.0f;
      prep[kk] = v * pow2(-i * w.bits);
      all += v;
      if (i < KB - 1) biased += v;
    }
    sums[2 * g] = static_cast<float>(-static_cast<double>(w.bias()) * biased);
    sums[2 * g + 1] = static_cast<float>(all);
  }
}

template <int BITS, int MR, bool OFF>
void gemv_panel(const WqPanels& w, const float* const* xr, const float* const* sums, int64_t p, float* ybuf) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  constexpr int NS = MR == 1 ? 4 : (MR == 2 ? 2 : 1);  // independent accumulator sets
  const uint8_t* bp = w.panel(p);
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc0[NS][MR], acc1[NS][MR];
    for (int s = 0; s < NS; ++s)
      for (int r = 0; r < MR; ++r) acc0[s][r] = acc1[s][r] = _mm256_setzero_ps();
    const int64_t nkb = w.group_kblocks(g);
    const int64_t kbase = g * w.kgroup;
    for (int64_t kb = 0; kb < nkb; ++kb, bp += kWqBlockBytes) {
      // The next group's bytes are already in flight through the hardware prefetcher (one
      // sequential stream per thread); a software prefetch 1 KiB ahead keeps it ahead of decode.
      _mm_prefetch(reinterpret_cast<const char*>(bp + 1024), _MM_HINT_T0);
      const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp));
      const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + 32));
      const int64_t k0 = kbase + kb * KB;
#pragma GCC unroll 8
      for (int i = 0; i < KB; ++i) {
        const __m256i m = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (i * BITS)));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
        for (int r = 0; r < MR; ++r) {
          const __m256 xb = _mm256_broadcast_ss(xr[r] + k0 + i);
          acc0[i % NS][r] = _mm256_fmadd_ps(xb, w0, acc0[i % NS][r]);
          acc1[i % NS][r] = _mm256_fmadd_ps(xb, w1, acc1[i % NS][r]);
        }
      }
    }
    const float* sc = reinterpret_cast<const float*>(bp);
    const __m256 s0 = _mm256_load_ps(sc), s1 = _mm256_load_ps(sc + 8);
    __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    if constexpr (OFF) {
      o0 = _mm256_load_ps(sc + 16);
      o1 = _mm256_load_ps(sc + 24);
    }
    bp += OFF ? 128 : 64;
    for (int r = 0; r < MR; ++r) {
      __m256 t0 = acc0[0][r], t1 = acc1[0][r];
      for (int s = 1; s < NS; ++s) {
        t0 = _mm256_add_ps(t0, acc0[s][r]);
        t1 = _mm256_add_ps(t1, acc1[s][r]);
      }
      const __m256 cb = _mm256_set1_ps(sums[r][2 * g]);
      t0 = _mm256_add_ps(t0, cb);
      t1 = _mm256_add_ps(t1, cb);
      if constexpr (OFF) {
        const __m256 xs = _mm256_set1_ps(sums[r][2 * g + 1]);
        t0 = _mm256_fmadd_ps(o0, xs, t0);
        t1 = _mm256_fmadd_ps(o1, xs, t1);
      }
      _mm256_store_ps(ybuf + r * 16, _mm256_fmadd_ps(t0, s0, _mm256_load_ps(ybuf + r * 16)));
      _mm256_store_ps(ybuf + r * 16 + 8, _mm256_fmadd_ps(t1, s1, _mm256_load_ps(ybuf + r * 16 + 8)));
    }
  }
}

template <int BITS, bool OFF>
void gemv_rows(int mr, const WqPanels& w, const float* const* xr, const float* const* sums, int64_t p, float* ybuf) {
  switch (mr) {
    case 1: gemv_panel<BITS, 1, OFF>(w, xr, sums, p, ybuf); break;
    case 2: gemv_panel<BITS, 2, OFF>(w, xr, sums, p, ybuf); break;
    case 3: gemv_panel<BITS, 3, OFF>(w, xr, sums, p, ybuf); break;
    default: gemv_panel<BITS, 4, OFF>(w, xr, sums, p, ybuf); break;
  }
}

void gemv(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1, const FloatEpilogue& ep) {
  const int64_t sums_at = w.groups * w.kgroup;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col0 = p * kWqPanel;
    const int64_t ncols = w.n - col0 < kWqPanel ? w.n - col0 : kWqPanel;
    // Four rows at a time keep 8 accumulators + decode registers within the 16 ymm; rows 4-7
    // of an 8-row call read the panel again, from L2.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int mr = static_cast<int>(rows - r0 < 4 ? rows - r0 : 4);
      alignas(32) float ybuf[4 * 16] = {};
      const float* xr[4];
      const float* sums[4];
      for (int r = 0; r < mr; ++r) {
        xr[r] = x.prep + (r0 + r) * x.ldp;
        sums[r] = xr[r] + sums_at;
      }
      if (w.bits == 8) {
        if (w.has_offset) gemv_rows<8, true>(mr, w, xr, sums, p, ybuf);
        else gemv_rows<8, false>(mr, w, xr, sums, p, ybuf);
      } else {
        if (w.has_offset) gemv_rows<4, true>(mr, w, xr, sums, p, ybuf);
        else gemv_rows<4, false>(mr, w, xr, sums, p, ybuf);
      }
      store_rows16(ybuf, mr, ep.bias ? ep.bias + col0 : nullptr, ep.out_dtype,
                        offset(ep.out, ep.out_dtype, r0 * ep.ldo + col0), ep.ldo, ncols);
    }
  }
}

template <int BITS, bool OFF>
void dequant_t(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  constexpr float kBias = BITS == 8 ? 128.0f : 8.0f;
  // Geometry once per call (its divisions would otherwise cost more than the decode).
  const uint8_t* pb = w.panel(p);
  const int64_t gbytes = w.group_bytes();
  int64_t g = k0 / w.kgroup;
  int64_t gend = (g + 1) * w.kgroup;
  const uint8_t* blk = pb + g * gbytes + ((k0 - g * w.kgroup) / KB) * kWqBlockBytes;
  const float* sc = w.scale(p, g);
  for (int64_t kb0 = k0; kb0 < k1; kb0 += KB, blk += kWqBlockBytes) {
    if (kb0 >= gend) {  // next group: its blocks follow this group's scales (and offsets)
      ++g;
      gend += w.kgroup;
      blk = pb + g * gbytes;
      sc = w.scale(p, g);
    }
    const __m256 s0 = _mm256_load_ps(sc), s1 = _mm256_load_ps(sc + 8);
    __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    if constexpr (OFF) {
      o0 = _mm256_load_ps(sc + 16);
      o1 = _mm256_load_ps(sc + 24);
    }
    const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk));
    const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32));
    const int n = static_cast<int>(k1 - kb0 < KB ? k1 - kb0 : KB);
    float* t = tile + (kb0 - k0) * kWqPanel;
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) {
      if (i >= n) break;
      const __m256i m = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (i * BITS)));
      const __m256 sh = _mm256_set1_ps(pow2(-i * BITS));
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
      // u * 2^(iB) * 2^(-iB) - bias is an exact small integer: q as the reference sees it.
      if (i < KB - 1) {
        q0 = _mm256_fmadd_ps(q0, sh, _mm256_set1_ps(-kBias));
        q1 = _mm256_fmadd_ps(q1, sh, _mm256_set1_ps(-kBias));
      } else {
        q0 = _mm256_mul_ps(q0, sh);
        q1 = _mm256_mul_ps(q1, sh);
      }
      if constexpr (OFF) {
        q0 = _mm256_add_ps(q0, o0);
        q1 = _mm256_add_ps(q1, o1);
      }
      _mm256_storeu_ps(t + i * kWqPanel, _mm256_mul_ps(q0, s0));
      _mm256_storeu_ps(t + i * kWqPanel + 8, _mm256_mul_ps(q1, s1));
    }
  }
}

void dequant(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile) {
  if (w.bits == 8) {
    if (w.has_offset) dequant_t<8, true>(w, p, k0, k1, tile);
    else dequant_t<8, false>(w, p, k0, k1, tile);
  } else {
    if (w.has_offset) dequant_t<4, true>(w, p, k0, k1, tile);
    else dequant_t<4, false>(w, p, k0, k1, tile);
  }
}

template <int MR, bool ACC>
void micro_t(const float* a, const float* b, int64_t kc, float* c, int64_t ldc) {
  // ACC is a template parameter: a run-time choice between loading and zeroing the
  // accumulators makes GCC keep them in memory (a store per FMA pair).
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if constexpr (ACC) {
      acc0[r] = _mm256_loadu_ps(c + r * ldc);
      acc1[r] = _mm256_loadu_ps(c + r * ldc + 8);
    } else {
      acc0[r] = acc1[r] = _mm256_setzero_ps();
    }
  }
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_load_ps(b + kk * kWqPanel), b1 = _mm256_load_ps(b + kk * kWqPanel + 8);
  #pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + kk * kWqMR + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc0[r]);
    _mm256_storeu_ps(c + r * ldc + 8, acc1[r]);
  }
}

template <bool ACC>
void micro_rows(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows) {
  switch (rows) {
    case 1: micro_t<1, ACC>(a, b, kc, c, ldc); break;
    case 2: micro_t<2, ACC>(a, b, kc, c, ldc); break;
    case 3: micro_t<3, ACC>(a, b, kc, c, ldc); break;
    case 4: micro_t<4, ACC>(a, b, kc, c, ldc); break;
    case 5: micro_t<5, ACC>(a, b, kc, c, ldc); break;
    default: micro_t<6, ACC>(a, b, kc, c, ldc); break;
  }
}

void micro(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, bool accumulate) {
  if (accumulate) micro_rows<true>(a, b, kc, c, ldc, rows);
  else micro_rows<false>(a, b, kc, c, ldc, rows);
}

}  // namespace
}  // namespace avx2

const WqKernels& wq_avx2_kernels() {
  static const WqKernels t{Isa::avx2, avx2::prep_floats, avx2::prepare, avx2::gemv, avx2::dequant, avx2::micro};
  return t;
}

}  // namespace qllm::kernels
