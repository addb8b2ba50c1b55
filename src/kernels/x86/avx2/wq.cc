// AVX2 weight-only quantised matmul (W8A16 / W4A16) on the packed panels of kernels/wq.h.
//
// Matrix-vector path (m <= 8, memory-bound): the goal is to decode weights as fast as DRAM
// delivers them. 4-bit weights take exact integer digit products per chunk where that is
// cheaper (int_both / int_half below, the VNNI kernel's scheme with vpmaddubsw; x prepared by
// kernels/x86/wq_digits.h); the rest takes the float path: A k-block (64 bytes: 16 columns x KB k) is two 32-byte loads; value i of every
// column is `vpand` with the bits of value i + `vcvtdq2ps`, which yields u * 2^(iB) exactly (the
// layout stores values biased and the top value signed, see wq.h), and one FMA against x[k]
// pre-multiplied by 2^(-iB) (exact: a power of two). So 3 vector ops per 8 weights, no shifts and
// no sign extension. Per group the kernel accumulates dot = sum_k x'[k] * stored[k] and applies
//   y += scale * (dot - bias_q * sum_{biased k} x + offset * sum_k x)
// once per group and column, with both sums prepared per row (wq_prepare). With one row the
// FMA chain latency (4 cycles) would bound the loop, so m = 1 keeps 4 independent accumulator
// sets (8 chains), m = 2 two.
//
// GEMM path (large m): `dequant` expands a (k-block x 16) tile to f32 W' with exactly the
// reference's operations ((f32(q) + offset) * scale), and `micro` is a 6 x 16 FMA microkernel
// (12 accumulators; see gemm_float.cc for why 6 x 16) that accumulates in k order, so the GEMM
// path matches the scalar reference bit for bit.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/wq.h"
#include "kernels/x86/avx2/simd.h"
#include "kernels/x86/wq_digits.h"

namespace qllm::kernels {

namespace avx2 {
namespace {

inline float pow2(int e) {  // 2^e for small |e|, exact
  return e >= 0 ? static_cast<float>(1u << e) : 1.0f / static_cast<float>(1u << -e);
}

// Per-row preparation: the digit kernels' (kernels/x86/wq_digits.h, shared with the AVX-512 VNNI
// kernel, layout WqVnniGeometry in kernels/wq.h): x' = x * 2^(-iB) for the float path, per
// group the sum of x (offsets), per chunk the digit count / accumulator starts / digit weights
// / the float path's bias correction, and the digits.
int64_t prep_floats(const WqPanels& w) { return wq_vnni_prep_floats(w); }

void prepare(const WqPanels& w, const float* x, float* prep, int64_t g0, int64_t g1) {
  wq_digits_prepare(w, x, prep, g0, g1);
}

using Geo = WqVnniGeometry;
// Software prefetch distance on the weight stream (see the design notes).
constexpr int64_t g_pf = 1024;

// Digit path, 4-bit weights, one row, one half-panel (8 columns: 32 bytes of each 64-byte
// k-block, bp already at the half), one chunk of nkb k-blocks, S digits. Per k-block the 32
// bytes (8 columns x 8 nibbles) split into even nibbles (vpand 0x0F) and odd nibbles (vpsrlw 4 +
// vpand; the xor of bit 31 first biases the top nibble, stored signed, like the rest): u8 lanes
// u = q + 8, 4 k of one column per dword. vpmaddubsw against the digit bytes of those 4 k (s8,
// broadcast) gives per column two int16 pair sums, |.| <= 2 * 15 * 128 = 3840, so 4 k-blocks
// (8 products) sum exactly in int16 (<= 30720 < 2^15) before one vpmaddwd by ones widens them
// to int32 and vpaddd adds them to the digit's accumulator, started at -8 * sum(digits) so it
// ends holding exactly sum d * q (|.| <= 2^22 for chunks <= 256 k: exact in f32).
// Per 64 weights and digit: 2 vpmaddubsw + 2 vpaddw + 0.5 (widen), plus 4 ops of unpacking per
// 64 weights for all digits: 17 ops at 3 digits where the float path spends 24.
template <int S, bool PF>
__attribute__((always_inline)) inline void int_half(const uint8_t* bp, int64_t nkb, const int8_t* dg, const int32_t* inf, __m256& t) {
  __m256i acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm256_set1_epi32(inf[1 + s]);
  const __m256i lo = _mm256_set1_epi8(0x0F);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t kb0 = 0; kb0 < nkb; kb0 += 4) {
    const int nb = static_cast<int>(nkb - kb0 < 4 ? nkb - kb0 : 4);
    __m256i a16[S];
    for (int b = 0; b < 4; ++b) {
      if (b >= nb) break;
      const uint8_t* p = bp + (kb0 + b) * kWqBlockBytes;
      if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(p + g_pf), _MM_HINT_T0);
      const __m256i v = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)), top);
      const __m256i e = _mm256_and_si256(v, lo);
      const __m256i o = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);
      const int8_t* d = dg + (kb0 + b) * 32;
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        int32_t de, dod;
        std::memcpy(&de, d + s * 8, 4);
        std::memcpy(&dod, d + s * 8 + 4, 4);
        const __m256i pr = _mm256_add_epi16(_mm256_maddubs_epi16(e, _mm256_set1_epi32(de)),
                                            _mm256_maddubs_epi16(o, _mm256_set1_epi32(dod)));
        a16[s] = b == 0 ? pr : _mm256_add_epi16(a16[s], pr);
      }
    }
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) acc[s] = _mm256_add_epi32(acc[s], _mm256_madd_epi16(a16[s], ones));
  }
  // sum_s f32(acc_s) * 2^(u + 8s), top digit first: the VNNI kernel's order (same bits).
  const float* pw = reinterpret_cast<const float*>(inf) + 5;
  for (int s = S - 1; s >= 0; --s) t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[s]), _mm256_set1_ps(pw[s]), t);
}

