// AVX-512 VNNI rows kernel of the 2:4 sparse s8 matmul (W8A8, large m): kernels/sparse24.h,
// "avx512 twin". Same contract as avx2::s24_s8_rows / ref::s24_s8_rows (exact integer sums, so
// all three give the same bits); packed layout unchanged.
//
// Channels in the lanes, x gathered by vpermb. vpdpbusd sums 4 u8 x s8 products per s32 lane; a
// lane here is one channel of a 16-channel half super-panel and its 4 bytes are the channel's 4
// kept weights of a group PAIR (8 k): (g.v0, g.v1, g+1.v0, g+1.v1), s8, straight from the packed
// values (vpunpck{l,h}wd of the two groups' rows). The x side of the lane must be the same row's
// x at those 4 positions: one vpermb of the row's 64 x bytes (8 group pairs, +128: vpdpbusd's
// first operand is unsigned) with a per-channel index vector. So every 64 useful multiply-adds
// cost one vpermb + one vpdpbusd, both on vector pipes, and nothing else in the inner loop
// touches memory: 8 rows x 32 channels = 16 zmm accumulators, 8 zmm of x rows, and the chunk's
// decoded index / value vectors (one load each per 16 vpdpbusd).
// The bias is undone per channel by -128 * sum of its kept weights (one vpdpbusd against a vector
// of ones per 16 channels and group pair in the decode pass): everything is exact modulo 2^32
// and the true sums fit s32 (ops/ bounds k), as in the dense VNNI kernel.
//
// Measured alternatives (docs/design.md, "s8 rows kernel on AVX-512"): a table of the 36 pair-code
// combinations with rows in the lanes (one table load per vpdpbusd instead of a vpermb) is
// load-bound on this Zen 4 (a zmm load per vpdpbusd plus the accumulators' traffic): 0.65x dense
// in the op against this kernel's figures.
//
// Decode (per super-panel and chunk of 4 blocks = 32 group pairs, amortised over the 64 rows):
// per group pair and half, the index dword of a channel is LUT_j[t + 8 b] for its byte b and
// pair code t (of group g for b < 2, g + 1 for b >= 2): vpermb gathers each channel's 3-byte code
// words, vpmultishiftqb pulls the 3-bit code into every byte, vpternlogd masks it and adds 8 b,
// and a vpermb of the 64-byte LUT of the pair's window slot j gives the final index
// (8 j + position: x row bytes 8j..8j+7 hold the pair).
#pragma GCC target("avx512vbmi")
// g++ 12 warns about the undefined upper half inside its own _mm512 VBMI intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "kernels/sparse24.h"

