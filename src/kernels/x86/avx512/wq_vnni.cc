// AVX-512 VNNI matrix-vector path of the weight-only quantised matmul (m <= 8), on the packed
// panels of kernels/wq.h. The GEMM path (dequant + micro) is the AVX2 one.
//
// Why: the AVX2 kernel spends 3 vector ops per 8 weights and row (vpand, vcvtdq2ps, FMA) and
// tops out near 17 GB/s per core from L1 on this Zen 4, below DRAM speed on 2 cores. Here the
// products are exact integer dot products (vpdpbusd: 64 u8 x s8 products per op) instead:
//
// * x stays as given, never quantised. Per row and per chunk of k (the quantisation group, or
//   128 k when the group is longer than 256), wq_vnni_prepare writes every x[kk] exactly as
//   X[kk] * 2^u with integer X (u = the lowest set bit over the chunk) and splits X into S <= 4
//   signed 8-bit digits, X = sum_s d_s * 256^s. Weights are unsigned u = q + 2^(B-1) (the packed
//   layout stores the top value of a dword signed; one xor of its top bit makes it biased too).
//   vpdpbusd accumulates sum_kk d_s[kk] * u[kk, c] per digit s in s32 (no overflow: |sum| <=
//   256 * 128 * 255 < 2^31), started at -2^(B-1) * sum_kk d_s[kk] so that it ends holding the
//   exact sum_kk d_s[kk] * q[kk, c] (|.| <= 2^22: exact in f32). The chunk's dot product is then
//   sum_s f32(acc_s) * 2^(u + 8s): S rounded f32 additions of exact terms per chunk, against one
//   rounding per k in a float FMA chain, so the result is f32 accumulation, only more accurate.
// * A chunk whose x cannot be written with 4 digits (f32 values whose significands span more
//   than ~31 bits, inf/nan, tiny subnormal scales) falls back to the float path below (the AVX2
//   kernel's vpand + vcvtdq2ps + FMA in zmm): any x is correct, activations that came from
//   f16/bf16 (11 / 8 significant bits; A16) take the integer path for nearly every chunk.
// * An all-zero chunk (of every row) is skipped.
// 4-bit blocks: the 8 nibbles of a column dword split into even nibbles (vpandd with 0x0F bytes)
// and odd nibbles (vpsrlw 4 + vpternlogd: and 0x0F bytes, xor the top nibble's sign bit), each a
// u8 per byte lane holding 4 k of one column: 3 ops for 128 weights, then 2 vpdpbusd per digit.
// 8-bit blocks are u8 already after one vpxord: 1 vpdpbusd per digit for 64 weights.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/wq.h"
#include "kernels/x86/avx2/simd.h"
#include "kernels/x86/wq_digits.h"

// GCC 12 warns inside its own _mm512_cvtepi32_ps (the _mm512_undefined_ps it passes through).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qllm::kernels {

