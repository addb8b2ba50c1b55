// AVX2 decode kernel of paged attention (AttnKernels::decode; the arithmetic of
// kernels/attention.h, bit-identical to ref and to the flash path's tile kernels in
// attention.cc). Compiled again as the avx512 ISA with QLLM_ATTN_VNNI (x86/avx512/
// attention_decode.cc), where the float passes use zmm and s8 caches go to
// avx512::attn_decode_s8 (x86/avx512/attention_decode_s8.cc, VNNI); the AVX2 build's s8 caches go
// to avx2::attn_decode_s8 (x86/avx2/attention_decode_s8.cc).
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

// ---- decode path -------------------------------------------------------------------------
//
// One query position: the GQA group's rows (4 for 32/8 heads) all see every key of the tile, so
// nothing is masked and K/V are read straight from the cache rows: each K/V chunk is loaded and
// converted once in registers (F16C / widening) and used by the 4 rows, with no f32 tile stored
// and reloaded. All KV heads of the tile are done in one call, token-major (key pair j, j + 1,
// then heads 0 .. H-1), so the [block, token, head, D] cache streams sequentially. Scores keep
// 4 rows x 2 keys = 8 accumulators (one tree4 per key gives the 4 rows' lane_tree8 sums); P.V
// keeps the pair's 4 x 2 probabilities broadcast in registers while V streams by, the
// accumulators (H x 4 rows x Dp f32 = 16 KB at D = 128) staying in L1. (Float caches only: s8
// caches go to their own tile kernels, attention_decode_s8.cc.)