// Both halves in one pass (S <= 3): the digit broadcasts (loads) are shared by the 16 columns.
// 2S int16 sums + 4 unpacked vectors + 2 broadcasts + 2 constants fill the 16 ymm; the int32
// accumulators are touched once per 4 k-blocks (the compiler keeps them in L1).
template <int S>
__attribute__((always_inline)) inline void int_both(const uint8_t* bp, int64_t nkb, const int8_t* dg, const int32_t* inf, __m256* t) {
  __m256i acc[S][2];
  for (int s = 0; s < S; ++s) acc[s][0] = acc[s][1] = _mm256_set1_epi32(inf[1 + s]);
  const __m256i lo = _mm256_set1_epi8(0x0F);
  const __m256i top = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t kb0 = 0; kb0 < nkb; kb0 += 4) {
    const int nb = static_cast<int>(nkb - kb0 < 4 ? nkb - kb0 : 4);
    __m256i a16[S][2];
    for (int b = 0; b < 4; ++b) {
      if (b >= nb) break;
      const uint8_t* p = bp + (kb0 + b) * kWqBlockBytes;
      _mm_prefetch(reinterpret_cast<const char*>(p + g_pf), _MM_HINT_T0);
      const __m256i v0 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(p)), top);
      const __m256i v1 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32)), top);
      const __m256i e0 = _mm256_and_si256(v0, lo), o0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo);
      const __m256i e1 = _mm256_and_si256(v1, lo), o1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo);
      const int8_t* d = dg + (kb0 + b) * 32;
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) {
        int32_t de, dod;
        std::memcpy(&de, d + s * 8, 4);
        std::memcpy(&dod, d + s * 8 + 4, 4);
        const __m256i De = _mm256_set1_epi32(de), Do = _mm256_set1_epi32(dod);
        const __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(e0, De), _mm256_maddubs_epi16(o0, Do));
        const __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(e1, De), _mm256_maddubs_epi16(o1, Do));
        a16[s][0] = b == 0 ? p0 : _mm256_add_epi16(a16[s][0], p0);
        a16[s][1] = b == 0 ? p1 : _mm256_add_epi16(a16[s][1], p1);
      }
    }
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      acc[s][0] = _mm256_add_epi32(acc[s][0], _mm256_madd_epi16(a16[s][0], ones));
      acc[s][1] = _mm256_add_epi32(acc[s][1], _mm256_madd_epi16(a16[s][1], ones));
    }
  }
  const float* pw = reinterpret_cast<const float*>(inf) + 5;
  for (int s = S - 1; s >= 0; --s) {
    t[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[s][0]), _mm256_set1_ps(pw[s]), t[0]);
    t[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[s][1]), _mm256_set1_ps(pw[s]), t[1]);
  }
}

