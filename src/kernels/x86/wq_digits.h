// Per-row preparation of x for the digit (exact integer product) matrix-vector kernels of the
// weight-only quantised matmul: shared by the AVX2 kernel (x86/avx2/wq.cc, vpmaddubsw) and the
// AVX-512 VNNI kernel (x86/avx512/wq_vnni.cc, vpdpbusd), so both see the same digits, the same
// float-fallback decisions and the same sums, and their results agree (bit for bit at m = 1).
// Layout of `prep`: WqVnniGeometry in kernels/wq.h.
//
// Written in AVX2 (8 k per step) so the AVX2 build can use it; the AVX-512 file compiles the
// same code. Everything is in an anonymous namespace: each including file (compiled with its
// own ISA flags) gets its own copy, so the linker can never hand the AVX-512-compiled copy to
// the AVX2 kernel.
//
// Per row and chunk of k (the quantisation group, or 128 k when the group is longer than 256)
// every x[kk] is written exactly as X[kk] * 2^u with integer X (u = the lowest set bit over the
// chunk) and X is split into S <= 4 signed 8-bit digits, X = sum_s d_s * 256^s. A chunk whose X
// would not fit 4 digits (significands spread over more than ~31 bits, inf/nan, scales outside
// the normal range) is marked for the float path (S = 5); an all-zero chunk gets S = 0.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/wq.h"