// Loaders of 8 cache elements as f32 (exactly the values load_row produces).
// The AVX-512 build's load16: 16 elements as one zmm (the P.V passes on zmm).
struct LoadF32 {
  static constexpr int64_t es = 4;
  static __m256 load(const uint8_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
#if QLLM_ATTN_VNNI
  static __m512 load16(const uint8_t* p) { return _mm512_loadu_ps(p); }
#endif
};
struct LoadF16 {
  static constexpr int64_t es = 2;
  static __m256 load(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#if QLLM_ATTN_VNNI
  static __m512 load16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif
};
struct LoadBF16 {
  static constexpr int64_t es = 2;
  static __m256 load(const uint8_t* p) { return avx2::load8(DType::bf16, p); }
#if QLLM_ATTN_VNNI
  static __m512 load16(const uint8_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
#endif
};
// Elements [d, D) (< 8 of them) zero padded to 8: the tail chunk of a head size that is not a
// multiple of 8, without reading past the row.
template <class L>
__m256 load_tail(const uint8_t* row, int64_t d, int64_t D) {
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, row + d * L::es, (D - d) * L::es);
  return L::load(buf);
}

// Tile geometry of one decode call: row addresses of head 0 (head h is h * D elements further).
struct DecTile {
  const uint8_t* kp[kMaxTile];
  const uint8_t* vp[kMaxTile];
  const uint8_t* kn[kMaxTile];  // the next tile's rows (prefetch), nullptr past the keys
  const uint8_t* vn[kMaxTile];
};

// Prefetch distance: one tile ahead, spread over this tile's work (a few lines per head and key
// pair) so the requests overlap the arithmetic instead of stalling it in one burst, into L2
// (prefetcht1): measured, T0 into the 32 KB L1 (and bursts of a whole tile, and no software
// prefetch) stay at ~11 GB/s from DRAM on 2 cores, T1 reaches ~20 GB/s (B8 16k f16). Which
// tile's rows each phase prefetches (one or half a tile ahead): DecPf below.
inline void prefetch_head(const uint8_t* p, int64_t bytes) {
  if (!p) return;
  // asm volatile: g++ 12 -O2 deleted these _mm_prefetch calls (and the address walk feeding
  // them) as dead code; the inline asm keeps them.
  for (int64_t b = 0; b < bytes; b += 64) asm volatile("prefetcht1 %0" : : "m"(p[b]));
}


// Prefetch schedules of the float decode path (measured from DRAM with an in-process A/B
// driver, 2 threads, B1 16k / B8 4k; docs/design.md "Float decode prefetch schedules"):
// one_tile: the score loop prefetches the next tile's K, the P.V passes its V (one tile ahead
//   each). The AVX2 build's float path at tiles of < 64 keys (D > 64). (s8 caches have their own
//   tile kernels in both builds, attention_decode_s8.cc, and do not come here.)
// phase: the score loop prefetches this tile's V (used by the P.V passes right after), the P.V
//   passes the next tile's K: each array half a tile ahead. AVX-512 build, D 64 with blocks of
//   >= Tk tokens (2-6% faster than one_tile) and D 128 with blocks of < Tk tokens (1-4%); on the
//   AVX2 build 5-8% slower at 16-token blocks, so not used there.
// score_phase: the score loop prefetches both (this tile's V, the next tile's K), the P.V
//   passes none. For tiles of >= 64 keys (Dp <= 64): at 16-token blocks, D 64, 6-19% faster
//   than one_tile on the AVX-512 build, 5-8% on AVX2 (f16; f32 D 64 12-15%, bf16 ~10%); at
//   128-token blocks equal to one_tile or up to 9% faster on AVX2, but 1-4% behind phase on the
//   AVX-512 build, so that build takes it only for tiles spanning several blocks
//   (block_size < Tk). At Tk 32 (D 128) it was 8-12% slower: not used there.
enum class DecPf { one_tile, phase, score_phase };
inline DecPf dec_pf_schedule(int64_t Tk, int64_t block_size) {
  if (Tk >= 64 && (!QLLM_ATTN_VNNI || block_size < Tk)) return DecPf::score_phase;
  // phase at Tk < 64 (D 128) only over small blocks: with blocks of >= Tk tokens its gain was
  // 0-4% and one run read 5% slower (B8 4k), so those keep the old schedule.
  return QLLM_ATTN_VNNI && (Tk >= 64 || block_size < Tk) ? DecPf::phase : DecPf::one_tile;
}

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
// The 8-lane FMA chains of R rows x NK keys over Dp: c[r][i] lane e = the sum over chunks of
// q[r][8 c + e] * k_i[8 c + e], in chunk order (the lane_tree8 inputs); rows >= R stay 0. PinQ:
// each q chunk held in a register by an empty asm (else g++ folds it into every key's FMA as a
// memory operand, one load per FMA).
template <int R, class L, int NK, bool PinQ>
[[gnu::always_inline]] inline void dec_score_chains(const float* q, int64_t D, int64_t Dp, const uint8_t* const* k, __m256 (&c)[4][NK]) {
  const int64_t Df = D / 8 * 8;
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < NK; ++i) c[r][i] = _mm256_setzero_ps();
  auto step = [&](int64_t d, const __m256* kv) {
    for (int r = 0; r < R; ++r) {
      __m256 qv = _mm256_load_ps(q + r * Dp + d);
      if constexpr (PinQ) asm("" : "+x"(qv));
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
}

template <int R, class L, int NK>
inline void dec_scores_f(const float* q, int64_t D, int64_t Dp, const uint8_t* const* k, float* s, int64_t Tk) {
  __m256 c[4][NK];
  dec_score_chains<R, L, NK, false>(q, D, Dp, k, c);
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

// P.V of R rows of one head over all n keys of the tile for C 8-dim chunks from dim d, the
// accumulators in registers across the keys: acc = fma(w_j, v_j, acc * alpha) for j = 0 .. n-1,
// the FMA chains of attend in the same key order (bit-identical), with no load + store of acc
// per key; the online-softmax rescale acc * alpha (al[r]) is applied here as acc is loaded (the
// same product, one pass over acc fewer). Tail: the chunk is the zero-padded last one (D % 8).
// pf (nullable): rows of pfb bytes to prefetch, one per key (the next tile's V of this head);
// each pass prefetches the 64-byte lines that start in its own byte range, so the requests
// spread over the passes, one instruction per line.
// Row r's weight of key j is w[r * Tk + j * KS]: KS = 1 for score rows (row-major), KS = 4 for
// the 4-row groups' key-major weights (w4[4 j + r], dec_softmax4), whose P.V runs 3 chunks per
// pass where the row-major callers take 2.
template <int R, class L, int C, bool Tail, int KS = 1>
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
    if (pfo) {
      prefetch_line_t1(pf[j] + o0);
      if (pf2) prefetch_line_t1(pf[j] + o0 + 64);
    }
    __m256 v[C];
    for (int i = 0; i < C; ++i) v[i] = Tail ? load_tail<L>(vr[j], d + 8 * i, D) : L::load(vr[j] + (d + 8 * i) * L::es);
    for (int r = 0; r < R; ++r) {
      const __m256 wr = _mm256_broadcast_ss(w + r * Tk + j * KS);
      for (int i = 0; i < C; ++i) a[r][i] = _mm256_fmadd_ps(wr, v[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < C; ++i) _mm256_store_ps(acc + r * Dp + d + 8 * i, a[r][i]);
}

#if QLLM_ATTN_VNNI
// dec_pv_pass on zmm (AVX-512 build): R rows x CZ 16-dim chunks from dim d (d + 16 CZ <= D).
// Each zmm lane runs the same FMA chain as the ymm pass's lane for that dim (acc * alpha, then
// fma(w_j, v_j, .) for j = 0 .. n-1), so the bits are the same; a zmm op does the work of two ymm
// ops in one instruction, so 4 rows x 64 dims = 16 zmm accumulators cover all of D = 64 in one
// pass over the keys (the ymm pass needs two, each with its own per-key overhead: row pointer,
// broadcasts, prefetch), and D = 128 in two passes instead of four.
template <int R, class L, int CZ>
[[gnu::always_inline]] inline void dec_pv_pass_z(const float* w, int64_t Tk, const uint8_t* const* vr, int64_t n, int64_t d,
                                                 const float* al, float* acc, int64_t Dp, const uint8_t* const* pf, int64_t pfb) {
  __m512 a[R][CZ];
  for (int r = 0; r < R; ++r) {
    const __m512 av = _mm512_set1_ps(al[r]);
    for (int i = 0; i < CZ; ++i) a[r][i] = _mm512_mul_ps(_mm512_loadu_ps(acc + r * Dp + d + 16 * i), av);
  }
  const int64_t b0 = d * L::es, b1 = std::min<int64_t>((d + 16 * CZ) * L::es, pfb);
  const int64_t o0 = (b0 + 63) / 64 * 64;  // lines starting in [b0, b1): at most 4 (f32, CZ = 4)
  const int npf = pf != nullptr && o0 < b1 ? static_cast<int>((b1 - o0 + 63) / 64) : 0;
  for (int64_t j = 0; j < n; ++j) {
    if (npf > 0) {
      const uint8_t* p = pf[j] + o0;
      prefetch_line_t1(p);
      if (npf > 1) prefetch_line_t1(p + 64);
      if (npf > 2) prefetch_line_t1(p + 128);
      if (npf > 3) prefetch_line_t1(p + 192);
    }
    __m512 v[CZ];
    for (int i = 0; i < CZ; ++i) v[i] = L::load16(vr[j] + (d + 16 * i) * L::es);
    for (int r = 0; r < R; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r * Tk + j]);
      for (int i = 0; i < CZ; ++i) a[r][i] = _mm512_fmadd_ps(wr, v[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < CZ; ++i) _mm512_storeu_ps(acc + r * Dp + d + 16 * i, a[r][i]);
}
#endif

// Online-softmax step of one row over all n keys of the tile (the arithmetic of attend with
// a = 0, b = n). Returns alpha; with
// acc non-null it also does acc *= alpha (the float caches' P.V applies alpha as it loads acc).
// Only the tile's last partial chunk is masked. The AVX-512 build takes 16 keys per exp (the
// same element-wise arithmetic) and adds each 16-key vector's halves to the 8 lane sums in key
// order (lane i sums the keys j % 8 == i in order, as the definition requires).
inline float dec_softmax(float* sr, int64_t n, float* m, float* l, float* acc, int64_t Dp) {
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
    _mm512_mask_storeu_ps(sr + j, mk, e);
  }
#else
  const __m256 mv = _mm256_set1_ps(mn);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv));
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(sr + j, e);
  }
  if (j < n) {  // s has Tk >= round_up(n, 8) slots: lanes past n get 0
    const __m256 mk = _mm256_castsi256_ps(lane_mask(0, n - j));
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), mv)), mk);
    sum = _mm256_add_ps(sum, e);
    _mm256_storeu_ps(sr + j, e);
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

