// The avx512 ISA's decode tile for s8 KV caches (AttnKernels::decode with an s8 cache calls it
// from x86/avx2/attention_decode.cc's decode_t in its AVX-512 build). Its own file: it shares
// nothing with the float and AVX2 decode paths but the helpers of attention_common.h.
#define QLLM_ATTN_VNNI 1
// g++ 12 warns about the undefined upper half inside its own _mm512 cast/convert/reduce intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/attention.h"
#include "kernels/norm.h"
#include "kernels/x86/avx2/attention_common.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace {

// ---- s8 decode, AVX-512 VNNI build --------------------------------------------------------
//
// Per KV head of the tile, per group of (up to) 4 query rows: scores of 16 keys per pass on
// transposed K bytes (s8_scores16), then softmax and the 7-bit P.V weights of the rows
// (s8_softmax_quant), then the integer P.V of all the rows' weights at once (s8_pv), all in zmm.
// Each pass keeps its working set in the 32 registers (the session-4 version transposed through
// an out-of-line function and spilled its 16 + 16 vectors: stack stores and reloads per key).
// Head sizes that are a multiple of 64 take the session-6 forms of the three steps further down
// (s8_scores_pipe, s8_softmax_phased, s8_pv_defer: the same arithmetic, fewer stalls).

// acc + vpdpbusd(u8 a, s8 of the dword at p broadcast): the sums of _mm512_dpbusd_epi32(acc, a,
// set1(*p)) in one instruction with an embedded broadcast. Inline asm: g++ 12 copies the
// accumulator of the intrinsic to a scratch register and back around every vpdpbusd (and then
// kept the P.V's 16 accumulators in memory as well, a store of each per 4 keys).
inline __m512i dpbusd_b(__m512i acc, __m512i a, const void* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*static_cast<const int32_t*>(p)));
  return acc;
}
// acc + vpdpbusd(u8 a, s8 b), as _mm512_dpbusd_epi32 (see dpbusd_b for the inline asm).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// In-lane 4 x 4 dword transpose of 4 vectors (levels 1-2 of a 16 x 16 transpose): afterwards
// vector m, 128-bit lane L holds dword 4L + m of the inputs a, b, c, d (in that lane order).
inline void tr4x4(__m512i& a, __m512i& b, __m512i& c, __m512i& d) {
  const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
  const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
  a = _mm512_unpacklo_epi64(t0, t2);
  b = _mm512_unpackhi_epi64(t0, t2);
  c = _mm512_unpacklo_epi64(t1, t3);
  d = _mm512_unpackhi_epi64(t1, t3);
}

// The 4 x 4 transpose of 128-bit lanes of a, b, c, d (two vshufi32x4 levels): T0 = lanes 0 of
// a, b, c, d; T4 = lanes 1 ...; T8 = lanes 2; T12 = lanes 3 (the names: the dword offsets of the
// score passes' transposed K units).
[[gnu::always_inline]] inline void lanes4x4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i& T0, __m512i& T4, __m512i& T8,
                                            __m512i& T12) {
  const __m512i x0 = _mm512_shuffle_i32x4(a, b, 0x88), x1 = _mm512_shuffle_i32x4(a, b, 0xdd);
  const __m512i x2 = _mm512_shuffle_i32x4(c, d, 0x88), x3 = _mm512_shuffle_i32x4(c, d, 0xdd);
  T0 = _mm512_shuffle_i32x4(x0, x2, 0x88);
  T8 = _mm512_shuffle_i32x4(x0, x2, 0xdd);
  T4 = _mm512_shuffle_i32x4(x1, x3, 0x88);
  T12 = _mm512_shuffle_i32x4(x1, x3, 0xdd);
}

