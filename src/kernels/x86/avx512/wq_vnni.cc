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
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/wq.h"
#include "kernels/x86/avx2/simd.h"

// GCC 12 warns inside its own _mm512_cvtepi32_ps (the _mm512_undefined_ps it passes through).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qllm::kernels {

namespace avx512 {
namespace {

using Geo = WqVnniGeometry;
// Software prefetch distance on the weight stream: 4 KiB ahead. Measured (bench wq-gemm
// --rows 1, m = 1, k = 7168 / 14336) 1, 2, 4 and 8 KiB: 4 KiB was 5-15% faster than 1 KiB at
// every format (e.g. W8 k = 14336 1.81 -> 1.48-1.62 ms) and 8 KiB no better, as the int8 GEMM
// found once large buffers sat on 2 MiB pages (no page boundary stops the prefetch there).
constexpr int64_t g_pf = 4096;

inline float pow2(int e) {  // 2^e, exact for -126 <= e <= 127
  uint32_t b = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Per row (see wq.h, WqVnniGeometry, for the layout of `prep`), groups [g0, g1), 16 k per step
// in AVX-512: the operator splits a row's groups over the threads, and this must still cost far
// less than the matrix-vector product (a scalar version cost ~10% of a k = 14336 call).
void prepare(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1) {
  const Geo geo(w);
  const int KB = w.kb_k();
  const int64_t bias = w.bias();
  float* xp = prep;
  float* gsum = prep + geo.gsum_at;
  int32_t* info = reinterpret_cast<int32_t*>(prep + geo.info_at);
  int8_t* dig = reinterpret_cast<int8_t*>(prep + geo.digits_at);
  const int SB = w.bits == 8 ? 4 : 8;  // digit bytes per k-block and digit
  // x' = x * 2^(-iB) with i = k % KB (KB divides 16 and every group starts at a multiple of KB).
  alignas(64) float mult[16];
  for (int j = 0; j < 16; ++j) mult[j] = 1.0f / static_cast<float>(1u << ((j % KB) * w.bits));
  const __m512 vmult = _mm512_load_ps(mult);
  // 4-bit: a block's 8 digit bytes are its even k then its odd k (the kernel's nibble order).
  const __m128i perm4 = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t len = w.group_len(g);
    const float* xg = x + g * w.kgroup;
    __m512d all = _mm512_setzero_pd();
    for (int64_t j = 0; j < w.kgroup; j += 16) {
      const int64_t nv = std::min<int64_t>(16, std::max<int64_t>(0, len - j));
      const __mmask16 lm = static_cast<__mmask16>((1u << nv) - 1);
      const __mmask16 sm = static_cast<__mmask16>((1u << std::min<int64_t>(16, w.kgroup - j)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(lm, xg + j);
      _mm512_mask_storeu_ps(xp + g * w.kgroup + j, sm, _mm512_mul_ps(v, vmult));
      all = _mm512_add_pd(all, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
      all = _mm512_add_pd(all, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    gsum[g] = static_cast<float>(_mm512_reduce_add_pd(all));
    for (int64_t c = 0; c < geo.cpg; ++c) {
      int32_t* inf = info + (g * geo.cpg + c) * 16;
      float* inff = reinterpret_cast<float*>(inf);
      std::memset(inf, 0, 64);
      const int64_t c0 = c * geo.chunk, clen = std::min(len, (c + 1) * geo.chunk) - c0;
      if (clen <= 0) continue;
      const int64_t nkb = (clen + KB - 1) / KB;
      const float* xc = xg + c0;
      int8_t* d = dig + ((g * w.kgroup + c0) / KB) * 4 * SB;
      // Pass 1: u = the lowest set bit over the chunk, top = a bound on the highest.
      __m512i vumin = _mm512_set1_epi32(1 << 20), vtop = _mm512_set1_epi32(-(1 << 20));
      __mmask16 bad = 0;
      // The float path's correction -bias * sum of x over the biased positions (i < KB - 1), for
      // every chunk: another row may send this chunk down the float path.
      __m512d biased = _mm512_setzero_pd();
      const __mmask16 bpos = KB == 8 ? 0x7F7F : 0x7777;
      for (int64_t j = 0; j < clen; j += 16) {
        const __mmask16 lm = static_cast<__mmask16>((1u << std::min<int64_t>(16, clen - j)) - 1);
        const __m512 xv = _mm512_maskz_loadu_ps(lm & bpos, xc + j);
        biased = _mm512_add_pd(biased, _mm512_cvtps_pd(_mm512_castps512_ps256(xv)));
        biased = _mm512_add_pd(biased, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(xv), 1))));
        const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(lm, xc + j));
        const __m512i ef = _mm512_and_si512(_mm512_srli_epi32(b, 23), _mm512_set1_epi32(0xFF));
        bad |= _mm512_cmpeq_epi32_mask(ef, _mm512_set1_epi32(0xFF));
        const __m512i mant = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFF));
        const __mmask16 nz = _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x7FFFFFFF));
        const __mmask16 normal = _mm512_test_epi32_mask(ef, ef);
        const __m512i m = _mm512_mask_or_epi32(mant, normal, mant, _mm512_set1_epi32(0x800000));
        const __m512i efp = _mm512_max_epi32(ef, _mm512_set1_epi32(1));
        const __m512i lsb = _mm512_and_si512(m, _mm512_sub_epi32(_mm512_setzero_si512(), m));
        // The lowest set bit's position: the exponent of lsb as a float (a power of two, exact).
        const __m512i tz = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(lsb)), 23),
                                            _mm512_set1_epi32(127));
        const __m512i elow = _mm512_add_epi32(_mm512_sub_epi32(efp, _mm512_set1_epi32(150)), tz);
        vumin = _mm512_mask_min_epi32(vumin, nz, vumin, elow);
        vtop = _mm512_mask_max_epi32(vtop, nz, vtop, _mm512_sub_epi32(efp, _mm512_set1_epi32(126)));
      }
      inff[9] = static_cast<float>(-static_cast<double>(bias) * _mm512_reduce_add_pd(biased));
      const int umin = _mm512_reduce_min_epi32(vumin), top = _mm512_reduce_max_epi32(vtop);
      bool ok = bad == 0;
      if (ok && umin == (1 << 20)) {  // all zero: S = 0 (zero digits, read if another row needs them)
        std::memset(d, 0, static_cast<size_t>(nkb * 4 * SB));
        continue;
      }
      // |X| = |x| 2^-u < 2^(top - u) must fit s32 for the digit split; 2^(u + 8s) must be normal.
      ok = ok && top - umin <= 31 && umin >= -126 && umin <= 100;
      int S = 0;
      if (ok) {
        const __m512 scl = _mm512_castsi512_ps(_mm512_set1_epi32((127 - umin) << 23));  // 2^-u
        __m512i sum[4], nzd = _mm512_setzero_si512();
        for (int s = 0; s < 4; ++s) sum[s] = _mm512_setzero_si512();
        __m512i used[4] = {nzd, nzd, nzd, nzd};
        for (int64_t j = 0; j < clen; j += 16) {
          const __mmask16 lm = static_cast<__mmask16>((1u << std::min<int64_t>(16, clen - j)) - 1);
          __m512i X = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(lm, xc + j), scl));
          __m128i db[4];
          for (int s = 0; s < 4; ++s) {
            const __m512i ds = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);  // low byte, signed
            X = _mm512_srai_epi32(_mm512_sub_epi32(X, ds), 8);
            sum[s] = _mm512_add_epi32(sum[s], ds);
            used[s] = _mm512_or_si512(used[s], ds);
            db[s] = _mm512_cvtepi32_epi8(ds);
          }
          nzd = _mm512_or_si512(nzd, X);  // must end zero
          const int64_t kb0 = j / KB;
          if (KB == 8) {
            for (int s = 0; s < 4; ++s) db[s] = _mm_shuffle_epi8(db[s], perm4);
            int8_t* o = d + kb0 * 32;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi64(db[0], db[1]));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpacklo_epi64(db[2], db[3]));
            if (kb0 + 1 < nkb) {
              _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 32), _mm_unpackhi_epi64(db[0], db[1]));
              _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 48), _mm_unpackhi_epi64(db[2], db[3]));
            }
          } else {
            const __m128i t0 = _mm_unpacklo_epi32(db[0], db[1]), t1 = _mm_unpacklo_epi32(db[2], db[3]);
            const __m128i t2 = _mm_unpackhi_epi32(db[0], db[1]), t3 = _mm_unpackhi_epi32(db[2], db[3]);
            const __m128i blk[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1),
                                    _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)};
            for (int q = 0; q < 4 && kb0 + q < nkb; ++q)
              _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (kb0 + q) * 16), blk[q]);
          }
        }
        ok = _mm512_test_epi32_mask(nzd, nzd) == 0;
        for (int s = 0; s < 4; ++s)
          if (_mm512_test_epi32_mask(used[s], used[s])) S = s + 1;
        if (ok && umin + 8 * (S - 1) > 127) ok = false;
        if (ok) {
          inf[0] = S;
          for (int s = 0; s < S; ++s) {
            inf[1 + s] = static_cast<int32_t>(-bias * _mm512_reduce_add_epi32(sum[s]));
            inff[5 + s] = pow2(umin + 8 * s);
          }
          // Digits >= S are zero (the split ended), so the kernel may read S' > S of them.
          continue;
        }
      }
      inf[0] = 5;  // float path
      std::memset(d, 0, static_cast<size_t>(nkb * 4 * SB));
    }
  }
}