// Maxima of 4 vectors' lanes (max is exact: any order gives the same value): lane r of the
// result is the max over the 8 lanes of x[r].
inline __m128 max4x8(__m256 x0, __m256 x1, __m256 x2, __m256 x3) {
  const __m256 a = _mm256_max_ps(_mm256_shuffle_ps(x0, x1, 0x88), _mm256_shuffle_ps(x0, x1, 0xdd));
  const __m256 b = _mm256_max_ps(_mm256_shuffle_ps(x2, x3, 0x88), _mm256_shuffle_ps(x2, x3, 0xdd));
  const __m256 c = _mm256_max_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xdd));
  return _mm_max_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
}

// dec_softmax for the R (<= 4) rows of one head of a float cache, the rows interleaved: one row
// at a time is a chain of dependent steps (max, its reduction, alpha = exp, the exps, lane sums,
// l) that the core did not overlap across rows (perf: ~12% of an avx512 f16 D = 64 decode, more
// than its exps' arithmetic); here each loop runs R independent chains. Per row the arithmetic
// is dec_softmax's (acc = nullptr): the same max, alpha (exp8's lanes are
// exp_qllm), exps, 8 lane sums in key order, their lane_tree8 (tree4 is 4 of them) and
// l * alpha + sum, so the bits are the same. Writes alpha[0 .. R).
template <int R>
inline void dec_softmax_f(float* s, int64_t Tk, int64_t n, float* m, float* l, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  __m256 mx[4];
#if QLLM_ATTN_VNNI
  {
    const __m512 ninf16 = _mm512_set1_ps(kNegInf);
    __m512 z[R];
    for (int r = 0; r < R; ++r) z[r] = ninf16;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
      for (int r = 0; r < R; ++r) z[r] = _mm512_max_ps(_mm512_mask_loadu_ps(ninf16, mk, s + r * Tk + j), z[r]);
    }
    for (int r = 0; r < 4; ++r)
      mx[r] = r < R ? _mm256_max_ps(_mm512_castps512_ps256(z[r]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z[r]), 1)))
                    : _mm256_set1_ps(kNegInf);
  }
