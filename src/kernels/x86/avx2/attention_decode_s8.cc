// The avx2 ISA's decode tile for s8 KV caches (AttnKernels::decode with an s8 cache calls it from
// attention_decode.cc's decode_t in its AVX2 build; the avx512 ISA has its own, VNNI, in
// x86/avx512/attention_decode_s8.cc). The structure of the AVX-512 tile adapted to AVX2's 16 ymm
// registers and no VNNI: its own block-wise walk of the block table, the scales of 8 heads
// transposed once per tile, then head by head, per group of <= 4 query rows: scores of 4 rows x
// 2 keys per pass (exact int32 vpmaddwd sums), softmax and the 7-bit P.V weights of the 4 rows at
// once on the scores in key-pair order, then the integer P.V of all 4 rows per V interleave. Each
// pass prefetches a share of the next tile (in address order where D % 64 == 0, NextTileLines;
// else the head's rows, from the bytes it reads). The arithmetic is
// kernels/attention.h's (exact int32 q.k and P.V sums), so ref, avx2 and avx512 give the same bits.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/attention.h"
#include "kernels/x86/avx2/attention_common.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace {

// ---- q.k without VNNI ------------------------------------------------------------------------
//
// Zen 4 (this machine) issues vpmaddwd / vpmaddubsw / vpsignb / vpabsb / FMAs on the same two
// pipes, 2 per cycle, and vphaddd at one per 2 cycles (measured, /tmp microbenchmarks). So q.k
// takes the query as int16 (q16) and sign-extended K (vpmovsxbw, another pipe): 2 multiplies
// per 32 products, the floor without VNNI. (The byte forms cost 3: vpmaddubsw(|k|, q * sign(k))
// + vpmaddwd by 1 + the vpsignb; biased u8 k + 128 would saturate, docs/design.md session 4.)
// The horizontal sums use unpack / blend / vperm2i128 + add, never vphaddd.

// acc_a += q.ka, acc_b += q.kb for one row and 16 dims (ka / kb sign-extended K, q from memory),
// in place. Inline asm, expanded in the function body (a macro: through references or lambdas
// g++ kept the accumulators in memory): with the intrinsics, g++ 12 reassociated the unrolled
// chunk loop's integer sums into trees (spilling accumulators) or, in a rolled loop, summed into
// a new register and copied it back (8 vmovdqa per chunk).
#define QLLM_S8_ROW_DOT(acc_a, acc_b, qp, ka, kb)                                                     \
  do {                                                                                               \
    __m256i t0_, t1_;                                                                                \
    asm("vmovdqa %[q], %[t1]\n\t"                                                                    \
        "vpmaddwd %[t1], %[k0], %[t0]\n\t"                                                           \
        "vpmaddwd %[t1], %[k1], %[t1]\n\t"                                                           \
        "vpaddd %[t0], %[a], %[a]\n\t"                                                               \
        "vpaddd %[t1], %[b], %[b]"                                                                   \
        : [a] "+x"(acc_a), [b] "+x"(acc_b), [t0] "=&x"(t0_), [t1] "=&x"(t1_)                         \
        : [q] "m"(*reinterpret_cast<const __m256i*>(qp)), [k0] "x"(ka), [k1] "x"(kb));               \
  } while (0)

