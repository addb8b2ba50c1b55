// AVX2 attention kernels (the arithmetic of kernels/attention.h, bit-identical to ref).
//
// attend works on groups of 4 query rows (a GQA head group at one position, or 4 positions):
//  - scores: 4 rows x 2 keys = 8 independent FMA chains (FMA latency 4 x 2 per cycle = 8 in
//    flight) over 8-dim chunks, then one 3-hadd tree per 4 chains gives the lane_tree8 sums;
//  - softmax: exp8 over 8 scores at a time, masked to each row's visible keys;
//  - P.V: 4 rows x 16 dims = 8 accumulators, each V chunk loaded once and used by 4 rows,
//    probabilities broadcast from the score buffer; the K/V tile is f32 in L1 (load_kv).
#include <immintrin.h>

// 1 when compiled as the avx512 ISA's kernels (x86/avx512/attention.cc includes this file).
#ifndef QLLM_ATTN_VNNI
#define QLLM_ATTN_VNNI 0
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/norm.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace {

using avx2::exp8;

// Prefetch distance: the next tile. A tile is ~16-32 KB of K+V, i.e. a few microseconds of DRAM
// streaming, which covers the memory latency with room to spare.
void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// One cache row (token j) as f32 into the tile: 8-element chunk c of the row goes to out + c * cs
// (cs = 8: a plain row; the AVX-512 K tile interleaves keys, see kt_row). Chunks past D are zero.
void load_row(const KvSource& s, const void* base, const float* scale, int64_t j, int64_t D, int64_t Dp, float* out,
              int64_t cs = 8) {
  const int64_t off = s.token_offset(j, s.token_stride, s.block_stride);
  auto at = [&](int64_t d) { return out + d / 8 * cs + d % 8; };
  int64_t d = 0;
  switch (s.dtype) {
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + d))));
      for (; d < D; ++d) *at(d) = f16_to_f32(p[d]);
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), avx2::load8(DType::bf16, p + d));
      for (; d < D; ++d) *at(d) = bf16_to_f32(p[d]);
      break;
    }
    case DType::s8: {
      const int8_t* p = static_cast<const int8_t*>(base) + off;
      const float sc = scale[s.token_offset(j, s.scale_token_stride, s.scale_block_stride)];
      const __m256 sv = _mm256_set1_ps(sc);
      for (; d + 8 <= D; d += 8) {
        const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + d)));
        _mm256_store_ps(at(d), _mm256_mul_ps(_mm256_cvtepi32_ps(w), sv));
      }
      for (; d < D; ++d) *at(d) = static_cast<float>(p[d]) * sc;
      break;
    }
    default: {
      const float* p = static_cast<const float*>(base) + off;
      for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), _mm256_loadu_ps(p + d));
      for (; d < D; ++d) *at(d) = p[d];
      break;
    }
  }
  for (; d < Dp; ++d) *at(d) = 0.0f;
}

void zero_row(int64_t Dp, float* out, int64_t cs = 8) {
  for (int64_t c = 0; c < Dp / 8; ++c) _mm256_store_ps(out + c * cs, _mm256_setzero_ps());
}

// Keys per score pass group; the tile's K rows (and the score rows, stride round_up(n, 8)) are
// padded to a multiple of it with zeros so that passes never need a key tail.
constexpr int64_t kKeyGroup = 8;
inline int64_t key_stride(int64_t n) { return (n + kKeyGroup - 1) / kKeyGroup * kKeyGroup; }

#if QLLM_ATTN_VNNI
// AVX-512 K tile: per group of 8 keys and per 8-dim chunk c, 4 zmm of 16 floats; zmm i holds
// chunk c of key 8G + i (low half) and of key 8G + i + 4 (high half). One zmm FMA then runs the
// 8-lane chains of two keys, and the transposing reduction (scores8) lands the 8 keys' sums in
// key order. Chunk c of key j starts at kt_row(j) + c * 64.
inline float* kt_row(float* kt, int64_t j, int64_t Dp) {
  const int64_t G = j / 8, w = j % 8;
  return kt + G * 8 * Dp + (w % 4) * 16 + (w / 4) * 8;
}
constexpr int64_t kKtChunkStride = 64;
#else
inline float* kt_row(float* kt, int64_t j, int64_t Dp) { return kt + j * Dp; }
constexpr int64_t kKtChunkStride = 8;
#endif

void load_kv(const KvSource& s, int64_t j0, int64_t n, int64_t D, int64_t Dp, float* kt, float* vt) {
  const int64_t row_bytes = D * dtype_size(s.dtype);
  for (int64_t j = 0; j < n; ++j) {
    // The same row one tile ahead, if that token exists (its block-table entry was validated).
    const int64_t jn = j0 + n + j;
    if (jn < s.tokens) {
      const int64_t off = s.token_offset(jn, s.token_stride, s.block_stride) * dtype_size(s.dtype);
      prefetch_row(static_cast<const char*>(s.k) + off, row_bytes);
      prefetch_row(static_cast<const char*>(s.v) + off, row_bytes);
    }
    load_row(s, s.k, s.k_scale, j0 + j, D, Dp, kt_row(kt, j, Dp), kKtChunkStride);
    load_row(s, s.v, s.v_scale, j0 + j, D, Dp, vt + j * Dp);
  }
  for (int64_t j = n; j < key_stride(n); ++j) zero_row(Dp, kt_row(kt, j, Dp), kKtChunkStride);
}

// Sums of 4 vectors, each in the lane_tree8 order: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
inline __m128 tree4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);   // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 t = _mm256_hadd_ps(ab, cd);  // a0123 b0123 c0123 d0123 | a4567 ...
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

__m256i lane_mask(int64_t lo, int64_t hi) {  // lanes i with lo <= i < hi
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int>(lo) - 1));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), idx);
  return _mm256_and_si256(ge, lt);
}