#else
  {
    const __m256 ninf = _mm256_set1_ps(kNegInf);
    for (int r = 0; r < 4; ++r) mx[r] = ninf;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int r = 0; r < R; ++r) mx[r] = _mm256_max_ps(_mm256_loadu_ps(s + r * Tk + j), mx[r]);
    if (j < n) {
      const __m256 mk = _mm256_castsi256_ps(lane_mask(0, n - j));
      for (int r = 0; r < R; ++r) mx[r] = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_loadu_ps(s + r * Tk + j), mk), mx[r]);
    }
  }
#endif
  const __m128 mt = max4x8(mx[0], mx[1], mx[2], mx[3]);
  alignas(16) float mo[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
  for (int r = 0; r < R; ++r) mo[r] = m[r];
  const __m128 mold = _mm_load_ps(mo);
  const __m128 mnew = _mm_max_ps(mt, mold);  // max_ps(mt, m) lane-wise
  // alpha = m == -inf ? 0 : exp_qllm(m - m'), 4 rows in one exp8 (upper lanes unused).
  const __m128 e4 = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(mold, mnew))));
  const __m128 al = _mm_andnot_ps(_mm_cmpeq_ps(mold, _mm_set1_ps(kNegInf)), e4);
  alignas(16) float mn[4];
  _mm_store_ps(mn, mnew);
  __m256 sum[4];
  for (int r = 0; r < 4; ++r) sum[r] = _mm256_setzero_ps();
#if QLLM_ATTN_VNNI
  {
    __m512 mv[R];
    for (int r = 0; r < R; ++r) mv[r] = _mm512_set1_ps(mn[r]);
    for (int64_t j = 0; j < n; j += 16) {  // lanes past n: 0 (added to the lane sums: exact)
      const __mmask16 mk = n - j >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
      for (int r = 0; r < R; ++r) {
        float* sr = s + r * Tk + j;
        const __m512 e = _mm512_maskz_mov_ps(mk, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sr), mv[r])));
        sum[r] = _mm256_add_ps(sum[r], _mm512_castps512_ps256(e));
        sum[r] = _mm256_add_ps(sum[r], _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
        _mm512_mask_storeu_ps(sr, mk, e);
      }
    }
  }
#else
  {
    __m256 mv[R];
    for (int r = 0; r < R; ++r) mv[r] = _mm256_set1_ps(mn[r]);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int r = 0; r < R; ++r) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + r * Tk + j), mv[r]));
        sum[r] = _mm256_add_ps(sum[r], e);
        _mm256_storeu_ps(s + r * Tk + j, e);
      }
    if (j < n) {  // s has Tk >= round_up(n, 8) slots: lanes past n get 0
      const __m256 mk = _mm256_castsi256_ps(lane_mask(0, n - j));
      for (int r = 0; r < R; ++r) {
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + r * Tk + j), mv[r])), mk);
        sum[r] = _mm256_add_ps(sum[r], e);
        _mm256_storeu_ps(s + r * Tk + j, e);
      }
    }
  }
#endif
  // l = l * alpha + lane_tree8(sum): tree4 gives the 4 rows' lane_tree8 sums.
  softmax_store_state<R>(tree4(sum[0], sum[1], sum[2], sum[3]), al, mnew, m, l, alpha);
}

#if !QLLM_ATTN_VNNI
// ---- AVX2 float decode, row groups of 4 (the GQA group of 32 / 8 heads) ------------------
//
// Measured (scratch driver, docs/design.md "AVX2 float decode, session 7"): the generic passes
// above ran at ~1.6-1.8x their FMA count on AVX2. The score pass (4 rows x 2 keys) had g++
// fold the q chunk into both keys' FMAs (10 loads per 8 FMAs), was called per key pair and head
// through the row-group lambda (its setup cost as much as the reductions) and ended each key in
// a tree4 and 8-byte stores; both loops kept 8 accumulators, i.e. 8 FMA chains of 4-cycle
// latency on 2 FMA pipes, with no slack. Row groups of 4 therefore take: scores in one loop
// over the tile (token-major) of 3 keys per pass (12 chains), reduced to key-major scores
// (s4[j * 4 + r]: one vector holds 2 keys x 4 rows, one store per key pair); the softmax on
// that layout; P.V passes of 3 chunks (12 chains) reading the key-major weights. The tile's
// score buffer of the group (4 x Tk floats) holds the key-major scores instead of 4 rows.

