// Pieces shared by the AVX2 attention kernel files (attention.cc: the tile kernels of flash and
// prefill; attention_decode.cc: the decode kernel). Each file is compiled twice, as the avx2 ISA
// and, with QLLM_ATTN_VNNI = 1, as the avx512 ISA (x86/avx512/attention*.cc include them);
// these helpers sit in an anonymous namespace so each compilation keeps its own copy.
#pragma once

#include <immintrin.h>

// 1 when compiled as the avx512 ISA's kernels (x86/avx512/attention*.cc include the sources).
#ifndef QLLM_ATTN_VNNI
#define QLLM_ATTN_VNNI 0
#endif
#if QLLM_ATTN_VNNI
#define QLLM_ATTN_ISA avx512
#else
#define QLLM_ATTN_ISA avx2
#endif

#include <algorithm>
#include <cstdint>

#include "kernels/attention.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace QLLM_ATTN_ISA {
// The decode kernel (AttnKernels::decode) of this ISA, defined in attention_decode.cc.
void attn_decode(const float* q, const int16_t* q16, const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH,
                 int64_t D, int64_t Dp, const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* tmp,
                 float* m, float* l, float* acc);
// AttnKernels::merge of this ISA (attention_decode.cc).
void attn_merge(const float* part, int64_t nsplit, int64_t stride, int64_t D, float* o);
}  // namespace QLLM_ATTN_ISA

#if QLLM_ATTN_VNNI
namespace avx512 {
// The s8-cache tile of the avx512 decode kernel (x86/avx512/attention_decode_s8.cc): head by
// head in zmm, the same integer sums and 7-bit P.V weights as the AVX2 and reference kernels.
void attn_decode_s8(const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
                    const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* m, float* l, float* acc);
}  // namespace avx512
#else
namespace avx2 {
// The s8-cache tile of the avx2 decode kernel (x86/avx2/attention_decode_s8.cc): head by head,
// the same integer sums and 7-bit P.V weights as the reference and avx512 kernels.
void attn_decode_s8(const int16_t* q16, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
                    const KvSource& src, int64_t j0, int64_t n, float* m, float* l, float* acc);
}  // namespace avx2
#endif

namespace {

using avx2::exp8;

// Sums of 4 vectors, each in the lane_tree8 order: ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
inline __m128 tree4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);   // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 t = _mm256_hadd_ps(ab, cd);  // a0123 b0123 c0123 d0123 | a4567 ...
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

inline __m256i lane_mask(int64_t lo, int64_t hi) {  // lanes i with lo <= i < hi
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ge = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int>(lo) - 1));
  const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), idx);
  return _mm256_and_si256(ge, lt);
}

#if QLLM_ATTN_VNNI
// exp8's polynomial on 16 lanes for x already clamped to [kExpLo, kExpHi]: returns p with
// exp(x) = p * 2^n, n = rint(x log2 e) (an integer in [-126, 127]). Shared by exp16 and the s8
// decode's exp16_le, which differ only in how they apply 2^n.
[[gnu::always_inline]] inline __m512 exp16_poly(__m512 x, __m512& n) {
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
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
  return _mm512_add_ps(p, _mm512_set1_ps(1.0f));
}

// exp8 on 16 lanes: the same operations in the same order, so the same bits as exp8 / exp_qllm.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(kExpHi));
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
  __m512 n;
  const __m512 p = exp16_poly(x, n);
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif


// ---- decode pieces shared by attention_decode.cc and avx512/attention_decode_s8.cc ----

constexpr int64_t kMaxTile = 128;  // Problem::Tk() <= 128

// One prefetcht1 of the line holding p. A register operand: with a memory operand ("m") g++
// kept the P.V accumulators in memory across the asm (a store of all 16 per key).
inline void prefetch_line_t1(const void* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }
inline void prefetch_line_t0(const void* p) { asm volatile("prefetcht0 (%0)" : : "r"(p)); }

// The s8 decode tiles' walk of the block table (both ISAs): rows (head 0) and scale offsets (so,
// nullable) of keys [j0, j0 + n), a block at a time (consecutive tokens of a block are
// token_stride apart), cheaper than a per-key walk (which cost ~9% of the avx512 s8 tile).
// Entries [n, pad) repeat key 0.
inline void s8_walk(const KvSource& src, int64_t j0, int64_t n, int64_t pad, const uint8_t** kp, const uint8_t** vp, int32_t* so) {
  const uint8_t* kb = static_cast<const uint8_t*>(src.k);
  const uint8_t* vb = static_cast<const uint8_t*>(src.v);
  int64_t blk = j0 / src.block_size, off = j0 % src.block_size;
  for (int64_t j = 0; j < n; ++blk, off = 0) {
    const int64_t phys = src.block_table ? src.block_table[blk] : blk;
    const int64_t seg = std::min(src.block_size - off, n - j);
    const int64_t e = phys * src.block_stride + off * src.token_stride;
    const int64_t sc = phys * src.scale_block_stride + off * src.scale_token_stride;
    for (int64_t i = 0; i < seg; ++i, ++j) {
      kp[j] = kb + e + i * src.token_stride;
      vp[j] = vb + e + i * src.token_stride;
      if (so) so[j] = static_cast<int32_t>(sc + i * src.scale_token_stride);
    }
  }
  for (int64_t j = n; j < pad; ++j) {
    kp[j] = kp[0];
    vp[j] = vp[0];
    if (so) so[j] = so[0];
  }
}