// Scores of R rows of one head for 2 keys (rows ka, kb): per 16 dims, each key's 16 bytes
// sign-extended once and multiplied into 8 int32 lane accumulators per (row, key) with the rows'
// q16 (vpmaddwd, exact: |pair| <= 2 * 127 * 128). Returns the sums as [key a: rows 0-3 | key b:
// rows 0-3] (rows >= R: 0): each accumulator's 128-bit halves are folded (blend + vperm2i128 +
// add: [a.lo + a.hi | b.hi + b.lo]), then a 4 x 4 transposing reduction (unpack32 / unpack64 +
// add) of the 4 rows. Integer sums: any order gives the same value. Live: 8 accumulators + 2 K
// + 1 q of the 16 ymm. NC > 0: D = 16 NC, the chunk loop fully unrolled (no loop overhead);
// NC = 0: any D, bytes past D load as 0 in the tail step (q16 is zero padded). pfa / pfb
// (nullable): the next tile's rows of the two keys, one prefetch per 64 bytes read.
template <int R, int NC>
[[gnu::always_inline]] inline __m256i s8_dot2(const int16_t* q16, int64_t Dq, int64_t D, const uint8_t* ka, const uint8_t* kb,
                                              const uint8_t* pfa, const uint8_t* pfb) {
  __m256i a0 = _mm256_setzero_si256(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;  // row r: keys a, b
  if constexpr (R == 4 && NC > 0) {
    // The whole pass of 4 rows x 2 keys x D in one asm block (GAS .rept over the 16-dim steps):
    // the q rows at constant displacements (row stride 32 NC bytes) from one register, K
    // sign-extended from memory, the first step writing the accumulators (no zeroing, 8 adds
    // fewer). In C++ (one asm block per row and step) g++ kept the 4 rows' q pointers on the
    // stack and reloaded one per row and step (a GPR load per 2 multiplies), and copied
    // accumulators with vmovdqa.
    __m256i k0, k1, t0, t1;
    const uint8_t* pa = pfa ? pfa : ka;  // no next tile: prefetch this tile's lines (in L1: harmless)
    const uint8_t* pb = pfa ? pfb : kb;
#define QLLM_S8_DOT4_ROW(r, FIRST)                                                        \
  "vmovdqa 2*qllm_qo+" #r "*%c[rs](%[q]), %[t1]\n\t"                                      \
  FIRST("vpmaddwd %[t1], %[k0], %[a" #r "]\n\t", "vpmaddwd %[t1], %[k0], %[t0]\n\t")        \
  FIRST("vpmaddwd %[t1], %[k1], %[b" #r "]\n\t", "vpmaddwd %[t1], %[k1], %[t1]\n\t")        \
  FIRST("", "vpaddd %[t0], %[a" #r "], %[a" #r "]\n\t")                                      \
  FIRST("", "vpaddd %[t1], %[b" #r "], %[b" #r "]\n\t")
#define QLLM_S8_FIRST(x, y) x
#define QLLM_S8_NEXT(x, y) y
#define QLLM_S8_DOT4_STEP(FIRST)                                                          \
  ".if (qllm_qo & 63) == 0\n\t"                                                            \
  "prefetcht1 qllm_qo(%[pa])\n\t"                                                          \
  "prefetcht1 qllm_qo(%[pb])\n\t"                                                          \
  ".endif\n\t"                                                                             \
  "vpmovsxbw qllm_qo(%[ka]), %[k0]\n\t"                                                    \
  "vpmovsxbw qllm_qo(%[kb]), %[k1]\n\t"                                                    \
  QLLM_S8_DOT4_ROW(0, FIRST) QLLM_S8_DOT4_ROW(1, FIRST) QLLM_S8_DOT4_ROW(2, FIRST) QLLM_S8_DOT4_ROW(3, FIRST) \
  ".set qllm_qo, qllm_qo + 16\n\t"
    asm(".set qllm_qo, 0\n\t"
        QLLM_S8_DOT4_STEP(QLLM_S8_FIRST)
        ".rept %c[nc] - 1\n\t"
        QLLM_S8_DOT4_STEP(QLLM_S8_NEXT)
        ".endr"
        : [a0] "=&x"(a0), [b0] "=&x"(b0), [a1] "=&x"(a1), [b1] "=&x"(b1), [a2] "=&x"(a2), [b2] "=&x"(b2), [a3] "=&x"(a3),
          [b3] "=&x"(b3), [k0] "=&x"(k0), [k1] "=&x"(k1), [t0] "=&x"(t0), [t1] "=&x"(t1)
        : [q] "r"(q16), [ka] "r"(ka), [kb] "r"(kb), [pa] "r"(pa), [pb] "r"(pb), [rs] "i"(32 * NC), [nc] "i"(NC),
          "m"(*reinterpret_cast<const int16_t(*)[64 * NC]>(q16)), "m"(*reinterpret_cast<const uint8_t(*)[16 * NC]>(ka)),
          "m"(*reinterpret_cast<const uint8_t(*)[16 * NC]>(kb)));
#undef QLLM_S8_DOT4_STEP
#undef QLLM_S8_DOT4_ROW
#undef QLLM_S8_FIRST
#undef QLLM_S8_NEXT
  } else {
  // With NC > 0 the row stride is the constant 16 NC (= decode_q16_width(D)), so the rows' chunks
  // can be one base register + displacements (in the tile g++ still reloads some row pointers
  // from the stack: the tile's other pointers take the GPRs).
  const int64_t qstride = NC > 0 ? 16 * NC : Dq;
  const int16_t* q1 = q16 + qstride;
  const int16_t* q2 = q16 + 2 * qstride;
  const int16_t* q3 = q16 + 3 * qstride;
  // One 16-dim step from byte d (a macro, not a lambda: see QLLM_S8_ROW_DOT).
#define QLLM_S8_DOT_STEP(d)                                                                            \
  do {                                                                                                 \
    if (pfa && (d) % 64 == 0) prefetch_line_t1(pfa + (d)), prefetch_line_t1(pfb + (d));                \
    const __m256i k0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ka + (d)))); \
    const __m256i k1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kb + (d)))); \
    QLLM_S8_ROW_DOT(a0, b0, q16 + (d), k0, k1);                                                        \
    if constexpr (R > 1) QLLM_S8_ROW_DOT(a1, b1, q1 + (d), k0, k1);                                    \
    if constexpr (R > 2) QLLM_S8_ROW_DOT(a2, b2, q2 + (d), k0, k1);                                    \
    if constexpr (R > 3) QLLM_S8_ROW_DOT(a3, b3, q3 + (d), k0, k1);                                    \
  } while (0)
  if constexpr (NC > 0) {
    #pragma GCC unroll 16
    for (int i = 0; i < NC; ++i) QLLM_S8_DOT_STEP(16 * i);
  } else {
    for (int64_t d = 0; d + 16 <= D; d += 16) QLLM_S8_DOT_STEP(d);
  }
#undef QLLM_S8_DOT_STEP
  if (NC == 0 && D % 16 != 0) {  // the last D % 16 bytes, zero padded (never read past the row)
    const int64_t d = D / 16 * 16;
    if (pfa && d % 64 == 0) prefetch_line_t1(pfa + d), prefetch_line_t1(pfb + d);
    alignas(16) uint8_t ba[16] = {}, bb[16] = {};
    std::memcpy(ba, ka + d, D - d);
    std::memcpy(bb, kb + d, D - d);
    const __m256i k0 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(ba)));
    const __m256i k1 = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(bb)));
    QLLM_S8_ROW_DOT(a0, b0, q16 + d, k0, k1);
    if constexpr (R > 1) QLLM_S8_ROW_DOT(a1, b1, q1 + d, k0, k1);
    if constexpr (R > 2) QLLM_S8_ROW_DOT(a2, b2, q2 + d, k0, k1);
    if constexpr (R > 3) QLLM_S8_ROW_DOT(a3, b3, q3 + d, k0, k1);
  }
  }
  // [a.lo + a.hi | b.hi + b.lo] per row, then the 4 x 4 transposing reduction of the rows.
  auto fold = [](__m256i a, __m256i b) { return _mm256_add_epi32(_mm256_blend_epi32(a, b, 0xf0), _mm256_permute2x128_si256(a, b, 0x21)); };
  const __m256i z = _mm256_setzero_si256();
  const __m256i v0 = fold(a0, b0), v1 = R > 1 ? fold(a1, b1) : z, v2 = R > 2 ? fold(a2, b2) : z, v3 = R > 3 ? fold(a3, b3) : z;
  const __m256i x = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
  const __m256i y = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y));
}
#undef QLLM_S8_ROW_DOT

