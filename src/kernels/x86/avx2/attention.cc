// AVX2 tile kernels of flash attention and paged prefill (load_kv, attend: the arithmetic of
// kernels/attention.h, bit-identical to ref). The decode kernel is attention_decode.cc, the
// helpers both use attention_common.h; the avx512 ISA compiles both files again (QLLM_ATTN_VNNI).
//
// AVX2 attend works on blocks of up to 12 query rows (AVX-512: groups of 4 rows):
//  - scores: 3 rows x 4 keys = 12 8-lane FMA chains over 8-dim chunks (scores3), one tree4 per
//    row giving the 4 keys' lane_tree8 sums in one 16-byte store (AVX-512: 4 rows x 8 keys in zmm);
//  - softmax: exp8 over whole 8-key chunks, masked only where a chunk cuts a row's visible keys;
//    AVX2 does 4 rows at once with vector max / alpha / sum tails (softmax_rows);
//  - P.V: 4 rows x 24 dims = 12 accumulators (pv4; AVX-512: 4 x 64), each V chunk loaded once and
//    used by every row, probabilities broadcast from the score buffer; the K/V tile is f32 in L1.
// 12 chains, not 8: 8 chains of 4-cycle FMA latency on 2 pipes leave no slack for loads or the
// loop; 12 accumulators + the operands fill AVX2's 16 registers exactly.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/norm.h"
#include "kernels/x86/avx2/attention_common.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels {

namespace {

// Prefetch distance: the next tile. A tile is ~16-32 KB of K+V, i.e. a few microseconds of DRAM
// streaming, which covers the memory latency with room to spare.
void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
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

// Calls f(i, off, soff) for tokens j0 + i, i in [0, n): off the element offset of the token's
// row, soff that of its scale. Within a block the rows are token_stride apart, so the division
// by block_size and the block-table lookup happen once per block, not once per row (they were
// ~half of load_kv's own cost, with the per-row dtype switch).
template <class F>
[[gnu::always_inline]] inline void for_rows(const KvSource& s, int64_t j0, int64_t n, F&& f) {
  for (int64_t i = 0; i < n;) {
    const int64_t t = j0 + i, blk = t / s.block_size, in = t % s.block_size;
    const int64_t cnt = std::min(n - i, s.block_size - in);
    const int64_t phys = s.block_table ? s.block_table[blk] : blk;
    int64_t off = phys * s.block_stride + in * s.token_stride;
    int64_t soff = phys * s.scale_block_stride + in * s.scale_token_stride;
    for (int64_t e = i + cnt; i < e; ++i, off += s.token_stride, soff += s.scale_token_stride) f(i, off, soff);
  }
}

// One row of dtype T at p (element pointer) as f32, chunk c of 8 at out + c * cs; zeros to Dp.
template <DType T>
[[gnu::always_inline]] inline void convert_row(const void* p, float sc, int64_t D, int64_t Dp, float* out, int64_t cs) {
  auto at = [&](int64_t d) { return out + d / 8 * cs + d % 8; };
  int64_t d = 0;
  if constexpr (T == DType::f16) {
    const uint16_t* x = static_cast<const uint16_t*>(p);
    for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + d))));
    for (; d < D; ++d) *at(d) = f16_to_f32(x[d]);
  } else if constexpr (T == DType::bf16) {
    const uint16_t* x = static_cast<const uint16_t*>(p);
    for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), avx2::load8(DType::bf16, x + d));
    for (; d < D; ++d) *at(d) = bf16_to_f32(x[d]);
  } else if constexpr (T == DType::s8) {
    const int8_t* x = static_cast<const int8_t*>(p);
    const __m256 sv = _mm256_set1_ps(sc);
    for (; d + 8 <= D; d += 8) {
      const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + d)));
      _mm256_store_ps(at(d), _mm256_mul_ps(_mm256_cvtepi32_ps(w), sv));
    }
    for (; d < D; ++d) *at(d) = static_cast<float>(x[d]) * sc;
  } else {
    const float* x = static_cast<const float*>(p);
    for (; d + 8 <= D; d += 8) _mm256_store_ps(at(d), _mm256_loadu_ps(x + d));
    for (; d < D; ++d) *at(d) = x[d];
  }
  for (; d < Dp; ++d) *at(d) = 0.0f;
}