inline void int_chunk4(int S, const uint8_t* bp, int64_t nkb, const int8_t* dg, const int32_t* inf, __m256* t) {
  // Half 0 streams the chunk's cache lines in (and prefetches ahead); half 1 reads them from L1.
  switch (S) {
    case 1: int_both<1>(bp, nkb, dg, inf, t); break;
    case 2: int_both<2>(bp, nkb, dg, inf, t); break;
    case 3: int_both<3>(bp, nkb, dg, inf, t); break;
    default: int_half<4, true>(bp, nkb, dg, inf, t[0]); int_half<4, false>(bp + 32, nkb, dg, inf, t[1]); break;
  }
}

// Float path of one chunk, MR rows: value i of every column is vpand + vcvtdq2ps (u * 2^(iB)
// exactly, see wq.h) and one FMA against x' = x * 2^(-iB); 3 vector ops per 8 weights and row.
// With one row the FMA latency would bound the loop, so m = 1 keeps 4 independent accumulator
// sets, m = 2 two. The sums run in the VNNI kernel's float path's order (same bits).
template <int BITS, int MR>
__attribute__((always_inline)) inline void float_chunk(const uint8_t* bp, int64_t nkb, const float* const* xr, int64_t k0,
                        const int32_t* const* inf, __m256 (*t)[2]) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  constexpr int NS = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  __m256 acc0[NS][MR], acc1[NS][MR];
  for (int s = 0; s < NS; ++s)
    for (int r = 0; r < MR; ++r) acc0[s][r] = acc1[s][r] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < nkb; ++kb, bp += kWqBlockBytes) {
    _mm_prefetch(reinterpret_cast<const char*>(bp + g_pf), _MM_HINT_T0);
    const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(bp + 32));
    const int64_t kk = k0 + kb * KB;
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) {
      const __m256i m = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (i * BITS)));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
      for (int r = 0; r < MR; ++r) {
        const __m256 xb = _mm256_broadcast_ss(xr[r] + kk + i);
        acc0[i % NS][r] = _mm256_fmadd_ps(xb, w0, acc0[i % NS][r]);
        acc1[i % NS][r] = _mm256_fmadd_ps(xb, w1, acc1[i % NS][r]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    __m256 a0 = acc0[0][r], a1 = acc1[0][r];
    for (int s = 1; s < NS; ++s) {
      a0 = _mm256_add_ps(a0, acc0[s][r]);
      a1 = _mm256_add_ps(a1, acc1[s][r]);
    }
    const __m256 cb = _mm256_set1_ps(reinterpret_cast<const float*>(inf[r])[9]);
    t[r][0] = _mm256_add_ps(t[r][0], _mm256_add_ps(a0, cb));
    t[r][1] = _mm256_add_ps(t[r][1], _mm256_add_ps(a1, cb));
  }
}