// [a, a, a, a, b, b, b, b]: a key pair's scale for the 4 row lanes of each key.
inline __m256 pair_bcast(const float* p) { return _mm256_set_m128(_mm_set1_ps(p[1]), _mm_set1_ps(p[0])); }

// Scores of R rows (q16 rows from q, scales qsp) of one head for the tile's n keys (rows kp[j]
// + ho, scales ks), in key-pair order into ss (see s8_softmax_quant): s_j = (f32(q.k) * k_scale_j)
// * q_scale. Prefetches into L2 as K is read, one line per 64 bytes: with lines (D % 64 == 0),
// the next tile's K lines in address order, key pair j taking lines pl + j D / 64 on (2 D / 64
// of them; see NextTileLines); else with pf (nullable), the next tile's rows (+ ho).
template <int R, int NC>
[[gnu::always_inline]] inline void s8_scores(const int16_t* q, int64_t Dq, int64_t D, const uint8_t* const* kp, int64_t ho,
                                             const float* ks, __m256 qsp, int64_t n, const uint8_t* const* pf, NextTileLines* lines,
                                             int64_t pl, float* ss) {
  const int C = static_cast<int>(D / 64);
  for (int64_t j = 0; j < n; j += 2) {
    const uint8_t* pa = pf ? pf[j] + ho : nullptr;
    const uint8_t* pb = pf ? pf[j + 1] + ho : nullptr;
    if (lines) {  // each key's C lines from one pointer (s8_dot2 prefetches pa + 64 i, pb + 64 i)
      pa = lines->contiguous(pl + j * C, C);
      pb = lines->contiguous(pl + (j + 1) * C, C);
      if (!pa) pa = pb;  // a run across segments was issued line by line: prefetch the other twice
      if (!pb) pb = pa;
    }
    const __m256i dot = s8_dot2<R, NC>(q, Dq, D, kp[j] + ho, kp[j + 1] + ho, pa, pb);
    _mm256_store_ps(ss + 4 * j, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), pair_bcast(ks + j)), qsp));
  }
}

// e[i] = exp8(x[i] - mn) for the 4 score vectors at x (8 floats apart), each operation of exp8 done
// on the 4 vectors in turn: the same operations on each lane as exp8 (so the same bits), with
// the 4 independent chains (~60 cycles of latency each) interleaved instruction by instruction,
// so that the scheduler holds ready work from every chain instead of one chain's waiting tail.
// The upper clamp of exp8 (min with kExpHi) is kept: lanes of the rows >= R hold x = 0 and an
// odd n's padding key may exceed the row max.
[[gnu::always_inline]] inline void exp8x4(const float* x, __m256 mn, __m256* e) {
  __m256 v[4], n[4], r[4], p[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) v[i] = _mm256_sub_ps(_mm256_load_ps(x + 8 * i), mn);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) v[i] = _mm256_max_ps(_mm256_min_ps(v[i], _mm256_set1_ps(kExpHi)), _mm256_set1_ps(kExpLo));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    n[i] = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) r[i] = _mm256_fmadd_ps(n[i], _mm256_set1_ps(-kLn2Hi), v[i]);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) r[i] = _mm256_fmadd_ps(n[i], _mm256_set1_ps(-kLn2Lo), r[i]);
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_fmadd_ps(_mm256_set1_ps(kExpC6), r[i], _mm256_set1_ps(kExpC5));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(kExpC4));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(kExpC3));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(kExpC2));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_fmadd_ps(p[i], r[i], _mm256_set1_ps(kExpC1));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) p[i] = _mm256_add_ps(_mm256_fmadd_ps(p[i], _mm256_mul_ps(r[i], r[i]), r[i]), _mm256_set1_ps(1.0f));
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m256i ex = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[i]), _mm256_set1_epi32(127)), 23);
    e[i] = _mm256_mul_ps(p[i], _mm256_castsi256_ps(ex));
  }
}