#if QLLM_ATTN_VNNI
// hadd of zmm pairs, per 128-bit lane like _mm256_hadd_ps: a01 a23 b01 b23 in each lane.
inline __m512 hadd512(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

// exp8 on 16 lanes: the same operations in the same order, so the same bits as exp8 / exp_qllm.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(kExpHi));
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC6);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Scores of R (<= 4) rows for the 8-key groups covering keys [ua, ub): 4 rows x 4 zmm (8 keys,
// see kt_row) = 16 chains, each K zmm loaded once per chunk for the R rows, the query chunk
// broadcast to both halves. Per row the 4 zmm are reduced by three lane-wise hadds (giving the
// l01 / l23 then l0123 / l4567 sums of the 8 keys, as tree4 does) and one 128-bit lane shuffle
// + add (l0123 + l4567): the 8 keys' lane_tree8 sums in key order, one 32-byte store per row.
template <int R>
void scores(const float* q, int64_t Dp, const float* kt, int64_t ns, int64_t ua, int64_t ub, float* s) {
  for (int64_t G = ua / 8; G * 8 < ub; ++G) {
    __m512 c[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) c[r][i] = _mm512_setzero_ps();
    const float* kg = kt + G * 8 * Dp;
    for (int64_t ch = 0; ch < Dp / 8; ++ch) {
      const float* kc = kg + ch * 64;
      const __m512 k0 = _mm512_load_ps(kc), k1 = _mm512_load_ps(kc + 16), k2 = _mm512_load_ps(kc + 32),
                   k3 = _mm512_load_ps(kc + 48);
      for (int r = 0; r < R; ++r) {
        // (AVX-512F forms of broadcast_f32x8 / extractf32x8: the build does not enable DQ)
        const __m512 qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_load_pd(reinterpret_cast<const double*>(q + r * Dp + ch * 8))));
        c[r][0] = _mm512_fmadd_ps(qv, k0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(qv, k1, c[r][1]);
        c[r][2] = _mm512_fmadd_ps(qv, k2, c[r][2]);
        c[r][3] = _mm512_fmadd_ps(qv, k3, c[r][3]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 h = hadd512(hadd512(c[r][0], c[r][1]), hadd512(c[r][2], c[r][3]));
      const __m512 x = _mm512_shuffle_f32x4(h, h, 0xD8);  // lanes 0 2 1 3
      _mm256_store_ps(s + r * ns + G * 8, _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
    }
  }
}
#else
// Scores of RR (1 or 2) rows x 4 keys = 8 independent FMA chains (FMA latency 4 x 2 per cycle
// = 8 in flight) over 8-dim chunks; one tree4 per row gives its 4 keys' lane_tree8 sums in key
// order, stored as one 16-byte vector (no scalar stores). Keys in steps of 4 from the 4-aligned
// start; the K tile and score rows are padded to 8 keys (zeros), so no key tail.
template <int RR>
void scores_rows(const float* q, int64_t Dp, const float* kt, int64_t ns, int64_t ua, int64_t ub, float* s) {
  for (int64_t j = ua / 4 * 4; j < ub; j += 4) {
    __m256 c[RR][4];
    for (int r = 0; r < RR; ++r)
      for (int i = 0; i < 4; ++i) c[r][i] = _mm256_setzero_ps();
    const float* k0 = kt + j * Dp;
    for (int64_t d = 0; d < Dp; d += 8) {
      __m256 kv0 = _mm256_load_ps(k0 + d), kv1 = _mm256_load_ps(k0 + Dp + d), kv2 = _mm256_load_ps(k0 + 2 * Dp + d),
             kv3 = _mm256_load_ps(k0 + 3 * Dp + d);
      // Keep the K chunks in registers: g++ otherwise folds their loads into the FMAs as memory
      // operands, loading each K chunk once per row (10 loads per 8 FMAs instead of 6).
      asm("" : "+x"(kv0), "+x"(kv1), "+x"(kv2), "+x"(kv3));
      for (int r = 0; r < RR; ++r) {
        const __m256 qv = _mm256_load_ps(q + r * Dp + d);
        c[r][0] = _mm256_fmadd_ps(qv, kv0, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(qv, kv1, c[r][1]);
        c[r][2] = _mm256_fmadd_ps(qv, kv2, c[r][2]);
        c[r][3] = _mm256_fmadd_ps(qv, kv3, c[r][3]);
      }
    }
    for (int r = 0; r < RR; ++r) _mm_storeu_ps(s + r * ns + j, tree4(c[r][0], c[r][1], c[r][2], c[r][3]));
  }
}

template <int R>
void scores(const float* q, int64_t Dp, const float* kt, int64_t ns, int64_t ua, int64_t ub, float* s) {
  if constexpr (R >= 2) scores_rows<2>(q, Dp, kt, ns, ua, ub, s);
  if constexpr (R == 4) scores_rows<2>(q + 2 * Dp, Dp, kt, ns, ua, ub, s + 2 * ns);
  if constexpr (R == 3) scores_rows<1>(q + 2 * Dp, Dp, kt, ns, ua, ub, s + 2 * ns);
  if constexpr (R == 1) scores_rows<1>(q, Dp, kt, ns, ua, ub, s);
}
#endif

// acc[r] = acc[r] * alpha[r] + sum_j p[r][j] v_j over keys [ua, ub) (p = 0 outside a row's keys).
template <int R>
void pv(const float* p, int64_t n, const float* vt, int64_t Dp, int64_t ua, int64_t ub, const float* alpha, float* acc) {
  int64_t d = 0;
#if QLLM_ATTN_VNNI
  // R rows x C zmm (16 dims each): with C = 4 the 16 accumulators cover 64 dims (all of D = 64)
  // per pass, each V zmm loaded once for the R rows and the probability broadcast folded into
  // the FMA (embedded broadcast). Same chains per element as the AVX2 form.
  auto pass = [&]<int C>(int64_t d0) {
    __m512 c[R][C];
    for (int r = 0; r < R; ++r) {
      const __m512 al = _mm512_set1_ps(alpha[r]);
      for (int i = 0; i < C; ++i) c[r][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + d0 + 16 * i), al);
    }
    for (int64_t j = ua; j < ub; ++j) {
      __m512 v[C];
      for (int i = 0; i < C; ++i) v[i] = _mm512_loadu_ps(vt + j * Dp + d0 + 16 * i);
      for (int r = 0; r < R; ++r) {
        const __m512 pb = _mm512_set1_ps(p[r * n + j]);
        for (int i = 0; i < C; ++i) c[r][i] = _mm512_fmadd_ps(pb, v[i], c[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < C; ++i) _mm512_storeu_ps(acc + r * Dp + d0 + 16 * i, c[r][i]);
  };
  for (; d + 64 <= Dp; d += 64) pass.template operator()<4>(d);
  for (; d + 16 <= Dp; d += 16) pass.template operator()<1>(d);
#endif
  for (; d + 16 <= Dp; d += 16) {
    __m256 c[4][2];
    for (int r = 0; r < R; ++r) {
      const __m256 al = _mm256_set1_ps(alpha[r]);
      c[r][0] = _mm256_mul_ps(_mm256_load_ps(acc + r * Dp + d), al);
      c[r][1] = _mm256_mul_ps(_mm256_load_ps(acc + r * Dp + d + 8), al);
    }
    for (int64_t j = ua; j < ub; ++j) {
      const __m256 v0 = _mm256_load_ps(vt + j * Dp + d), v1 = _mm256_load_ps(vt + j * Dp + d + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 pb = _mm256_broadcast_ss(p + r * n + j);
        c[r][0] = _mm256_fmadd_ps(pb, v0, c[r][0]);
        c[r][1] = _mm256_fmadd_ps(pb, v1, c[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(acc + r * Dp + d, c[r][0]);
      _mm256_store_ps(acc + r * Dp + d + 8, c[r][1]);
    }
  }
  if (d < Dp) {  // Dp % 16 == 8
    __m256 c[4];
    for (int r = 0; r < R; ++r) c[r] = _mm256_mul_ps(_mm256_load_ps(acc + r * Dp + d), _mm256_set1_ps(alpha[r]));
    for (int64_t j = ua; j < ub; ++j) {
      const __m256 v0 = _mm256_load_ps(vt + j * Dp + d);
      for (int r = 0; r < R; ++r) c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * n + j), v0, c[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_store_ps(acc + r * Dp + d, c[r]);
  }
}

template <int R>
void attend_group(const float* q, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0, const int64_t* lo,
                  const int64_t* hi, float* s, float* m, float* l, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t a[4], b[4];
  int64_t ua = n, ub = 0;
  for (int r = 0; r < R; ++r) {
    a[r] = std::max<int64_t>(lo[r] - j0, 0);
    b[r] = std::min<int64_t>(hi[r] - j0, n);
    if (a[r] < b[r]) {
      ua = std::min(ua, a[r]);
      ub = std::max(ub, b[r]);
    }
  }
  if (ua >= ub) return;
  const int64_t ns = key_stride(n);  // score row stride (8-key padded)
  scores<R>(q, Dp, kt, ns, ua, ub, s);
  float alpha[4];
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * ns;
    if (a[r] >= b[r]) {  // no visible key in this tile: state unchanged, p = 0 over [ua, ub)
      alpha[r] = 1.0f;
      for (int64_t j = ua; j < ub; ++j) sr[j] = 0.0f;
      continue;
    }
    // Chunks of 8 aligned to the tile (lane i of a chunk is tile index j with j % 8 == i, as
    // the lane sums of the definition require); lanes outside [a, b) are -inf for the max and
    // 0 for the probabilities. The score rows are padded to whole chunks (ns), so every chunk
    // is loaded and stored whole (lanes outside [ua, ub) are never read by pv; lanes never
    // written by scores may hold garbage, which the blend / and drop): only the chunks that cut
    // [a, b) (causal diagonal, window edge, tile tail) need the masks; the others take the plain
    // path (vmaskmov, slow on this CPU, is gone).
    const int64_t c0 = ua / 8 * 8;
    const __m256 ninf = _mm256_set1_ps(kNegInf);
    __m256 mx = ninf;
    for (int64_t j = c0; j < b[r]; j += 8) {
      __m256 x = _mm256_load_ps(sr + j);
      if (j < a[r] || j + 8 > b[r]) x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(lane_mask(a[r] - j, b[r] - j)));
      mx = _mm256_max_ps(x, mx);
    }
    alignas(32) float mxl[8];
    _mm256_store_ps(mxl, mx);
    float mt = kNegInf;
    for (int i = 0; i < 8; ++i) mt = max_ps(mxl[i], mt);
    const float mn = max_ps(mt, m[r]);
    alpha[r] = m[r] == kNegInf ? 0.0f : exp_qllm(m[r] - mn);
    const __m256 mv = _mm256_set1_ps(mn);
    __m256 sum = _mm256_setzero_ps();
#if QLLM_ATTN_VNNI
    const __m512 mv16 = _mm512_set1_ps(mn);
#endif
    for (int64_t j = c0; j < ub;) {
#if QLLM_ATTN_VNNI
      // Two whole visible chunks per exp16 (the same operations as exp8, lane for lane); the
      // lane sums still add chunk j, then chunk j + 8, in key order.
      if (j >= a[r] && j + 16 <= b[r]) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv16));
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
        _mm512_storeu_ps(sr + j, e);
        j += 16;
        continue;
      }
#endif
      __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sr + j), mv));
      if (j < a[r] || j + 8 > b[r]) e = _mm256_and_ps(e, _mm256_castsi256_ps(lane_mask(a[r] - j, b[r] - j)));
      sum = _mm256_add_ps(sum, e);
      _mm256_store_ps(sr + j, e);
      j += 8;
    }
    alignas(32) float sl[8];
    _mm256_store_ps(sl, sum);
    l[r] = l[r] * alpha[r] + lane_tree8(sl);
    m[r] = mn;
  }
  pv<R>(s, ns, vt, Dp, ua, ub, alpha, acc);
}

void attend(const float* q, int64_t rows, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0,
            const int64_t* lo, const int64_t* hi, float* s, float* m, float* l, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    attend_group<4>(q + r * Dp, Dp, kt, vt, n, j0, lo + r, hi + r, s + r * key_stride(n), m + r, l + r, acc + r * Dp);
  switch (rows - r) {
    case 3: attend_group<3>(q + r * Dp, Dp, kt, vt, n, j0, lo + r, hi + r, s + r * key_stride(n), m + r, l + r, acc + r * Dp); break;
    case 2: attend_group<2>(q + r * Dp, Dp, kt, vt, n, j0, lo + r, hi + r, s + r * key_stride(n), m + r, l + r, acc + r * Dp); break;
    case 1: attend_group<1>(q + r * Dp, Dp, kt, vt, n, j0, lo + r, hi + r, s + r * key_stride(n), m + r, l + r, acc + r * Dp); break;
    default: break;
  }
}

// ---- decode path -------------------------------------------------------------------------
//
// One query position: the GQA group's rows (4 for 32/8 heads) all see every key of the tile, so
// nothing is masked and K/V are read straight from the cache rows: each K/V chunk is loaded and
// converted once in registers (F16C / widening) and used by the 4 rows, with no f32 tile stored
// and reloaded. All KV heads of the tile are done in one call, token-major (key pair j, j + 1,
// then heads 0 .. H-1), so the [block, token, head, D] cache streams sequentially. Scores keep
// 4 rows x 2 keys = 8 accumulators (one tree4 per key gives the 4 rows' lane_tree8 sums; s8:
// int32 vpmaddwd sums); P.V keeps the pair's 4 x 2 probabilities broadcast in registers while
// V streams by, the accumulators (H x 4 rows x Dp f32 = 16 KB at D = 128) staying in L1.

// Loaders of 8 cache elements as f32 (exactly the values load_row produces).
struct LoadF32 {
  static constexpr int64_t es = 4;
  static __m256 load(const uint8_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
};
struct LoadF16 {
  static constexpr int64_t es = 2;
  static __m256 load(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};
struct LoadBF16 {
  static constexpr int64_t es = 2;
  static __m256 load(const uint8_t* p) { return avx2::load8(DType::bf16, p); }
};
struct LoadS8 {  // V of an s8 cache: f32(v8), the scale is in the P.V weight
  static constexpr int64_t es = 1;
  static __m256 load(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// Elements [d, D) (< 8 of them) zero padded to 8: the tail chunk of a head size that is not a
// multiple of 8, without reading past the row.
template <class L>
__m256 load_tail(const uint8_t* row, int64_t d, int64_t D) {
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, row + d * L::es, (D - d) * L::es);
  return L::load(buf);
}

// Sums of 4 int32 vectors (any order: integer sums are exact).
inline __m128i tree4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

// Tile geometry of one decode call: row addresses of head 0 (head h is h * D elements further),
// and for s8 the scales of every (key, head).
constexpr int64_t kMaxTile = 128;  // Problem::Tk() <= 128
struct DecTile {
  const uint8_t* kp[kMaxTile];
  const uint8_t* vp[kMaxTile];
  const float* ksp[kMaxTile];  // s8: scale of (key j, head 0); head h at + h
  const float* vsp[kMaxTile];
  const uint8_t* kn[kMaxTile];  // the next tile's rows (prefetch), nullptr past the keys
  const uint8_t* vn[kMaxTile];
};

// Prefetch distance: one tile ahead, spread over this tile's work (a few lines per head and key
// pair) so the requests overlap the arithmetic instead of stalling it in one burst, into L2
// (prefetcht1): measured, T0 into the 32 KB L1 (and bursts of a whole tile, and no software
// prefetch) stay at ~11 GB/s from DRAM on 2 cores, T1 reaches ~20 GB/s (B8 16k f16).
inline void prefetch_head(const uint8_t* p, int64_t bytes) {
  if (!p) return;
  // asm volatile: g++ 12 -O2 deleted these _mm_prefetch calls (and the address walk feeding
  // them) as dead code; the inline asm keeps them.
  for (int64_t b = 0; b < bytes; b += 64) asm volatile("prefetcht1 %0" : : "m"(p[b]));
}

// One prefetcht1 of the line holding p. A register operand: with a memory operand ("m") g++
// kept the P.V accumulators in memory across the asm (a store of all 16 per key).
inline void prefetch_line_t1(const void* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

// Rows r < R of the scores f0 (key j) and f1 (key j + 1): s[r * Tk] = f0[r], s[r * Tk + 1] = f1[r].
template <int R>
inline void store_pairs(__m128 f0, __m128 f1, float* s, int64_t Tk) {
  const __m128 lo = _mm_unpacklo_ps(f0, f1), hi = _mm_unpackhi_ps(f0, f1);  // r0k0 r0k1 r1k0 r1k1 | r2.. r3..
  _mm_storel_pi(reinterpret_cast<__m64*>(s), lo);
  if (R > 1) _mm_storeh_pi(reinterpret_cast<__m64*>(s + Tk), lo);
  if (R > 2) _mm_storel_pi(reinterpret_cast<__m64*>(s + 2 * Tk), hi);
  if (R > 3) _mm_storeh_pi(reinterpret_cast<__m64*>(s + 3 * Tk), hi);
}

// Stores the scores of NK keys for R rows: f[k] holds key k's scores of rows 0..3 (lanes);
// s[r * Tk + k] = f[k][r]. NK = 4 transposes them in registers so each row is one 16-byte store
// (scalar or 8-byte stores per key pair cost as much as the dot products at D = 64).
template <int R, int NK>
inline void store_scores(__m128* f, float* s, int64_t Tk) {
  if constexpr (NK == 4) {
    _MM_TRANSPOSE4_PS(f[0], f[1], f[2], f[3]);  // f[r] = row r's 4 keys
    for (int r = 0; r < R; ++r) _mm_storeu_ps(s + r * Tk, f[r]);
  } else if constexpr (NK == 2) {
    store_pairs<R>(f[0], f[1], s, Tk);
  } else {
    alignas(16) float t0[4];
    _mm_store_ps(t0, f[0]);
    for (int r = 0; r < R; ++r) s[r * Tk] = t0[r];
  }
}

// Scores of R rows of one head for NK (1, 2 or 4) consecutive keys (K rows k[0..NK)), 8-lane
// FMA chains over Dp reduced in the lane_tree8 order: each converted K chunk serves the R rows,
// each q chunk the NK keys. NK = 4 only in the AVX-512 build (16 accumulators + 4 K chunks
// need its 32 registers; AVX2 would spill). NK = 4 reduces row by row: three hadds of the row's
// 4 key vectors leave [k0 k1 k2 k3](lanes 0-3) | [k0 k1 k2 k3](lanes 4-7) partial sums, whose
// halves add to the row's 4 scores in lane_tree8 order, stored as one 16-byte store (no 4 x 4
// transpose of per-key tree4 results: 24 instead of 32 vector ops per 4 keys and 4 rows).
template <int R, class L, int NK>
inline void dec_scores_f(const float* q, int64_t D, int64_t Dp, const uint8_t* const* k, float* s, int64_t Tk) {
  const int64_t Df = D / 8 * 8;
  __m256 c[4][NK];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < NK; ++i) c[r][i] = _mm256_setzero_ps();
  auto step = [&](int64_t d, const __m256* kv) {
    for (int r = 0; r < R; ++r) {
      const __m256 qv = _mm256_load_ps(q + r * Dp + d);
      for (int i = 0; i < NK; ++i) c[r][i] = _mm256_fmadd_ps(qv, kv[i], c[r][i]);
    }
  };
  int64_t d = 0;
  for (; d < Df; d += 8) {  // full chunks: no tail test per chunk
    __m256 kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = L::load(k[i] + d * L::es);
    step(d, kv);
  }
  if (d < Dp) {
    __m256 kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = load_tail<L>(k[i], d, D);
    step(d, kv);
  }
  if constexpr (NK == 4) {
    for (int r = 0; r < R; ++r) {
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(c[r][0], c[r][1]), _mm256_hadd_ps(c[r][2], c[r][3]));
      _mm_storeu_ps(s + r * Tk, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    }
  } else {
    __m128 f[NK];
    for (int i = 0; i < NK; ++i) f[i] = tree4(c[0][i], c[1][i], c[2][i], c[3][i]);
    store_scores<R, NK>(f, s, Tk);
  }
}

// 16 int8 of a K row as int16 (zero padded past D).
inline __m256i load_k16(const uint8_t* row, int64_t d, int64_t D) {
  if (d + 16 <= D) return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
  alignas(16) uint8_t buf[16] = {};
  std::memcpy(buf, row + d, D - d);
  return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
}

// s8 scores of R rows for NK (1, 2 or 4) consecutive keys (K rows k[i], scales ks[i]): exact
// int32 q16.k8 dot products (vpmaddwd: 16 products per instruction, pairs summed in int32,
// |pair| <= 2 * 127 * 128, no saturation).
template <int R, int NK>
inline void dec_scores_s8(const int16_t* q16, __m128 qsv, int64_t D, const uint8_t* const* k, const float* ks, float* s,
                          int64_t Tk) {
  const int64_t Dq = decode_q16_width(D);
  __m256i c[4][NK];
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < NK; ++i) c[r][i] = _mm256_setzero_si256();
  int64_t d0 = 0;
#if QLLM_ATTN_VNNI
  // 32 dims per vpdpwssd on zmm, folded to the ymm accumulators (exact int32 either way).
  if (D >= 32) {
    __m512i z[4][NK];
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < NK; ++i) z[r][i] = _mm512_setzero_si512();
    for (; d0 + 32 <= D; d0 += 32) {
      __m512i kv[NK];
      for (int i = 0; i < NK; ++i) kv[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k[i] + d0)));
      for (int r = 0; r < R; ++r) {
        const __m512i qv = _mm512_loadu_si512(q16 + r * Dq + d0);
        for (int i = 0; i < NK; ++i) z[r][i] = _mm512_dpwssd_epi32(z[r][i], qv, kv[i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < NK; ++i) c[r][i] = _mm256_add_epi32(_mm512_castsi512_si256(z[r][i]), _mm512_extracti64x4_epi64(z[r][i], 1));
  }
#endif
  for (int64_t d = d0; d < Dq; d += 16) {
    __m256i kv[NK];
    for (int i = 0; i < NK; ++i) kv[i] = load_k16(k[i], d, D);
    for (int r = 0; r < R; ++r) {
      const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q16 + r * Dq + d));
      for (int i = 0; i < NK; ++i) {
#if QLLM_ATTN_VNNI  // vpdpwssd: the same exact int32 sums, multiply and add fused
        c[r][i] = _mm256_dpwssd_epi32(c[r][i], qv, kv[i]);
#else
        c[r][i] = _mm256_add_epi32(c[r][i], _mm256_madd_epi16(qv, kv[i]));
#endif
      }
    }
  }
  __m128 f[NK];
  for (int i = 0; i < NK; ++i)
    f[i] = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(tree4_epi32(c[0][i], c[1][i], c[2][i], c[3][i])), _mm_set1_ps(ks[i])), qsv);
  store_scores<R, NK>(f, s, Tk);
}

