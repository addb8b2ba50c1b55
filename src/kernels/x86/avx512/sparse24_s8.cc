// AVX-512 VNNI rows kernel of the 2:4 sparse s8 matmul (W8A8, large m): kernels/sparse24.h,
// "avx512 twin". Same contract as avx2::s24_s8_rows / ref::s24_s8_rows (exact integer sums, so
// all three give the same bits); packed layout unchanged.
//
// Why a table of 36 combinations: vpdpbusd sums 4 u8 x s8 products into each s32 lane. With rows
// in the lanes, the 4 bytes of a lane must be 4 kept x of ONE row for ONE channel; a group keeps
// only 2, so a lane takes a group PAIR: (x[i0(t0)], x[i1(t0)], x[4 + i0(t1)], x[4 + i1(t1)]) for
// the channel's two pair codes t0, t1 (6 x 6 = 36 combinations). Per chunk of 4 groups (2 group
// pairs) and 64-row panel the kernel writes all 36 combinations of both pairs (x + 128, u8):
//   tab[gp][c = 6 t0 + t1][64 rows] u8x4   (2 x 36 x 256 bytes = 18 KB, stays in L1)
// and then per channel and group pair runs 4 vpdpbusd (64 rows) of the table entry (a load at a
// data-dependent offset: load ports, not vector pipes) with the broadcast dword of the channel's 4
// kept s8 values: 64 useful multiply-adds per instruction, where the dense VNNI kernel does 64
// dense ones (half of them on pruned weights). The x + 128 bias (vpdpbusd's first operand is
// unsigned) is undone per channel by -128 * sum of its kept weights (summed per item by one
// vpdpbusd against a vector of ones per 16 channels and group pair): everything is exact modulo
// 2^32 and the true sums fit s32 (ops/ bounds k), as in the dense VNNI kernel.
//
// Per super-panel and chunk, a short vector pass decodes the packed super-panel into what the
// channel loop wants (measured in a /tmp microbenchmark: decoding inline, per channel, with scalar
// shifts and a vpbroadcastd from a general register ran at half the speed of reading decoded
// arrays): the channel's 4 values as one dword (vpunpck{l,h}wd of the two groups' value rows:
// channels end up in "slot" order, slot_channel below) and its table offset c * 256 from the
// two 3-bit codes (vpermb + vpmultishiftqb extract them, vpmaddubsw forms 6 t0 + t1).
//
// Ceiling (microbenchmark, one core, table in L1, random codes): 0.31 ns per vpdpbusd for this
// 64-row / 2-group-pair shape against the dense kernel's 0.27 ns (8 x 16 tile), i.e. ~1.75x the
// dense useful rate; 32-row panels with 4 group pairs (same 18 KB table) measured ~1.9x but would
// re-read the weights twice as often and decode per 2 instead of 4 vpdpbusd.
#pragma GCC target("avx512vbmi")
// g++ 12 warns about the undefined upper half inside its own _mm512 VBMI intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "kernels/sparse24.h"