// Both s8 tiles' rows: kp / vp / so for the tile's keys [j0, j0 + n) padded to `pad` with key 0
// (s8_walk), and kn / vn (and son, nullable) for the next tile's keys, padded to `pad` with this
// tile's rows (prefetched again: harmless) where the next tile is shorter or absent. Returns the
// next tile's key count (<= 0: none).
inline int64_t s8_walk_tiles(const KvSource& src, int64_t j0, int64_t n, int64_t pad, const uint8_t** kp, const uint8_t** vp,
                             int32_t* so, const uint8_t** kn, const uint8_t** vn, int32_t* son) {
  s8_walk(src, j0, n, pad, kp, vp, so);
  const int64_t nn = std::min(n, src.tokens - j0 - n);
  if (nn > 0) s8_walk(src, j0 + n, nn, 0, kn, vn, son);
  for (int64_t j = std::max<int64_t>(nn, 0); j < pad; ++j) kn[j] = kp[j], vn[j] = vp[j];
  return nn;
}

// The next tile's K (or V) lines in address order (token-major: every head's bytes of a token,
// then the next token), for the s8 tiles' prefetches (both ISAs, D % 64 == 0). The s8 passes
// read head-major (per head, each token's D bytes at a stride of Hkv * D); until session 7
// they also prefetched the next tile head-major, each pass the lines it was reading, from the
// next tile's rows. Prefetching
// the same number of lines per score unit / P.V group, but walking the next tile's bytes in
// address order (a tile of a 128-token block is one contiguous range of 32-64 KiB), keeps
// DRAM reads sequential: from DRAM 7-30% faster (2 threads; docs/design.md, session 7). The
// tile's lines are a few contiguous segments (one per block the tile touches, or one per token
// where the task's heads are not the token's whole row); line L of the walk is segment s's
// line L - line0[s]. issue(L, k) prefetches lines [L, L + k) (those that exist) into L2; the
// callers' L only grow during a tile, so the segment cursor only moves forward, and a run
// inside one segment (nearly every call) is k prefetches of consecutive lines, unrolled: a
// per-line walk with a division per line cost ~15% L3-resident.
struct NextTileLines {
  const uint8_t* ptr[kMaxTile];
  int64_t line0[kMaxTile + 1];  // first walk line of each segment; line0[nseg] = all lines
  int nseg = 0, cur = 0;
  // Keys [j0, j0 + n) of the array at base (head 0 of the task) with H * hs bytes per token.
  void build(const KvSource& src, const void* base, int64_t j0, int64_t n, int64_t row_bytes) {
    const uint8_t* b = static_cast<const uint8_t*>(base);
    const int64_t lpt = row_bytes / 64;
    const bool whole = row_bytes == src.token_stride;  // the task's heads are the whole token row
    int64_t blk = j0 / src.block_size, off = j0 % src.block_size, line = 0;
    nseg = cur = 0;
    for (int64_t j = 0; j < n; ++blk, off = 0) {
      const int64_t phys = src.block_table ? src.block_table[blk] : blk;
      const int64_t seg = std::min(src.block_size - off, n - j);
      const uint8_t* e = b + phys * src.block_stride + off * src.token_stride;
      for (int64_t i = 0; i < (whole ? 1 : seg); ++i) {
        ptr[nseg] = e + i * src.token_stride;
        line0[nseg++] = line;
        line += whole ? seg * lpt : lpt;
      }
      j += seg;
    }
    line0[nseg] = line;
  }
  [[gnu::always_inline]] inline void issue(int64_t L, int k) {
    while (cur + 1 < nseg && L >= line0[cur + 1]) ++cur;
    if (L + k <= line0[cur + 1]) {
      const uint8_t* p = ptr[cur] + (L - line0[cur]) * 64;
      #pragma GCC unroll 16
      for (int i = 0; i < k; ++i) prefetch_line_t1(p + 64 * i);
      return;
    }
    for (int i = 0; i < k; ++i, ++L) {
      while (cur + 1 < nseg && L >= line0[cur + 1]) ++cur;
      if (L >= line0[nseg]) return;
      prefetch_line_t1(ptr[cur] + (L - line0[cur]) * 64);
    }
  }
  // Line L's address when lines [L, L + k) lie in one segment (for a caller whose prefetches
  // sit in its own asm, a fixed k lines from one pointer); else issue(L, k) and nullptr (also
  // nullptr past the walk's end, where there is nothing to prefetch).
  [[gnu::always_inline]] inline const uint8_t* contiguous(int64_t L, int k) {
    while (cur + 1 < nseg && L >= line0[cur + 1]) ++cur;
    if (L + k <= line0[cur + 1]) return ptr[cur] + (L - line0[cur]) * 64;
    issue(L, k);
    return nullptr;
  }
};

// The end of a decode softmax step for R <= 4 rows (both ISAs' s8 tiles and the float
// decode's dec_softmax_f), row i in lane i: l = l * alpha + sums (each row's lane_tree8 of its
// probabilities), m = the new maxima mnv, and alpha out.
template <int R>
[[gnu::always_inline]] inline void softmax_store_state(__m128 sums, __m128 av, __m128 mnv, float* m, float* l, float* alpha) {
  alignas(16) float lo[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ln[4], al[4], mn[4];
  for (int i = 0; i < R; ++i) lo[i] = l[i];
  _mm_store_ps(ln, _mm_add_ps(_mm_mul_ps(_mm_load_ps(lo), av), sums));
  _mm_store_ps(al, av);
  _mm_store_ps(mn, mnv);
  for (int i = 0; i < R; ++i) {
    l[i] = ln[i];
    m[i] = mn[i];
    alpha[i] = al[i];
  }
}

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

}  // namespace

}  // namespace qllm::kernels