// P.V of R rows of one head over all n keys of the tile for C 8-dim chunks from dim d, the
// accumulators in registers across the keys: acc = fma(w_j, v_j, acc * alpha) for j = 0 .. n-1,
// the FMA chains of attend in the same key order (bit-identical), with no load + store of acc
// per key; the online-softmax rescale acc * alpha (al[r]) is applied here as acc is loaded (the
// same product, one pass over acc fewer). Tail: the chunk is the zero-padded last one (D % 8).
// pf (nullable): rows of pfb bytes to prefetch, one per key (the next tile's V of this head);
// each pass prefetches the 64-byte lines that start in its own byte range, so the requests
// spread over the passes, one instruction per line.
template <int R, class L, int C, bool Tail>
[[gnu::always_inline]] inline void dec_pv_pass(const float* w, int64_t Tk, const uint8_t* const* vr, int64_t n, int64_t d, int64_t D, int64_t Dp,
                        const float* al, float* acc, const uint8_t* const* pf, int64_t pfb) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r) {
    const __m256 av = _mm256_set1_ps(al[r]);
    for (int i = 0; i < C; ++i) a[r][i] = _mm256_mul_ps(_mm256_load_ps(acc + r * Dp + d + 8 * i), av);
  }
  const int64_t b0 = d * L::es, b1 = std::min<int64_t>((d + 8 * C) * L::es, pfb);
  const int64_t o0 = (b0 + 63) / 64 * 64;  // lines starting in [b0, b1)
  const bool pfo = pf != nullptr && o0 < b1, pf2 = o0 + 64 < b1;  // at most 2 lines (f32, C = 4)
  for (int64_t j = 0; j < n; ++j) {
    if (pfo && pf[j]) {
      prefetch_line_t1(pf[j] + o0);
      if (pf2) prefetch_line_t1(pf[j] + o0 + 64);
    }
    __m256 v[C];
    for (int i = 0; i < C; ++i) v[i] = Tail ? load_tail<L>(vr[j], d + 8 * i, D) : L::load(vr[j] + (d + 8 * i) * L::es);
    for (int r = 0; r < R; ++r) {
      const __m256 wr = _mm256_broadcast_ss(w + r * Tk + j);
      for (int i = 0; i < C; ++i) a[r][i] = _mm256_fmadd_ps(wr, v[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) _mm256_store_ps(acc + r * Dp + d + 8 * i, a[r][i]);
}

// Online-softmax step of one row over all n keys of the tile (the arithmetic of attend with
// a = 0, b = n); s8 caches fold the value scale into the stored P.V weight. Returns alpha; with
// acc non-null it also does acc *= alpha (the float caches' P.V applies alpha as it loads acc).
// Only the tile's last partial chunk is masked. The AVX-512 build takes 16 keys per exp (the
// same element-wise arithmetic) and adds each 16-key vector's halves to the 8 lane sums in key
// order (lane i sums the keys j % 8 == i in order, as the definition requires).
inline float dec_softmax(float* sr, int64_t n, const float* vs, float* m, float* l, float* acc, int64_t Dp) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float mt;
#if QLLM_ATTN_VNNI
  const __m512 ninf16 = _mm512_set1_ps(kNegInf);
  __m512 mx16 = ninf16;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mk = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    mx16 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf16, mk, sr + j), mx16);
  }
  mt = _mm512_reduce_max_ps(mx16);  // max is exact: any order gives the same value
