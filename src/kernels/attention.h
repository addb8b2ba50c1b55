// Kernels of the attention family (SPEC section 7), one table per ISA.
//
// The driver (ops/attention.cc) cuts the work into tasks: one KV head, a block of query rows
// (the query positions x the GQA group of query heads that share that KV head) and a range of
// keys. A task walks its keys in tiles: load_kv converts one tile of K and V to f32 (int8
// dequantised here, tile by tile, never into a full copy), and attend applies one online-softmax
// step to all rows of the task, so every K/V tile is read from memory once per task and shared
// by the whole head group. Extra memory is O(rows x tile), never O(Lq x Lk).
//
// Bit-identity: both ISAs compute each score as an 8-lane FMA dot product reduced in the
// lane_tree8 order (kernels/norm.h), exponentials with exp_qllm / exp8, the softmax sums in
// 8 lanes and every output element as a chain of FMAs in key order. The tests therefore compare
// ref and avx2 exactly; the tolerance against the naive oracle is derived in the tests.
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"

namespace qllm::kernels {

// Where the keys and values of one (sequence, KV head) live. Token j is in logical block
// j / block_size (physical block block_table[that], or the logical block itself when there is no
// table), at offset j % block_size. Element offsets are in elements of `dtype`; for s8 caches the
// per-(token, head) scales are f32 at the same token/block position with their own strides.
struct KvSource {
  const void* k = nullptr;  // token 0 of block 0 of this head
  const void* v = nullptr;
  const float* k_scale = nullptr;  // s8 only
  const float* v_scale = nullptr;
  DType dtype = DType::f32;
  int64_t token_stride = 0;  // elements between consecutive tokens of a block (Hkv * D)
  int64_t block_size = 1;
  int64_t block_stride = 0;  // elements between blocks
  int64_t scale_token_stride = 0;
  int64_t scale_block_stride = 0;
  const int32_t* block_table = nullptr;  // nullptr: contiguous
  int64_t tokens = 0;  // tokens that exist (and whose block-table entries are valid)