namespace qllm::kernels::avx512 {

namespace {

constexpr int kChunk = 4;                    // groups per chunk (two group pairs), inside one block
constexpr int kGP = kChunk / 2;              // group pairs per chunk
constexpr int64_t kEntry = kRowPanel * 4;    // one combination for 64 rows: 256 bytes
constexpr int64_t kGpBytes = 36 * kEntry;    // one group pair's table: 9 KB
constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;  // the codes' offset in a block
static_assert(kGP * kGpBytes == kS8Rows512TableBytes && kS8BlockGroups % kChunk == 0 && kRowPanel == 64,
              "the table holds one chunk of one 64-row panel; a chunk lies in one block");

// Slot s of a decoded super-panel -> its channel: vpunpcklwd leaves channels 8L + {0..3} of each
// 128-bit lane L in dwords 4L + {0..3} (slots 0..15), vpunpckhwd channels 8L + {4..7} (slots 16..31).
constexpr int slot_channel(int s) { return s < 16 ? 8 * (s / 4) + s % 4 : 8 * ((s - 16) / 4) + 4 + s % 4; }

// A chunk of one super-panel, decoded: per group pair and slot the 4 kept values (g.v0, g.v1,
// g+1.v0, g+1.v1: the table entry's byte order) and the table offset (6 t0 + t1) * 256.
struct Decoded {
  alignas(64) int32_t w[kGP][kS8Channels];
  alignas(64) uint16_t off[kGP][kS8Channels];
};
static_assert(sizeof(Decoded) <= 2 * kS8Channels * 8, "kS8Rows512ScratchBytes reserves 512 bytes for it");

// Constants of the decode and the table build, made once per call.
struct Consts {
  __m512i ca[6], cb[6];  // vpshufb controls: pair t of a dword's 4 bytes into bytes 0, 1 (ca) or 2, 3 (cb)
  __m512i cperm;         // vpermb: the 24 code bytes of two groups -> per-qword source bytes
  __m512i cshift;        // vpmultishiftqb: bit offsets of t0 / t1 per output byte
  __m512i coef;          // vpmaddubsw (6, 1): 6 t0 + t1
  Consts() {
    constexpr int kPos[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};  // kernels/sparse24.h codes
    alignas(64) uint8_t a[64], b[64];
    for (int t = 0; t < 6; ++t) {
      for (int d = 0; d < 16; ++d) {
        a[4 * d] = static_cast<uint8_t>((4 * d + kPos[t][0]) & 15);
        a[4 * d + 1] = static_cast<uint8_t>((4 * d + kPos[t][1]) & 15);
        a[4 * d + 2] = a[4 * d + 3] = 0x80;
        b[4 * d] = b[4 * d + 1] = 0x80;
        b[4 * d + 2] = static_cast<uint8_t>((4 * d + kPos[t][0]) & 15);
        b[4 * d + 3] = static_cast<uint8_t>((4 * d + kPos[t][1]) & 15);
      }
      ca[t] = _mm512_load_si512(a);
      cb[t] = _mm512_load_si512(b);
    }
    // Output qword i holds slots 4i..4i+3 (one 16-bit word each: t0 in the low byte, t1 in the
    // high). Their channels are in sub-panel L = i % 4, at code bits 3u (i < 4) or 12 + 3u (i >= 4)
    // of its 24-bit word; group g's 4 words are the loaded bytes 0..11, group g + 1's 12..23.
    // Source qword i = (g's 3 bytes of sub-panel L, g + 1's 3 bytes, 0, 0).
    alignas(64) uint8_t p[64], m[64], c[64];
    for (int i = 0; i < 8; ++i) {
      const int L = i % 4, hi = i >= 4 ? 12 : 0;
      for (int bb = 0; bb < 8; ++bb) p[8 * i + bb] = static_cast<uint8_t>(bb < 3 ? 3 * L + bb : bb < 6 ? 12 + 3 * L + bb - 3 : 0);
      for (int u = 0; u < 4; ++u) {
        m[8 * i + 2 * u] = static_cast<uint8_t>(hi + 3 * u);
        m[8 * i + 2 * u + 1] = static_cast<uint8_t>(24 + hi + 3 * u);
      }
    }
    for (int i = 0; i < 64; ++i) c[i] = i % 2 == 0 ? 6 : 1;
    cperm = _mm512_load_si512(p);
    cshift = _mm512_load_si512(m);
    coef = _mm512_load_si512(c);
  }
};

// The chunk's table: groups [g0, g0 + 4) of the panel's 64 rows, gathered 16 rows x one group at
// a time (rows past `rows` and groups past `groups` read as x = 0), biased to u8, then per group
// pair 12 vpshufb and 36 vpor + store per 16 rows.
void build_table(const int8_t* x, int64_t ldx, int64_t rows, int64_t groups, int64_t g0, uint8_t* tab, const Consts& k) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i bias = _mm512_set1_epi32(static_cast<int>(0x80808080u));
  for (int z = 0; z < 4; ++z) {
    const __m512i r = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * z));
    const __m512i vidx = _mm512_mullo_epi32(r, _mm512_set1_epi32(static_cast<int>(ldx)));
    const __mmask16 rm = _mm512_cmplt_epi32_mask(r, _mm512_set1_epi32(static_cast<int>(rows)));
    for (int gp = 0; gp < kGP; ++gp) {
      __m512i xg[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t g = g0 + 2 * gp + h;
        const __mmask16 m = g < groups ? rm : 0;
        xg[h] = _mm512_xor_si512(
            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, vidx, x + (g < groups ? 4 * g : 0), 1), bias);
      }
      __m512i a[6], b[6];
      for (int t = 0; t < 6; ++t) {
        a[t] = _mm512_shuffle_epi8(xg[0], k.ca[t]);
        b[t] = _mm512_shuffle_epi8(xg[1], k.cb[t]);
      }
      uint8_t* tg = tab + gp * kGpBytes + 64 * z;
      for (int t0 = 0; t0 < 6; ++t0)
        for (int t1 = 0; t1 < 6; ++t1) _mm512_store_si512(tg + (6 * t0 + t1) * kEntry, _mm512_or_si512(a[t0], b[t1]));
    }
  }
}