#else
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  __m256 mx = ninf;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(sr + j), mx);
  if (j < n) {
    const __m256i mk = lane_mask(0, n - j);
    mx = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_loadu_ps(sr + j), _mm256_castsi256_ps(mk)), mx);
  }
  alignas(32) float mxl[8];
  _mm256_store_ps(mxl, mx);
  mt = kNegInf;
  for (int i = 0; i < 8; ++i) mt = max_ps(mxl[i], mt);
#endif
  const float mn = max_ps(mt, *m);
  const float alpha = *m == kNegInf ? 0.0f : exp_qllm(*m - mn);
  __m256 sum = _mm256_setzero_ps();
#if QLLM_ATTN_VNNI
  const __m512 mv16 = _mm512_set1_ps(mn);
  for (int64_t j = 0; j < n; j += 16) {  // lanes past n: 0 (added to the lane sums: exact)
    const __mmask16 mk = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sr + j), mv16)));
    sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
    sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    _mm512_mask_storeu_ps(sr + j, mk, vs ? _mm512_mul_ps(e, _mm512_maskz_loadu_ps(mk, vs + j)) : e);
  }
#else
  const __m256 mv = _mm256_set1_ps(mn);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(sr + j, vs ? _mm256_mul_ps(e, _mm256_loadu_ps(vs + j)) : e);
  }
  if (j < n) {  // s has Tk >= round_up(n, 8) slots: lanes past n get 0
    const __m256 mk = _mm256_castsi256_ps(lane_mask(0, n - j));
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv)), mk);
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(sr + j, vs ? _mm256_mul_ps(e, _mm256_loadu_ps(vs + j)) : e);
  }