template <int BITS, int MR, int S>
inline void int_chunk(const uint8_t* bp, int64_t nkb, const int8_t* const* dg, const int32_t* const* inf,
                      __m512* t) {
  constexpr int SB = BITS == 8 ? 4 : 8;
  // One row: two accumulator chains per digit hide vpdpbusd's latency (5 cycles).
  constexpr int CH = MR == 1 ? 2 : 1;
  __m512i acc[CH][MR][S];
  for (int r = 0; r < MR; ++r)
    for (int s = 0; s < S; ++s) {
      acc[0][r][s] = _mm512_set1_epi32(inf[r][1 + s]);
      if constexpr (CH == 2) acc[CH - 1][r][s] = _mm512_setzero_si512();
    }
  const __m512i lo = _mm512_set1_epi8(0x0F);
  const __m512i top = _mm512_set1_epi32(BITS == 8 ? static_cast<int>(0x80000000u) : 0x08000000);
  for (int64_t kb = 0; kb < nkb; ++kb, bp += kWqBlockBytes) {
    _mm_prefetch(reinterpret_cast<const char*>(bp + g_pf), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(bp);
    if constexpr (BITS == 4) {
      const __m512i e = _mm512_and_si512(v, lo);
      // (v >> 4) & 0x0F.. ^ top: the odd nibbles, the top one biased like the rest.
      const __m512i o = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), lo, top, 0x6A);
      for (int r = 0; r < MR; ++r) {
        const int8_t* d = dg[r] + kb * 4 * SB;
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          int32_t de, dod;
          std::memcpy(&de, d + s * SB, 4);
          std::memcpy(&dod, d + s * SB + 4, 4);
          acc[0][r][s] = _mm512_dpbusd_epi32(acc[0][r][s], e, _mm512_set1_epi32(de));
          acc[CH - 1][r][s] = _mm512_dpbusd_epi32(acc[CH - 1][r][s], o, _mm512_set1_epi32(dod));
        }
      }
    } else {
      const __m512i e = _mm512_xor_si512(v, top);
      const int c = CH == 2 ? static_cast<int>(kb & 1) : 0;
      for (int r = 0; r < MR; ++r) {
        const int8_t* d = dg[r] + kb * 4 * SB;
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          int32_t de;
          std::memcpy(&de, d + s * SB, 4);
          if (c == 0) acc[0][r][s] = _mm512_dpbusd_epi32(acc[0][r][s], e, _mm512_set1_epi32(de));
          else acc[CH - 1][r][s] = _mm512_dpbusd_epi32(acc[CH - 1][r][s], e, _mm512_set1_epi32(de));
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const float* p = reinterpret_cast<const float*>(inf[r]) + 5;
    for (int s = S - 1; s >= 0; --s) {
      __m512i a = acc[0][r][s];
      if constexpr (CH == 2) a = _mm512_add_epi32(a, acc[1][r][s]);
      t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(p[s]), t[r]);
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
    _mm_prefetch(reinterpret_cast<const char*>(bp + g_pf), _MM_HINT_T0);
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

template <int BITS, int MR, bool OFF>
void gemv_panel(const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  const uint8_t* bp = w.panel(p);
  const float* xr[MR];
  const float* gs[MR];
  for (int r = 0; r < MR; ++r) {
    xr[r] = prow[r];
    gs[r] = prow[r] + geo.gsum_at;
  }
  __m512 y[MR];
  for (int r = 0; r < MR; ++r) y[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 t[MR];
    for (int r = 0; r < MR; ++r) t[r] = _mm512_setzero_ps();
    const int64_t len = w.group_len(g);
    for (int64_t c = 0; c < geo.cpg; ++c) {
      const int64_t c0 = c * geo.chunk;
      if (c0 >= len) break;
      const int64_t nkb = (std::min(len, c0 + geo.chunk) - c0 + KB - 1) / KB;
      const int32_t* inf[MR];
      const int8_t* dg[MR];
      int S = 0;
      for (int r = 0; r < MR; ++r) {
        inf[r] = reinterpret_cast<const int32_t*>(prow[r] + geo.info_at) + (g * geo.cpg + c) * 16;
        dg[r] = reinterpret_cast<const int8_t*>(prow[r] + geo.digits_at) + ((g * w.kgroup + c0) / KB) * (BITS == 8 ? 16 : 32);
        S = std::max(S, inf[r][0]);
      }
      switch (S) {
        case 0: break;
        case 1: int_chunk<BITS, MR, 1>(bp, nkb, dg, inf, t); break;
        case 2: int_chunk<BITS, MR, 2>(bp, nkb, dg, inf, t); break;
        case 3: int_chunk<BITS, MR, 3>(bp, nkb, dg, inf, t); break;
        case 4: int_chunk<BITS, MR, 4>(bp, nkb, dg, inf, t); break;
        default: float_chunk<BITS, MR>(bp, nkb, xr, g * w.kgroup + c0, inf, t); break;
      }
      bp += nkb * kWqBlockBytes;
    }
    const float* sc = reinterpret_cast<const float*>(bp);
    const __m512 s = _mm512_loadu_ps(sc);
    for (int r = 0; r < MR; ++r) {
      __m512 tt = t[r];
      if constexpr (OFF) tt = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 16), _mm512_set1_ps(gs[r][g]), tt);
      y[r] = _mm512_fmadd_ps(tt, s, y[r]);
    }
    bp += OFF ? 128 : 64;
  }
  for (int r = 0; r < MR; ++r) _mm512_store_ps(ybuf + r * 16, y[r]);
}