// Decode the chunk (groups gi0..gi0+3 of block blk) of one super-panel; ws (32 s32, slot order)
// += the chunk's kept weights per channel.
template <bool First>
[[gnu::always_inline]] inline void decode(const uint8_t* blk, int64_t gi0, Decoded& d, int32_t* ws, const Consts& k) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i s0 = First ? _mm512_setzero_si512() : _mm512_load_si512(ws);
  __m512i s1 = First ? _mm512_setzero_si512() : _mm512_load_si512(ws + 16);
  for (int gp = 0; gp < kGP; ++gp) {
    const uint8_t* v = blk + (gi0 + 2 * gp) * kS8Channels * 2;
    const __m512i v0 = _mm512_loadu_si512(v), v1 = _mm512_loadu_si512(v + kS8Channels * 2);
    const __m512i lo = _mm512_unpacklo_epi16(v0, v1), hi = _mm512_unpackhi_epi16(v0, v1);
    _mm512_store_si512(d.w[gp], lo);
    _mm512_store_si512(d.w[gp] + 16, hi);
    s0 = _mm512_dpbusd_epi32(s0, ones, lo);
    s1 = _mm512_dpbusd_epi32(s1, ones, hi);
    // 24 code bytes (this pair's two groups; the buffer is padded past the last block).
    const __m512i cw = _mm512_castsi256_si512(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kCodes + (gi0 + 2 * gp) * 12)));
    const __m512i t = _mm512_and_si512(_mm512_multishift_epi64_epi8(k.cshift, _mm512_permutexvar_epi8(k.cperm, cw)),
                                       _mm512_set1_epi8(7));
    _mm512_store_si512(d.off[gp], _mm512_slli_epi16(_mm512_maddubs_epi16(t, k.coef), 8));
  }
  _mm512_store_si512(ws, s0);
  _mm512_store_si512(ws + 16, s1);
}

// One slot (channel) over the chunk: 64 rows in 4 zmm, per group pair one broadcast of the 4
// values and 4 vpdpbusd with the table entry; on the last chunk the bias correction.
template <int S, bool First, bool Last>
[[gnu::always_inline]] inline void slot(const uint8_t* tab, const Decoded& d, const int32_t* ws, int32_t* acc) {
  int32_t* a = acc + slot_channel(S) * kRowPanel;
  __m512i r[4];
  for (int z = 0; z < 4; ++z) r[z] = First ? _mm512_setzero_si512() : _mm512_load_si512(a + 16 * z);
  for (int gp = 0; gp < kGP; ++gp) {
    const uint8_t* e = tab + gp * kGpBytes + d.off[gp][S];
    const __m512i wb = _mm512_set1_epi32(d.w[gp][S]);
    for (int z = 0; z < 4; ++z) r[z] = _mm512_dpbusd_epi32(r[z], _mm512_load_si512(e + 64 * z), wb);
  }
  if (Last) {
    const __m512i corr = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(ws[S]) * 128u));
    for (int z = 0; z < 4; ++z) r[z] = _mm512_sub_epi32(r[z], corr);
  }
  for (int z = 0; z < 4; ++z) _mm512_store_si512(a + 16 * z, r[z]);
}

