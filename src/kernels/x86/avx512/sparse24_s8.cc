// AVX-512 VNNI rows kernel of the 2:4 sparse s8 matmul (W8A8; the avx512 ISA runs it at every m,
// small_rows below for m <= 32): kernels/sparse24.h, "avx512 twin". Same contract as
// avx2::s24_s8_rows / ref::s24_s8_rows (exact integer sums, so all three give the same bits);
// packed layout unchanged.
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
#include <cstring>
#include <utility>

#include "kernels/sparse24.h"

namespace qllm::kernels::avx512 {

namespace {

constexpr int kRT = 8;                      // rows per register tile (8 x rows + 16 accumulators)
constexpr int kChunkBlocks = kS8Rows512ChunkBlocks;  // blocks (8 group pairs each) per decoded chunk
constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;  // the codes' offset in a block
static_assert(kRowPanel % kRT == 0 && kS8BlockGroups == 16, "a block is one 64-byte x window (8 group pairs)");

// Slot s of a decoded half -> its channel: vpunpcklwd leaves channels 8L + {0..3} of each 128-bit
// lane L in dwords 4L + {0..3} (the low half), vpunpckhwd channels 8L + {4..7} (the high half).
constexpr int slot_channel(int s) { return s < 16 ? 8 * (s / 4) + s % 4 : 8 * ((s - 16) / 4) + 4 + s % 4; }

// The inverse as vpermt2d indices: output channel c takes slot kToSlot[c] of (low half, high half).
alignas(64) constexpr int32_t kToSlot[32] = {0, 1, 2,  3,  16, 17, 18, 19, 4,  5,  6,  7,  20, 21, 22, 23,
                                             8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
static_assert(slot_channel(4) == 8 && slot_channel(16) == 4 && slot_channel(31) == 31, "kToSlot inverts slot_channel");

// One row's 32 sums (slot order, lo / hi halves, biased by +128 x) to out in channel order: the
// bias undone by -128 * the channel's kept-weight sum (clo / chi = that sum << 7).
[[gnu::always_inline]] inline void store_row(__m512i lo, __m512i hi, __m512i clo, __m512i chi, int32_t* out) {
  const __m512i plo = _mm512_load_si512(kToSlot), phi = _mm512_load_si512(kToSlot + 16);
  lo = _mm512_sub_epi32(lo, clo);
  hi = _mm512_sub_epi32(hi, chi);
  _mm512_store_si512(out, _mm512_permutex2var_epi32(lo, plo, hi));
  _mm512_store_si512(out + 16, _mm512_permutex2var_epi32(lo, phi, hi));
}

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
  }
};

// Group pair j of a packed block, decoded (index and values of both halves); ws0 / ws1 += the
// kept weights per channel (slot order). The constants come in by value: behind references
// GCC 12 reloaded them after every store.
[[gnu::always_inline]] inline Pair decode_pair(const uint8_t* blk, int j, __m512i ones, __m512i cperm, __m512i cs0, __m512i cs1,
                                               __m512i bsel, __m512i seven, const __m512i& lut, __m512i& ws0, __m512i& ws1) {
  Pair d;
  const __m512i v0 = _mm512_loadu_si512(blk + 2 * j * kS8Channels * 2);
  const __m512i v1 = _mm512_loadu_si512(blk + (2 * j + 1) * kS8Channels * 2);
  d.wlo = _mm512_unpacklo_epi16(v0, v1);
  d.whi = _mm512_unpackhi_epi16(v0, v1);
  ws0 = _mm512_dpbusd_epi32(ws0, ones, d.wlo);
  ws1 = _mm512_dpbusd_epi32(ws1, ones, d.whi);
  // The pair's 24 code bytes (the buffer is padded past the last block).
  const __m512i cw = _mm512_permutexvar_epi8(
      cperm, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kCodes + 24 * j))));
  // (code & 7) | 8 b, then the slot's LUT.
  const __m512i qlo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(cs0, cw), seven, bsel, 0xea);
  const __m512i qhi = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(cs1, cw), seven, bsel, 0xea);
  d.ilo = _mm512_permutexvar_epi8(qlo, lut);
  d.ihi = _mm512_permutexvar_epi8(qhi, lut);
  return d;
}