// s8 scores of R rows of one head for 16 keys at once, one key per dword lane: each 64-byte
// chunk of the 16 K rows is biased to unsigned (k ^ 0x80 = k + 128) and transposed in
// registers, so T[c] lane i holds bytes 4c .. 4c+3 of key i, and vpdpbusd(T[c], broadcast q8
// dword c) adds 4 products per lane. The sums start at -128 * sum(q8) (qc), which cancels the
// bias exactly: sum (k + 128) q - 128 sum q = sum k q, the int32 q16.k8 sum of the definition.
// No horizontal reduction: the 16 sums are one vector, converted, scaled by the keys' scales
// (ksv) and the row's, and stored as 16 scores per row (lanes >= nk masked off). Bytes past D
// load as 0 (biased: 128) and meet q8's zero padding. The transpose runs per group of 4 keys
// (in-lane 4 x 4) and then per quad of its outputs (the two 128-bit-lane levels), each quad's
// 4 T vectors going straight into the R rows' vpdpbusd: 16 + 4 + R + 2 registers live, no spill.
template <int R>
[[gnu::always_inline]] inline void s8_scores16(const int8_t* q8, int64_t Dq8, const int32_t* qc, const float* qs, int64_t D,
                                               const uint8_t* const* k, __m512 ksv, __mmask16 keep, float* s, int64_t Tk,
                                               const uint8_t* const* pf) {
  // Two accumulators per row (even / odd m below): vpdpbusd has a 4-cycle latency and issues
  // one zmm per cycle, so R <= 4 single chains would leave no slack.
  __m512i acc[R], acc2[R];
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_epi32(qc[r]), acc2[r] = _mm512_setzero_si512();
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t d = 0; d < D; d += 64) {
    const __mmask64 mk = d + 64 <= D ? ~uint64_t{0} : (uint64_t{1} << (D - d)) - 1;
    __m512i u[16];
    #pragma GCC unroll 16
    for (int grp = 0; grp < 4; ++grp) {
      #pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) u[4 * grp + i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, k[4 * grp + i] + d), bias);
      tr4x4(u[4 * grp], u[4 * grp + 1], u[4 * grp + 2], u[4 * grp + 3]);
      if (pf)
        for (int i = 0; i < 4; ++i) prefetch_line_t1(pf[4 * grp + i] + d);
    }
    // u[4 grp + m] lane (L, kk) = key 4 grp + kk, dword 4L + m. Per m, two vshufi32x4 levels over
    // the 4 groups give T[m], T[4 + m], T[8 + m], T[12 + m] (lanes = keys 0 .. 15 in order).
    #pragma GCC unroll 16
    for (int m = 0; m < 4; ++m) {
      __m512i T0, T4, T8, T12;
      lanes4x4(u[m], u[4 + m], u[8 + m], u[12 + m], T0, T4, T8, T12);
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const int8_t* qd = q8 + r * Dq8 + d + 4 * m;
        acc[r] = dpbusd_b(acc[r], T0, qd);
        acc2[r] = dpbusd_b(acc2[r], T4, qd + 16);
        acc[r] = dpbusd_b(acc[r], T8, qd + 32);
        acc2[r] = dpbusd_b(acc2[r], T12, qd + 48);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r], acc2[r])), ksv), _mm512_set1_ps(qs[r]));
    _mm512_mask_storeu_ps(s + r * Tk, keep, f);
  }
}

// Lanes i < left of 16 (all for left >= 16, none for left <= 0).
inline __mmask16 keys_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << left) - 1);
}

// The maxima of 4 vectors in the lanes of an xmm (max is exact: the order does not matter):
// two 128-bit-lane levels for the 4 vectors at once, then two in-lane levels.
inline __m128 hmax4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_max_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
  const __m512 cd = _mm512_max_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
  __m512 z = _mm512_max_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));  // 128-bit lane i: vector i
  z = _mm512_max_ps(z, _mm512_permute_ps(z, 0x4e));
  z = _mm512_max_ps(z, _mm512_permute_ps(z, 0xb1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), z));
}

// exp16 for x <= kExpHi (here x = s - m' <= 0; lanes past n may exceed it, but are discarded): exp16 without its
// upper clamp, which is then the identity, and with p * 2^n as one vscalefps instead of building
// 2^n in the exponent field (cvt, add, shift) and multiplying: n is an integer in [-126, 127]
// (the lower clamp), so 2^n is a normal float and both forms round the same exact product p 2^n
// once (to a subnormal only below 2^-126): the same bits as exp16 / exp_qllm.
inline __m512 exp16_le(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
  __m512 n;
  const __m512 p = exp16_poly(x, n);
  return _mm512_scalef_ps(p, n);
}

// The start of a softmax step for R <= 4 rows at once: the new maxima m' = max(m, max of mx[r]'s
// lanes) and alpha = m == -inf ? 0 : exp_qllm(m - m'), the 4 rows in the lanes of one exp8.
template <int R>
[[gnu::always_inline]] inline void s8_max_alpha(const __m512 (&mx)[4], const float* m, __m128& mnv, __m128& av) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  alignas(16) float mo[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
  for (int i = 0; i < R; ++i) mo[i] = m[i];
  const __m128 mov = _mm_load_ps(mo);
  mnv = _mm_max_ps(hmax4(mx[0], mx[1], mx[2], mx[3]), mov);  // max_ps(mt, m)
  const __m128 e4 = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(mov, mnv))));
  av = _mm_andnot_ps(_mm_cmpeq_ps(mov, _mm_set1_ps(kNegInf)), e4);
}