template <bool First, bool Last, int... S>
[[gnu::always_inline]] inline void slots(std::integer_sequence<int, S...>, const uint8_t* tab, const Decoded& d,
                                         const int32_t* ws, int32_t* acc) {
  (slot<S, First, Last>(tab, d, ws, acc), ...);
}

// One super-panel's chunk: decode, then its 32 channels.
template <bool First, bool Last>
void superpanel(const uint8_t* blk, int64_t gi0, const uint8_t* tab, Decoded& d, int32_t* ws, int32_t* acc,
                const Consts& k) {
  decode<First>(blk, gi0, d, ws, k);
  slots<First, Last>(std::make_integer_sequence<int, kS8Channels>{}, tab, d, ws, acc);
}

}  // namespace

// Chunk walk (as avx2::s24_s8_rows): per chunk of 4 groups build the table, then every
// super-panel. Prefetch: a super-panel's chunk (4 value lines + its code bytes) two super-panels
// ahead (at the end of the item: the first super-panels of the next chunk); the next chunk's x
// rows spread over the super-panels.
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch) {
  static const Consts kc;
  uint8_t* tab = static_cast<uint8_t*>(scratch);
  Decoded& d = *reinterpret_cast<Decoded*>(tab + kS8Rows512TableBytes);
  int32_t* wsum = reinterpret_cast<int32_t*>(tab + kS8Rows512TableBytes + 2 * kS8Channels * 8);
  const int64_t groups = k / 4, nsp = sp1 - sp0;
  if (groups == 0) std::memset(acc, 0, static_cast<size_t>(nsp * kS8Channels * kRowPanel) * sizeof(int32_t));
  for (int64_t g0 = 0; g0 < groups; g0 += kChunk) {
    // Groups past k inside the chunk are the packing's zero groups (zero values, code 0): they run
    // like the others against x = 0.
    build_table(x, ldx, rows, groups, g0, tab, kc);
    const int64_t b = g0 / kS8BlockGroups, gi0 = g0 % kS8BlockGroups, gnext = g0 + kChunk;
    const bool first = g0 == 0, last = gnext >= groups;
    for (int64_t sp = sp0; sp < sp1; ++sp) {
      constexpr int pfd = 2;
      const int64_t ps = sp + pfd < sp1 ? sp + pfd : sp0 + (sp + pfd - sp1);
      const int64_t pg = sp + pfd < sp1 ? g0 : gnext;
      if (pg < groups && ps < sp1) {
        const uint8_t* pb = w.block(ps, pg / kS8BlockGroups);
        const int64_t pgi = pg % kS8BlockGroups;
        for (int l = 0; l < kChunk; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(pb + (pgi + l) * kS8Channels * 2), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pb + kCodes + pgi * 12), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(pb + kCodes + pgi * 12 + kChunk * 12 - 1), _MM_HINT_T0);
      }
      if (gnext < groups)
        for (int64_t r = kRowPanel * (sp - sp0) / nsp; r < kRowPanel * (sp - sp0 + 1) / nsp && r < rows; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(x + r * ldx + 4 * gnext), _MM_HINT_T0);
      const uint8_t* blk = w.block(sp, b);
      int32_t* a = acc + (sp - sp0) * kS8Channels * kRowPanel;
      int32_t* ws = wsum + (sp - sp0) * kS8Channels;
      if (first && last) superpanel<true, true>(blk, gi0, tab, d, ws, a, kc);
      else if (first) superpanel<true, false>(blk, gi0, tab, d, ws, a, kc);
      else if (last) superpanel<false, true>(blk, gi0, tab, d, ws, a, kc);
      else superpanel<false, false>(blk, gi0, tab, d, ws, a, kc);
    }
  }
}

}  // namespace qllm::kernels::avx512