// Per chunk, the rows' digit counts S_r (0: all zero, 5: float path) pick the path: float for
// all rows when one needs it; else the digit path (row by row: its accumulators do not fit 16
// ymm for several rows, the chunk is in L1 after the first row) when its estimated vector ops
// per 64 weights, sum_r (4 + 4.5 S_r), are below the float path's 16 + 8 MR (the float path
// shares its decode between rows, the digit path pays per digit and row). 8-bit weights take the
// float path (vpmaddubsw would need 7-bit digits for 8-bit weights).
template <int BITS, int MR, bool OFF>
void gemv_panel(const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  const uint8_t* bp = w.panel(p);
  const float* gs[MR];
  for (int r = 0; r < MR; ++r) gs[r] = prow[r] + geo.gsum_at;
  __m256 y[MR][2];
  for (int r = 0; r < MR; ++r) y[r][0] = y[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 t[MR][2];
    for (int r = 0; r < MR; ++r) t[r][0] = t[r][1] = _mm256_setzero_ps();
    const int64_t len = w.group_len(g);
    for (int64_t c = 0; c < geo.cpg; ++c) {
      const int64_t c0 = c * geo.chunk;
      if (c0 >= len) break;
      const int64_t nkb = (std::min(len, c0 + geo.chunk) - c0 + KB - 1) / KB;
      const int32_t* inf[MR];
      const int8_t* dg[MR];
      int smax = 0, cost = 0;
      for (int r = 0; r < MR; ++r) {
        inf[r] = geo.info(prow[r], g, c);
        dg[r] = geo.digits(prow[r], w.kgroup, BITS, g, c0);
        smax = std::max(smax, inf[r][0]);
        if (inf[r][0] > 0) cost += 8 + 9 * inf[r][0];  // twice the estimate above
      }
      if (smax == 0) {
        // all rows zero: nothing to add
      } else if (BITS == 4 && geo.chunk >= 64 && smax <= 4 && cost < 32 + 16 * MR) {
        // (Chunks of 32 k - groups of 32 - keep the float path: the digit path's per-chunk
        // set-up and S-term epilogue every 4 k-blocks measured 15% slower at k = 7168.)
        for (int r = 0; r < MR; ++r)
          if (inf[r][0] > 0) int_chunk4(inf[r][0], bp, nkb, dg[r], inf[r], t[r]);
      } else {
        float_chunk<BITS, MR>(bp, nkb, prow, g * w.kgroup + c0, inf, t);
      }
      bp += nkb * kWqBlockBytes;
    }
    const float* sc = reinterpret_cast<const float*>(bp);
    const __m256 s0 = _mm256_load_ps(sc), s1 = _mm256_load_ps(sc + 8);
    for (int r = 0; r < MR; ++r) {
      __m256 t0 = t[r][0], t1 = t[r][1];
      if constexpr (OFF) {
        const __m256 xs = _mm256_set1_ps(gs[r][g]);
        t0 = _mm256_fmadd_ps(_mm256_load_ps(sc + 16), xs, t0);
        t1 = _mm256_fmadd_ps(_mm256_load_ps(sc + 24), xs, t1);
      }
      y[r][0] = _mm256_fmadd_ps(t0, s0, y[r][0]);
      y[r][1] = _mm256_fmadd_ps(t1, s1, y[r][1]);
    }
    bp += OFF ? 128 : 64;
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(ybuf + r * 16, y[r][0]);
    _mm256_store_ps(ybuf + r * 16 + 8, y[r][1]);
  }
}