// Softmax step of R rows (row i: scores s + i * Tk, state m[i], l[i]) over the tile's n keys,
// then the rows' 7-bit P.V weights (kernels/attention.h): wq + i * kMaxTile gets the bytes of
// every 32-key block (lanes past n zero), sw[i * 4 + b] the scale of block b (0 for a block that
// adds nothing: its bytes are zero too, so the P.V adds 0), alpha[i] the rescale of the row's
// acc. Everything that is per row in the float path (max, alpha = exp_qllm, the l update, and
// here each block's max, the divisions 127 / wmax and wmax / 127) runs for the R rows at once
// in the lanes of one vector (hmax4, exp8 = exp_qllm's bits, tree4 = lane_tree8's sums); a
// block's probabilities stay in registers from exp16 to the quantisation.
template <int R>
[[gnu::always_inline]] inline void s8_softmax_quant(float* s, int64_t Tk, int64_t n, const float* vs, float* m, float* l, uint8_t* wq,
                                                    float* sw, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  __m512 mx[4] = {ninf, ninf, ninf, ninf};
  #pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < n; j += 16) mx[i] = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, keys_mask(n - j), s + i * Tk + j), mx[i]);
  __m128 mnv, av;
  s8_max_alpha<R>(mx, m, mnv, av);
  alignas(16) float mn[4];
  _mm_store_ps(mn, mnv);
  __m256 sum[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) sum[i] = _mm256_setzero_ps();
  const __m512i top = _mm512_set1_epi32(127);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += kDecPvBlock, ++b) {
    const __mmask16 k0 = keys_mask(n - b0), k1 = keys_mask(n - b0 - 16);
    const __m512 vs0 = _mm512_maskz_loadu_ps(k0, vs + b0), vs1 = _mm512_maskz_loadu_ps(k1, vs + b0 + 16);
    __m512 w0[4] = {zero, zero, zero, zero}, w1[4] = {zero, zero, zero, zero};
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const float* sr = s + i * Tk + b0;
      const __m512 mv = _mm512_set1_ps(mn[i]);
      // Lanes past n: 0 (added to the lane sums: exact). Lane i of sum sums keys j % 8 == i in order.
      const __m512 e0 = _mm512_maskz_mov_ps(k0, exp16_le(_mm512_sub_ps(_mm512_maskz_loadu_ps(k0, sr), mv)));
      sum[i] = _mm256_add_ps(sum[i], _mm512_castps512_ps256(e0));
      sum[i] = _mm256_add_ps(sum[i], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e0), 1)));
      w0[i] = _mm512_mul_ps(e0, vs0);
      if (k1) {
        const __m512 e1 = _mm512_maskz_mov_ps(k1, exp16_le(_mm512_sub_ps(_mm512_maskz_loadu_ps(k1, sr + 16), mv)));
        sum[i] = _mm256_add_ps(sum[i], _mm512_castps512_ps256(e1));
        sum[i] = _mm256_add_ps(sum[i], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e1), 1)));
        w1[i] = _mm512_mul_ps(e1, vs1);
      }
    }
    // The block's max weight per row (>= 0: lanes past n are 0), then its quantisation.
    const __m128 wmax = hmax4(_mm512_max_ps(w0[0], w1[0]), _mm512_max_ps(w0[1], w1[1]), _mm512_max_ps(w0[2], w1[2]),
                              _mm512_max_ps(w0[3], w1[3]));
    const __m128 ok = _mm_cmpge_ps(wmax, _mm_set1_ps(kDecPvMinWeight));
    alignas(16) float inv[4], swb[4];
    _mm_store_ps(inv, _mm_and_ps(ok, _mm_div_ps(_mm_set1_ps(127.0f), wmax)));
    _mm_store_ps(swb, _mm_and_ps(ok, _mm_div_ps(wmax, _mm_set1_ps(127.0f))));
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512 iv = _mm512_set1_ps(inv[i]);
      // cvtps rounds to nearest even (MXCSR default), like nearbyint; values in [0, 127].
      const __m512i q0 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w0[i], iv)), top);
      const __m512i q1 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(w1[i], iv)), top);
      uint8_t* wb = wq + i * kMaxTile + b0;
      _mm_store_si128(reinterpret_cast<__m128i*>(wb), _mm512_cvtepi32_epi8(q0));
      _mm_store_si128(reinterpret_cast<__m128i*>(wb + 16), _mm512_cvtepi32_epi8(q1));
      sw[i * 4 + b] = swb[i];
    }
  }
  softmax_store_state<R>(tree4(sum[0], sum[1], sum[2], sum[3]), av, mnv, m, l, alpha);
}