// Scores of 4 rows for NK (1-3) keys k[0 .. NK) into s4[i * 4 + r] (key-major): 8-lane FMA
// chains over Dp (dec_score_chains), each q chunk loaded once into a register (PinQ) and each
// converted K chunk used by the 4 rows
// (NK = 3: 12 accumulators + 3 K chunks + q = the 16 ymm registers). Reduction in the
// lane_tree8 order without scalar stores: hadd(row r, row r + 1) of a key adds lanes (0,1),
// (2,3) of each half, a second hadd the pairs of pairs, leaving per key [rows 0-3 sums of lanes
// 0-3 | rows 0-3 sums of lanes 4-7]; two keys' halves are exchanged with vperm2f128 and one add
// gives ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)) of both: one 32-byte store [key i: rows 0-3 |
// key i + 1: rows 0-3] (a key left over: one 16-byte store).
template <class L, int NK>
[[gnu::always_inline]] inline void dec_scores4(const float* q, int64_t D, int64_t Dp, const uint8_t* const* k, float* s4) {
  __m256 c[4][NK];
  dec_score_chains<4, L, NK, true>(q, D, Dp, k, c);
  // x[i] = key i: [rows 0-3, lanes 0-3 summed | rows 0-3, lanes 4-7 summed]
  __m256 x[NK];
  for (int i = 0; i < NK; ++i) x[i] = _mm256_hadd_ps(_mm256_hadd_ps(c[0][i], c[1][i]), _mm256_hadd_ps(c[2][i], c[3][i]));
  int i = 0;
  for (; i + 2 <= NK; i += 2)
    _mm256_storeu_ps(s4 + 4 * i, _mm256_add_ps(_mm256_permute2f128_ps(x[i], x[i + 1], 0x20), _mm256_permute2f128_ps(x[i], x[i + 1], 0x31)));
  if (i < NK) _mm_storeu_ps(s4 + 4 * i, _mm_add_ps(_mm256_castps256_ps128(x[i]), _mm256_extractf128_ps(x[i], 1)));
}

// The scores of the row groups of 4 (rows h * RH + r, r < g4, of each head h < H) over the
// tile's n keys (K rows kp[j] + h * hs), key-major into s + (h * g + r) * Tk, 3 keys per
// dec_scores4 (then 2 or 1), token-major: per group of keys every head, so the tile's K rows are
// read in address order (the first tile of a task is not prefetched: its rows come from DRAM,
// where the hardware prefetcher follows address order; head-major passes over a tile were 22%
// slower for tasks of 4 tiles at D 64). One loop for the tile instead of a call per key pair and
// head (the per-call setup cost as much as the reductions). Prefetch (the score loop's share of
// schedule S, per key and head the lines of its row): pv (nullable) this tile's V rows, pk
// (nullable) the next tile's K rows (entries past the last key point at this tile's rows).
constexpr int kS4 = 3;  // keys per dec_scores4 pass
template <class L>
[[gnu::noinline]] void dec_scores4_tile(const float* q, int64_t H, int64_t g4, int64_t g, int64_t RH, int64_t D, int64_t Dp,
                                        const uint8_t* const* kp, int64_t hs, int64_t n, float* s, int64_t Tk, const uint8_t* const* pv,
                                        const uint8_t* const* pk) {
  auto group = [&]<int NK>(int64_t j) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t ho = h * hs;
      for (int64_t b = 0; b < hs; b += 64)
        for (int i = 0; i < NK; ++i) {
          if (pv) prefetch_line_t1(pv[j + i] + ho + b);
          if (pk) prefetch_line_t1(pk[j + i] + ho + b);
        }
      const uint8_t* kr[NK];
      for (int i = 0; i < NK; ++i) kr[i] = kp[j + i] + ho;
      for (int64_t r = 0; r < g4; r += 4) dec_scores4<L, NK>(q + (h * RH + r) * Dp, D, Dp, kr, s + (h * g + r) * Tk + 4 * j);
    }
  };
  int64_t j = 0;
  for (; j + kS4 <= n; j += kS4) group.template operator()<kS4>(j);
  if (n - j == 2) group.template operator()<2>(j);
  if (n - j == 1) group.template operator()<1>(j);
}