#endif
  alignas(32) float sl[8];
  _mm256_store_ps(sl, sum);
  *l = *l * alpha + lane_tree8(sl);
  *m = mn;
  if (acc) {
    const __m256 av = _mm256_set1_ps(alpha);
    for (int64_t d = 0; d < Dp; d += 8) _mm256_store_ps(acc + d, _mm256_mul_ps(_mm256_load_ps(acc + d), av));
  }
  return alpha;
}

// s8 P.V weights of one row's block (keys [b0, b1) of the tile, b1 - b0 <= 32): the 7-bit
// quantisation of kernels/attention.h, stored as 32 bytes (4-key groups = one dword each, keys
// past b1 zero). Returns the block's scale wmax / 127, or 0 for a block that adds nothing.
inline float dec_quant_block(const float* sr, int64_t b0, int64_t b1, uint8_t* wq) {
  static_assert(kDecPvBlock == 32);
  __m256 w[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {  // masked: lanes past b1 read nothing and hold 0
    w[i] = _mm256_maskload_ps(sr + b0 + 8 * i, lane_mask(0, b1 - b0 - 8 * i));
    mx = _mm256_max_ps(mx, w[i]);
  }
  alignas(32) float ml[8];
  _mm256_store_ps(ml, mx);
  float wmax = 0.0f;
  for (int i = 0; i < 8; ++i) wmax = max_ps(ml[i], wmax);
  if (!(wmax >= kDecPvMinWeight)) return 0.0f;
  const __m256 inv = _mm256_set1_ps(127.0f / wmax);
  const __m256i top = _mm256_set1_epi32(127);
  __m256i q[4];  // cvtps rounds to nearest even (MXCSR default), like nearbyint
  for (int i = 0; i < 4; ++i) q[i] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(w[i], inv)), top);
  // packs interleave 128-bit lanes: dwords come out as groups 0 2 4 6 1 3 5 7 (of 4 keys).
  const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_store_si256(reinterpret_cast<__m256i*>(wq), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return wmax / 127.0f;
}