// s8_softmax_quant's arithmetic in phases, each a loop of independent work (s8_softmax_quant
// runs a block's exps, its max, the divisions and the quantisation as one dependent chain per
// block, which the core did not overlap with the next block's): (1) the row maxima, m' and
// alpha; (2) per 16 keys and row, p = exp16, the lane sums, w = p * v_scale stored over the
// scores, and each block's running max vector; (3) per block, the 4 rows' wmax, 127 / wmax and
// wmax / 127 in the lanes of one vector; (4) the quantisation. Needs Tk >= round_up(n, 16).
template <int R>
[[gnu::always_inline]] inline void s8_softmax_phased(float* s, int64_t Tk, int64_t n, const float* vs, float* m, float* l,
                                                     uint8_t* wq, float* sw, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const int64_t n16 = (n + 15) / 16 * 16, nb = (n + kDecPvBlock - 1) / kDecPvBlock;
  const __mmask16 tail = keys_mask(n - (n16 - 16));  // lanes of the last 16 keys that exist
  __m512 mx[4] = {ninf, ninf, ninf, ninf};
  for (int64_t j = 0; j < n16; j += 16) {
    const __mmask16 k = j + 16 < n16 ? __mmask16(0xffff) : tail;
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) mx[i] = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, k, s + i * Tk + j), mx[i]);
  }
  __m128 mnv, av;
  s8_max_alpha<R>(mx, m, mnv, av);
  __m512 mv[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) mv[i] = _mm512_broadcastss_ps(_mm_permutevar_ps(mnv, _mm_set1_epi32(i)));
  __m256 sum[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) sum[i] = _mm256_setzero_ps();
  alignas(64) float bmax[kMaxTile / kDecPvBlock][4][16];  // per block and row: max of w per lane
  const __m512 zero = _mm512_setzero_ps();
  __m512 bm[4] = {zero, zero, zero, zero};
  for (int64_t j = 0; j < n16; j += 16) {
    const bool last = j + 16 >= n16;
    const __m512 vsv = _mm512_load_ps(vs + j);  // 0 past n
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      float* sr = s + i * Tk + j;
      __m512 e = exp16_le(_mm512_sub_ps(_mm512_loadu_ps(sr), mv[i]));
      if (last) e = _mm512_maskz_mov_ps(tail, e);  // keys past n: 0 (added to the sums: exact)
      // Lane i of sum sums keys j % 8 == i in order.
      sum[i] = _mm256_add_ps(sum[i], _mm512_castps512_ps256(e));
      sum[i] = _mm256_add_ps(sum[i], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
      const __m512 w = _mm512_mul_ps(e, vsv);
      _mm512_storeu_ps(sr, w);
      bm[i] = _mm512_max_ps(bm[i], w);
    }
    if (last || (j + 16) % kDecPvBlock == 0) {
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) _mm512_store_ps(bmax[j / kDecPvBlock][i], bm[i]), bm[i] = zero;
    }
  }
  alignas(16) float inv[kMaxTile / kDecPvBlock][4];
  for (int64_t b = 0; b < nb; ++b) {
    const __m128 wmax = hmax4(_mm512_load_ps(bmax[b][0]), _mm512_load_ps(bmax[b][1]), _mm512_load_ps(bmax[b][2]),
                              _mm512_load_ps(bmax[b][3]));
    const __m128 ok = _mm_cmpge_ps(wmax, _mm_set1_ps(kDecPvMinWeight));
    alignas(16) float swb[4];
    _mm_store_ps(inv[b], _mm_and_ps(ok, _mm_div_ps(_mm_set1_ps(127.0f), wmax)));
    _mm_store_ps(swb, _mm_and_ps(ok, _mm_div_ps(wmax, _mm_set1_ps(127.0f))));
    for (int i = 0; i < R; ++i) sw[i * 4 + b] = swb[i];
  }
  for (int64_t j = 0; j < n16; j += 16) {
    #pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      // cvtps rounds to nearest even (MXCSR default), like nearbyint; values in [0, 127].
      const __m512 iv = _mm512_set1_ps(inv[j / kDecPvBlock][i]);
      // No min with 127: w <= wmax, so w * fl(127 / wmax) <= 127 (1 + 2^-24) rounds to <= 127.
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(s + i * Tk + j), iv));
      _mm_store_si128(reinterpret_cast<__m128i*>(wq + i * kMaxTile + j), _mm512_cvtepi32_epi8(q));
    }
  }
  softmax_store_state<R>(tree4(sum[0], sum[1], sum[2], sum[3]), av, mnv, m, l, alpha);
}

// Integer P.V of R rows of one head over the tile (blocks of 32 keys) for the 64 dims from d, in
// zmm: 4 keys at a time, their V rows (64 bytes each) byte-interleaved with two in-lane unpack
// levels so that X[i] lane (L, w) holds dim d + 16L + 4i + w of the 4 keys; vpdpbusd with the
// broadcast 4 weights of a row adds sum_j wq_j v_j into int32 (exact). All R rows use each
// interleave (the AVX2 form redoes it per 2 rows). Per block, a 4 x 4 transpose of 128-bit lanes
// puts the sums in dim order for the one FMA per dim into acc, which is first multiplied by the
// row's alpha (the rescale of the softmax step: the same product the float path applies).
// vr[j] (j < round_up(n, 4)) is key j's V row; keys past n point at a valid row, weight 0.
template <int R>
[[gnu::always_inline]] inline void s8_pv64(const uint8_t* wq, const float* sw, const float* alpha, const uint8_t* const* vr, int64_t n,
                                           int64_t d, int64_t D, int64_t Dp, float* acc, int64_t acc_stride, const uint8_t* const* pf) {
  const __mmask64 mk = d + 64 <= D ? ~uint64_t{0} : (uint64_t{1} << (D - d)) - 1;
  const int64_t nd = std::min<int64_t>(64, Dp - d);  // dims of acc to update (Dp is a multiple of 8)
  const __mmask16 st_mask[4] = {keys_mask(nd), keys_mask(nd - 16), keys_mask(nd - 32), keys_mask(nd - 48)};
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += kDecPvBlock, ++b) {
    bool any = b0 == 0;  // the first block also applies alpha
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) any = any || sw[r * 4 + b] != 0.0f;
    if (!any) continue;  // no row's weights in this block (as the reference, which skips it)
    const int64_t groups = (std::min<int64_t>(n, b0 + kDecPvBlock) - b0 + 3) / 4;
    __m512i A[R][4];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) A[r][i] = _mm512_setzero_si512();
    for (int64_t gi = 0; gi < groups; ++gi) {
      if (pf)
        for (int i = 0; i < 4; ++i) prefetch_line_t1(pf[b0 + 4 * gi + i] + d);
      const uint8_t* const* p = vr + b0 + 4 * gi;
      const __m512i v0 = _mm512_maskz_loadu_epi8(mk, p[0] + d), v1 = _mm512_maskz_loadu_epi8(mk, p[1] + d);
      const __m512i v2 = _mm512_maskz_loadu_epi8(mk, p[2] + d), v3 = _mm512_maskz_loadu_epi8(mk, p[3] + d);
      const __m512i a = _mm512_unpacklo_epi8(v0, v1), bb = _mm512_unpackhi_epi8(v0, v1);
      const __m512i c = _mm512_unpacklo_epi8(v2, v3), e = _mm512_unpackhi_epi8(v2, v3);
      const __m512i X[4] = {_mm512_unpacklo_epi16(a, c), _mm512_unpackhi_epi16(a, c), _mm512_unpacklo_epi16(bb, e),
                            _mm512_unpackhi_epi16(bb, e)};
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        int32_t wd;
        std::memcpy(&wd, wq + r * kMaxTile + b0 + 4 * gi, 4);
        const __m512i W = _mm512_set1_epi32(wd);
        #pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) A[r][i] = dpbusd(A[r][i], W, X[i]);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      // A[i] lane (L, w) = dim 16L + 4i + w: O[L] = [A0.L, A1.L, A2.L, A3.L] = dims 16L .. 16L + 15.
      const __m512i t0 = _mm512_shuffle_i32x4(A[r][0], A[r][1], 0x44), t1 = _mm512_shuffle_i32x4(A[r][2], A[r][3], 0x44);
      const __m512i t2 = _mm512_shuffle_i32x4(A[r][0], A[r][1], 0xee), t3 = _mm512_shuffle_i32x4(A[r][2], A[r][3], 0xee);
      const __m512i O[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xdd), _mm512_shuffle_i32x4(t2, t3, 0x88),
                            _mm512_shuffle_i32x4(t2, t3, 0xdd)};
      const __m512 sv = _mm512_set1_ps(sw[r * 4 + b]);
      float* ap = acc + r * acc_stride + d;
      #pragma GCC unroll 16
      for (int i = 0; i < 4; ++i) {
        if (16 * i >= nd) break;
        __m512 a = _mm512_maskz_loadu_ps(st_mask[i], ap + 16 * i);
        if (b0 == 0 && alpha[r] != 1.0f) a = _mm512_mul_ps(a, _mm512_set1_ps(alpha[r]));  // (alpha 1: a * 1 == a)
        _mm512_mask_storeu_ps(ap + 16 * i, st_mask[i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(O[i]), sv, a));
      }
    }
  }
}