// dec_softmax_f<4> on the key-major scores s4 (n keys x 4 rows; vector t = keys 2t, 2t + 1):
// the same arithmetic per row. Lane sums: accumulator u (t % 4 == u) adds keys 8i + 2u (low
// half) and 8i + 2u + 1 (high half) in key order, i.e. lane classes 2u and 2u + 1 of the
// definition for the 4 rows at once; lane_tree8 = ((c0 + c1) + (c2 + c3)) + ((c4 + c5) +
// (c6 + c7)) is then (F0 + F1) + (F2 + F3) with F_u = low(u) + high(u). An odd last key's
// partner lanes are masked (-inf for the max, 0 for the sums and weights: adding +0 to a
// sum of exps is exact).
inline void dec_softmax4(float* s4, int64_t n, float* m, float* l, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const int64_t np = n / 2;  // whole key pairs
  const __m256 lo4 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));
  __m256 mx0 = ninf, mx1 = ninf;
  int64_t t = 0;
  for (; t + 2 <= np; t += 2) {
    mx0 = _mm256_max_ps(_mm256_loadu_ps(s4 + 8 * t), mx0);
    mx1 = _mm256_max_ps(_mm256_loadu_ps(s4 + 8 * t + 8), mx1);
  }
  if (t < np) mx0 = _mm256_max_ps(_mm256_loadu_ps(s4 + 8 * t), mx0);
  if (n & 1) mx1 = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_loadu_ps(s4 + 8 * np), lo4), mx1);
  const __m256 mx = _mm256_max_ps(mx0, mx1);  // max is exact: any order gives the same value
  const __m128 mt = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  const __m128 mold = _mm_loadu_ps(m);
  const __m128 mnew = _mm_max_ps(mt, mold);  // max_ps(mt, m) lane-wise
  // alpha = m == -inf ? 0 : exp_qllm(m - m'), 4 rows in one exp8 (upper lanes unused).
  const __m128 e4 = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(mold, mnew))));
  const __m128 al = _mm_andnot_ps(_mm_cmpeq_ps(mold, _mm_set1_ps(kNegInf)), e4);
  const __m256 mv = _mm256_set_m128(mnew, mnew);
  __m256 sum[4];
  for (int u = 0; u < 4; ++u) sum[u] = _mm256_setzero_ps();
  t = 0;
  for (; t + 4 <= np; t += 4)
    for (int u = 0; u < 4; ++u) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s4 + 8 * (t + u)), mv));
      sum[u] = _mm256_add_ps(sum[u], e);
      _mm256_storeu_ps(s4 + 8 * (t + u), e);
    }
  for (int u = 0; t + u < np; ++u) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s4 + 8 * (t + u)), mv));
    sum[u] = _mm256_add_ps(sum[u], e);
    _mm256_storeu_ps(s4 + 8 * (t + u), e);
  }
  if (n & 1) {
    const int u = static_cast<int>(np % 4);
    const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s4 + 8 * np), mv)), lo4);
    sum[u] = _mm256_add_ps(sum[u], e);
    _mm256_storeu_ps(s4 + 8 * np, e);
  }
  __m128 f[4];
  for (int u = 0; u < 4; ++u) f[u] = _mm_add_ps(_mm256_castps256_ps128(sum[u]), _mm256_extractf128_ps(sum[u], 1));
  const __m128 tree = _mm_add_ps(_mm_add_ps(f[0], f[1]), _mm_add_ps(f[2], f[3]));
  _mm_storeu_ps(l, _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(l), al), tree));
  _mm_storeu_ps(m, mnew);
  _mm_storeu_ps(alpha, al);
}

#endif

template <class L, DecPf S>
void decode_t(const float* q, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp, const KvSource& src, int64_t j0,
              int64_t n, int64_t Tk, float* s, float* m, float* l, float* acc) {
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
    if (++off == src.block_size) off = 0, ++blk;
  }
  for (int64_t j = 0; j < n; ++j) {  // continues the walk: keys j0 + n + j
    const bool ok = j0 + n + j < src.tokens;
    const int64_t phys = !ok ? 0 : src.block_table ? src.block_table[blk] : blk;
    const int64_t e = (phys * src.block_stride + off * src.token_stride) * es;
    t.kn[j] = ok ? kb + e : nullptr;
    t.vn[j] = ok ? vb + e : nullptr;
    if (ok && ++off == src.block_size) off = 0, ++blk;
  }
  // Scores, token-major: for each group of KS keys (KS = 4 in the AVX-512 build, 2 with AVX2's
  // 16 registers), every head's rows (the group's K rows of all heads are KS contiguous runs of
  // H * D elements, read once). A tile's tail takes groups of 2 and 1.
  constexpr int64_t KS = QLLM_ATTN_VNNI ? 4 : 2;
  // Prefetch schedule S (DecPf, a template parameter so that each schedule compiles to its own
  // loops with no flag tests): which tile's K and V rows the score loop and the P.V passes
  // prefetch. It moves no arithmetic (docs/design.md, "Float decode prefetch schedules").
  constexpr bool pf_v_now = S != DecPf::one_tile, pf_k_next = S != DecPf::phase;
  constexpr int64_t kMaxAlpha = 512;  // rows H * g whose alpha can be deferred to the P.V passes
  const bool fold_alpha = H * g <= kMaxAlpha;
  // AVX2 build: row groups of 4 take the key-major path (dec_scores4_tile, dec_softmax4,
  // dec_pv_pass with KS = 4) when alpha is deferred (the per-row dec_softmax reads row-major scores).
  [[maybe_unused]] const bool kp4 = !QLLM_ATTN_VNNI && fold_alpha && g >= 4;