// Decode blocks [b0, b0 + nb) of one super-panel into dec (8 pairs per block); ws[2] += the kept
// weights per channel (slot order).
void decode(const uint8_t* panel, int64_t b0, int64_t nb, Pair* dec, __m512i (&wsum)[2], const Consts& k) {
  // Locals: with the sums behind references GCC 12 kept them in memory (a store-forwarded
  // vpdpbusd chain per pair and half).
  const __m512i ones = _mm512_set1_epi8(1), seven = _mm512_set1_epi8(7);
  __m512i ws0 = wsum[0], ws1 = wsum[1];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = panel + (b0 + b) * kS8BlockBytes;
    for (int j = 0; j < 8; ++j)
      dec[b * 8 + j] = decode_pair(blk, j, ones, k.cperm, k.cshift[0], k.cshift[1], k.bsel, seven, k.lut[j], ws0, ws1);
  }
  wsum[0] = ws0;
  wsum[1] = ws1;
}

// The chunk's x for the panel, biased to u8 once (x + 128, i.e. x ^ 0x80) into xb [64][256]: rows
// past `rows` and bytes past k read as x = 0 (their weights are the packing's zero groups). Done
// per chunk, not per super-panel and tile: the bias and the tail masks in the tile loop cost
// ~10 % (bare kernel 0.48-0.49 -> 0.44 ns per 64 products).
void bias_chunk(const int8_t* x, int64_t ldx, int64_t rows, int64_t kvalid, int64_t nb, uint8_t* xb) {
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

// Few rows (m <= kSmallMaxRows; decode's m = 1 is the matrix-vector product). The tiles above
// amortise a group pair's decode (11 vector ops, written to memory and read back by every 8-row
// tile) over a 64-row panel; with few rows that round trip costs more than the products. Here
// each super-panel's blocks are read straight from the packed stream and every pair is decoded
// in registers and used at once by R <= 8 rows (11 + 4 R vector ops per pair and 32 channels,
// the R rows' biased x windows in registers per block); more rows run in chunks of 8 over the
// same super-panel, whose 136-272 KB of weights are then still in L2. Measured (bench sparse24,
// avx512, in one session against the tiles): m = 4-8 1.7-2.7x faster, m = 12-24 1.2-1.8x, m = 32
// equal, m = 48 and 64 10-25 % slower, hence kSmallMaxRows = 32. With R >= 4 rows the weights
// are prefetched kSmallPf bytes ahead (the stream runs on across super-panels: they are
// consecutive in the packed buffer); with fewer the loop is light enough for the hardware
// prefetcher alone (measured, alternated runs: m = 1 and 2 5-10 % faster without the software
// prefetch, m = 8 1.3-1.5x faster with it, m = 4 equal or slightly faster with it; 1 and 4 KiB
// ahead no better than 2). Same sums, slot order and bias correction as the tiles, so the same
// bits.
constexpr int64_t kSmallMaxRows = 32;
constexpr int64_t kSmallPf = 2048;

template <int R>
void small_rows(const int8_t* x, int64_t ldx, const uint8_t* panel, int64_t kb, __mmask64 tail_mask, const Consts& kc,
                int32_t* out) {
  const __m512i ones = _mm512_set1_epi8(1), cperm = kc.cperm, cs0 = kc.cshift[0], cs1 = kc.cshift[1], bsel = kc.bsel;
  const __m512i seven = _mm512_set1_epi8(7), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i a[R][2], ws0 = _mm512_setzero_si512(), ws1 = ws0;
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = ws0;
  for (int64_t b = 0; b < kb; ++b) {
    const uint8_t* blk = panel + b * kS8BlockBytes;
    if constexpr (R >= 4)
      for (int64_t l = 0; l < kS8BlockBytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + kSmallPf + l), _MM_HINT_T0);
    __m512i xr[R];
    const __mmask64 km = b + 1 < kb ? ~__mmask64{0} : tail_mask;
    for (int r = 0; r < R; ++r) xr[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(km, x + r * ldx + 64 * b), bias);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const Pair d = decode_pair(blk, j, ones, cperm, cs0, cs1, bsel, seven, kc.lut[j], ws0, ws1);  // in registers
      for (int r = 0; r < R; ++r) {
        a[r][0] = _mm512_dpbusd_epi32(a[r][0], _mm512_permutexvar_epi8(d.ilo, xr[r]), d.wlo);
        a[r][1] = _mm512_dpbusd_epi32(a[r][1], _mm512_permutexvar_epi8(d.ihi, xr[r]), d.whi);
      }
    }
  }
  const __m512i clo = _mm512_slli_epi32(ws0, 7), chi = _mm512_slli_epi32(ws1, 7);
  for (int r = 0; r < R; ++r) store_row(a[r][0], a[r][1], clo, chi, out + r * 32);
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
  Pair* dec = static_cast<Pair*>(scratch);
  uint8_t* xb = static_cast<uint8_t*>(scratch) + kChunkBlocks * 8 * sizeof(Pair);
  int32_t* wsum = reinterpret_cast<int32_t*>(xb + kRowPanel * kChunkBlocks * 64);
  const int64_t kb = (k / 4 + kS8BlockGroups - 1) / kS8BlockGroups;  // blocks holding k
  const int64_t nsp = sp1 - sp0;
  constexpr int64_t kSp = kS8Channels * kRowPanel;  // s32 per super-panel in acc
  if (kb == 0 || rows <= 0) {
    std::memset(acc, 0, static_cast<size_t>(nsp * kSp) * sizeof(int32_t));
    return;
  }
  if (rows <= kSmallMaxRows) {
    const int64_t tail = k - 64 * (kb - 1);  // valid x bytes of the last block (1..64)
    const __mmask64 tail_mask = tail >= 64 ? ~__mmask64{0} : (__mmask64{1} << tail) - 1;
    const int64_t nr = std::min<int64_t>(rows, kRowPanel);
    for (int64_t sp = sp0; sp < sp1; ++sp) {
      int32_t* out = acc + (sp - sp0) * kSp;
      const uint8_t* panel = w.block(sp, 0);
      for (int64_t r0 = 0; r0 < nr; r0 += 8) {
        const int8_t* xr = x + r0 * ldx;
        int32_t* o = out + r0 * 32;
        switch (std::min<int64_t>(8, nr - r0)) {
          case 1: small_rows<1>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 2: small_rows<2>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 3: small_rows<3>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 4: small_rows<4>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 5: small_rows<5>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 6: small_rows<6>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          case 7: small_rows<7>(xr, ldx, panel, kb, tail_mask, kc, o); break;
          default: small_rows<8>(xr, ldx, panel, kb, tail_mask, kc, o); break;
        }
      }
      std::memset(out + nr * 32, 0, static_cast<size_t>((kRowPanel - nr) * 32) * sizeof(int32_t));
    }
    return;
  }
  for (int64_t b0 = 0; b0 < kb; b0 += kChunkBlocks) {
    const int64_t nb = std::min<int64_t>(kChunkBlocks, kb - b0);
    bias_chunk(x + 64 * b0, ldx, rows, k - 64 * b0, nb, xb);
    for (int64_t sp = sp0; sp < sp1; ++sp) {
      __m512i ws[2];
      int32_t* wsp = wsum + (sp - sp0) * kS8Channels;
      ws[0] = b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp);
      ws[1] = b0 == 0 ? _mm512_setzero_si512() : _mm512_load_si512(wsp + 16);
      decode(w.block(sp, 0), b0, nb, dec, ws, kc);
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
  const int64_t nr = std::min<int64_t>(rows, kRowPanel);
  for (int64_t sp = sp0; sp < sp1; ++sp) {
    int32_t* a = acc + (sp - sp0) * kSp;
    const int32_t* ws = wsum + (sp - sp0) * kS8Channels;
    const __m512i clo = _mm512_slli_epi32(_mm512_load_si512(ws), 7), chi = _mm512_slli_epi32(_mm512_load_si512(ws + 16), 7);
    for (int64_t r = 0; r < nr; ++r)
      store_row(_mm512_load_si512(a + r * 32), _mm512_load_si512(a + r * 32 + 16), clo, chi, a + r * 32);
    std::memset(a + nr * 32, 0, static_cast<size_t>((kRowPanel - nr) * 32) * sizeof(int32_t));
  }
}

}  // namespace qllm::kernels::avx512