template <DType T>
void load_kv_t(const KvSource& s, int64_t j0, int64_t n, int64_t D, int64_t Dp, float* kt, float* vt) {
  constexpr int64_t es = T == DType::s8 ? 1 : T == DType::f32 ? 4 : 2;
  const int64_t row_bytes = D * es;
  // Element offsets of the next tile's rows (if those tokens exist; their block-table entries
  // were validated), prefetched one row per converted row.
  int64_t next[kMaxTile];  // Problem::Tk() <= kMaxTile
  const int64_t nn = std::clamp<int64_t>(s.tokens - (j0 + n), 0, std::min<int64_t>(n, kMaxTile));
  for_rows(s, j0 + n, nn, [&](int64_t i, int64_t off, int64_t) { next[i] = off * es; });
  const char* kb = static_cast<const char*>(s.k);
  const char* vb = static_cast<const char*>(s.v);
  for_rows(s, j0, n, [&](int64_t i, int64_t off, int64_t soff) {
    if (i < nn) {
      prefetch_row(kb + next[i], row_bytes);
      prefetch_row(vb + next[i], row_bytes);
    }
    const float ks = T == DType::s8 ? s.k_scale[soff] : 0.0f, vs = T == DType::s8 ? s.v_scale[soff] : 0.0f;
    convert_row<T>(kb + off * es, ks, D, Dp, kt_row(kt, i, Dp), kKtChunkStride);
    convert_row<T>(vb + off * es, vs, D, Dp, vt + i * Dp, 8);
  });
  for (int64_t j = n; j < key_stride(n); ++j) zero_row(Dp, kt_row(kt, j, Dp), kKtChunkStride);
}

void load_kv(const KvSource& s, int64_t j0, int64_t n, int64_t D, int64_t Dp, float* kt, float* vt) {
  switch (s.dtype) {
    case DType::f16: load_kv_t<DType::f16>(s, j0, n, D, Dp, kt, vt); break;
    case DType::bf16: load_kv_t<DType::bf16>(s, j0, n, D, Dp, kt, vt); break;
    case DType::s8: load_kv_t<DType::s8>(s, j0, n, D, Dp, kt, vt); break;
    default: load_kv_t<DType::f32>(s, j0, n, D, Dp, kt, vt); break;
  }
}