// 32 bytes of a V row from dim d (zero past D).
inline __m256i load_v32(const uint8_t* row, int64_t d, int64_t D) {
  if (d + 32 <= D) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, row + d, D - d);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// Integer P.V of R (<= 2) rows over one block: 4 keys at a time, their V rows interleaved
// byte-wise so that each dword lane holds (v_j[d], v_j+1[d], v_j+2[d], v_j+3[d]); vpmaddubsw
// with the broadcast 4 weights then vpmaddwd by 1 gives sum_j wq_j v_j[d] in int32, exact. The
// int32 sums stay in registers over the block's keys (32 dims x 2 rows at a time); the in-lane
// unpacks permute the dims (X0 holds d 0-3 | 16-19, X1 4-7 | 20-23, ...), undone before the
// one fma per dim and block into acc.
template <int R>
inline void dec_pv_s8(const uint8_t* const* wq, const float* sw, const uint8_t* const* vr, int64_t groups, int64_t D,
                      int64_t Dp, float* const* acc) {
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t d = 0; d < Dp; d += 32) {
    __m256i A[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < 4; ++i) A[r][i] = _mm256_setzero_si256();
    for (int64_t gi = 0; gi < groups; ++gi) {
      const uint8_t* const* p = vr + 4 * gi;
      const __m256i v0 = load_v32(p[0], d, D), v1 = load_v32(p[1], d, D);
      const __m256i v2 = load_v32(p[2], d, D), v3 = load_v32(p[3], d, D);
      const __m256i a = _mm256_unpacklo_epi8(v0, v1), b = _mm256_unpackhi_epi8(v0, v1);
      const __m256i c = _mm256_unpacklo_epi8(v2, v3), e = _mm256_unpackhi_epi8(v2, v3);
      const __m256i X[4] = {_mm256_unpacklo_epi16(a, c), _mm256_unpackhi_epi16(a, c), _mm256_unpacklo_epi16(b, e),
                            _mm256_unpackhi_epi16(b, e)};
      for (int r = 0; r < R; ++r) {
        int32_t wd;
        std::memcpy(&wd, wq[r] + 4 * gi, 4);
        const __m256i W = _mm256_set1_epi32(wd);
#if QLLM_ATTN_VNNI  // vpdpbusd sums the 4 u8 x s8 products of a dword lane into int32 directly
        for (int i = 0; i < 4; ++i) A[r][i] = _mm256_dpbusd_epi32(A[r][i], W, X[i]);
#else
        for (int i = 0; i < 4; ++i) A[r][i] = _mm256_add_epi32(A[r][i], _mm256_madd_epi16(_mm256_maddubs_epi16(W, X[i]), ones));
#endif
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256i N[4] = {_mm256_permute2x128_si256(A[r][0], A[r][1], 0x20), _mm256_permute2x128_si256(A[r][2], A[r][3], 0x20),
                            _mm256_permute2x128_si256(A[r][0], A[r][1], 0x31), _mm256_permute2x128_si256(A[r][2], A[r][3], 0x31)};
      const __m256 s = _mm256_set1_ps(sw[r]);
      for (int i = 0; i < 4 && d + 8 * i < Dp; ++i) {
        float* ap = acc[r] + d + 8 * i;
        _mm256_store_ps(ap, _mm256_fmadd_ps(_mm256_cvtepi32_ps(N[i]), s, _mm256_load_ps(ap)));
      }
    }
  }
}

#if QLLM_ATTN_VNNI
// In-register transpose of 16 x 16 dwords: r[i] lane j becomes r[j] lane i.
inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// s8 scores of R rows of one head for 16 keys at once, one key per dword lane: each 64-byte
// chunk of the 16 K rows is biased to unsigned (k ^ 0x80 = k + 128) and transposed in
// registers, so T[c] lane i holds bytes 4c .. 4c+3 of key i, and vpdpbusd(T[c], broadcast q8
// dword c) adds 4 products per lane. The sums start at -128 * sum(q8) (qc), which cancels the
// bias exactly: sum (k + 128) q - 128 sum q = sum k q, the int32 q16.k8 sum of the definition.
// No horizontal reduction: the 16 sums are one vector, converted, scaled by the keys' scales
// (ksv) and the row's, and stored as 16 scores per row (lanes >= nk masked off). Bytes past D
// load as 0 (biased: 128) and meet q8's zero padding.
template <int R>
inline void dec_scores_s8_t16(const int8_t* q8, int64_t Dq8, const int32_t* qc, const float* qs, int64_t D,
                              const uint8_t* const* k, __m512 ksv, __mmask16 keep, float* s, int64_t Tk) {
  __m512i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_epi32(qc[r]);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t d = 0; d < D; d += 64) {
    __m512i T[16];
    if (d + 64 <= D) {
      for (int i = 0; i < 16; ++i) T[i] = _mm512_xor_si512(_mm512_loadu_si512(k[i] + d), bias);
    } else {
      const __mmask64 mk = (uint64_t{1} << (D - d)) - 1;
      for (int i = 0; i < 16; ++i) T[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, k[i] + d), bias);
    }
    transpose16(T);
    for (int r = 0; r < R; ++r) {
      const int8_t* qd = q8 + r * Dq8 + d;
      for (int c = 0; c < 16; ++c) {
        int32_t w;
        std::memcpy(&w, qd + 4 * c, 4);
        acc[r] = _mm512_dpbusd_epi32(acc[r], T[c], _mm512_set1_epi32(w));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), ksv), _mm512_set1_ps(qs[r]));
    _mm512_mask_storeu_ps(s + r * Tk, keep, f);
  }
}
#endif