// Softmax step of R rows over the tile's n keys and the rows' 7-bit P.V weights, on the scores
// in key-pair order: ss + 8 p holds keys 2p, 2p + 1 as [key 2p: rows 0-3 | key 2p + 1: rows 0-3]
// (rows >= R: lanes whose results are dropped), so every vector op serves 4 rows and 2 keys and
// the per-row reductions are one fold of the 128-bit halves. Per row the arithmetic is
// kernels/attention.h's: mt = max of the scores, m' = max(mt, m), alpha = m == -inf ? 0 :
// exp_qllm(m - m') (exp8's lanes are exp_qllm), p_j = exp_qllm(s_j - m'), l = l * alpha +
// lane_tree8(lanes), lane i adding the p_j with j % 8 == i in key order: keys 2p and 2p + 1 sit
// in the halves of pair p, so S[p % 4]'s low half adds class 2 (p % 4), its high half class
// 2 (p % 4) + 1, in key order, and ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)) is
// (S0 + S1) + (S2 + S3) over the folded halves. w_j = p_j * v_scale_j goes back into ss (L1)
// between the block's max and its quantisation (16 vectors per block do not fit the registers).
// Weights: wq + 16 gi + 4 r = row r's bytes of keys 4 gi .. 4 gi + 3 (the dword the P.V
// broadcasts; keys past n weigh 0), sw[r * 4 + b] block b's scale (0: the block adds nothing,
// its bytes are 0), alpha[r] the rescale of acc.
template <int R>
[[gnu::always_inline]] inline void s8_softmax_quant(float* ss, int64_t n, const float* vs, float* m, float* l, uint8_t* wq, float* sw,
                                                    float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const int64_t n2 = (n + 1) / 2, full = n / 2;  // pairs; pairs with both keys < n
  const __m256 lo4 = _mm256_castsi256_ps(_mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0));  // key 2p only
  __m256 mx0 = ninf, mx1 = ninf;
  int64_t p = 0;
  for (; p + 2 <= full; p += 2)
    mx0 = _mm256_max_ps(_mm256_load_ps(ss + 8 * p), mx0), mx1 = _mm256_max_ps(_mm256_load_ps(ss + 8 * p + 8), mx1);
  if (p < full) mx0 = _mm256_max_ps(_mm256_load_ps(ss + 8 * p), mx0);
  if (full < n2) mx1 = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_load_ps(ss + 8 * full), lo4), mx1);
  const __m256 mx = _mm256_max_ps(mx0, mx1);
  alignas(16) float mo[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
  for (int i = 0; i < R; ++i) mo[i] = m[i];
  const __m128 mov = _mm_load_ps(mo);
  const __m128 mnv = _mm_max_ps(_mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1)), mov);  // max_ps(mt, m)
  // alpha = m == -inf ? 0 : exp_qllm(m - m'), the 4 rows in the lanes of one exp8.
  const __m128 e4 = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(mov, mnv))));
  const __m128 av = _mm_andnot_ps(_mm_cmpeq_ps(mov, _mm_set1_ps(kNegInf)), e4);
  const __m256 mn2 = _mm256_set_m128(mnv, mnv);
  __m256 S[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) S[i] = _mm256_setzero_ps();
  const __m256i top = _mm256_set1_epi32(127);
  // packs / packus leave the keys' row dwords as 0 2 4 6 | 1 3 5 7; vpermd orders them, then
  // vpshufb transposes each 4 keys x 4 rows of bytes to 4 rows x 4 keys.
  const __m256i korder = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3,
                                      7, 11, 15);
  alignas(16) float swb[4];
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += kDecPvBlock, ++b) {
    static_assert(kDecPvBlock == 32 && kMaxTile % 32 == 0);
    const int64_t p0 = b0 / 2, p1 = std::min(n2, p0 + kDecPvBlock / 2);
    __m256 bm0 = _mm256_setzero_ps(), bm1 = _mm256_setzero_ps();
    for (int64_t q = p0; q < p1; q += 4) {
      if (q + 4 <= full && q + 4 <= p1) {  // 4 complete pairs: their exps interleaved, no branches
        __m256 e[4];
        exp8x4(ss + 8 * q, mn2, e);
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          S[i] = _mm256_add_ps(S[i], e[i]);
          const __m256 w = _mm256_mul_ps(e[i], pair_bcast(vs + 2 * (q + i)));
          _mm256_store_ps(ss + 8 * (q + i), w);
          if (i % 2) bm1 = _mm256_max_ps(bm1, w);
          else bm0 = _mm256_max_ps(bm0, w);
        }
        continue;
      }
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        if (i > 0 && q + i >= p1) break;
        float* sp = ss + 8 * (q + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sp), mn2));
        if (q + i == full) e = _mm256_and_ps(e, lo4);  // odd n: key n is padding (0 in the lane sums: exact)
        S[i] = _mm256_add_ps(S[i], e);
        const __m256 w = _mm256_mul_ps(e, pair_bcast(vs + 2 * (q + i)));  // vs is 0 past n
        _mm256_store_ps(sp, w);
        if (i % 2) bm1 = _mm256_max_ps(bm1, w);
        else bm0 = _mm256_max_ps(bm0, w);
      }
    }
    // The block's max weight per row (>= 0), then the quantisation of its weights.
    const __m256 bm = _mm256_max_ps(bm0, bm1);
    const __m128 wmax = _mm_max_ps(_mm256_castps256_ps128(bm), _mm256_extractf128_ps(bm, 1));
    const __m128 ok = _mm_cmpge_ps(wmax, _mm_set1_ps(kDecPvMinWeight));
    const __m128 inv = _mm_and_ps(ok, _mm_div_ps(_mm_set1_ps(127.0f), wmax));
    _mm_store_ps(swb, _mm_and_ps(ok, _mm_div_ps(wmax, _mm_set1_ps(127.0f))));
    const __m256 iv = _mm256_set_m128(inv, inv);
    for (int64_t q = p0; q < p1; q += 4) {  // 8 keys: 4 pairs -> 32 bytes
      __m256i x[4];
      #pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)  // cvtps rounds to nearest even (MXCSR default), like nearbyint
        x[i] = q + i < p1 ? _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(ss + 8 * (q + i)), iv)), top)
                          : _mm256_setzero_si256();
      const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(x[0], x[1]), _mm256_packs_epi32(x[2], x[3]));
      _mm256_store_si256(reinterpret_cast<__m256i*>(wq + 8 * q), _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(bytes, korder), tr));
    }
    for (int i = 0; i < R; ++i) sw[i * 4 + b] = swb[i];
  }
  // l = l * alpha + lane_tree8(lane sums), the 4 rows at once.
  __m128 t[4];
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) t[i] = _mm_add_ps(_mm256_castps256_ps128(S[i]), _mm256_extractf128_ps(S[i], 1));
  softmax_store_state<R>(_mm_add_ps(_mm_add_ps(t[0], t[1]), _mm_add_ps(t[2], t[3])), av, mnv, m, l, alpha);
}