#if QLLM_ATTN_VNNI
// hadd of zmm pairs, per 128-bit lane like _mm256_hadd_ps: a01 a23 b01 b23 in each lane.
inline __m512 hadd512(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
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

// Scores of 3 rows x 4 keys = 12 independent FMA chains: 8 chains of 4-cycle FMA latency on 2
// pipes leave no slack (any load or loop hiccup stalls them), 12 do. Per 8-dim chunk the 3
// query chunks stay in registers and each K chunk is loaded once into the 16th register and
// used by the 3 rows (7 loads per 12 FMAs; the empty asm keeps g++ from folding the K loads
// into the FMAs as memory operands, which would load each K chunk 3 times). The same chains and
// the same tree4 sums per row as scores_rows, so the same bits.
void scores3(const float* q, int64_t Dp, const float* kt, int64_t ns, int64_t ua, int64_t ub, float* s) {
  for (int64_t j = ua / 4 * 4; j < ub; j += 4) {
    __m256 c[3][4];
    for (int r = 0; r < 3; ++r)
      for (int i = 0; i < 4; ++i) c[r][i] = _mm256_setzero_ps();
    const float* k0 = kt + j * Dp;
    for (int64_t d = 0; d < Dp; d += 8) {
      __m256 q0 = _mm256_load_ps(q + d), q1 = _mm256_load_ps(q + Dp + d), q2 = _mm256_load_ps(q + 2 * Dp + d);
      asm("" : "+x"(q0), "+x"(q1), "+x"(q2));
      for (int i = 0; i < 4; ++i) {
        __m256 kv = _mm256_load_ps(k0 + i * Dp + d);
        asm("" : "+x"(kv));
        c[0][i] = _mm256_fmadd_ps(q0, kv, c[0][i]);
        c[1][i] = _mm256_fmadd_ps(q1, kv, c[1][i]);
        c[2][i] = _mm256_fmadd_ps(q2, kv, c[2][i]);
      }
    }
    // tree4 with each hadd written as two shufps + add (the same pair sums, a0 + a1 etc.): in
    // an L1-resident 12-row test 2% (D64) to 7-10% (D128) faster than vhaddps here.
    auto hadd = [](__m256 x, __m256 y) { return _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x88), _mm256_shuffle_ps(x, y, 0xDD)); };
    for (int r = 0; r < 3; ++r) {
      const __m256 t = hadd(hadd(c[r][0], c[r][1]), hadd(c[r][2], c[r][3]));
      _mm_storeu_ps(s + r * ns + j, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
    }
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

// One row's online-softmax step over its score row sr (keys [ua, ub) of the group's union, its
// visible keys [a, b)): sr becomes the probabilities (0 outside [a, b)), m / l are updated and
// the rescale factor alpha of acc is returned (1 for a row without a visible key).
[[gnu::always_inline]] inline float softmax_row(float* sr, int64_t a, int64_t b, int64_t ua, int64_t ub, float& m, float& l) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (a >= b) {  // no visible key in this tile: state unchanged, p = 0 over [ua, ub)
    for (int64_t j = ua; j < ub; ++j) sr[j] = 0.0f;
    return 1.0f;
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
  for (int64_t j = c0; j < b; j += 8) {
    __m256 x = _mm256_load_ps(sr + j);
    if (j < a || j + 8 > b) x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(lane_mask(a - j, b - j)));
    mx = _mm256_max_ps(x, mx);
  }
  alignas(32) float mxl[8];
  _mm256_store_ps(mxl, mx);
  float mt = kNegInf;
  for (int i = 0; i < 8; ++i) mt = max_ps(mxl[i], mt);
  const float mn = max_ps(mt, m);
  const float alpha = m == kNegInf ? 0.0f : exp_qllm(m - mn);
  const __m256 mv = _mm256_set1_ps(mn);
  __m256 sum = _mm256_setzero_ps();
#if QLLM_ATTN_VNNI
  const __m512 mv16 = _mm512_set1_ps(mn);
#endif
  for (int64_t j = c0; j < ub;) {
#if QLLM_ATTN_VNNI
    // Two whole visible chunks per exp16 (the same operations as exp8, lane for lane); the
    // lane sums still add chunk j, then chunk j + 8, in key order.
    if (j >= a && j + 16 <= b) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + j), mv16));
      sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
      sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
      _mm512_storeu_ps(sr + j, e);
      j += 16;
      continue;
    }
#endif
    __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sr + j), mv));
    if (j < a || j + 8 > b) e = _mm256_and_ps(e, _mm256_castsi256_ps(lane_mask(a - j, b - j)));
    sum = _mm256_add_ps(sum, e);
    _mm256_store_ps(sr + j, e);
    j += 8;
  }
  alignas(32) float sl[8];
  _mm256_store_ps(sl, sum);
  l = l * alpha + lane_tree8(sl);
  m = mn;
  return alpha;
}

template <int R>
void attend_group(const float* q, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0, const int64_t* lo,
                  const int64_t* hi, float* s, float* m, float* l, float* acc) {
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
  for (int r = 0; r < R; ++r) alpha[r] = softmax_row(s + r * ns, a[r], b[r], ua, ub, m[r], l[r]);
  pv<R>(s, ns, vt, Dp, ua, ub, alpha, acc);
}

#if QLLM_ATTN_VNNI
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