namespace qllm::kernels::avx512 {

namespace {

constexpr int kRT = 8;                      // rows per register tile (8 x rows + 16 accumulators)
constexpr int kChunkBlocks = kS8Rows512ChunkBlocks;  // blocks (8 group pairs each) per decoded chunk
constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;  // the codes' offset in a block
static_assert(kRowPanel % kRT == 0 && kS8BlockGroups == 16, "a block is one 64-byte x window (8 group pairs)");
constexpr int64_t kTabGp = kS8Rows512TabGp;  // table bytes per group pair: [36 combinations][4 row vectors][64]
// Full-panel calls (rows >= kMixMinRows) run the mixed design; the table half costs all 64 rows
// whatever the fill, so small m keeps the vpermb-only kernel.
constexpr int64_t kMixMinRows = 33;

// Slot s of a decoded half -> its channel: vpunpcklwd leaves channels 8L + {0..3} of each 128-bit
// lane L in dwords 4L + {0..3} (the low half), vpunpckhwd channels 8L + {4..7} (the high half).
constexpr int slot_channel(int s) { return s < 16 ? 8 * (s / 4) + s % 4 : 8 * ((s - 16) / 4) + 4 + s % 4; }

// One group pair of a super-panel, decoded: index and values of the low and high halves.
struct Pair {
  __m512i ilo, wlo, ihi, whi;
};
static_assert(sizeof(Pair) == 256 &&
                  kS8Rows512ScratchBytes >= kChunkBlocks * 8 * 256 + kRowPanel * kChunkBlocks * 64 + kS8RowsMaxPanels * kS8Channels * 4,
              "scratch: the decoded chunk, the biased x chunk and the weight sums");

struct Consts {
  __m512i cperm;       // vpermb: the 24 code bytes of two groups -> per-qword (g's 3 bytes, g+1's 3 bytes)
  __m512i cshift[2];   // vpmultishiftqb bit offsets of each output byte's code (low / high half)
  __m512i bsel;        // 8 b for byte b of every dword
  __m512i lut[8];      // per window slot j: [t + 8 b] = 8 j + position of byte b for pair code t
  // Mixed design's table build: vpermi2b of a pair's 16 row qwords (rows 0-7 | 8-15) -> lane l
  // = row l, bytes 0-1 = the group g pair t (tl[t]), bytes 2-3 = the group g + 1 pair t (th[t]).
  __m512i tl[6], th[6];
  Consts() {
    constexpr int kPos[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};  // kernels/sparse24.h codes
    alignas(64) uint8_t p[64], m[2][64], bs[64], l[64];
    // Output qword i = dwords 2i, 2i + 1 = slots 2i + e: sub-panel L = i / 2, channel u = 2 (i % 2) + e
    // of it (+ 4 in the high half), whose code is at bits 3u (+ 12) of the sub-panel's 24-bit word.
    for (int i = 0; i < 8; ++i) {
      const int L = i / 2;
      for (int bb = 0; bb < 8; ++bb) p[8 * i + bb] = static_cast<uint8_t>(bb < 3 ? 3 * L + bb : bb < 6 ? 12 + 3 * L + bb - 3 : 0);
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e)
          for (int b = 0; b < 4; ++b)
            m[h][8 * i + 4 * e + b] = static_cast<uint8_t>(3 * (2 * (i % 2) + e) + 12 * h + (b < 2 ? 0 : 24));
    }
    for (int i = 0; i < 64; ++i) bs[i] = static_cast<uint8_t>(8 * (i % 4));
    cperm = _mm512_load_si512(p);
    cshift[0] = _mm512_load_si512(m[0]);
    cshift[1] = _mm512_load_si512(m[1]);
    bsel = _mm512_load_si512(bs);
    for (int j = 0; j < 8; ++j) {
      for (int q = 0; q < 64; ++q) {
        const int t = q % 8, b = q / 8;
        l[q] = t < 6 && b < 4 ? static_cast<uint8_t>(8 * j + (b < 2 ? kPos[t][b] : 4 + kPos[t][b - 2])) : 0;
      }
      lut[j] = _mm512_load_si512(l);
    }
    for (int t = 0; t < 6; ++t) {
      for (int q = 0; q < 64; ++q) {
        const int lane = q / 4, e = q % 4;
        l[q] = static_cast<uint8_t>(8 * lane + (e < 2 ? kPos[t][e] : 0));
        m[0][q] = static_cast<uint8_t>(8 * lane + (e >= 2 ? 4 + kPos[t][e - 2] : 0));
      }
      tl[t] = _mm512_load_si512(l);
      th[t] = _mm512_load_si512(m[0]);
    }
  }
};

// Decode blocks [b0, b0 + nb) of one super-panel into dec (8 pairs per block); ws[2] += the kept
// weights per channel (slot order).
// Mixed (the mixed design): the high half's ihi slot holds instead, per channel, the table offset
// of its code combination, pair * kTabGp + (6 t0 + t1) * 256 (pair: within the chunk).
template <bool Mixed>
void decode(const uint8_t* panel, int64_t b0, int64_t nb, Pair* dec, __m512i (&wsum)[2], const Consts& k) {
  // Locals: with the sums and constants behind references GCC kept the sums in memory (a
  // store-forwarded chain per pair) and reloaded the constants after every store.
  const __m512i ones = _mm512_set1_epi8(1), cperm = k.cperm, cs0 = k.cshift[0], cs1 = k.cshift[1], bsel = k.bsel;
  __m512i ws0 = wsum[0], ws1 = wsum[1];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = panel + (b0 + b) * kS8BlockBytes;
    for (int j = 0; j < 8; ++j) {
      Pair& d = dec[b * 8 + j];
      const __m512i v0 = _mm512_loadu_si512(blk + 2 * j * kS8Channels * 2);
      const __m512i v1 = _mm512_loadu_si512(blk + (2 * j + 1) * kS8Channels * 2);
      const __m512i wlo = _mm512_unpacklo_epi16(v0, v1), whi = _mm512_unpackhi_epi16(v0, v1);
      d.wlo = wlo;
      d.whi = whi;
      ws0 = _mm512_dpbusd_epi32(ws0, ones, wlo);
      ws1 = _mm512_dpbusd_epi32(ws1, ones, whi);
      // The pair's 24 code bytes (the buffer is padded past the last block).
      const __m512i cw = _mm512_permutexvar_epi8(
          cperm, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kCodes + 24 * j))));
      // (code & 7) | 8 b, then the slot's LUT.
      const __m512i qlo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(cs0, cw), _mm512_set1_epi8(7), bsel, 0xea);
      d.ilo = _mm512_permutexvar_epi8(qlo, k.lut[j]);
      const __m512i mhi = _mm512_multishift_epi64_epi8(cs1, cw);
      if constexpr (Mixed) {
        // The high half runs on the table (mtile): its entry offsets instead of an index vector.
        // Bytes 0 and 2 of each high-half dword hold t0 and t1 in their low 3 bits: one vpmaddwd
        // gives t0 * 1536 + t1 * 256 (an entry = 4 row vectors of 64 bytes).
        const __m512i tt = _mm512_and_si512(mhi, _mm512_set1_epi32(0x00070007));
        const int32_t pair = static_cast<int32_t>(b * 8 + j);
        _mm512_store_si512(&d.ihi, _mm512_add_epi32(_mm512_madd_epi16(tt, _mm512_set1_epi32(0x01000600)),
                                                              _mm512_set1_epi32(pair * static_cast<int32_t>(kTabGp))));
      } else {
        d.ihi = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(mhi, _mm512_set1_epi8(7), bsel, 0xea), k.lut[j]);
      }
    }
  }
  wsum[0] = ws0;
  wsum[1] = ws1;
}