// 32 bytes of a V row from byte d, zero past D (the tail chunk: never reads past the row).
template <bool Tail>
[[gnu::always_inline]] inline __m256i load_v32(const uint8_t* row, int64_t d, int64_t D) {
  if constexpr (!Tail) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + d));
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, row + d, D - d);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// a0 += sum over the 4 keys of w_j x0_j, a1 likewise for x1 (int32 lanes): one row's 7-bit
// weights broadcast from wp (vpbroadcastd), vpmaddubsw (u8 weights x s8 values, pairs into
// int16: exact) then vpmaddwd by 1 (into int32). Inline asm in the function body (a macro), so
// that the accumulators stay in place in registers: g++ 12 hoisted the 4 rows' broadcasts
// ahead of the multiplies and spilled 2 of the 8 accumulators (a load + store each per group).
#define QLLM_S8_ROW_PV(acc0, acc1, wp, x0, x1, one)                                                   \
  do {                                                                                               \
    __m256i t0_, t1_;                                                                                \
    asm("vpbroadcastd %[w], %[t0]\n\t"                                                               \
        "vpmaddubsw %[v1], %[t0], %[t1]\n\t"                                                         \
        "vpmaddubsw %[v0], %[t0], %[t0]\n\t"                                                         \
        "vpmaddwd %[o], %[t0], %[t0]\n\t"                                                            \
        "vpmaddwd %[o], %[t1], %[t1]\n\t"                                                            \
        "vpaddd %[t0], %[a0], %[a0]\n\t"                                                             \
        "vpaddd %[t1], %[a1], %[a1]"                                                                 \
        : [a0] "+x"(acc0), [a1] "+x"(acc1), [t0] "=&x"(t0_), [t1] "=&x"(t1_)                         \
        : [w] "m"(*reinterpret_cast<const int32_t*>(wp)), [v0] "x"(x0), [v1] "x"(x1), [o] "x"(one)); \
  } while (0)

// One 4-key group of s8_pv16 for 4 rows: x0 / x1 = the two unpack16 levels of the unpack8 (lo or
// hi: OP) of rows 0/1 and 2/3, then per row the broadcast weights into x1's place (t0, t1: the
// two vpmaddubsw + vpmaddwd by 1 chains) and the adds into the row's accumulators.
#define QLLM_S8_PV4_ROW(a0, a1, w)               \
  "vpbroadcastd %[" #w "], %[t1]\n\t"          \
  "vpmaddubsw %[x1], %[t1], %[t0]\n\t"         \
  "vpmaddubsw %[x0], %[t1], %[t1]\n\t"         \
  "vpmaddwd %[o], %[t1], %[t1]\n\t"            \
  "vpmaddwd %[o], %[t0], %[t0]\n\t"            \
  "vpaddd %[t1], %[" #a0 "], %[" #a0 "]\n\t"   \
  "vpaddd %[t0], %[" #a1 "], %[" #a1 "]\n\t"
#define QLLM_S8_PV4_ASM(OP)                       \
  "vmovdqu %[r0], %[x0]\n\t"                    \
  OP " %[r1], %[x0], %[x0]\n\t"                 \
  "vmovdqu %[r2], %[t0]\n\t"                    \
  OP " %[r3], %[t0], %[t0]\n\t"                 \
  "vpunpckhwd %[t0], %[x0], %[x1]\n\t"          \
  "vpunpcklwd %[t0], %[x0], %[x0]\n\t"          \
  QLLM_S8_PV4_ROW(a00, a01, w0)                  \
  QLLM_S8_PV4_ROW(a10, a11, w1)                  \
  QLLM_S8_PV4_ROW(a20, a21, w2)                  \
  QLLM_S8_PV4_ROW(a30, a31, w3)