// Calls f.template operator()<R>(r) for the row groups of g rows: 4 at a time, then the rest.
template <class F>
inline void for_groups(int64_t g, F&& f) {
  int64_t r = 0;
  for (; r + 4 <= g; r += 4) f.template operator()<4>(r);
  switch (g - r) {
    case 3: f.template operator()<3>(r); break;
    case 2: f.template operator()<2>(r); break;
    case 1: f.template operator()<1>(r); break;
    default: break;
  }
}

template <class L>
void decode_t(const float* q, const int16_t* q16, [[maybe_unused]] const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
              const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* m, float* l, float* acc) {
  constexpr bool s8 = std::is_same_v<L, LoadS8>;
  DecTile t;
  const int64_t es = L::es, hs = D * es;  // bytes between the heads of a token
  const uint8_t* kb = static_cast<const uint8_t*>(src.k);
  const uint8_t* vb = static_cast<const uint8_t*>(src.v);
  int64_t blk = j0 / src.block_size, off = j0 % src.block_size;
  for (int64_t j = 0; j < n; ++j) {  // walk the block table once per tile
    const int64_t phys = src.block_table ? src.block_table[blk] : blk;
    const int64_t e = (phys * src.block_stride + off * src.token_stride) * es;
    t.kp[j] = kb + e;
    t.vp[j] = vb + e;
    if (s8) {
      const int64_t so = phys * src.scale_block_stride + off * src.scale_token_stride;
      t.ksp[j] = src.k_scale + so;
      t.vsp[j] = src.v_scale + so;
    }
    if (++off == src.block_size) off = 0, ++blk;
  }
  const char* last_sl = nullptr;  // s8: the last scale line prefetched
  for (int64_t j = 0; j < n; ++j) {  // continues the walk: keys j0 + n + j
    const bool ok = j0 + n + j < src.tokens;
    const int64_t phys = !ok ? 0 : src.block_table ? src.block_table[blk] : blk;
    const int64_t e = (phys * src.block_stride + off * src.token_stride) * es;
    t.kn[j] = ok ? kb + e : nullptr;
    t.vn[j] = ok ? vb + e : nullptr;
    if (s8 && ok) {
      // The next tile's K/V scales (a separate [block, token, head] f32 array, 32 B per token
      // at 8 KV heads): without this prefetch every block's scale lines missed to DRAM, stalling
      // the score and softmax loops (~8% of the s8 decode time in perf).
      const int64_t so = phys * src.scale_block_stride + off * src.scale_token_stride;
      const char* sl = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src.k_scale + so) & ~uintptr_t{63});
      if (sl != last_sl) {
        last_sl = sl;
        asm volatile("prefetcht0 %0" : : "m"(*sl));
        asm volatile("prefetcht0 %0" : : "m"(*(reinterpret_cast<const char*>(src.v_scale + so))));
      }
    }
    if (ok && ++off == src.block_size) off = 0, ++blk;
  }
  const int64_t Dq = decode_q16_width(D);
  // Scores, token-major: for each group of KS keys (KS = 4 in the AVX-512 build, 2 with AVX2's
  // 16 registers), every head's rows (the group's K rows of all heads are KS contiguous runs of
  // H * D elements, read once). A tile's tail takes groups of 2 and 1.
  constexpr int64_t KS = QLLM_ATTN_VNNI ? 4 : 2;
#if QLLM_ATTN_VNNI
  constexpr int64_t kMaxRows = 1024;  // H * g: query heads of the task (qc below)
  if (s8 && H * g <= kMaxRows) {
    // 16 keys per pass, transposed (dec_scores_s8_t16); -128 * sum(q8) per row first.
    const int64_t Dq8 = decode_q8_width(D);
    alignas(64) int32_t qc[kMaxRows];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < g; ++r) {
        const int8_t* qr = q8 + (h * RH + r) * Dq8;
        __m512i sum = _mm512_setzero_si512();
        for (int64_t d = 0; d < Dq8; d += 64)
          sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), _mm512_load_si512(qr + d));
        qc[h * g + r] = -128 * _mm512_reduce_add_epi32(sum);
      }
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t nk = std::min<int64_t>(16, n - j);
      const __mmask16 keep = static_cast<__mmask16>((1u << nk) - 1);
      // Scale offsets (floats from k_scale) of the 16 keys, head 0; lanes past nk repeat key j.
      alignas(64) int32_t so[16];
      for (int64_t i = 0; i < 16; ++i) so[i] = static_cast<int32_t>(t.ksp[j + (i < nk ? i : 0)] - src.k_scale);
      const __m512i sov = _mm512_load_si512(so);
      for (int64_t h = 0; h < H; ++h) {
        const uint8_t* kr[16];
        for (int64_t i = 0; i < 16; ++i) kr[i] = t.kp[j + (i < nk ? i : 0)] + h * hs;
        for (int64_t i = 0; i < nk; ++i)
          if (t.kn[j + i]) prefetch_head(t.kn[j + i] + h * hs, hs);
        const __m512 ksv = _mm512_i32gather_ps(_mm512_add_epi32(sov, _mm512_set1_epi32(static_cast<int>(h))), src.k_scale, 4);
        for_groups(g, [&]<int R>(int64_t r) {
          const int64_t row = h * RH + r;
          dec_scores_s8_t16<R>(q8 + row * Dq8, Dq8, qc + h * g + r, qs + row, D, kr, ksv, keep, s + (h * g + r) * Tk + j, Tk);
        });
      }
    }
  } else