// The chunk's x for the panel, biased to u8 once (x + 128, i.e. x ^ 0x80) into xb [64][256]: rows
// past `rows` and bytes past k read as x = 0 (their weights are the packing's zero groups). Done
// per chunk, not per super-panel and tile: the bias and the tail masks in the tile loop cost
// ~10 % (bare kernel 0.48-0.49 -> 0.44 ns per 64 products).
[[gnu::noinline]] void bias_chunk(const int8_t* x, int64_t ldx, int64_t rows, int64_t kvalid, int64_t nb, uint8_t* xb) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < kRowPanel; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t left = kvalid - 64 * b;
      const __mmask64 km = r >= rows ? 0 : left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      _mm512_store_si512(xb + r * kChunkBlocks * 64 + 64 * b,
                         _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, x + r * ldx + 64 * b), bias));
    }
}

// One 8-row tile over the decoded blocks: acc (row-major [r][32] s32, slot order) += the
// products; xb: the tile's first row of the biased chunk.
template <bool First>
void tile(const uint8_t* xb, const Pair* dec, int64_t nb, int32_t* acc) {
  __m512i a[kRT][2];
  for (int r = 0; r < kRT; ++r)
    for (int h = 0; h < 2; ++h) a[r][h] = First ? _mm512_setzero_si512() : _mm512_load_si512(acc + r * 32 + 16 * h);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i xr[kRT];
    for (int r = 0; r < kRT; ++r) xr[r] = _mm512_load_si512(xb + r * kChunkBlocks * 64 + 64 * b);
    const Pair* d = dec + 8 * b;
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i ilo = _mm512_load_si512(&d[j].ilo), wlo = _mm512_load_si512(&d[j].wlo);
      const __m512i ihi = _mm512_load_si512(&d[j].ihi), whi = _mm512_load_si512(&d[j].whi);
      for (int r = 0; r < kRT; ++r) {
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], _mm512_permutexvar_epi8(ilo, xr[r]), wlo);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], _mm512_permutexvar_epi8(ihi, xr[r]), whi);
      }
    }
  }
  for (int r = 0; r < kRT; ++r)
    for (int h = 0; h < 2; ++h) _mm512_store_si512(acc + r * 32 + 16 * h, a[r][h]);
}