// Integer P.V of R rows of one head over the tile (blocks of 32 keys), for 16 of the 32 dims
// from d: Hi = false dims d + 0-7 and d + 16-23, Hi = true d + 8-15 and d + 24-31. 4 keys at a
// time, their V rows byte-interleaved (one unpack8 level, lo or hi, and two unpack16) so that
// X[i] dword lane holds one dim of the 4 keys; vpmaddubsw with the row's broadcast 4 weights
// (u8 <= 127 x s8: a pair is at most 2 * 127 * 128 < 32768, exact) then vpmaddwd by 1 adds
// sum_j wq_j v_j into int32, exact. Two 16-dim halves (not one 32-dim pass) so that all R <= 4
// rows share each interleave in 8 accumulators (4 rows x 32 dims would need 16, all of AVX2's
// registers; the old AVX2 form took 2 rows at a time and redid the interleave per row pair),
// at no extra shuffle: each half uses only its own unpack8 outputs. Per block and row, the sums
// go into acc with one FMA per dim (vperm2i128 puts the dims back in order), acc first
// multiplied by the row's alpha in block 0 (the same product as the reference's rescale); a
// row whose block adds nothing (sw = 0) keeps acc (block 0: acc * alpha), as the reference.
// vr[j] (j < round_up(n, 4)) is key j's V row (+ vo); keys past n have weight 0. Prefetches
// one line per 4-key group and 64 bytes of V: with lines (D % 64 == 0), the next tile's V lines
// in address order, lines pl + (d / 64) round_up(n, 4) + j for the group of key j; else with pf
// (nullable), the next tile's rows of this head. The
// weights of row r for keys 4 gi .. 4 gi + 3 are the dword at wq + 16 gi + 4 r (s8_softmax_quant).
template <int R, bool Hi, bool Tail>
[[gnu::always_inline]] inline void s8_pv16(const uint8_t* wq, const float* sw, const float* alpha, const uint8_t* const* vr,
                                           int64_t vo, int64_t n, int64_t d, int64_t D, int64_t Dp, float* acc, int64_t acc_stride,
                                           const uint8_t* const* pf, NextTileLines* lines, int64_t pl) {
  const int64_t lc = pl + d / 64 * ((n + 3) / 4 * 4);  // the first slot of this 64-byte chunk
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t base = d + (Hi ? 8 : 0);  // dims base .. base + 7 and base + 16 .. base + 23
  // Block b's sums of row r into acc (one FMA per dim, vperm2i128 putting the dims in order).
  auto store = [&](int r, int64_t b0, int64_t b, __m256i A0, __m256i A1) {
    // A0 lanes: dims base + 0-3 | base + 16-19, A1: base + 4-7 | base + 20-23.
    const __m256i N[2] = {_mm256_permute2x128_si256(A0, A1, 0x20), _mm256_permute2x128_si256(A0, A1, 0x31)};
    const float w = sw[r * 4 + b];
    float* ap = acc + r * acc_stride + base;
    #pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
      if (base + 16 * i >= Dp) break;  // Dp is a multiple of 8: a chunk is wholly in or out
      __m256 x = _mm256_load_ps(ap + 16 * i);
      if (b0 == 0) x = _mm256_mul_ps(x, _mm256_set1_ps(alpha[r]));
      if (w != 0.0f) x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(N[i]), _mm256_set1_ps(w), x);
      _mm256_store_ps(ap + 16 * i, x);
    }
  };
  for (int64_t b0 = 0, b = 0; b0 < n; b0 += kDecPvBlock, ++b) {
    bool any = b0 == 0;  // block 0 also applies alpha
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) any = any || sw[r * 4 + b] != 0.0f;
    if (!any) continue;  // no row's weights in this block (the reference skips it)
    const int64_t groups = (std::min<int64_t>(n, b0 + kDecPvBlock) - b0 + 3) / 4;
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const uint8_t* w = wq + 4 * b0;
    for (int64_t gi = 0; gi < groups; ++gi, w += 16) {
      const uint8_t* const* p = vr + b0 + 4 * gi;
      if (lines) {
        lines->issue(lc + b0 + 4 * gi, 4);
      } else if (pf) {
        const uint8_t* const* pn = pf + b0 + 4 * gi;
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) prefetch_line_t1(pn[i] + vo + d);
      }
      if constexpr (R == 4 && !Tail) {
        // The whole group in one asm block (rows 32 bytes from p[i] + vo + d): with separate
        // statements g++ still spilled 2 accumulators and shuffled the others with vmovdqa.
        __m256i x0, x1, t0, t1;
#define QLLM_S8_PV4_OPERANDS                                                                                                     \
  : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11), [a20] "+x"(a20), [a21] "+x"(a21), [a30] "+x"(a30),        \
    [a31] "+x"(a31), [x0] "=&x"(x0), [x1] "=&x"(x1), [t0] "=&x"(t0), [t1] "=&x"(t1)                                                \
  : [r0] "m"(*reinterpret_cast<const __m256i*>(p[0] + vo + d)), [r1] "m"(*reinterpret_cast<const __m256i*>(p[1] + vo + d)),       \
    [r2] "m"(*reinterpret_cast<const __m256i*>(p[2] + vo + d)), [r3] "m"(*reinterpret_cast<const __m256i*>(p[3] + vo + d)),       \
    [w0] "m"(*reinterpret_cast<const int32_t*>(w)), [w1] "m"(*reinterpret_cast<const int32_t*>(w + 4)),                           \
    [w2] "m"(*reinterpret_cast<const int32_t*>(w + 8)), [w3] "m"(*reinterpret_cast<const int32_t*>(w + 12)), [o] "x"(ones)
        if constexpr (Hi) asm(QLLM_S8_PV4_ASM("vpunpckhbw") QLLM_S8_PV4_OPERANDS);
        else asm(QLLM_S8_PV4_ASM("vpunpcklbw") QLLM_S8_PV4_OPERANDS);