#if !QLLM_ATTN_VNNI
  if (kp4) {  // token-major (dec_scores4_tile); then the rows of a group of < 4 per key pair
    const uint8_t* kx[kMaxTile];  // the next tile's K rows, this tile's past the last key
    if (pf_k_next)
      for (int64_t j = 0; j < n; ++j) kx[j] = t.kn[j] ? t.kn[j] : t.kp[j];
    const int64_t g4 = g / 4 * 4;
    dec_scores4_tile<L>(q, H, g4, g, RH, D, Dp, t.kp, hs, n, s, Tk, pf_v_now ? t.vp : nullptr, pf_k_next ? kx : nullptr);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t r = g4;
      if (r < g)
        for (int64_t j = 0; j < n;) {
          const int64_t nk = n - j >= 2 ? 2 : 1;
          const uint8_t* kr[2] = {t.kp[j] + h * hs, t.kp[j + nk - 1] + h * hs};
          for_groups(g - r, [&]<int R>(int64_t) {
            const int64_t row = h * RH + r;
            float* sp = s + (h * g + r) * Tk + j;
            if (nk == 2) dec_scores_f<R, L, 2>(q + row * Dp, D, Dp, kr, sp, Tk);
            else dec_scores_f<R, L, 1>(q + row * Dp, D, Dp, kr, sp, Tk);
          });
          j += nk;
        }
    }
  } else
#endif
  for (int64_t j = 0; j < n;) {
    const int64_t nk = n - j >= KS ? KS : n - j >= 2 ? 2 : 1;
    for (int64_t h = 0; h < H; ++h) {
      const uint8_t* kr[4];
      for (int64_t i = 0; i < nk; ++i) {
        kr[i] = t.kp[j + i] + h * hs;
        if constexpr (pf_v_now) prefetch_head(t.vp[j + i] + h * hs, hs);  // this tile's V, for the P.V below
        if (pf_k_next && t.kn[j + i]) prefetch_head(t.kn[j + i] + h * hs, hs);
      }
      for_groups(g, [&]<int R>(int64_t r) {
        const int64_t row = h * RH + r;
        float* sp = s + (h * g + r) * Tk + j;
        const float* qr = q + row * Dp;
        if (KS == 4 && nk == 4) dec_scores_f<R, L, (KS == 4 ? 4 : 2)>(qr, D, Dp, kr, sp, Tk);
        else if (nk == 2) dec_scores_f<R, L, 2>(qr, D, Dp, kr, sp, Tk);
        else dec_scores_f<R, L, 1>(qr, D, Dp, kr, sp, Tk);
      });
    }
    j += nk;
  }
  // Softmax per row.
  alignas(32) float alpha[kMaxAlpha];
  if (fold_alpha) {  // a head's rows at once, alpha to the P.V passes
    for (int64_t h = 0; h < H; ++h)
      for_groups(g, [&]<int R>(int64_t r) {
        const int64_t row = h * RH + r;
#if !QLLM_ATTN_VNNI
        if constexpr (R == 4) {
          if (kp4) return dec_softmax4(s + (h * g + r) * Tk, n, m + row, l + row, alpha + h * g + r);
        }
#endif
        dec_softmax_f<R>(s + (h * g + r) * Tk, Tk, n, m + row, l + row, alpha + h * g + r);
      });
  } else
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < g; ++r) {  // more rows than alpha slots: acc *= alpha here
      const int64_t row = h * RH + r;
      dec_softmax(s + (h * g + r) * Tk, n, m + row, l + row, acc + row * Dp, Dp);
    }
  // P.V head by head, 4 rows x (4 chunks with AVX-512's 32 registers, 2 with AVX2's 16) of
  // accumulators held in registers over the tile's keys; the tile's V rows of a head (n x D)
  // stay in L1 across the passes. (AVX-512: zmm passes of 64, 32, 16 dims first.)
  {
    constexpr int C = QLLM_ATTN_VNNI ? 4 : 2;
    const int64_t Df = D / 8 * 8;
    const uint8_t* vr[kMaxTile];
    const uint8_t* pf[kMaxTile];
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};  // acc already rescaled (x * 1 = x)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < n; ++j) {
        vr[j] = t.vp[j] + h * hs;
        // Past the last key: this tile's row (in cache), so the passes need no null test.
        const uint8_t* nx = S == DecPf::phase ? t.kn[j] : t.vn[j];  // the next tile's K or V
        pf[j] = nx ? nx + h * hs : vr[j];
      }
      for_groups(g, [&]<int R>(int64_t r) {
        const float* wp = s + (h * g + r) * Tk;
        float* ap = acc + (h * RH + r) * Dp;
        const float* al = fold_alpha ? alpha + h * g + r : ones;
        // The first row group prefetches (nothing in the score-phase schedule).
        const uint8_t* const* p = r == 0 && S != DecPf::score_phase ? pf : nullptr;
#if !QLLM_ATTN_VNNI
        if constexpr (R == 4) {
          if (kp4) {
            int64_t d = 0;
            // 3 chunks (12 accumulators: 8 FMA chains of 4-cycle latency on 2 pipes leave no
            // slack), 2 + 2 for the last 4.
            for (; d + 24 <= Df && Df - d != 32; d += 24) dec_pv_pass<4, L, 3, false, 4>(wp, 1, vr, n, d, D, Dp, al, ap, p, hs);
            for (; d + 16 <= Df; d += 16) dec_pv_pass<4, L, 2, false, 4>(wp, 1, vr, n, d, D, Dp, al, ap, p, hs);
            for (; d + 8 <= Df; d += 8) dec_pv_pass<4, L, 1, false, 4>(wp, 1, vr, n, d, D, Dp, al, ap, p, hs);
            if (d < Dp) dec_pv_pass<4, L, 1, true, 4>(wp, 1, vr, n, d, D, Dp, al, ap, p, hs);
            return;
          }
        }
#endif
        int64_t d = 0;
#if QLLM_ATTN_VNNI
        for (; d + 64 <= Df; d += 64) dec_pv_pass_z<R, L, 4>(wp, Tk, vr, n, d, al, ap, Dp, p, hs);
        if (d + 32 <= Df) dec_pv_pass_z<R, L, 2>(wp, Tk, vr, n, d, al, ap, Dp, p, hs), d += 32;
        if (d + 16 <= Df) dec_pv_pass_z<R, L, 1>(wp, Tk, vr, n, d, al, ap, Dp, p, hs), d += 16;
#endif
        for (; d + 8 * C <= Df; d += 8 * C) dec_pv_pass<R, L, C, false>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
        for (; d + 8 <= Df; d += 8) dec_pv_pass<R, L, 1, false>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
        if (d < Dp) dec_pv_pass<R, L, 1, true>(wp, Tk, vr, n, d, D, Dp, al, ap, p, hs);
      });
    }
  }
}

}  // namespace