// The chunk's x by pair, xq[pair][64 rows] (8 bytes each), from the biased chunk: the table
// build reads 16 rows of one pair as two zmm.
[[gnu::noinline]] void pair_rows(const uint8_t* xb, int64_t nb, uint64_t* xq) {
  for (int64_t b = 0; b < nb; ++b)
    for (int j = 0; j < 8; ++j)
      for (int r = 0; r < kRowPanel; ++r) std::memcpy(xq + (b * 8 + j) * kRowPanel + r, xb + r * kChunkBlocks * 64 + 64 * b + 8 * j, 8);
}

// The combination table of the chunk: tab[pair][q = 6 t0 + t1][row vector v][16 rows] dwords
// (x[g, i0(t0)], x[g, i1(t0)], x[g + 1, i0(t1)], x[g + 1, i1(t1)]), biased. Per pair and 16 rows:
// 12 zero-masked vpermi2b (the 6 pair forms of each group, in disjoint bytes), then 36 vpord +
// stores (the ALU pipes, not the permute pipe).
[[gnu::noinline]] void build_table(const uint64_t* xq, int64_t npairs, uint8_t* tab, const Consts& k) {
  const __mmask64 mlo = 0x3333333333333333ull, mhi = 0xccccccccccccccccull;
  for (int64_t p = 0; p < npairs; ++p)
    for (int v = 0; v < 4; ++v) {
      const __m512i a = _mm512_load_si512(xq + p * kRowPanel + 16 * v), b = _mm512_load_si512(xq + p * kRowPanel + 16 * v + 8);
      __m512i lo[6], hi[6];
      for (int t = 0; t < 6; ++t) {
        lo[t] = _mm512_maskz_permutex2var_epi8(mlo, a, k.tl[t], b);
        hi[t] = _mm512_maskz_permutex2var_epi8(mhi, a, k.th[t], b);
      }
      uint8_t* e = tab + p * kTabGp + 64 * v;
      for (int t0 = 0; t0 < 6; ++t0)
        for (int t1 = 0; t1 < 6; ++t1) _mm512_store_si512(e + (6 * t0 + t1) * 256, _mm512_or_si512(lo[t0], hi[t1]));
    }
}

// Mixed call (rows >= kMixMinRows): per chunk the table half of every super-panel is walked
// window by window (2 pairs: 18 KB of the table, hot in L1; a whole-chunk sweep per tile, 147 KB
// from L2, ran at 0.41-0.43 ns per vpdpbusd in a microbenchmark against 0.28 for 18 KB), while
// the vpermb half walks tile by tile with its sums in registers across the chunk. One call =
// one vpermb tile (8 rows x 16 low-half channels x the chunk's S pairs) interleaved step by step
// with S table items (a channel x one window x 64 rows: its 4 sums loaded, 2 pairs x 4 row vectors
// of vpdpbusd with the channel's weights broadcast, stored back). Per step: 8 vpermb + 16
// vpdpbusd and ~18 loads (the loads are what bounds it: ~1.1 zmm load slots per vpdpbusd).
// Inline asm with a fixed register plan: zmm0-7 vpermb sums, 8-15 table sums (two items in
// flight), 16-23 x rows, 24/25 index / values, 26/27 broadcast weights, 28-31 temporaries (GCC 12
// rotated values through spare registers and spilled the x rows: 0.36 against 0.33 ns per
// vpdpbusd in isolation).
// Operands: xb = the tile's first biased x row (block 0), dp = the vpermb super-panel's decoded
// chunk, tb = the table super-panel's decoded window + 4 * (first item's channel), ta = the first
// item's sums ([item][64 rows]), alo = the tile's sums ([8 rows][16]), tab = the chunk's table.
#define S24M_TAB(V, OFF, W, TMP, T) \
  "vmovdqa64 " #V "*64(%[tab],%%" #OFF "), %%zmm" #TMP "\n\t" "vpdpbusd %%zmm" #W ", %%zmm" #TMP ", %%zmm" #T "\n\t"