namespace avx512 {
namespace {

using Geo = WqVnniGeometry;
// Software prefetch distance on the weight stream: 4 KiB ahead when one panel streams (m >= 3).
// Measured (bench wq-gemm --rows 1, m = 1, k = 7168 / 14336) 1, 2, 4 and 8 KiB: 4 KiB was 5-15%
// faster than 1 KiB at every format (e.g. W8 k = 14336 1.81 -> 1.48-1.62 ms) and 8 KiB no
// better, as the int8 GEMM found once large buffers sat on 2 MiB pages.
constexpr int64_t g_pf = 4096;
// With 2 or 4 panels streaming at once (m <= 2, session 4) the hardware prefetcher tracks the
// streams itself and the software prefetch only has to cover its start-up: 512 bytes per stream.
// Measured at m = 1, 4 streams, one thread, alternated in one process: 256 / 512 B 0.64-0.67
// ms (W4-g128 k = 7168), 1 KiB 0.72-0.73, 1.5 KiB 0.72-0.73, none 0.69-0.72.
constexpr int64_t g_pf_multi = 512;

// Per-row preparation (digits, float-fallback decisions, sums): kernels/x86/wq_digits.h, shared
// with the AVX2 digit kernel so both see the same digits and round the same way.
void prepare(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1) {
  wq_digits_prepare(w, x, prep, g0, g1);
}

// Prefetch one k-block's line g_pf (one stream) or g_pf_multi (NP >= 2 streams) bytes ahead.
template <int NP>
inline void pf(const uint8_t* a) {
  _mm_prefetch(reinterpret_cast<const char*>(a + (NP == 1 ? g_pf : g_pf_multi)), _MM_HINT_T0);
}

template <int BITS, int MR, int S, int NP>
inline void int_chunk(const uint8_t* const* bp0, int64_t nkb, const int8_t* const* dg, const int32_t* const* inf,
                      __m512 (*t)[4]) {
  constexpr int SB = BITS == 8 ? 4 : 8;
  // One row: two accumulator chains per digit hide vpdpbusd's latency (5 cycles); with 4 panels
  // the panels are the independent chains (and 2 x 4 x S accumulators would not fit 32 zmm).
  constexpr int CH = MR == 1 && NP <= 2 ? 2 : 1;
  __m512i acc[NP][CH][MR][S];
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < MR; ++r)
      for (int s = 0; s < S; ++s) {
        acc[q][0][r][s] = _mm512_set1_epi32(inf[r][1 + s]);
        if constexpr (CH == 2) acc[q][CH - 1][r][s] = _mm512_setzero_si512();
      }
  const __m512i lo = _mm512_set1_epi8(0x0F);
  const __m512i top = _mm512_set1_epi32(BITS == 8 ? static_cast<int>(0x80000000u) : 0x08000000);
  const uint8_t* bp[NP];
  for (int q = 0; q < NP; ++q) bp[q] = bp0[q];
  for (int64_t kb = 0; kb < nkb; ++kb) {
    __m512i e[NP], o[NP];
    for (int q = 0; q < NP; ++q) {
      pf<NP>(bp[q]);
      const __m512i v = _mm512_loadu_si512(bp[q]);
      bp[q] += kWqBlockBytes;
      if constexpr (BITS == 4) {
        e[q] = _mm512_and_si512(v, lo);
        // (v >> 4) & 0x0F.. ^ top: the odd nibbles, the top one biased like the rest.
        o[q] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), lo, top, 0x6A);
      } else {
        e[q] = _mm512_xor_si512(v, top);
      }
    }
    if constexpr (BITS == 4) {
      for (int r = 0; r < MR; ++r) {
        const int8_t* d = dg[r] + kb * 4 * SB;
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          int32_t de, dod;
          std::memcpy(&de, d + s * SB, 4);
          std::memcpy(&dod, d + s * SB + 4, 4);
          const __m512i be = _mm512_set1_epi32(de), bo = _mm512_set1_epi32(dod);
          for (int q = 0; q < NP; ++q) {
            acc[q][0][r][s] = _mm512_dpbusd_epi32(acc[q][0][r][s], e[q], be);
            acc[q][CH - 1][r][s] = _mm512_dpbusd_epi32(acc[q][CH - 1][r][s], o[q], bo);
          }
        }
      }
    } else {
      const int c = CH == 2 ? static_cast<int>(kb & 1) : 0;
      for (int r = 0; r < MR; ++r) {
        const int8_t* d = dg[r] + kb * 4 * SB;
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          int32_t de;
          std::memcpy(&de, d + s * SB, 4);
          const __m512i be = _mm512_set1_epi32(de);
          for (int q = 0; q < NP; ++q) {
            if (c == 0) acc[q][0][r][s] = _mm512_dpbusd_epi32(acc[q][0][r][s], e[q], be);
            else acc[q][CH - 1][r][s] = _mm512_dpbusd_epi32(acc[q][CH - 1][r][s], e[q], be);
          }
        }
      }
    }
  }
  // The integer sums are exact, so splitting them over chains or panels changes no bit; the
  // float epilogue keeps its order (top digit first).
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < MR; ++r) {
      const float* p = reinterpret_cast<const float*>(inf[r]) + 5;
      for (int s = S - 1; s >= 0; --s) {
        __m512i a = acc[q][0][r][s];
        if constexpr (CH == 2) a = _mm512_add_epi32(a, acc[q][1][r][s]);
        t[q][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(p[s]), t[q][r]);
      }
    }
}