// Scales of nh <= 8 consecutive heads (sc: head 0's scale array) for the tile's keys (so: their
// offsets), transposed to out[h * kMaxTile + j] (0 for keys j >= n): 16 keys at a time, the 8
// heads of key i and of key i + 8 in one zmm, then an 8 x 8 transpose within the 256-bit halves
// (24 shuffles per 16 keys x 8 heads, where two vgatherdps per 16 keys and head took ~17 cycles
// each on this core).
inline void s8_scales8(const float* sc, const int32_t* so, int64_t n, int64_t nh, float* out) {
  const __mmask8 hm = static_cast<__mmask8>((1u << nh) - 1);
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i hi = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t j = 0; j < n; j += 16) {
    __m512 r[8];
    for (int i = 0; i < 8; ++i)  // so[] is padded to 16 keys (key 0's offset)
      r[i] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(_mm256_maskz_loadu_ps(hm, sc + so[j + i]))),
                                                 _mm256_castps_pd(_mm256_maskz_loadu_ps(hm, sc + so[j + 8 + i])), 1));
    __m512 t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
      u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    const __mmask16 keep = keys_mask(n - j);
    // u[h] 128-bit lanes: (head h, keys 0-3), (head h + 4, keys 0-3), (head h, keys 8-11),
    // (head h + 4, keys 8-11); u[h + 4] the same for the keys 4 further.
    for (int h = 0; h < 4; ++h) {
      _mm512_store_ps(out + h * kMaxTile + j, _mm512_maskz_mov_ps(keep, _mm512_permutex2var_ps(u[h], lo, u[h + 4])));
      _mm512_store_ps(out + (h + 4) * kMaxTile + j, _mm512_maskz_mov_ps(keep, _mm512_permutex2var_ps(u[h], hi, u[h + 4])));
    }
  }
}


// ---- fast path: D a multiple of 64 (no partial 64-byte chunk) ------------------------------
//
// The passes above cost ~2x their vpdpbusd count (L1-resident driver, session 6): each 16-key
// score pass and each 32-key P.V block is a chain (loads -> transposes -> 8-deep vpdpbusd
// chains -> convert / fold -> store) of ~60 cycles, ~200 instructions long, and the core's
// scheduler holds too few of them to overlap one pass with the next. The passes below are
// software-pipelined: while the vpdpbusd of one unit (16 keys x 64 dims of K; 4 keys x 64 dims
// of V) run, the next unit's rows are loaded and transposed, so the vpdpbusd never wait for
// loads. Rows are addressed as head 0's row pointer + the head's offset (no per-head pointer
// arrays) and loaded unmasked (full 64-byte chunks).

// Loads 4 K rows (p[i] + off), biased to unsigned, transposed in-lane (tr4x4).
[[gnu::always_inline]] inline void ld_k4(const uint8_t* const* p, int64_t off, __m512i bias, __m512i& a, __m512i& b, __m512i& c,
                                         __m512i& d) {
  a = _mm512_xor_si512(_mm512_loadu_si512(p[0] + off), bias);
  b = _mm512_xor_si512(_mm512_loadu_si512(p[1] + off), bias);
  c = _mm512_xor_si512(_mm512_loadu_si512(p[2] + off), bias);
  d = _mm512_xor_si512(_mm512_loadu_si512(p[3] + off), bias);
  tr4x4(a, b, c, d);
}