namespace QLLM_ATTN_ISA {

void attn_decode(const float* q, const int16_t* q16, const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
            const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* /*tmp*/, float* m, float* l,
            float* acc) {
  if (src.dtype == DType::s8) {  // head by head, with their own tile walks (attention_decode_s8.cc)
#if QLLM_ATTN_VNNI
    (void)q16;
    avx512::attn_decode_s8(q8, qs, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
#else
    (void)q8;
    avx2::attn_decode_s8(q16, qs, g, H, RH, D, Dp, src, j0, n, m, l, acc);
#endif
    return;
  }
  // Float caches: the build's two prefetch schedules (dec_pf_schedule).
  const DecPf sched = dec_pf_schedule(Tk, src.block_size);
  constexpr DecPf kOther = QLLM_ATTN_VNNI ? DecPf::phase : DecPf::one_tile;
  const bool sp = sched == DecPf::score_phase;
  if (!sp && sched != kOther) {  // AVX-512 build, D 128 over large blocks: one_tile
    switch (src.dtype) {
      case DType::f16: decode_t<LoadF16, DecPf::one_tile>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); return;
      case DType::bf16: decode_t<LoadBF16, DecPf::one_tile>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); return;
      default: decode_t<LoadF32, DecPf::one_tile>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc); return;
    }
  }
  switch (src.dtype) {
    case DType::f16:
      if (sp) decode_t<LoadF16, DecPf::score_phase>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      else decode_t<LoadF16, kOther>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      break;
    case DType::bf16:
      if (sp) decode_t<LoadBF16, DecPf::score_phase>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      else decode_t<LoadBF16, kOther>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      break;
    default:
      if (sp) decode_t<LoadF32, DecPf::score_phase>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      else decode_t<LoadF32, kOther>(q, g, H, RH, D, Dp, src, j0, n, Tk, s, m, l, acc);
      break;
  }
}

// The split merge of kernels/attention.h, 8 dims per FMA (element-wise the same arithmetic as
// merge_ref: scalar w and L, fma per dim in split order, IEEE division). Was scalar code in the
// driver, where std::fma is a libm call (the driver is compiled for baseline x86-64): ~8% of a
// 1-thread batch-1 decode over 4k keys (8 splits).
void attn_merge(const float* part, int64_t nsplit, int64_t stride, int64_t D, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float M = kNegInf;
  for (int64_t sp = 0; sp < nsplit; ++sp) M = max_ps(part[sp * stride], M);
  float L = 0.0f;
  const int64_t Df = D / 8 * 8;
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  if (M != kNegInf) {
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      const float* src = part + sp * stride;
      if (src[0] == kNegInf) continue;
      const float w = exp_qllm(src[0] - M);
      L = std::fma(src[1], w, L);
      const __m256 wv = _mm256_set1_ps(w);
      int64_t d = 0;
      for (; d < Df; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(_mm256_loadu_ps(src + 2 + d), wv, _mm256_loadu_ps(o + d)));
      for (; d < D; ++d) o[d] = std::fma(src[2 + d], w, o[d]);
    }
  }
  if (L > 0.0f) {
    const __m256 lv = _mm256_set1_ps(L);
    int64_t d = 0;
    for (; d < Df; d += 8) _mm256_storeu_ps(o + d, _mm256_div_ps(_mm256_loadu_ps(o + d), lv));
    for (; d < D; ++d) o[d] = o[d] / L;
  } else {
    for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  }
}

}  // namespace QLLM_ATTN_ISA

}  // namespace qllm::kernels