template <int BITS, bool OFF>
void gemv_rows(int mr, const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  switch (mr) {
    case 1: gemv_panel<BITS, 1, OFF>(w, geo, prow, p, ybuf); break;
    case 2: gemv_panel<BITS, 2, OFF>(w, geo, prow, p, ybuf); break;
    case 3: gemv_panel<BITS, 3, OFF>(w, geo, prow, p, ybuf); break;
    default: gemv_panel<BITS, 4, OFF>(w, geo, prow, p, ybuf); break;
  }
}

void gemv(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1, const FloatEpilogue& ep) {
  const Geo geo(w);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col0 = p * kWqPanel;
    const int64_t ncols = w.n - col0 < kWqPanel ? w.n - col0 : kWqPanel;
    // Four rows at a time (4 rows x 4 digits = 16 zmm accumulators); rows 4-7 of an 8-row call
    // read the panel again, from L2.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int mr = static_cast<int>(rows - r0 < 4 ? rows - r0 : 4);
      alignas(64) float ybuf[4 * 16];
      const float* prow[4];
      for (int r = 0; r < mr; ++r) prow[r] = x.prep + (r0 + r) * x.ldp;
      if (w.bits == 8) {
        if (w.has_offset) gemv_rows<8, true>(mr, w, geo, prow, p, ybuf);
        else gemv_rows<8, false>(mr, w, geo, prow, p, ybuf);
      } else {
        if (w.has_offset) gemv_rows<4, true>(mr, w, geo, prow, p, ybuf);
        else gemv_rows<4, false>(mr, w, geo, prow, p, ybuf);
      }
      avx2::store_rows16(ybuf, mr, ep.bias ? ep.bias + col0 : nullptr, ep.out_dtype,
                        avx2::offset(ep.out, ep.out_dtype, r0 * ep.ldo + col0), ep.ldo, ncols);
    }
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