// s8_scores16 for all the tile's 16-key passes of R rows, pipelined (see above). kp: head 0's K
// rows of the tile (padded to 16 keys with key 0), hoff: this head's byte offset; ks: the head's
// k scales (0 past n); pf: the next tile's K lines, or nullptr: each unit (16 keys x 64 dims)
// prefetches 16 of them, lines pl + 16 u for this call's u-th unit.
template <int R>
[[gnu::always_inline]] inline void s8_scores_pipe(const int8_t* q8, int64_t Dq8, const int32_t* qc, const float* qs, int64_t D,
                                                  const uint8_t* const* kp, int64_t hoff, const float* ks, int64_t n, float* s,
                                                  int64_t Tk, NextTileLines* pf, int64_t pl) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t C = D / 64, P = (n + 15) / 16;
  __m512i u[16];
  #pragma GCC unroll 4
  for (int grp = 0; grp < 4; ++grp) ld_k4(kp + 4 * grp, hoff, bias, u[4 * grp], u[4 * grp + 1], u[4 * grp + 2], u[4 * grp + 3]);
  __m512i acc[R], acc2[R];
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_epi32(qc[r]), acc2[r] = _mm512_setzero_si512();
  int64_t p = 0, c = 0;
  for (;;) {
    // The next unit: the next chunk of this pass, else the next pass (the last unit reloads itself).
    int64_t pn = p, cn = c + 1;
    if (cn == C) cn = 0, ++pn;
    const bool last = pn == P;
    const uint8_t* const* kn = kp + 16 * (last ? p : pn);
    const int64_t offn = hoff + 64 * (last ? c : cn);
    const int8_t* q = q8 + 64 * c;
    __m512i nu[16];
    #pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) {
      __m512i T0, T4, T8, T12;
      lanes4x4(u[m], u[4 + m], u[8 + m], u[12 + m], T0, T4, T8, T12);
      ld_k4(kn + 4 * m, offn, bias, nu[4 * m], nu[4 * m + 1], nu[4 * m + 2], nu[4 * m + 3]);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* qd = q + r * Dq8 + 4 * m;
        acc[r] = dpbusd_b(acc[r], T0, qd);
        acc2[r] = dpbusd_b(acc2[r], T4, qd + 16);
        acc[r] = dpbusd_b(acc[r], T8, qd + 32);
        acc2[r] = dpbusd_b(acc2[r], T12, qd + 48);
      }
    }
    if (pf) pf->issue(pl + 16 * (p * C + c), 16);
    #pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) u[i] = nu[i];
    if (c == C - 1) {  // the pass's scores, then the next pass's accumulators
      const __m512 ksv = _mm512_load_ps(ks + 16 * p);
      const __mmask16 keep = keys_mask(n - 16 * p);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r], acc2[r])), ksv), _mm512_set1_ps(qs[r]));
        _mm512_mask_storeu_ps(s + r * Tk + 16 * p, keep, f);
        acc[r] = _mm512_set1_epi32(qc[r]), acc2[r] = _mm512_setzero_si512();
      }
    }
    if (last) break;
    p = pn, c = cn;
  }
}

// Loads 4 V rows (p[i] + off) and byte-interleaves them (s8_pv64's X layout).
[[gnu::always_inline]] inline void ld_v4(const uint8_t* const* p, int64_t off, __m512i* X) {
  const __m512i v0 = _mm512_loadu_si512(p[0] + off), v1 = _mm512_loadu_si512(p[1] + off);
  const __m512i v2 = _mm512_loadu_si512(p[2] + off), v3 = _mm512_loadu_si512(p[3] + off);
  const __m512i a = _mm512_unpacklo_epi8(v0, v1), b = _mm512_unpackhi_epi8(v0, v1);
  const __m512i c = _mm512_unpacklo_epi8(v2, v3), e = _mm512_unpackhi_epi8(v2, v3);
  X[0] = _mm512_unpacklo_epi16(a, c), X[1] = _mm512_unpackhi_epi16(a, c);
  X[2] = _mm512_unpacklo_epi16(b, e), X[3] = _mm512_unpackhi_epi16(b, e);
}