// One row (m = 1, session 5, wq6): NP panels at once, interleaved chunk by chunk, so NP weight
// streams are in flight per core (one sequential stream per core reads DRAM far below the
// streaming probe, see the AVX-512 kernel's notes), and the chunk kernels are inlined with the
// chunk sums t in registers (the out-of-line call per chunk kept t in memory). Per chunk the
// path is gemv_panel's at MR = 1 (digits for 4-bit chunks of >= 64 k with S <= 4 - its cost
// estimate 8 + 9 S < 48 always holds at one row -, else the float path), and each panel's
// float operations run in the same order as there: the results are bit-identical to the
// one-panel kernel (and at 4-bit to the VNNI kernel). Measured (one thread, kernel only, k =
// 7168, W4-g128 S = 3): from L2/L3 19.7 -> 21.5 GB/s (inlining), from DRAM (16 weight copies)
// 13.6-14.8 -> 17.7-17.9 GB/s (4 streams; 2 streams 16.8); W8 from DRAM 19.6 -> 24-25 GB/s.
template <int BITS, bool OFF, int NP>
void gemv1_panels(const WqPanels& w, const Geo& geo, const float* prow, int64_t p, float* ybuf) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  const uint8_t* bp[NP];
  for (int q = 0; q < NP; ++q) bp[q] = w.panel(p + q);
  const float* gs = prow + geo.gsum_at;
  const float* const xr[1] = {prow};
  __m256 y[NP][2];
  for (int q = 0; q < NP; ++q) y[q][0] = y[q][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 t[NP][1][2];
    for (int q = 0; q < NP; ++q) t[q][0][0] = t[q][0][1] = _mm256_setzero_ps();
    const int64_t len = w.group_len(g);
    for (int64_t c = 0; c < geo.cpg; ++c) {
      const int64_t c0 = c * geo.chunk;
      if (c0 >= len) break;
      const int64_t nkb = (std::min(len, c0 + geo.chunk) - c0 + KB - 1) / KB;
      const int32_t* inf = geo.info(prow, g, c);
      const int8_t* dg = geo.digits(prow, w.kgroup, BITS, g, c0);
      const int S = inf[0];
      const int32_t* const infs[1] = {inf};
      if (S == 0) {
      } else if (BITS == 4 && geo.chunk >= 64 && S <= 4) {
        switch (S) {
          case 1: for (int q = 0; q < NP; ++q) int_both<1>(bp[q], nkb, dg, inf, t[q][0]); break;
          case 2: for (int q = 0; q < NP; ++q) int_both<2>(bp[q], nkb, dg, inf, t[q][0]); break;
          case 3: for (int q = 0; q < NP; ++q) int_both<3>(bp[q], nkb, dg, inf, t[q][0]); break;
          default:
            for (int q = 0; q < NP; ++q) {
              int_half<4, true>(bp[q], nkb, dg, inf, t[q][0][0]);
              int_half<4, false>(bp[q] + 32, nkb, dg, inf, t[q][0][1]);
            }
            break;
        }
      } else {
        for (int q = 0; q < NP; ++q) float_chunk<BITS, 1>(bp[q], nkb, xr, g * w.kgroup + c0, infs, t[q]);
      }
      for (int q = 0; q < NP; ++q) bp[q] += nkb * kWqBlockBytes;
    }
    for (int q = 0; q < NP; ++q) {
      const float* sc = reinterpret_cast<const float*>(bp[q]);
      __m256 t0 = t[q][0][0], t1 = t[q][0][1];
      if constexpr (OFF) {
        const __m256 xs = _mm256_set1_ps(gs[g]);
        t0 = _mm256_fmadd_ps(_mm256_load_ps(sc + 16), xs, t0);
        t1 = _mm256_fmadd_ps(_mm256_load_ps(sc + 24), xs, t1);
      }
      y[q][0] = _mm256_fmadd_ps(t0, _mm256_load_ps(sc), y[q][0]);
      y[q][1] = _mm256_fmadd_ps(t1, _mm256_load_ps(sc + 8), y[q][1]);
      bp[q] += OFF ? 128 : 64;
    }
  }
  for (int q = 0; q < NP; ++q) {
    _mm256_store_ps(ybuf + q * 16, y[q][0]);
    _mm256_store_ps(ybuf + q * 16 + 8, y[q][1]);
  }
}

template <int BITS, bool OFF>
void gemv1(int np, const WqPanels& w, const Geo& geo, const float* prow, int64_t p, float* ybuf) {
  switch (np) {
    case 1: gemv1_panels<BITS, OFF, 1>(w, geo, prow, p, ybuf); break;
    case 2: gemv1_panels<BITS, OFF, 2>(w, geo, prow, p, ybuf); break;
    default: gemv1_panels<BITS, OFF, 4>(w, geo, prow, p, ybuf); break;
  }
}

template <int BITS, bool OFF>
void gemv_rows(int mr, const WqPanels& w, const Geo& geo, const float* const* prow, int64_t p, float* ybuf) {
  switch (mr) {
    case 1: gemv_panel<BITS, 1, OFF>(w, geo, prow, p, ybuf); break;
    case 2: gemv_panel<BITS, 2, OFF>(w, geo, prow, p, ybuf); break;
    case 3: gemv_panel<BITS, 3, OFF>(w, geo, prow, p, ybuf); break;
    default: gemv_panel<BITS, 4, OFF>(w, geo, prow, p, ybuf); break;
  }
}