#else
// P.V pass of 4 rows x C 8-dim chunks of dims [d0, d0 + 8C): acc = acc * alpha, then
// acc = fma(p_j, v_j, acc) in key order. With C = 3 the 12 accumulators + 3 V chunks + the
// broadcast probability fill the 16 ymm registers: 12 FMA chains keep both FMA pipes busy
// where 8 (4 x 16 dims) leave no slack for the loads and the loop. The same chains per element
// as pv<R>, so the same bits.
template <int C>
[[gnu::always_inline]] inline void pv4_pass(const float* p, int64_t n, const float* vt, int64_t Dp, int64_t ua, int64_t ub,
                                            const float* alpha, float* acc, int64_t d0) {
  __m256 c[4][C];
  for (int r = 0; r < 4; ++r) {
    const __m256 al = _mm256_set1_ps(alpha[r]);
    for (int i = 0; i < C; ++i) c[r][i] = _mm256_mul_ps(_mm256_load_ps(acc + r * Dp + d0 + 8 * i), al);
  }
  const float* vj = vt + ua * Dp + d0;
  for (int64_t j = ua; j < ub; ++j, vj += Dp) {
    // One load per V chunk, not one per row (see scores3); named registers, since an array
    // under the asm made g++ keep a stack copy of it (3 stores per key).
    __m256 v0 = _mm256_load_ps(vj), v1 = v0, v2 = v0;
    if constexpr (C >= 2) v1 = _mm256_load_ps(vj + 8);
    if constexpr (C >= 3) v2 = _mm256_load_ps(vj + 16);
    asm("" : "+x"(v0), "+x"(v1), "+x"(v2));
    for (int r = 0; r < 4; ++r) {
      const __m256 pb = _mm256_broadcast_ss(p + r * n + j);
      c[r][0] = _mm256_fmadd_ps(pb, v0, c[r][0]);
      if constexpr (C >= 2) c[r][1] = _mm256_fmadd_ps(pb, v1, c[r][1]);
      if constexpr (C >= 3) c[r][2] = _mm256_fmadd_ps(pb, v2, c[r][2]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int i = 0; i < C; ++i) _mm256_store_ps(acc + r * Dp + d0 + 8 * i, c[r][i]);
}

// 4 rows of P.V: 3-chunk passes, the rest (Dp / 8 % 3 chunks) as 2-chunk passes (8 chains) or,
// for Dp = 8, one 1-chunk pass: D 128 = 4 x 24 + 2 x 16 dims, D 64 = 2 x 24 + 16.
void pv4(const float* p, int64_t n, const float* vt, int64_t Dp, int64_t ua, int64_t ub, const float* alpha, float* acc) {
  int64_t nc = Dp / 8, d = 0;
  for (; nc >= 3 && nc != 4; nc -= 3, d += 24) pv4_pass<3>(p, n, vt, Dp, ua, ub, alpha, acc, d);
  for (; nc >= 2; nc -= 2, d += 16) pv4_pass<2>(p, n, vt, Dp, ua, ub, alpha, acc, d);
  if (nc == 1) pv4_pass<1>(p, n, vt, Dp, ua, ub, alpha, acc, d);
}

// The online-softmax step of R <= 4 rows at once (row r's scores at s + r * ns, visible keys
// [a[r], b[r]), chunks covering [ua, ub)): the same values as softmax_row, with its per-row
// scalar tails (horizontal max, exp_qllm of alpha, lane_tree8 of the sums, the l / m update)
// done as 4-lane vector operations and the rows' max and exp passes interleaved. One row's
// step is a chain of dependent stages (max pass, horizontal max, exp pass, sums): ~115 cycles
// per row at 64 keys, latency bound, ~22% of the tile's FMA time at D = 64. Exactness: max is
// exact in any order, exp8's lanes are exp_qllm, tree4 gives the lane_tree8 sums, and
// l * alpha + sum keeps its two roundings (mul, then add).
template <int R>
[[gnu::always_inline]] inline void softmax_rows(float* s, int64_t ns, const int64_t* a, const int64_t* b, int64_t ua, int64_t ub,
                                                float* m, float* l, float* alpha) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  const int64_t c0 = ua / 8 * 8;
  __m256 mx[4] = {ninf, ninf, ninf, ninf};
  for (int64_t j = c0; j < ub; j += 8)
    for (int r = 0; r < R; ++r) {
      if (j >= b[r] || a[r] >= b[r]) continue;  // nothing visible in this chunk
      __m256 x = _mm256_load_ps(s + r * ns + j);
      if (j < a[r] || j + 8 > b[r]) x = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(lane_mask(a[r] - j, b[r] - j)));
      mx[r] = _mm256_max_ps(x, mx[r]);
    }
  // The 8 lane maxima of each row -> one per row (lane r of mt).
  const __m256 t0 = _mm256_max_ps(_mm256_permute2f128_ps(mx[0], mx[2], 0x20), _mm256_permute2f128_ps(mx[0], mx[2], 0x31));
  const __m256 t1 = _mm256_max_ps(_mm256_permute2f128_ps(mx[1], mx[3], 0x20), _mm256_permute2f128_ps(mx[1], mx[3], 0x31));
  const __m256 u = _mm256_max_ps(_mm256_unpacklo_ps(t0, t1), _mm256_unpackhi_ps(t0, t1));
  const __m256 w = _mm256_max_ps(u, _mm256_permute_ps(u, 0x4E));
  const __m128 mt = _mm_shuffle_ps(_mm256_castps256_ps128(w), _mm256_extractf128_ps(w, 1), 0x44);
  alignas(16) float mo[4] = {kNegInf, kNegInf, kNegInf, kNegInf}, lo[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int r = 0; r < R; ++r) {
    mo[r] = m[r];
    lo[r] = l[r];
  }
  const __m128 mov = _mm_load_ps(mo);
  const __m128 mn = _mm_max_ps(mt, mov);
  // alpha = m == -inf ? 0 : exp_qllm(m - mn)
  const __m128 ea = _mm256_castps256_ps128(exp8(_mm256_zextps128_ps256(_mm_sub_ps(mov, mn))));
  const __m128 av = _mm_andnot_ps(_mm_cmpeq_ps(mov, _mm_set1_ps(kNegInf)), ea);
  alignas(16) float mnl[4];
  _mm_store_ps(mnl, mn);
  __m256 sum[4], mv[4];
  for (int r = 0; r < 4; ++r) {
    sum[r] = _mm256_setzero_ps();
    mv[r] = _mm256_set1_ps(mnl[r]);
  }
  // p = exp(s - mn), 0 outside [a, b) (all of a row without a visible key).
  for (int64_t j = c0; j < ub; j += 8)
    for (int r = 0; r < R; ++r) {
      float* sr = s + r * ns;
      __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sr + j), mv[r]));
      if (j < a[r] || j + 8 > b[r]) e = _mm256_and_ps(e, _mm256_castsi256_ps(lane_mask(a[r] - j, b[r] - j)));
      sum[r] = _mm256_add_ps(sum[r], e);
      _mm256_store_ps(sr + j, e);
    }
  alignas(16) float ln[4], al[4];
  _mm_store_ps(ln, _mm_add_ps(_mm_mul_ps(_mm_load_ps(lo), av), tree4(sum[0], sum[1], sum[2], sum[3])));
  _mm_store_ps(al, av);
  for (int r = 0; r < R; ++r) {
    if (a[r] >= b[r]) {  // no visible key in this tile: state unchanged
      alpha[r] = 1.0f;
      continue;
    }
    l[r] = ln[r];
    m[r] = mnl[r];
    alpha[r] = al[r];
  }
}