template <int BITS, int MR>
inline void float_chunk(const uint8_t* bp, int64_t nkb, const float* const* xr, int64_t k0,
                        const int32_t* const* inf, __m512* t) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  constexpr int NS = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  __m512 acc[NS][MR];
  for (int s = 0; s < NS; ++s)
    for (int r = 0; r < MR; ++r) acc[s][r] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < nkb; ++kb, bp += kWqBlockBytes) {
    pf<1>(bp);
    const __m512i v = _mm512_loadu_si512(bp);
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) {
      const __m512 wv = _mm512_cvtepi32_ps(
          _mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (i * BITS)))));
      for (int r = 0; r < MR; ++r)
        acc[i % NS][r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[r][k0 + kb * KB + i]), wv, acc[i % NS][r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m512 a = acc[0][r];
    for (int s = 1; s < NS; ++s) a = _mm512_add_ps(a, acc[s][r]);
    a = _mm512_add_ps(a, _mm512_set1_ps(reinterpret_cast<const float*>(inf[r])[9]));
    t[r] = _mm512_add_ps(t[r], a);
  }
}

// NP panels p .. p + NP - 1 at once, k-block by k-block: NP weight streams in flight per core,
// the digit broadcasts shared between them. One stream per core read DRAM at ~17-19 GB/s on one
// thread (the streaming probe: 26-30), because one sequential stream keeps too few lines in
// flight; 4 streams read 23-24 GB/s (W4-g128) and 28-30 (W8) there. m = 1 streams 4 panels
// (4 panels x 3 digits x 1-2 chains <= 16 zmm accumulators), m = 2 two; m >= 3 one.
template <int BITS, int MR, bool OFF, int NP>
void gemv_panel(const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  const uint8_t* bp[NP];
  for (int q = 0; q < NP; ++q) bp[q] = w.panel(p + q);
  const float* xr[MR];
  const float* gs[MR];
  for (int r = 0; r < MR; ++r) {
    xr[r] = prow[r];
    gs[r] = prow[r] + geo.gsum_at;
  }
  __m512 y[NP][MR];
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < MR; ++r) y[q][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 t[NP][4];
    for (int q = 0; q < NP; ++q)
      for (int r = 0; r < MR; ++r) t[q][r] = _mm512_setzero_ps();
    const int64_t len = w.group_len(g);
    for (int64_t c = 0; c < geo.cpg; ++c) {
      const int64_t c0 = c * geo.chunk;
      if (c0 >= len) break;
      const int64_t nkb = (std::min(len, c0 + geo.chunk) - c0 + KB - 1) / KB;
      const int32_t* inf[MR];
      const int8_t* dg[MR];
      int S = 0;
      for (int r = 0; r < MR; ++r) {
        inf[r] = geo.info(prow[r], g, c);
        dg[r] = geo.digits(prow[r], w.kgroup, BITS, g, c0);
        S = std::max(S, inf[r][0]);
      }
      switch (S) {
        case 0: break;
        case 1: int_chunk<BITS, MR, 1, NP>(bp, nkb, dg, inf, t); break;
        case 2: int_chunk<BITS, MR, 2, NP>(bp, nkb, dg, inf, t); break;
        case 3: int_chunk<BITS, MR, 3, NP>(bp, nkb, dg, inf, t); break;
        case 4: int_chunk<BITS, MR, 4, NP>(bp, nkb, dg, inf, t); break;
        default:
          for (int q = 0; q < NP; ++q) float_chunk<BITS, MR>(bp[q], nkb, xr, g * w.kgroup + c0, inf, t[q]);
          break;
      }
      for (int q = 0; q < NP; ++q) bp[q] += nkb * kWqBlockBytes;
    }
    for (int q = 0; q < NP; ++q) {
      const float* sc = reinterpret_cast<const float*>(bp[q]);
      const __m512 s = _mm512_loadu_ps(sc);
      for (int r = 0; r < MR; ++r) {
        __m512 tt = t[q][r];
        if constexpr (OFF) tt = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 16), _mm512_set1_ps(gs[r][g]), tt);
        y[q][r] = _mm512_fmadd_ps(tt, s, y[q][r]);
      }
      bp[q] += OFF ? 128 : 64;
    }
  }
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < MR; ++r) _mm512_store_ps(ybuf + (q * 4 + r) * 16, y[q][r]);
}