void gemv(const WqPanels& w, const WqGemvX& x, int64_t rows, int64_t p0, int64_t p1, const FloatEpilogue& ep) {
  const Geo geo(w);
  if (rows == 1) {
    // One row: four panels at once where the run has them (see gemv1_panels).
    for (int64_t p = p0; p < p1;) {
      const int np = p + 3 < p1 ? 4 : (p + 1 < p1 ? 2 : 1);
      alignas(32) float ybuf[4 * 16];
      if (w.bits == 8) {
        if (w.has_offset) gemv1<8, true>(np, w, geo, x.prep, p, ybuf);
        else gemv1<8, false>(np, w, geo, x.prep, p, ybuf);
      } else {
        if (w.has_offset) gemv1<4, true>(np, w, geo, x.prep, p, ybuf);
        else gemv1<4, false>(np, w, geo, x.prep, p, ybuf);
      }
      for (int q = 0; q < np; ++q) {
        const int64_t col0 = (p + q) * kWqPanel;
        const int64_t ncols = w.n - col0 < kWqPanel ? w.n - col0 : kWqPanel;
        store_rows16(ybuf + q * 16, 1, ep.bias ? ep.bias + col0 : nullptr, ep.out_dtype,
                     offset(ep.out, ep.out_dtype, col0), ep.ldo, ncols);
      }
      p += np;
    }
    return;
  }
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t col0 = p * kWqPanel;
    const int64_t ncols = w.n - col0 < kWqPanel ? w.n - col0 : kWqPanel;
    // Four rows at a time (the float path's 8 accumulators + decode registers fit the 16 ymm);
    // rows 4-7 of an 8-row call read the panel again, from L2.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int mr = static_cast<int>(rows - r0 < 4 ? rows - r0 : 4);
      alignas(32) float ybuf[4 * 16];
      const float* prow[4];
      for (int r = 0; r < mr; ++r) prow[r] = x.prep + (r0 + r) * x.ldp;
      if (w.bits == 8) {
        if (w.has_offset) gemv_rows<8, true>(mr, w, geo, prow, p, ybuf);
        else gemv_rows<8, false>(mr, w, geo, prow, p, ybuf);
      } else {
        if (w.has_offset) gemv_rows<4, true>(mr, w, geo, prow, p, ybuf);
        else gemv_rows<4, false>(mr, w, geo, prow, p, ybuf);
      }
      store_rows16(ybuf, mr, ep.bias ? ep.bias + col0 : nullptr, ep.out_dtype,
                   offset(ep.out, ep.out_dtype, r0 * ep.ldo + col0), ep.ldo, ncols);
    }
  }
}

template <int BITS, bool OFF>
void dequant_t(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile) {
  constexpr int KB = BITS == 8 ? 4 : 8;
  constexpr float kBias = BITS == 8 ? 128.0f : 8.0f;
  // Geometry once per call (its divisions would otherwise cost more than the decode).
  const uint8_t* pb = w.panel(p);
  const int64_t gbytes = w.group_bytes();
  int64_t g = k0 / w.kgroup;
  int64_t gend = (g + 1) * w.kgroup;
  const uint8_t* blk = pb + g * gbytes + ((k0 - g * w.kgroup) / KB) * kWqBlockBytes;
  const float* sc = w.scale(p, g);
  for (int64_t kb0 = k0; kb0 < k1; kb0 += KB, blk += kWqBlockBytes) {
    if (kb0 >= gend) {  // next group: its blocks follow this group's scales (and offsets)
      ++g;
      gend += w.kgroup;
      blk = pb + g * gbytes;
      sc = w.scale(p, g);
    }
    const __m256 s0 = _mm256_load_ps(sc), s1 = _mm256_load_ps(sc + 8);
    __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    if constexpr (OFF) {
      o0 = _mm256_load_ps(sc + 16);
      o1 = _mm256_load_ps(sc + 24);
    }
    const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk));
    const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32));
    const int n = static_cast<int>(k1 - kb0 < KB ? k1 - kb0 : KB);
    float* t = tile + (kb0 - k0) * kWqPanel;