#define S24M_MIX(X, A, PTMP, V, OFF, W, TMP, T) \
  "vpermb %%zmm" #X ", %%zmm24, %%zmm" #PTMP "\n\t" "vpdpbusd %%zmm25, %%zmm" #PTMP ", %%zmm" #A "\n\t" S24M_TAB(V, OFF, W, TMP, T)
#define S24M_TLD(J, R, V) "vmovdqa64 " #J "*256+" #V "*64(%[ta]), %%zmm" #R "\n\t"
#define S24M_TST(J, R, V) "vmovdqa64 %%zmm" #R ", " #J "*256+" #V "*64(%[ta])\n\t"
// Step J: pair J of the vpermb tile, item J of the table walk (its sums in zmm T0..T3).
#define S24M_STEP(J, T0, T1, T2, T3)                                                                            \
  "vmovdqa64 " #J "*256(%[dp]), %%zmm24\n\t" "vmovdqa64 " #J "*256+64(%[dp]), %%zmm25\n\t"                      \
  "movslq " #J "*4+128(%[tb]), %%rax\n\t" "movslq " #J "*4+384(%[tb]), %%rdx\n\t"                                \
  "vpbroadcastd " #J "*4+192(%[tb]), %%zmm26\n\t" "vpbroadcastd " #J "*4+448(%[tb]), %%zmm27\n\t"                \
  S24M_TLD(J, T0, 0) S24M_TLD(J, T1, 1) S24M_TLD(J, T2, 2) S24M_TLD(J, T3, 3)                                   \
  S24M_MIX(16, 0, 28, 0, rax, 26, 30, T0) S24M_MIX(17, 1, 29, 1, rax, 26, 31, T1)                                \
  S24M_MIX(18, 2, 28, 2, rax, 26, 30, T2) S24M_MIX(19, 3, 29, 3, rax, 26, 31, T3)                                \
  S24M_MIX(20, 4, 28, 0, rdx, 27, 30, T0) S24M_MIX(21, 5, 29, 1, rdx, 27, 31, T1)                                \
  S24M_MIX(22, 6, 28, 2, rdx, 27, 30, T2) S24M_MIX(23, 7, 29, 3, rdx, 27, 31, T3)                                \
  S24M_TST(J, T0, 0) S24M_TST(J, T1, 1) S24M_TST(J, T2, 2) S24M_TST(J, T3, 3)
#define S24M_EVEN(J) S24M_STEP(J, 8, 9, 10, 11)
#define S24M_ODD(J) S24M_STEP(J, 12, 13, 14, 15)
#define S24M_XR(B)                                                                                              \
  "vmovdqa64 0*%c[rs]+" #B "*64(%[xb]), %%zmm16\n\t" "vmovdqa64 1*%c[rs]+" #B "*64(%[xb]), %%zmm17\n\t"         \
  "vmovdqa64 2*%c[rs]+" #B "*64(%[xb]), %%zmm18\n\t" "vmovdqa64 3*%c[rs]+" #B "*64(%[xb]), %%zmm19\n\t"         \
  "vmovdqa64 4*%c[rs]+" #B "*64(%[xb]), %%zmm20\n\t" "vmovdqa64 5*%c[rs]+" #B "*64(%[xb]), %%zmm21\n\t"         \
  "vmovdqa64 6*%c[rs]+" #B "*64(%[xb]), %%zmm22\n\t" "vmovdqa64 7*%c[rs]+" #B "*64(%[xb]), %%zmm23\n\t"