template <int BITS, bool OFF>
void gemv_rows(int mr, int np, const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  if (np == 4 && mr == 1) {
    gemv_panel<BITS, 1, OFF, 4>(w, geo, prow, p, ybuf);
    return;
  }
  if (np >= 2) {
    switch (mr) {
      case 1: gemv_panel<BITS, 1, OFF, 2>(w, geo, prow, p, ybuf); return;
      case 2: gemv_panel<BITS, 2, OFF, 2>(w, geo, prow, p, ybuf); return;
      default: break;
    }
  }
  switch (mr) {
    case 1: gemv_panel<BITS, 1, OFF, 1>(w, geo, prow, p, ybuf); break;
    case 2: gemv_panel<BITS, 2, OFF, 1>(w, geo, prow, p, ybuf); break;
    case 3: gemv_panel<BITS, 3, OFF, 1>(w, geo, prow, p, ybuf); break;
    default: gemv_panel<BITS, 4, OFF, 1>(w, geo, prow, p, ybuf); break;
  }
}

void gemv(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1, const FloatEpilogue& ep) {
  const Geo geo(w);
  for (int64_t p = p0; p < p1;) {
    // Four rows at a time (4 rows x 4 digits = 16 zmm accumulators); rows 4-7 of an 8-row call
    // read the panel again, from L2. Up to 2 rows: two panels at once (2 x 16 accumulators).
    const int np = rows == 1 && p + 3 < p1 ? 4 : (rows <= 2 && p + 1 < p1 ? 2 : 1);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int mr = static_cast<int>(rows - r0 < 4 ? rows - r0 : 4);
      alignas(64) float ybuf[4 * 4 * 16];
      const float* prow[4];
      for (int r = 0; r < mr; ++r) prow[r] = x.prep + (r0 + r) * x.ldp;
      if (w.bits == 8) {
        if (w.has_offset) gemv_rows<8, true>(mr, np, w, geo, prow, p, ybuf);
        else gemv_rows<8, false>(mr, np, w, geo, prow, p, ybuf);
      } else {
        if (w.has_offset) gemv_rows<4, true>(mr, np, w, geo, prow, p, ybuf);
        else gemv_rows<4, false>(mr, np, w, geo, prow, p, ybuf);
      }
      for (int q = 0; q < np; ++q) {
        const int64_t col0 = (p + q) * kWqPanel;
        const int64_t ncols = w.n - col0 < kWqPanel ? w.n - col0 : kWqPanel;
        avx2::store_rows16(ybuf + q * 4 * 16, mr, ep.bias ? ep.bias + col0 : nullptr, ep.out_dtype,
                          avx2::offset(ep.out, ep.out_dtype, r0 * ep.ldo + col0), ep.ldo, ncols);
      }
    }
    p += np;
  }
}

}  // namespace
}  // namespace avx512

const WqKernels& wq_avx512_kernels() {
  static const WqKernels t{Isa::avx512, wq_vnni_prep_floats, avx512::prepare, avx512::gemv,
                           wq_avx2_kernels().dequant, wq_avx2_kernels().micro};
  return t;
}

}  // namespace qllm::kernels