  int64_t token_offset(int64_t j, int64_t stride_tok, int64_t stride_blk) const {
    const int64_t blk = j / block_size;
    const int64_t phys = block_table ? block_table[blk] : blk;
    return phys * stride_blk + (j % block_size) * stride_tok;
  }
};

struct AttnKernels {
  // kt, vt [n, Dp] f32 from keys [j0, j0 + n): f16/bf16 exactly, s8 as f32(q) * scale (one
  // rounding); columns [D, Dp) are zero. Also prefetches the next tile's rows. The SIMD kernels
  // pad kt to round_up(n, 8) keys with zeros (the buffers hold that many rows), and the avx512
  // kernels store kt interleaved for their zmm score groups; the layout is private to the pair
  // load_kv / attend of one ISA.
  void (*load_kv)(const KvSource& src, int64_t j0, int64_t n, int64_t D, int64_t Dp, float* kt, float* vt);
  // One online-softmax step of `rows` query rows over the tile's keys j0 .. j0 + n - 1.
  // q [rows, Dp] (pre-scaled, zero padded), row r sees keys [lo[r], hi[r]). State per row: m
  // (running max, -inf initially), l (running sum), acc [rows, Dp] (unnormalised output). s is
  // scratch [rows, round_up(n, 8)] (the SIMD kernels keep whole 8-key chunks per row). A row that sees no key of the tile is left unchanged. For a row that does,
  // with [a, b) its visible keys of the tile:
  //   s_j = lane_tree8(8-lane FMA dot of q and k_j); m' = max(m, max s_j);
  //   alpha = m == -inf ? 0 : exp_qllm(m - m'); p_j = exp_qllm(s_j - m');
  //   l = l * alpha + lane_tree8(lanes), lane i summing (in key order) the p_j with j % 8 == i
  //   (j the index within the tile); acc = acc * alpha, then
  //   acc = fma(p_j, v_j, acc) for j = a .. b-1.
  void (*attend)(const float* q, int64_t rows, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0,
                 const int64_t* lo, const int64_t* hi, float* s, float* m, float* l, float* acc);
  // Decode path (one query position per task): the H KV heads h = 0 .. H-1 of a tile of keys
  // [j0, j0 + n), each with its g query rows (the GQA group), all seeing every key of the tile.
  // Scores and P.V come straight from the cache rows (no f32 K/V tile), token-major across the
  // heads so the token-major cache ([block, token, head, D]) is read sequentially. `src` is head
  // 0; head h's rows are h * D elements (and its scales h floats) further. The state of head h's
  // row r is row h * RH + r of q, q16, qs, m, l, acc. Per row, the online-softmax step is the
  // one of `attend` with a = 0, b = n (max, alpha, p_j, lane sums of l, acc scaled by alpha then
  // FMA chains in key order), so for f32/f16/bf16 caches the result is bit-identical to
  // load_kv + attend. For s8 caches q.k is integer:
  //   s_j = (f32(sum_d q16[d] k8_j[d]) * k_scale_j) * qs   (the int32 sum is exact),
  // with q16 [rows, Dq] the pre-scaled query quantised per row to [-127, 127] (scale qs[r]),
  // zero padded to Dq = round_up(D, 16); and P.V is integer too: with w_j = p_j * v_scale_j
  // (l sums the p_j), per row and per block of kDecPvBlock keys of the tile ([0, 32), [32, 64),
  // ...; the last one partial), wmax = max_j w_j; a block with wmax < kDecPvMinWeight adds
  // nothing; otherwise the weights are quantised to 7 bits,
  //   wq_j = min(nearbyint(w_j * (127 / wmax)), 127) in [0, 127],
  //   isum[d] = sum_j wq_j * v8_j[d] (exact int32: |.| <= 32 * 127 * 128),
  //   acc[d] = fma(f32(isum[d]), wmax / 127, acc[d]) (blocks in order).
  // 7 bits (not 8) so that AVX2's vpmaddubsw (u8 x s8, pairs summed in saturating int16) stays
  // exact: 2 * 127 * 128 < 32768; the VNNI form gives the same int32 sums. The quantisation
  // error of a weight is <= 0.51 wmax / 127 (see docs/design.md for the accuracy).
  // tmp holds >= D int32 in the ref kernel.
  // n <= 128. s: scratch [H * g, Tk] (Tk >= n, a multiple of 8); tmp: >= 2 * Dp + 64 floats.
  // q8 [rows, decode_q8_width(D)] holds the same quantised query as int8 (zero padded): the
  // AVX-512 VNNI build's q.k (vpdpbusd on bytes) reads it, the others read q16.
  void (*decode)(const float* q, const int16_t* q16, const int8_t* q8, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D,
                 int64_t Dp, const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* tmp, float* m, float* l,
                 float* acc);
  // Merge of one query row's key splits (flash-decoding): split sp's state is part + sp * stride
  // = [m, l, acc[0 .. D)]. In split order, skipping splits with m = -inf (they saw no key):
  //   M = max m; w = exp_qllm(m - M); L = fma(l, w, L); o[d] = fma(acc[d], w, o[d]) (from 0);
  // then o[d] = L > 0 ? o[d] / L : 0 (all zeros when no split saw a key). Element-wise, so
  // every ISA gives the same bits.
  void (*merge)(const float* part, int64_t nsplit, int64_t stride, int64_t D, float* o);
};

// Keys per quantisation block of the s8 decode path's P.V weights, and the smallest block max
// weight that is quantised (below it 127 / wmax could overflow; such blocks weigh < 2^-100 of
// the row's largest probability, 1).
constexpr int64_t kDecPvBlock = 32;
constexpr float kDecPvMinWeight = 0x1p-100f;

// Query row width of the s8 decode path: D rounded up to the 16 int16 lanes of one vpmaddwd.
inline int64_t decode_q16_width(int64_t D) { return (D + 15) / 16 * 16; }
// The same rows as int8: D rounded up to the 64 bytes of one zmm vpdpbusd.
inline int64_t decode_q8_width(int64_t D) { return (D + 63) / 64 * 64; }

const AttnKernels& attn_kernels(Isa isa);
const AttnKernels& attn_kernels_ref();
const AttnKernels& attn_kernels_avx2();  // QLLM_HAVE_AVX2 builds only
// The same kernels compiled for AVX-512 VL + VNNI: the s8 decode path's q.k uses vpdpwssd and
// its P.V vpdpbusd (identical integer sums, so bit-identical to the others).
const AttnKernels& attn_kernels_avx512();  // QLLM_HAVE_AVX2 builds only

}  // namespace qllm::kernels