#define S24M_A(M)                                                                                               \
  M("0", "%%zmm0") M("1", "%%zmm1") M("2", "%%zmm2") M("3", "%%zmm3") M("4", "%%zmm4") M("5", "%%zmm5")            \
  M("6", "%%zmm6") M("7", "%%zmm7")
#define S24M_ALD(I, R) "vmovdqa64 " I "*64(%[alo]), " R "\n\t"
#define S24M_AST(I, R) "vmovdqa64 " R ", " I "*64(%[alo])\n\t"
#define S24M_BLOCK0 S24M_XR(0) S24M_EVEN(0) S24M_ODD(1) S24M_EVEN(2) S24M_ODD(3) S24M_EVEN(4) S24M_ODD(5) S24M_EVEN(6) S24M_ODD(7)
#define S24M_BLOCK1 S24M_XR(1) S24M_EVEN(8) S24M_ODD(9) S24M_EVEN(10) S24M_ODD(11) S24M_EVEN(12) S24M_ODD(13) S24M_EVEN(14) S24M_ODD(15)
#define S24M_OPERANDS                                                                                             \
  : : [xb] "r"(xb), [dp] "r"(dp), [tb] "r"(tb), [ta] "r"(ta), [alo] "r"(alo), [tab] "r"(tab), [rs] "i"(kChunkBlocks * 64) \
  : "rax", "rdx", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",      \
    "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21",   \
    "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"
static_assert(kChunkBlocks == 2, "the mixed call is written for chunks of 2 blocks (16 steps; 8 for a last odd block)");
template <int Blocks>
[[gnu::noinline]] void mcall(const uint8_t* xb, const Pair* dp, const uint8_t* tb, int32_t* ta, int32_t* alo, const uint8_t* tab) {
  if constexpr (Blocks == 2)
    asm volatile(S24M_A(S24M_ALD) S24M_BLOCK0 S24M_BLOCK1 S24M_A(S24M_AST) S24M_OPERANDS);
  else
    asm volatile(S24M_A(S24M_ALD) S24M_BLOCK0 S24M_A(S24M_AST) S24M_OPERANDS);
}

}  // namespace