// Keys [ua, ub) that any of rows [r0, r1) sees (ua >= ub: none).
inline void key_union(const int64_t* a, const int64_t* b, int r0, int r1, int64_t n, int64_t& ua, int64_t& ub) {
  ua = n;
  ub = 0;
  for (int r = r0; r < r1; ++r)
    if (a[r] < b[r]) {
      ua = std::min(ua, a[r]);
      ub = std::max(ub, b[r]);
    }
}

// One online-softmax step of a block of nr <= 12 rows: scores in groups of 3 rows (scores3),
// softmax per row over the block's key union, P.V in groups of 4 rows (pv4). 12 is the least
// common multiple of the two shapes; each group computes only its own rows' key union, so the
// block changes no work against 4-row groups (only softmax writes zeros over the block union).
void attend_block(const float* q, int nr, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0,
                  const int64_t* lo, const int64_t* hi, float* s, float* m, float* l, float* acc) {
  int64_t a[12], b[12];
  for (int r = 0; r < nr; ++r) {
    a[r] = std::max<int64_t>(lo[r] - j0, 0);
    b[r] = std::min<int64_t>(hi[r] - j0, n);
  }
  int64_t UA, UB, ua, ub;
  key_union(a, b, 0, nr, n, UA, UB);
  if (UA >= UB) return;
  const int64_t ns = key_stride(n);  // score row stride (8-key padded)
  int r = 0;
  for (; r + 3 <= nr; r += 3) {
    key_union(a, b, r, r + 3, n, ua, ub);
    if (ua < ub) scores3(q + r * Dp, Dp, kt, ns, ua, ub, s + r * ns);
  }
  if (nr - r == 2) {
    key_union(a, b, r, r + 2, n, ua, ub);
    if (ua < ub) scores_rows<2>(q + r * Dp, Dp, kt, ns, ua, ub, s + r * ns);
  } else if (nr - r == 1) {
    key_union(a, b, r, r + 1, n, ua, ub);
    if (ua < ub) scores_rows<1>(q + r * Dp, Dp, kt, ns, ua, ub, s + r * ns);
  }
  float alpha[12];
  for (r = 0; r + 4 <= nr; r += 4) softmax_rows<4>(s + r * ns, ns, a + r, b + r, UA, UB, m + r, l + r, alpha + r);
  switch (nr - r) {
    case 3: softmax_rows<3>(s + r * ns, ns, a + r, b + r, UA, UB, m + r, l + r, alpha + r); break;
    case 2: softmax_rows<2>(s + r * ns, ns, a + r, b + r, UA, UB, m + r, l + r, alpha + r); break;
    case 1: softmax_rows<1>(s + r * ns, ns, a + r, b + r, UA, UB, m + r, l + r, alpha + r); break;
    default: break;
  }
  for (r = 0; r + 4 <= nr; r += 4) {
    key_union(a, b, r, r + 4, n, ua, ub);
    if (ua < ub) pv4(s + r * ns, ns, vt, Dp, ua, ub, alpha + r, acc + r * Dp);
  }
  if (r < nr) {
    key_union(a, b, r, nr, n, ua, ub);
    if (ua < ub) {
      switch (nr - r) {
        case 3: pv<3>(s + r * ns, ns, vt, Dp, ua, ub, alpha + r, acc + r * Dp); break;
        case 2: pv<2>(s + r * ns, ns, vt, Dp, ua, ub, alpha + r, acc + r * Dp); break;
        default: pv<1>(s + r * ns, ns, vt, Dp, ua, ub, alpha + r, acc + r * Dp); break;
      }
    }
  }
}

void attend(const float* q, int64_t rows, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0,
            const int64_t* lo, const int64_t* hi, float* s, float* m, float* l, float* acc) {
  const int64_t ns = key_stride(n);
  for (int64_t r = 0; r < rows; r += 12)
    attend_block(q + r * Dp, static_cast<int>(std::min<int64_t>(12, rows - r)), Dp, kt, vt, n, j0, lo + r, hi + r, s + r * ns,
                 m + r, l + r, acc + r * Dp);
}
#endif

}  // namespace

#if QLLM_ATTN_VNNI
const AttnKernels& attn_kernels_avx512() {
#else
const AttnKernels& attn_kernels_avx2() {
#endif
  static const AttnKernels t{load_kv, attend, QLLM_ATTN_ISA::attn_decode, QLLM_ATTN_ISA::attn_merge};
  return t;
}

}  // namespace qllm::kernels