namespace qllm::kernels {
namespace {

inline float wqd_pow2(int e) {  // 2^e, exact for -126 <= e <= 127
  uint32_t b = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// Lanes [0, n) set (n clamped to [0, 8]): the mask of a partial 8-lane step.
inline __m256i wqd_mask(int64_t n) {
  const int c = static_cast<int>(std::min<int64_t>(8, std::max<int64_t>(0, n)));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline double wqd_hadd(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline int32_t wqd_hadd(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
inline int32_t wqd_hmin(__m256i v) {
  __m128i s = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_min_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_min_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
inline int32_t wqd_hmax(__m256i v) {
  __m128i s = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_max_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_max_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
inline __m256d wqd_add8(__m256d acc, __m256 v) {  // acc + the 8 floats of v, in double
  acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  return _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

// Groups [g0, g1) of one row (the operator splits a row's groups over the threads): each
// group's part of `prep` depends on that group's x only. Must cost far less than the matrix-
// vector product (a scalar version cost ~10% of a k = 14336 call).
inline void wq_digits_prepare(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1) {
  const WqVnniGeometry geo(w);
  const int KB = w.kb_k();
  const int64_t bias = w.bias();
  float* xp = prep;
  float* gsum = prep + geo.gsum_at;
  int32_t* info = reinterpret_cast<int32_t*>(prep + geo.info_at);
  int8_t* dig = reinterpret_cast<int8_t*>(prep + geo.digits_at);
  const int SB = w.bits == 8 ? 4 : 8;  // digit bytes per k-block and digit
  // x' = x * 2^(-iB) with i = k % KB (KB divides 8 and every group starts at a multiple of KB):
  // the float path's activations, the power of two of the layout's value i folded in (exact).
  alignas(32) float mult[8];
  for (int j = 0; j < 8; ++j) mult[j] = 1.0f / static_cast<float>(1u << ((j % KB) * w.bits));
  const __m256 vmult = _mm256_load_ps(mult);
  // Lanes of the biased values (i < KB - 1), whose float-path correction is -bias * sum x.
  const __m256i bpos = KB == 8 ? _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, -1, 0)
                               : _mm256_setr_epi32(-1, -1, -1, 0, -1, -1, -1, 0);
  // 4-bit: 8 k (one k-block) per step; the lanes are permuted to even k then odd k (the
  // kernels' nibble order) before the split, so each digit's 8 bytes come out in block order.
  const __m256i perm4 = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i c_ff = _mm256_set1_epi32(0xFF), c_mant = _mm256_set1_epi32(0x7FFFFF);
  const __m256i c_abs = _mm256_set1_epi32(0x7FFFFFFF), c_hid = _mm256_set1_epi32(0x800000);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t len = w.group_len(g);
    const float* xg = x + g * w.kgroup;
    __m256d all = _mm256_setzero_pd();
    for (int64_t j = 0; j < w.kgroup; j += 8) {
      const __m256 v = _mm256_maskload_ps(xg + j, wqd_mask(len - j));
      _mm256_maskstore_ps(xp + g * w.kgroup + j, wqd_mask(w.kgroup - j), _mm256_mul_ps(v, vmult));
      all = wqd_add8(all, v);
    }
    gsum[g] = static_cast<float>(wqd_hadd(all));
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
      __m256i vumin = _mm256_set1_epi32(1 << 20), vtop = _mm256_set1_epi32(-(1 << 20)), bad = zero;
      // The float path's correction -bias * sum of x over the biased positions, for every
      // chunk: another row may send this chunk down the float path.
      __m256d biased = _mm256_setzero_pd();
      for (int64_t j = 0; j < clen; j += 8) {
        const __m256i lm = wqd_mask(clen - j);
        const __m256 xv = _mm256_maskload_ps(xc + j, lm);
        biased = wqd_add8(biased, _mm256_and_ps(xv, _mm256_castsi256_ps(bpos)));
        const __m256i b = _mm256_castps_si256(xv);
        const __m256i ef = _mm256_and_si256(_mm256_srli_epi32(b, 23), c_ff);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(ef, c_ff));
        const __m256i mant = _mm256_and_si256(b, c_mant);
        const __m256i nz = _mm256_cmpgt_epi32(_mm256_and_si256(b, c_abs), zero);  // x != +-0
        const __m256i normal = _mm256_cmpgt_epi32(ef, zero);
        const __m256i m = _mm256_or_si256(mant, _mm256_and_si256(normal, c_hid));
        const __m256i efp = _mm256_max_epi32(ef, _mm256_set1_epi32(1));
        const __m256i lsb = _mm256_and_si256(m, _mm256_sub_epi32(zero, m));
        // The lowest set bit's position: the exponent of lsb as a float (a power of two, exact).
        const __m256i tz = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(lsb)), 23),
                                            _mm256_set1_epi32(127));
        const __m256i elow = _mm256_add_epi32(_mm256_sub_epi32(efp, _mm256_set1_epi32(150)), tz);
        vumin = _mm256_blendv_epi8(vumin, _mm256_min_epi32(vumin, elow), nz);
        vtop = _mm256_blendv_epi8(vtop, _mm256_max_epi32(vtop, _mm256_sub_epi32(efp, _mm256_set1_epi32(126))), nz);
      }
      inff[9] = static_cast<float>(-static_cast<double>(bias) * wqd_hadd(biased));
      const int umin = wqd_hmin(vumin), top = wqd_hmax(vtop);
      bool ok = _mm256_testz_si256(bad, bad) != 0;
      if (ok && umin == (1 << 20)) {  // all zero: S = 0 (zero digits, read if another row needs them)
        std::memset(d, 0, static_cast<size_t>(nkb * 4 * SB));
        continue;
      }
      // |X| = |x| 2^-u < 2^(top - u) must fit s32 for the digit split; 2^(u + 8s) must be normal.
      ok = ok && top - umin <= 31 && umin >= -126 && umin <= 100;
      int S = 0;
      if (ok) {
        const __m256 scl = _mm256_castsi256_ps(_mm256_set1_epi32((127 - umin) << 23));  // 2^-u
        __m256i sum[4], used[4], nzd = zero;
        for (int s = 0; s < 4; ++s) sum[s] = used[s] = zero;
        for (int64_t j = 0; j < clen; j += 8) {
          __m256i X = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_maskload_ps(xc + j, wqd_mask(clen - j)), scl));
          if (KB == 8) X = _mm256_permutevar8x32_epi32(X, perm4);
          __m256i ds[4];
          for (int s = 0; s < 4; ++s) {
            ds[s] = _mm256_srai_epi32(_mm256_slli_epi32(X, 24), 24);  // low byte, signed
            X = _mm256_srai_epi32(_mm256_sub_epi32(X, ds[s]), 8);
            sum[s] = _mm256_add_epi32(sum[s], ds[s]);
            used[s] = _mm256_or_si256(used[s], ds[s]);
          }
          nzd = _mm256_or_si256(nzd, X);  // must end zero
          // Digits are in [-128, 127]: the signed packs are exact. Per 128-bit lane the bytes
          // are [d0: 4 k][d1: 4 k][d2: 4 k][d3: 4 k].
          const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(ds[0], ds[1]), _mm256_packs_epi32(ds[2], ds[3]));
          const __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
          const int64_t kb0 = j / KB;
          if (KB == 8) {
            // lo holds the even k of each digit, hi the odd k: digit s = [lo dword s][hi dword s].
            int8_t* o = d + kb0 * 32;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_unpacklo_epi32(lo, hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 16), _mm_unpackhi_epi32(lo, hi));
          } else {
            // 8-bit: each 128-bit lane is one k-block's 4 digits x 4 k.
            _mm_storeu_si128(reinterpret_cast<__m128i*>(d + kb0 * 16), lo);
            if (kb0 + 1 < nkb) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (kb0 + 1) * 16), hi);
          }
        }
        ok = _mm256_testz_si256(nzd, nzd) != 0;
        for (int s = 0; s < 4; ++s)
          if (!_mm256_testz_si256(used[s], used[s])) S = s + 1;
        if (ok && umin + 8 * (S - 1) > 127) ok = false;
        if (ok) {
          inf[0] = S;
          for (int s = 0; s < S; ++s) {
            inf[1 + s] = static_cast<int32_t>(-bias * wqd_hadd(sum[s]));
            inff[5 + s] = wqd_pow2(umin + 8 * s);
          }
          // Digits >= S are zero (the split ended), so a kernel may read S' > S of them.
          continue;
        }
      }
      inf[0] = 5;  // float path
      std::memset(d, 0, static_cast<size_t>(nkb * 4 * SB));
    }
  }
}

}  // namespace
}  // namespace qllm::kernels