// Per chunk of kChunkBlocks blocks (256 k: the panel's x chunk, 16 KB, stays in L1/L2 while
// every super-panel uses it; a super-panel-outer order re-streamed the whole x panel per
// super-panel, 0.9 MB at k = 14336, from L3), per super-panel: decode its chunk, then the panel's
// 8-row tiles. Between chunks the sums live in acc itself, row-major per super-panel ([r][slot],
// 8 KB each); at the end the bias correction and the slots put in channel order (the acc layout
// is row-major per super-panel: Sparse24Kernels::s8_rows_row_major).
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch) {
  static const Consts kc;
  Pair* dec = static_cast<Pair*>(scratch);  // [super-panel][pair of the chunk]
  uint8_t* xb = static_cast<uint8_t*>(scratch) + kS8RowsMaxPanels * kChunkBlocks * 8 * sizeof(Pair);
  int32_t* wsum = reinterpret_cast<int32_t*>(xb + kRowPanel * kChunkBlocks * 64);
  uint64_t* xq = reinterpret_cast<uint64_t*>(wsum + kS8RowsMaxPanels * kS8Channels);
  uint8_t* tab = reinterpret_cast<uint8_t*>(xq + kChunkBlocks * 8 * kRowPanel);
  int32_t* rowbuf = reinterpret_cast<int32_t*>(tab + kChunkBlocks * 8 * kTabGp);
  static_assert(kS8Rows512ScratchBytes == kS8RowsMaxPanels * kChunkBlocks * 8 * 256 + kRowPanel * kChunkBlocks * 64 +
                                              kS8RowsMaxPanels * kS8Channels * 4 + kChunkBlocks * 8 * kRowPanel * 8 +
                                              kChunkBlocks * 8 * kTabGp + kS8Channels * kRowPanel * 4,
                "scratch layout");
  const int64_t kb = (k / 4 + kS8BlockGroups - 1) / kS8BlockGroups;  // blocks holding k
  const int64_t nsp = sp1 - sp0;
  constexpr int64_t kSp = kS8Channels * kRowPanel;  // s32 per super-panel in acc
  if (kb == 0 || rows <= 0) {
    std::memset(acc, 0, static_cast<size_t>(nsp * kSp) * sizeof(int32_t));
    return;
  }
  static const bool kNoMix = std::getenv("S24I_NOMIX") != nullptr;  // TEMP experiment knob
  const bool mixed = rows >= kMixMinRows && !kNoMix;
  if (mixed) std::memset(acc, 0, static_cast<size_t>(nsp * kSp) * sizeof(int32_t));
  for (int64_t b0 = 0; b0 < kb; b0 += kChunkBlocks) {
    const int64_t nb = std::min<int64_t>(kChunkBlocks, kb - b0);
    bias_chunk(x + 64 * b0, ldx, rows, k - 64 * b0, nb, xb);
    if (mixed) {
      const int64_t np = nb * 8;  // pairs in the chunk
      pair_rows(xb, nb, xq);
      build_table(xq, np, tab, kc);
      for (int64_t sp = sp0; sp < sp1; ++sp) {
        int32_t* wsp = wsum + (sp - sp0) * kS8Channels;
        __m512i ws[2] = {b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp),
                         b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp + 16)};
        decode<true>(w.block(sp, 0), b0, nb, dec + (sp - sp0) * np, ws, kc);
        _mm512_store_si512(wsp, ws[0]);
        _mm512_store_si512(wsp + 16, ws[1]);
      }
      // The next chunk's weights of every super-panel (their decode follows this chunk's calls):
      // a few lines per call.
      const int64_t nbn = std::min<int64_t>(kChunkBlocks, kb - b0 - nb), lines_sp = nbn * kS8BlockBytes / 64;
      const int64_t ncalls = nsp * 8, pf_per_call = (lines_sp * nsp + ncalls - 1) / ncalls;
      // Calls per window: the windows (np / 2 of them) share the calls evenly; each call takes np
      // consecutive table channels (np divides the 16 of a half super-panel).
      const int64_t cpw = ncalls / (np / 2);
      for (int64_t n = 0; n < ncalls; ++n) {
        for (int64_t q = n * pf_per_call; q < std::min(lines_sp * nsp, (n + 1) * pf_per_call); ++q)
          _mm_prefetch(reinterpret_cast<const char*>(w.block(sp0 + q / lines_sp, b0 + nb) + 64 * (q % lines_sp)), _MM_HINT_T0);
        const int64_t spp = n / 8, t = n % 8, win = n / cpw, item = (n % cpw) * np, spt = item / 16, s0 = item % 16;
        const uint8_t* xt = xb + 8 * t * kChunkBlocks * 64;
        const Pair* dp = dec + spp * np;
        const uint8_t* tb = reinterpret_cast<const uint8_t*>(dec + spt * np + 2 * win) + 4 * s0;
        int32_t* ta = acc + spt * kSp + kRowPanel * 16 + s0 * kRowPanel;
        int32_t* alo = acc + spp * kSp + 8 * t * 16;
        if (nb == 2) mcall<2>(xt, dp, tb, ta, alo, tab);
        else mcall<1>(xt, dp, tb, ta, alo, tab);
      }
      continue;
    }
    for (int64_t sp = sp0; sp < sp1; ++sp) {
      __m512i ws[2];
      int32_t* wsp = wsum + (sp - sp0) * kS8Channels;
      ws[0] = b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp);
      ws[1] = b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp + 16);
      decode<false>(w.block(sp, 0), b0, nb, dec, ws, kc);
      _mm512_store_si512(wsp, ws[0]);
      _mm512_store_si512(wsp + 16, ws[1]);
      // The next super-panel's chunk (or the first one of the next chunk): one line in 8 per
      // tile, so the stream is requested while the tiles run.
      const uint8_t* nxt = sp + 1 < sp1 ? w.block(sp + 1, b0) : b0 + kChunkBlocks < kb ? w.block(sp0, b0 + kChunkBlocks) : nullptr;
      const int64_t nxt_lines = (sp + 1 < sp1 ? nb : std::min<int64_t>(kChunkBlocks, kb - b0 - kChunkBlocks)) * kS8BlockBytes / 64;
      int32_t* a = acc + (sp - sp0) * kSp;
      for (int r0 = 0; r0 < rows && r0 < kRowPanel; r0 += kRT) {
        if (nxt)
          for (int64_t l = r0 / kRT; l < nxt_lines; l += kRowPanel / kRT)
            _mm_prefetch(reinterpret_cast<const char*>(nxt + 64 * l), _MM_HINT_T0);
        const uint8_t* xt = xb + r0 * kChunkBlocks * 64;
        if (b0 == 0) tile<true>(xt, dec, nb, a + r0 * kS8Channels);
        else tile<false>(xt, dec, nb, a + r0 * kS8Channels);
      }
    }
  }
  // Bias correction, and the slots put back in channel order: acc[(sp - sp0) * 2048 + r * 32 + c]
  // (row-major per super-panel: Sparse24Kernels::s8_rows_row_major); rows past `rows` are 0.
  alignas(64) static constexpr int32_t kToSlot[32] = {0,  1,  2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                                      8,  9,  10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  static_assert(slot_channel(4) == 8 && slot_channel(16) == 4 && slot_channel(31) == 31, "kToSlot inverts slot_channel");
  const __m512i plo = _mm512_load_si512(kToSlot), phi = _mm512_load_si512(kToSlot + 16);
  const int64_t nr = std::min<int64_t>(rows, kRowPanel);
  for (int64_t sp = sp0; sp < sp1; ++sp) {
    int32_t* a = acc + (sp - sp0) * kSp;
    const int32_t* ws = wsum + (sp - sp0) * kS8Channels;
    const __m512i clo = _mm512_slli_epi32(_mm512_load_si512(ws), 7), chi = _mm512_slli_epi32(_mm512_load_si512(ws + 16), 7);
    if (mixed) {
      // Low half [r][16], high half [slot][64 rows]: each row assembled in rowbuf, then copied back.
      for (int64_t r = 0; r < nr; ++r) {
        alignas(64) int32_t h[16];
        for (int s = 0; s < 16; ++s) h[s] = a[kRowPanel * 16 + s * kRowPanel + r];
        const __m512i lo = _mm512_sub_epi32(_mm512_load_si512(a + r * 16), clo);
        const __m512i hi = _mm512_sub_epi32(_mm512_load_si512(h), chi);
        _mm512_store_si512(rowbuf + r * 32, _mm512_permutex2var_epi32(lo, plo, hi));
        _mm512_store_si512(rowbuf + r * 32 + 16, _mm512_permutex2var_epi32(lo, phi, hi));
      }
      std::memcpy(a, rowbuf, static_cast<size_t>(nr * 32) * sizeof(int32_t));
    } else {
      for (int64_t r = 0; r < nr; ++r) {
        const __m512i lo = _mm512_sub_epi32(_mm512_load_si512(a + r * 32), clo);
        const __m512i hi = _mm512_sub_epi32(_mm512_load_si512(a + r * 32 + 16), chi);
        _mm512_store_si512(a + r * 32, _mm512_permutex2var_epi32(lo, plo, hi));
        _mm512_store_si512(a + r * 32 + 16, _mm512_permutex2var_epi32(lo, phi, hi));
      }
    }
    std::memset(a + nr * 32, 0, static_cast<size_t>((kRowPanel - nr) * 32) * sizeof(int32_t));
  }
}

}  // namespace qllm::kernels::avx512