#pragma GCC unroll 8
    for (int i = 0; i < KB; ++i) {
      if (i >= n) break;
      const __m256i m = _mm256_set1_epi32(static_cast<int>(((1u << BITS) - 1u) << (i * BITS)));
      const __m256 sh = _mm256_set1_ps(pow2(-i * BITS));
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, m));
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, m));
      // u * 2^(iB) * 2^(-iB) - bias is an exact small integer: q as the reference sees it.
      if (i < KB - 1) {
        q0 = _mm256_fmadd_ps(q0, sh, _mm256_set1_ps(-kBias));
        q1 = _mm256_fmadd_ps(q1, sh, _mm256_set1_ps(-kBias));
      } else {
        q0 = _mm256_mul_ps(q0, sh);
        q1 = _mm256_mul_ps(q1, sh);
      }
      if constexpr (OFF) {
        q0 = _mm256_add_ps(q0, o0);
        q1 = _mm256_add_ps(q1, o1);
      }
      _mm256_storeu_ps(t + i * kWqPanel, _mm256_mul_ps(q0, s0));
      _mm256_storeu_ps(t + i * kWqPanel + 8, _mm256_mul_ps(q1, s1));
    }
  }
}

void dequant(const WqPanels& w, int64_t p, int64_t k0, int64_t k1, float* tile) {
  if (w.bits == 8) {
    if (w.has_offset) dequant_t<8, true>(w, p, k0, k1, tile);
    else dequant_t<8, false>(w, p, k0, k1, tile);
  } else {
    if (w.has_offset) dequant_t<4, true>(w, p, k0, k1, tile);
    else dequant_t<4, false>(w, p, k0, k1, tile);
  }
}

template <int MR, bool ACC>
void micro_t(const float* a, const float* b, int64_t kc, float* c, int64_t ldc) {
  // ACC is a template parameter: a run-time choice between loading and zeroing the
  // accumulators makes GCC keep them in memory (a store per FMA pair).
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if constexpr (ACC) {
      acc0[r] = _mm256_loadu_ps(c + r * ldc);
      acc1[r] = _mm256_loadu_ps(c + r * ldc + 8);
    } else {
      acc0[r] = acc1[r] = _mm256_setzero_ps();
    }
  }
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_load_ps(b + kk * kWqPanel), b1 = _mm256_load_ps(b + kk * kWqPanel + 8);
  #pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + kk * kWqMR + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc0[r]);
    _mm256_storeu_ps(c + r * ldc + 8, acc1[r]);
  }
}

template <bool ACC>
void micro_rows(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows) {
  switch (rows) {
    case 1: micro_t<1, ACC>(a, b, kc, c, ldc); break;
    case 2: micro_t<2, ACC>(a, b, kc, c, ldc); break;
    case 3: micro_t<3, ACC>(a, b, kc, c, ldc); break;
    case 4: micro_t<4, ACC>(a, b, kc, c, ldc); break;
    case 5: micro_t<5, ACC>(a, b, kc, c, ldc); break;
    default: micro_t<6, ACC>(a, b, kc, c, ldc); break;
  }
}

void micro(const float* a, const float* b, int64_t kc, float* c, int64_t ldc, int rows, bool accumulate) {
  if (accumulate) micro_rows<true>(a, b, kc, c, ldc, rows);
  else micro_rows<false>(a, b, kc, c, ldc, rows);
}

}  // namespace
}  // namespace avx2

const WqKernels& wq_avx2_kernels() {
  static const WqKernels t{Isa::avx2, avx2::prep_floats, avx2::prepare, avx2::gemv, avx2::dequant, avx2::micro};
  return t;
}

}  // namespace qllm::kernels