// s8_pv64 over all the head's 64-dim chunks with the block folds deferred: the vpdpbusd pass
// stores each block's 16 int32 accumulators (64 B each) to isum and moves on, and a second
// loop does the folds (4 x 4 transpose of 128-bit lanes, convert, one FMA per dim; acc * alpha
// in the first block), in block order per dim as s8_pv64 does. In s8_pv64 each block's fold
// (~100 instructions for 4 rows, a third of them on the FMA pipes that vpdpbusd uses) sat
// between two blocks' vpdpbusd chains: 4 rows x 64 dims cost ~7 cycles per key (L1-resident)
// against 4 for the vpdpbusd alone. vp: head 0's V rows (padded to 4-key groups with key 0,
// weight 0), hoff: the head's byte offset. Blocks no row uses are skipped, as in s8_pv64.
// pf: the next tile's V lines, or nullptr: the 4-key group j of chunk c prefetches 4 of them,
// lines pl + c * round_up(n, 4) + j (a skipped block skips its prefetches: rare, harmless).
template <int R>
[[gnu::always_inline]] inline void s8_pv_defer(const uint8_t* wq, const float* sw, const float* alpha, const uint8_t* const* vp,
                                               int64_t hoff, int64_t n, int64_t D, float* acc, int64_t acc_stride,
                                               NextTileLines* pf, int64_t pl) {
  const int64_t C = D / 64, nb = (n + kDecPvBlock - 1) / kDecPvBlock, n4 = (n + 3) / 4 * 4;
  bool act[kMaxTile / kDecPvBlock];
  for (int64_t b = 0; b < nb; ++b) {
    bool any = b == 0;  // the first block also applies alpha
    for (int r = 0; r < R; ++r) any = any || sw[r * 4 + b] != 0.0f;
    act[b] = any;
  }
  alignas(64) int32_t isum[4][4][4][16];  // [chunk x block (<= 4: Tk * D <= 4096 * 4)][row][i][lane]
  int64_t u = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < nb; ++b, ++u) {
      if (!act[b]) continue;
      const int64_t b0 = b * kDecPvBlock, groups = (std::min<int64_t>(n, b0 + kDecPvBlock) - b0 + 3) / 4;
      const int64_t off = hoff + 64 * c;
      __m512i A[R][4];
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) A[r][i] = _mm512_setzero_si512();
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t j = b0 + 4 * gi;
        __m512i X[4];
        ld_v4(vp + j, off, X);
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          int32_t wd;
          std::memcpy(&wd, wq + r * kMaxTile + j, 4);
          const __m512i W = _mm512_set1_epi32(wd);
          #pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) A[r][i] = dpbusd(A[r][i], W, X[i]);
        }
        if (pf) pf->issue(pl + c * n4 + j, 4);
      }
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) _mm512_store_si512(isum[u][r][i], A[r][i]);
    }
  u = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t b = 0; b < nb; ++b, ++u) {
      if (!act[b]) continue;
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i a0 = _mm512_load_si512(isum[u][r][0]), a1 = _mm512_load_si512(isum[u][r][1]);
        const __m512i a2 = _mm512_load_si512(isum[u][r][2]), a3 = _mm512_load_si512(isum[u][r][3]);
        // a_i lane (L, w) = dim 16L + 4i + w: O[L] = [a0.L, a1.L, a2.L, a3.L] = dims 16L .. 16L + 15.
        const __m512i t0 = _mm512_shuffle_i32x4(a0, a1, 0x44), t1 = _mm512_shuffle_i32x4(a2, a3, 0x44);
        const __m512i t2 = _mm512_shuffle_i32x4(a0, a1, 0xee), t3 = _mm512_shuffle_i32x4(a2, a3, 0xee);
        const __m512i O[4] = {_mm512_shuffle_i32x4(t0, t1, 0x88), _mm512_shuffle_i32x4(t0, t1, 0xdd), _mm512_shuffle_i32x4(t2, t3, 0x88),
                              _mm512_shuffle_i32x4(t2, t3, 0xdd)};
        const __m512 sv = _mm512_set1_ps(sw[r * 4 + b]);
        float* ap = acc + r * acc_stride + 64 * c;
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          __m512 x = _mm512_loadu_ps(ap + 16 * i);
          if (b == 0 && alpha[r] != 1.0f) x = _mm512_mul_ps(x, _mm512_set1_ps(alpha[r]));  // x * 1 == x
          _mm512_storeu_ps(ap + 16 * i, _mm512_fmadd_ps(_mm512_cvtepi32_ps(O[i]), sv, x));
        }
      }
    }
}

}  // namespace