#undef QLLM_S8_PV4_OPERANDS
        continue;
      }
      const __m256i v0 = load_v32<Tail>(p[0] + vo, d, D), v1 = load_v32<Tail>(p[1] + vo, d, D);
      const __m256i v2 = load_v32<Tail>(p[2] + vo, d, D), v3 = load_v32<Tail>(p[3] + vo, d, D);
      const __m256i a = Hi ? _mm256_unpackhi_epi8(v0, v1) : _mm256_unpacklo_epi8(v0, v1);
      const __m256i c = Hi ? _mm256_unpackhi_epi8(v2, v3) : _mm256_unpacklo_epi8(v2, v3);
      const __m256i X0 = _mm256_unpacklo_epi16(a, c), X1 = _mm256_unpackhi_epi16(a, c);
      QLLM_S8_ROW_PV(a00, a01, w, X0, X1, ones);
      if constexpr (R > 1) QLLM_S8_ROW_PV(a10, a11, w + 4, X0, X1, ones);
      if constexpr (R > 2) QLLM_S8_ROW_PV(a20, a21, w + 8, X0, X1, ones);
      if constexpr (R > 3) QLLM_S8_ROW_PV(a30, a31, w + 12, X0, X1, ones);
    }
    store(0, b0, b, a00, a01);
    if constexpr (R > 1) store(1, b0, b, a10, a11);
    if constexpr (R > 2) store(2, b0, b, a20, a21);
    if constexpr (R > 3) store(3, b0, b, a30, a31);
  }
}
#undef QLLM_S8_ROW_PV
#undef QLLM_S8_PV4_ASM
#undef QLLM_S8_PV4_ROW

// P.V of R rows of one head: the 32-dim chunks of Dp, each as two s8_pv16 halves (a half whose
// dims all lie past Dp is skipped); the first half of a chunk at a 64-byte boundary prefetches.
template <int R>
[[gnu::always_inline]] inline void s8_pv(const uint8_t* wq, const float* sw, const float* alpha, const uint8_t* const* vr,
                                         int64_t vo, int64_t n, int64_t D, int64_t Dp, float* acc, int64_t acc_stride,
                                         const uint8_t* const* pf, NextTileLines* lines, int64_t pl) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    const bool first = d % 64 == 0;
    s8_pv16<R, false, false>(wq, sw, alpha, vr, vo, n, d, D, Dp, acc, acc_stride, first ? pf : nullptr, first ? lines : nullptr, pl);
    s8_pv16<R, true, false>(wq, sw, alpha, vr, vo, n, d, D, Dp, acc, acc_stride, nullptr, nullptr, pl);
  }
  if (d < Dp) {
    const bool first = d % 64 == 0;
    s8_pv16<R, false, true>(wq, sw, alpha, vr, vo, n, d, D, Dp, acc, acc_stride, first ? pf : nullptr, first ? lines : nullptr, pl);
    if (d + 8 < Dp) s8_pv16<R, true, true>(wq, sw, alpha, vr, vo, n, d, D, Dp, acc, acc_stride, nullptr, nullptr, pl);
  }
}

// Scales of nh <= 8 consecutive heads (sc: head 0's scale array) for the tile's keys (so: their
// offsets, padded to a multiple of 8), transposed to out[h * kMaxTile + j], 0 for keys j >= n up
// to the next multiple of 8: with all 8 heads, 8 keys' 8 heads as 8 vectors and an in-register
// 8 x 8 transpose (24 shuffles per 8 keys and 8 heads, no gather); fewer heads (a task that
// covers < 8 KV heads at the end) one scalar per key and head.
inline void s8_scales(const float* sc, const int32_t* so, int64_t n, int64_t nh, float* out) {
  const int64_t n8 = (n + 7) / 8 * 8;
  if (nh < 8) {
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t j = 0; j < n8; ++j) out[h * kMaxTile + j] = j < n ? sc[so[j] + h] : 0.0f;
    return;
  }
  for (int64_t j = 0; j < n8; j += 8) {
    __m256 r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(sc + so[j + i]);
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    // u[i] (i < 4) lanes: head i of keys 0-3 | head i + 4 of keys 0-3; u[4 + i] the same for keys 4-7.
    const __m256 keep = _mm256_castsi256_ps(lane_mask(0, n - j));
    for (int h = 0; h < 4; ++h) {
      _mm256_store_ps(out + h * kMaxTile + j, _mm256_and_ps(keep, _mm256_permute2f128_ps(u[h], u[h + 4], 0x20)));
      _mm256_store_ps(out + (h + 4) * kMaxTile + j, _mm256_and_ps(keep, _mm256_permute2f128_ps(u[h], u[h + 4], 0x31)));
    }
  }
}

}  // namespace