#endif
  for (int64_t j = 0; j < n;) {
    const int64_t nk = n - j >= KS ? KS : n - j >= 2 ? 2 : 1;
    for (int64_t h = 0; h < H; ++h) {
      const uint8_t* kr[4];
      float ksc[4] = {};
      for (int64_t i = 0; i < nk; ++i) {
        kr[i] = t.kp[j + i] + h * hs;
        if (t.kn[j + i]) prefetch_head(t.kn[j + i] + h * hs, hs);
        if (s8) ksc[i] = t.ksp[j + i][h];
      }
      for_groups(g, [&]<int R>(int64_t r) {
        const int64_t row = h * RH + r;
        float* sp = s + (h * g + r) * Tk + j;
        if constexpr (s8) {
          // Built in registers: 4 scalar stores then a vector load of them stalled store forwarding.
          const __m128 qsv = _mm_setr_ps(qs[row], R > 1 ? qs[row + 1] : 0.0f, R > 2 ? qs[row + 2] : 0.0f, R > 3 ? qs[row + 3] : 0.0f);
          const int16_t* qr = q16 + row * Dq;
          if (KS == 4 && nk == 4) dec_scores_s8<R, (KS == 4 ? 4 : 2)>(qr, qsv, D, kr, ksc, sp, Tk);
          else if (nk == 2) dec_scores_s8<R, 2>(qr, qsv, D, kr, ksc, sp, Tk);
          else dec_scores_s8<R, 1>(qr, qsv, D, kr, ksc, sp, Tk);
        } else {
          const float* qr = q + row * Dp;
          if (KS == 4 && nk == 4) dec_scores_f<R, L, (KS == 4 ? 4 : 2)>(qr, D, Dp, kr, sp, Tk);
          else if (nk == 2) dec_scores_f<R, L, 2>(qr, D, Dp, kr, sp, Tk);
          else dec_scores_f<R, L, 1>(qr, D, Dp, kr, sp, Tk);
        }
      });
    }
    j += nk;
  }
  // Softmax per row; s8 multiplies the probabilities by the value scales.
  alignas(32) float vs[kMaxTile + 8];
  constexpr int64_t kMaxAlpha = 512;  // rows H * g whose alpha can be deferred to the P.V passes
  alignas(32) float alpha[kMaxAlpha];
  const bool fold_alpha = !s8 && H * g <= kMaxAlpha;
  for (int64_t h = 0; h < H; ++h) {
    if (s8) {
      for (int64_t j = 0; j < n; ++j) vs[j] = t.vsp[j][h];
      for (int64_t j = n; j < n + 8; ++j) vs[j] = 0.0f;
    }
    for (int64_t r = 0; r < g; ++r) {
      const int64_t row = h * RH + r;
      // Float caches: alpha goes to the P.V passes, which rescale acc as they load it.
      const float a = dec_softmax(s + (h * g + r) * Tk, n, s8 ? vs : nullptr, m + row, l + row,
                                  fold_alpha ? nullptr : acc + row * Dp, Dp);
      if (fold_alpha) alpha[h * g + r] = a;
    }
  }
  if constexpr (s8) {  // integer P.V, block by block (kernels/attention.h)
    // Rows per pass: 2 x 4 int32 accumulators in AVX2's 16 registers; 4 x 4 with AVX-512's 32.
    constexpr int kRows = QLLM_ATTN_VNNI ? 4 : 2;
    alignas(32) uint8_t wq[kRows][kDecPvBlock];
    const uint8_t* vr[kDecPvBlock];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t b0 = 0; b0 < n; b0 += kDecPvBlock) {
        const int64_t b1 = std::min(n, b0 + kDecPvBlock), groups = (b1 - b0 + 3) / 4;
        for (int64_t k = 0; k < 4 * groups; ++k) vr[k] = t.vp[b0 + k < b1 ? b0 + k : b0] + h * hs;  // padding: weight 0
        for (int64_t j = b0; j < b1; ++j)
          if (t.vn[j]) prefetch_head(t.vn[j] + h * hs, hs);
        // Rows kRows at a time, skipping those whose block adds nothing (as the reference does).
        int64_t np = 0;
        float sw[kRows];
        float* ap[kRows];
        const uint8_t* wp[kRows];
        for (int64_t i = 0; i < kRows; ++i) wp[i] = wq[i];
        auto flush = [&] {
          switch (np) {
            case 4: if constexpr (kRows >= 4) dec_pv_s8<4>(wp, sw, vr, groups, D, Dp, ap); break;
            case 3: if constexpr (kRows >= 3) dec_pv_s8<3>(wp, sw, vr, groups, D, Dp, ap); break;
            case 2: dec_pv_s8<2>(wp, sw, vr, groups, D, Dp, ap); break;
            case 1: dec_pv_s8<1>(wp, sw, vr, groups, D, Dp, ap); break;
            default: break;
          }
          np = 0;
        };
        for (int64_t r = 0; r < g; ++r) {
          const float w = dec_quant_block(s + (h * g + r) * Tk, b0, b1, wq[np]);
          if (w == 0.0f) continue;
          sw[np] = w;
          ap[np] = acc + (h * RH + r) * Dp;
          if (++np == kRows) flush();
        }
        flush();
      }
    return;
  }
  // P.V head by head, 4 rows x (4 chunks with AVX-512's 32 registers, 2 with AVX2's 16) of
  // accumulators held in registers over the tile's keys; the tile's V rows of a head (n x D)
  // stay in L1 across the passes.
  {
    constexpr int C = QLLM_ATTN_VNNI ? 4 : 2;
    const int64_t Df = D / 8 * 8;
    const uint8_t* vr[kMaxTile];
    const uint8_t* pf[kMaxTile];
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};  // acc already rescaled (x * 1 = x)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < n; ++j) {
        vr[j] = t.vp[j] + h * hs;
        pf[j] = t.vn[j] ? t.vn[j] + h * hs : nullptr;
      }
      for_groups(g, [&]<int R>(int64_t r) {
        const float* wp = s + (h * g + r) * Tk;
        float* ap = acc + (h * RH + r) * Dp;
        const float* al = fold_alpha ? alpha + h * g + r : ones;
        const uint8_t* const* p = r == 0 ? pf : nullptr;  // the first row group prefetches
        int64_t d = 0;
        for (; d + 8 * C <= Df; d += 8 * C) dec_pv_pass<R, L, C, false>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
        for (; d + 8 <= Df; d += 8) dec_pv_pass<R, L, 1, false>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
        if (d < Dp) dec_pv_pass<R, L, 1, true>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
      });
    }
  }
}

void decode(const float* q, const int16_t* q16, const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
            const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* /*tmp*/, float* m, float* l,
            float* acc) {
  switch (src.dtype) {
    case DType::f16: decode_t<LoadF16>(q, q16, q8, qs, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); break;
    case DType::bf16: decode_t<LoadBF16>(q, q16, q8, qs, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); break;
    case DType::s8: decode_t<LoadS8>(q, q16, q8, qs, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); break;
    default: decode_t<LoadF32>(q, q16, q8, qs, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); break;
  }
}

}  // namespace

#if QLLM_ATTN_VNNI
const AttnKernels& attn_kernels_avx512() {
#else
const AttnKernels& attn_kernels_avx2() {
#endif
  static const AttnKernels t{load_kv, attend, decode};
  return t;
}

}  // namespace qllm::kernels