namespace avx512 {

// The s8 tile of decode_t on the AVX-512 VNNI build: per head, per group of <= 4 rows, scores,
// softmax + weights and P.V as above (D % 64 == 0: the pipelined / phased / deferred forms).
void attn_decode_s8(const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
                    const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* m, float* l, float* acc) {
  const int64_t hs = D, Dq8 = decode_q8_width(D), n16 = (n + 15) / 16 * 16;
  // K / V rows of the tile's keys (head 0) and their scale offsets (floats from k_scale /
  // v_scale: the same layout), padded to 16 keys with key 0 (scores masked off, weight 0).
  const uint8_t* kp[kMaxTile];
  const uint8_t* vp[kMaxTile];
  alignas(64) int32_t so[kMaxTile];
  // The next tile's rows (kn0, vn0; prefetched below) and scale offsets.
  const uint8_t* kn0[kMaxTile];
  const uint8_t* vn0[kMaxTile];
  alignas(64) int32_t son[kMaxTile];
  const int64_t nn = s8_walk_tiles(src, j0, n, n16, kp, vp, so, kn0, vn0, son);
  if (nn > 0) {
    // The next tile's K/V scales (a separate [block, token, head] f32 array, 32 B per token at 8
    // KV heads): without this prefetch every block's scale lines missed to DRAM, stalling the
    // score and softmax loops (~8% of the s8 decode time in perf, session 4). Per block segment
    // of the next tile (its tokens' scale rows are consecutive, scale_token_stride floats apart)
    // every line of the H heads' scales, once: the per-key loop with a line test before (and a
    // 64-bit division per key before that) was ~20% of the tile's fixed work at D 128.
    const auto lines = [](const float* a, int64_t nf) {
      const uintptr_t e = reinterpret_cast<uintptr_t>(a + nf);
      for (uintptr_t p = reinterpret_cast<uintptr_t>(a) & ~uintptr_t{63}; p < e; p += 64)
        prefetch_line_t0(reinterpret_cast<const void*>(p));
    };
    for (int64_t j = 0, seg = std::min(src.block_size - (j0 + n) % src.block_size, nn); j < nn;
         j += seg, seg = std::min(src.block_size, nn - j)) {
      const int64_t nf = (seg - 1) * src.scale_token_stride + H;
      lines(src.k_scale + son[j], nf);
      lines(src.v_scale + son[j], nf);
    }
  }
  // D a multiple of 64: the next tile's K / V in address order (NextTileLines). The score units
  // of the H heads have H * round_up(n, 16) * D / 64 prefetch slots and the P.V groups H *
  // round_up(n, 4) * D / 64, at least the next tile's nn * H * D / 64 lines of each: head h's
  // passes take the slots from h times its share, so the walk spreads over the whole tile.
  const bool fast = D % 64 == 0;
  NextTileLines kpf, vpf;
  if (fast && nn > 0) {
    kpf.build(src, src.k, j0 + n, nn, H * hs);
    vpf.build(src, src.v, j0 + n, nn, H * hs);
  }
  // V rows of the current head, padded to 4-key groups with key 0's (weight 0).
  const uint8_t* vr[kMaxTile];
  alignas(64) float kst[8 * kMaxTile], vst[8 * kMaxTile];  // scales of 8 heads (s8_scales8)
  // D a multiple of 64: the pipelined passes (full 64-byte chunks, head offsets into kp / vp).
  for (int64_t h = 0; h < H; ++h) {
    if (!fast)
      for (int64_t j = 0; j < (n + 3) / 4 * 4; ++j) vr[j] = vp[j] + h * hs;
    if (h % 8 == 0) {  // the scales of heads h .. h + 7, transposed to [head][key]
      s8_scales8(src.k_scale + h, so, n, std::min<int64_t>(8, H - h), kst);
      s8_scales8(src.v_scale + h, so, n, std::min<int64_t>(8, H - h), vst);
    }
    const float* vs = vst + (h % 8) * kMaxTile;  // v scales of head h (0 past n)
    // Other head sizes (s8_scores16 / s8_pv64): head h's rows of the next tile, into L2: each
    // score pass (K) and P.V group (V) prefetches the bytes it reads of the current rows from
    // the next tile's rows, so the requests spread evenly over the work (bursts of a whole
    // head's rows stalled on the fill buffers, and made the DRAM-fed decode slower than the
    // L3-resident one). The fast path spreads them the same way, in address order (kpf / vpf).
    const uint8_t* kn[kMaxTile];
    const uint8_t* vn[kMaxTile];
    if (!fast)
      for (int64_t j = 0; j < (n + 15) / 16 * 16; ++j) kn[j] = kn0[j] + h * hs, vn[j] = vn0[j] + h * hs;
    for_groups(g, [&]<int R>(int64_t r) {
      const int64_t row = h * RH + r;
      const int8_t* qr = q8 + row * Dq8;
      // -128 * sum(q8) of each row (cancels the K bias of s8_scores16).
      alignas(16) int32_t qc[4];
      for (int i = 0; i < R; ++i) {
        __m512i sum = _mm512_setzero_si512();
        for (int64_t d = 0; d < Dq8; d += 64)
          sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), _mm512_load_si512(qr + i * Dq8 + d));
        qc[i] = -128 * _mm512_reduce_add_epi32(sum);
      }
      float* sr = s + (h * g + r) * Tk;
      if (fast) {
        const int64_t C = D / 64;
        s8_scores_pipe<R>(qr, Dq8, qc, qs + row, D, kp, h * hs, kst + (h % 8) * kMaxTile, n, sr, Tk, r == 0 && nn > 0 ? &kpf : nullptr,
                          h * n16 * C);
        alignas(64) uint8_t wq[4 * kMaxTile];
        float sw[4 * 4], alpha[4];
        // The phased softmax pays a fixed cost per call that a 32-key tile (D 128) does not
        // recover; the one-chain form is as fast there.
        if (n > kDecPvBlock) s8_softmax_phased<R>(sr, Tk, n, vs, m + row, l + row, wq, sw, alpha);
        else s8_softmax_quant<R>(sr, Tk, n, vs, m + row, l + row, wq, sw, alpha);
        s8_pv_defer<R>(wq, sw, alpha, vp, h * hs, n, D, acc + row * Dp, Dp, r == 0 && nn > 0 ? &vpf : nullptr,
                       h * ((n + 3) / 4 * 4) * C);
        return;
      }
      for (int64_t j = 0; j < n; j += 16) {
        const uint8_t* kr[16];
        for (int i = 0; i < 16; ++i) kr[i] = kp[j + i] + h * hs;
        const __m512 ksv = _mm512_load_ps(kst + (h % 8) * kMaxTile + j);
        s8_scores16<R>(qr, Dq8, qc, qs + row, D, kr, ksv, keys_mask(n - j), sr + j, Tk, r == 0 ? kn + j : nullptr);
      }
      alignas(64) uint8_t wq[4 * kMaxTile];
      float sw[4 * 4], alpha[4];
      s8_softmax_quant<R>(sr, Tk, n, vs, m + row, l + row, wq, sw, alpha);
      for (int64_t d = 0; d < Dp; d += 64) s8_pv64<R>(wq, sw, alpha, vr, n, d, D, Dp, acc + row * Dp, Dp, r == 0 ? vn : nullptr);
    });
  }
}

}  // namespace avx512

}  // namespace qllm::kernels