namespace avx2 {

// The s8 tile of decode_t on the AVX2 build: per head, per group of <= 4 rows, scores,
// softmax + weights and P.V as above.
void attn_decode_s8(const int16_t* q16, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
                    const KvSource& src, int64_t j0, int64_t n, float* m, float* l, float* acc) {
  const int64_t hs = D, Dq = decode_q16_width(D), n8 = (n + 7) / 8 * 8;
  // K / V rows of the tile's keys (head 0) and their scale offsets (floats from k_scale /
  // v_scale: the same layout), padded to 8 keys with key 0 (scores ignored, weight 0).
  const uint8_t* kp[kMaxTile];
  const uint8_t* vp[kMaxTile];
  alignas(32) int32_t so[kMaxTile];
  // The next tile's rows (prefetched by the passes).
  const uint8_t* kn[kMaxTile];
  const uint8_t* vn[kMaxTile];
  const int64_t nn = s8_walk_tiles(src, j0, n, n8, kp, vp, so, kn, vn, nullptr);
  if (nn > 0) {
    // The next tile's K/V scale lines (a separate [block, token, head] f32 array): without this
    // prefetch every block's scale lines missed to DRAM (session 4). One per line.
    const char* last = nullptr;
    for (int64_t j = 0; j < nn; ++j) {
      const int64_t jj = j0 + n + j;
      const int64_t blk = jj / src.block_size, phys = src.block_table ? src.block_table[blk] : blk;
      const int64_t so_n = phys * src.scale_block_stride + (jj % src.block_size) * src.scale_token_stride;
      const char* sl = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(src.k_scale + so_n) & ~uintptr_t{63});
      if (sl == last) continue;
      last = sl;
      prefetch_line_t0(sl);
      prefetch_line_t0(src.v_scale + so_n);
    }
  }
  // D a multiple of 64: the next tile's K / V prefetched in address order (NextTileLines, as the
  // AVX-512 tile): head h's score passes take K slots from h round_up(n, 2) D / 64 on, its P.V
  // groups V slots from h round_up(n, 4) D / 64 on, so the walk spreads over the tile's work.
  // Other head sizes prefetch each head's own rows of the next tile (kn / vn).
  const bool seq = D % 64 == 0 && nn > 0;
  NextTileLines kpf, vpf;
  if (seq) {
    kpf.build(src, src.k, j0 + n, nn, H * hs);
    vpf.build(src, src.v, j0 + n, nn, H * hs);
  }
  alignas(32) float kst[8 * kMaxTile], vst[8 * kMaxTile];  // scales of 8 heads, [head][key]
  alignas(32) float ss[4 * kMaxTile];                       // scores / weights, key-pair order
  alignas(32) uint8_t wq[4 * kMaxTile];                     // 7-bit weights, [4-key group][row][key]
  for (int64_t h = 0; h < H; ++h) {
    if (h % 8 == 0) {
      s8_scales(src.k_scale + h, so, n, std::min<int64_t>(8, H - h), kst);
      s8_scales(src.v_scale + h, so, n, std::min<int64_t>(8, H - h), vst);
    }
    const float* ks = kst + (h % 8) * kMaxTile;
    const float* vs = vst + (h % 8) * kMaxTile;
    const int64_t ho = h * hs;  // head h's rows: ho bytes after head 0's
    for_groups(g, [&]<int R>(int64_t r) {
      const int64_t row = h * RH + r;
      alignas(16) float qv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int i = 0; i < R; ++i) qv[i] = qs[row + i];
      const __m256 qsp = _mm256_set_m128(_mm_load_ps(qv), _mm_load_ps(qv));
      // The first row group prefetches the next tile's rows of the head (K here, V in the P.V),
      // from the bytes it reads: spread evenly over the work, in the order the next tile reads.
      const bool pfr = r == 0;
      const uint8_t* const* pf = pfr && !seq ? kn : nullptr;
      NextTileLines* kl = pfr && seq ? &kpf : nullptr;
      const int64_t kpl = h * ((n + 1) / 2 * 2) * (D / 64);
      const int16_t* qr = q16 + row * Dq;
      if (D == 128) s8_scores<R, 8>(qr, Dq, D, kp, ho, ks, qsp, n, pf, kl, kpl, ss);
      else if (D == 64) s8_scores<R, 4>(qr, Dq, D, kp, ho, ks, qsp, n, pf, kl, kpl, ss);
      else s8_scores<R, 0>(qr, Dq, D, kp, ho, ks, qsp, n, pf, kl, kpl, ss);
      float sw[4 * 4], alpha[4];
      s8_softmax_quant<R>(ss, n, vs, m + row, l + row, wq, sw, alpha);
      s8_pv<R>(wq, sw, alpha, vp, ho, n, D, Dp, acc + row * Dp, Dp, pfr && !seq ? vn : nullptr, pfr && seq ? &vpf : nullptr,
               h * ((n + 3) / 4 * 4) * (D / 64));
    });
  }
}

}  // namespace avx2

}  // namespace qllm::kernels
