// AVX2 kernels of the 2:4 sparse matmul (layout in kernels/sparse24.h).
//
// Float: a block of 8 x values holds two groups, one per 128-bit lane, so vpermilps (an in-lane
// permute that reads only bits 1:0 of each index) gathers the kept x of two channels at once.
// Its indices are the packed 2-bit positions themselves: one 32-bit broadcast of the pair's meta
// for two blocks and one vpsrlvd put each position in the low bits of its lane, no mask or table
// needed. Each useful FMA then costs one permute and no wasted multiply: half the FMAs of the
// dense product. Zen 4 sustains ~1.25 permute+FMA pairs a cycle (measured), so the GEMM ceiling
// is ~1.25x the dense FMA peak in dense-equivalent flops. Tiles: 4 rows x 2 pairs (8
// accumulators + 2 indices + 2 value vectors + x + the permute result = 14 ymm: with 5 rows
// the compiler ran out of registers and reloaded x per pair and the values per row, and the
// loads, not the FMAs, set the pace), and for the memory-bound matrix-vector case 1 row x two
// 4-pair super-panels (fmv: two sequential streams, 8 independent chains).
//
// s8: the super-panel layout and x pair table of kernels/sparse24.h: per group and 8 channels,
// vpermd of the group's table row by the 8 stored pair codes gives 8 ready s16 pairs for one
// exact vpmaddwd.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "kernels/sparse24.h"
#include "kernels/x86/avx2/simd.h"
#include "kernels/x86/s24_rows_walk.h"

namespace qllm::kernels::avx2 {

namespace {

// Float software prefetch distance for the matrix-vector kernel (bytes ahead in each super-panel's
// stream; every line of a step is requested once, spread over the steps). 1 KB with two streams
// per core measured the steadiest (1.6-1.9x dense at m = 1); 2-4 KB were no better, and one stream
// per core (8 accumulators over one 8-pair super-panel) stayed ~10-20 % slower.
constexpr int64_t kFPrefetchBytes = 1024;

// The chunk a tile loop (m > 1) reads after the current one, prefetched into L2 by the passes that
// read the current chunk from DRAM, spread evenly over their steps. The two passes over a chunk
// (pair tiles 0-1 and 2-3, or sub-panel pairs 0-1 and 2-3) take one half each, so requests keep
// flowing through both (fmm, s24_s8_mm).
struct ChunkPrefetch {
  const uint8_t* p = nullptr;
  int64_t bytes = 0, done = 0;
  // Half h (0: the first, 1: the rest, split at a line) of [next, next + total).
  static ChunkPrefetch half(const uint8_t* next, int64_t total, int h) {
    const int64_t first = (total / 2 + 63) / 64 * 64;
    if (h == 0) return {next, std::min(total, first), 0};
    return {next + first, std::max<int64_t>(0, total - first), 0};
  }
  // After step i of n: the first i / n of the range requested.
  void upto(int64_t i, int64_t n) {
    for (const int64_t want = bytes * i / n; done < want; done += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p + done), _MM_HINT_T1);
  }
};

// MR rows x PR pairs starting at pair p; all PR pairs lie in p's super-panel (p % kFP + PR <= kFP),
// so one running step pointer reaches every pair's values and meta at fixed offsets.
template <DType DT, int MR, int PR>
void ftile(const float* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, float* acc,
           int64_t ld_acc, ChunkPrefetch pf = {}) {
  constexpr int64_t es = dtype_size(DT);
  constexpr int64_t step = s24_step_bytes(es);
  __m256 a[PR][MR];
  for (int j = 0; j < PR; ++j)
    for (int r = 0; r < MR; ++r) a[j][r] = _mm256_loadu_ps(acc + r * ld_acc + j * 8);
  const int64_t pj = p % kFP;
  const uint8_t* sv = w.step(p, kb0 / 2) + pj * 16 * es;       // pair p's values in the step
  const uint8_t* sm = w.step(p, kb0 / 2) + kFP * 16 * es + pj * 4;  // pair p's meta in the step
  // Lane shifts: lane 4h + 2c + s reads bits 8c + 4h + 2s of the block's u16 (kernels/sparse24.h);
  // the odd block of the step sits 16 bits higher in the 32-bit load.
  const __m256i sh0 = _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
  const __m256i sh1 = _mm256_add_epi32(sh0, _mm256_set1_epi32(16));
  const int64_t nsteps = (kb1 - kb0) / 2;
  for (int64_t kb = kb0, i = 1; kb < kb1; kb += 2, ++i, sv += step, sm += step) {
    pf.upto(i, nsteps);
    for (int h = 0; h < 2; ++h) {
      __m256i idx[PR];
      __m256 vv[PR];
      for (int j = 0; j < PR; ++j) {
        int32_t m32;
        std::memcpy(&m32, sm + 4 * j, 4);
        idx[j] = _mm256_srlv_epi32(_mm256_set1_epi32(m32), h ? sh1 : sh0);
        vv[j] = load8(DT, sv + (j * 16 + h * 8) * es);
      }
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * ldx + (kb + h) * 8);
        for (int j = 0; j < PR; ++j) a[j][r] = _mm256_fmadd_ps(vv[j], _mm256_permutevar_ps(xv, idx[j]), a[j][r]);
      }
    }
  }
  for (int j = 0; j < PR; ++j)
    for (int r = 0; r < MR; ++r) _mm256_storeu_ps(acc + r * ld_acc + j * 8, a[j][r]);
}

// Matrix-vector kernel: one row x NS super-panels (NS sequential streams, NS * kFP = 8
// accumulators). Per pair and step: one broadcast of its u32 of positions; vpsrlvd gives block
// 2s's indices, vpsrld 16 + vpsrlvd block 2s+1's; two value loads, two permutes of the step's two x
// vectors, two FMAs. Written pair by pair so that only ~5 temporaries are live besides the 8
// accumulators, 2 x vectors and the shift vector (the block-major form of ftile kept 8 indices
// and 8 value vectors live and spilled half of them, which made it compute-bound at ~20 GB/s).
template <DType DT, int NS>
void fmv(const float* x, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, float* acc) {
  constexpr int64_t es = dtype_size(DT);
  constexpr int64_t step = s24_step_bytes(es);
  __m256 a[NS][kFP];
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < kFP; ++j) a[s][j] = _mm256_loadu_ps(acc + (s * kFP + j) * 8);
  const uint8_t* sv[NS];
  for (int s = 0; s < NS; ++s) sv[s] = w.step(p + s * kFP, kb0 / 2);
  const __m256i sh0 = _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
  for (int64_t kb = kb0; kb < kb1; kb += 2) {
    const __m256 x0 = _mm256_loadu_ps(x + kb * 8), x1 = _mm256_loadu_ps(x + kb * 8 + 8);
    for (int s = 0; s < NS; ++s) {
      for (int64_t l = 0; l < step; l += 64) _mm_prefetch(reinterpret_cast<const char*>(sv[s] + kFPrefetchBytes + l), _MM_HINT_T0);
      for (int j = 0; j < kFP; ++j) {
        int32_t m32;
        std::memcpy(&m32, sv[s] + kFP * 16 * es + 4 * j, 4);
        const __m256i mb = _mm256_set1_epi32(m32);
        const __m256i i0 = _mm256_srlv_epi32(mb, sh0), i1 = _mm256_srlv_epi32(_mm256_srli_epi32(mb, 16), sh0);
        a[s][j] = _mm256_fmadd_ps(load8(DT, sv[s] + j * 16 * es), _mm256_permutevar_ps(x0, i0), a[s][j]);
        a[s][j] = _mm256_fmadd_ps(load8(DT, sv[s] + (j * 16 + 8) * es), _mm256_permutevar_ps(x1, i1), a[s][j]);
      }
      sv[s] += step;
    }
  }
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < kFP; ++j) _mm256_storeu_ps(acc + (s * kFP + j) * 8, a[s][j]);
}

template <DType DT, int PR>
void ftile_rows(int mr, const float* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, float* acc,
                int64_t ld_acc, ChunkPrefetch pf) {
  switch (mr) {
    case 1: ftile<DT, 1, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc, pf); break;
    case 2: ftile<DT, 2, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc, pf); break;
    case 3: ftile<DT, 3, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc, pf); break;
    default: ftile<DT, 4, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc, pf); break;
  }
}

template <DType DT>
void fmm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0,
         int64_t kb1, float* acc, int64_t ld_acc) {
  constexpr int kMR = 4;
  if (rows == 1) {
    int64_t p = p0;
    for (; p + 2 * kFP <= p1 && p % kFP == 0; p += 2 * kFP) fmv<DT, 2>(x, w, p, kb0, kb1, acc + (p - p0) * 8);
    for (; p + kFP <= p1 && p % kFP == 0; p += kFP) fmv<DT, 1>(x, w, p, kb0, kb1, acc + (p - p0) * 8);
    for (; p < p1; ++p) ftile<DT, 1, 1>(x, ldx, w, p, kb0, kb1, acc + (p - p0) * 8, ld_acc);
    return;
  }
  // Pairs outer: a pair's chunk (L1-sized) is reused by every row tile while x's chunk stays in L2.
  // The weights come from DRAM once per chunk, in the first row tile of each pair tile; that tile
  // also prefetches (into L2, spread over its steps) half of the chunk this loop reads next: the
  // next super-panel's, or after the last one the first super-panel's next chunk (the pair tile
  // p % kFP == 0 the first half, == 2 the second, so the requests run through both passes). With
  // no prefetch (or only 1 KB ahead in the same stream) a few rows left the memory idle between
  // misses. bench sparse24, avx2, f16 / f32, speedup over dense (alternated runs): m = 2
  // 0.77-0.90 / 0.90-1.06 -> 1.24-1.61 / 1.38-1.68, m = 4 0.82-0.98 / 0.62-0.81 -> 1.26-1.50 /
  // 1.42-1.76, m = 8 1.02-1.25 / 0.78-0.91 -> 1.38-1.58 / 1.25-1.52, m = 16 0.89-1.04 / 0.79-0.88
  // -> 0.95-1.19 / 0.91-1.07. Into L1 instead, f32 gained only half as much (its next chunk and
  // the current one exceed L1).
  const int64_t sb = w.step_bytes();
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) {
    const uint8_t* next = nullptr;
    int64_t total = 0;
    if (const int64_t pn = (p / kFP + 1) * kFP; pn < p1) next = w.step(pn, kb0 / 2), total = (kb1 - kb0) / 2 * sb;
    else if (kb1 < w.kb) next = w.step(p0, kb1 / 2), total = (std::min(w.kb, 2 * kb1 - kb0) - kb1) / 2 * sb;
    const ChunkPrefetch pf = ChunkPrefetch::half(next, total, p % kFP == 0 ? 0 : 1);
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      ftile_rows<DT, 2>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                        acc + r0 * ld_acc + (p - p0) * 8, ld_acc, r0 == 0 ? pf : ChunkPrefetch{});
  }
  for (; p < p1; ++p)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      ftile_rows<DT, 1>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                        acc + r0 * ld_acc + (p - p0) * 8, ld_acc, ChunkPrefetch{});
}

// a[q] += w * x[8q, 8q + 8) for q < 8 (one FMA each, the accumulator as the addend: the same
// fused operation as _mm256_fmadd_ps(w, x, a)), in asm: with the intrinsics GCC 12 alternated
// vfmadd231ps / vfmadd132ps forms and rotated one accumulator through a spare register (a
// vmovaps per 32 FMAs) once the block loop was unrolled.
[[gnu::always_inline]] inline void fma8(__m256 (&a)[8], __m256 w, const float* x) {
  asm("vfmadd231ps (%[x]), %[w], %[a0]\n\t"
      "vfmadd231ps 32(%[x]), %[w], %[a1]\n\t"
      "vfmadd231ps 64(%[x]), %[w], %[a2]\n\t"
      "vfmadd231ps 96(%[x]), %[w], %[a3]\n\t"
      "vfmadd231ps 128(%[x]), %[w], %[a4]\n\t"
      "vfmadd231ps 160(%[x]), %[w], %[a5]\n\t"
      "vfmadd231ps 192(%[x]), %[w], %[a6]\n\t"
      "vfmadd231ps 224(%[x]), %[w], %[a7]"
      : [a0] "+x"(a[0]), [a1] "+x"(a[1]), [a2] "+x"(a[2]), [a3] "+x"(a[3]), [a4] "+x"(a[4]), [a5] "+x"(a[5]),
        [a6] "+x"(a[6]), [a7] "+x"(a[7])
      : [x] "r"(x), [w] "x"(w), "m"(*reinterpret_cast<const float(*)[64]>(x)));
}

// Large-m rows kernel (kernels/sparse24.h): one channel of pair p at a time over the chunk, 8
// accumulators = 64 rows. Per kept weight one broadcast (vpermps) and 8 FMAs whose x operand is a memory
// load at the kept k: 8 + 1/4 loads per 8 useful FMAs, one permute, and the 8 independent chains cover
// the FMA latency x 2 pipes. The meta byte gives the 4 offsets with 2 ALU ops each: position i
// of group h is row 4h + i of the block, i * 256 bytes (64 f32) past the group.
// vals: the pair's f32 values in the chunk's first step (vstride floats per step); meta: its
// meta byte for channel c in the first step (mstride bytes per step).
[[gnu::always_inline]] inline void frows_channel(const float* xp, const float* vals, int64_t vstride, const uint8_t* meta,
                                                 int64_t mstride, int c, int64_t kb0, int64_t kb1, float* acc) {
  __m256 a[8];
  for (int q = 0; q < 8; ++q) a[q] = _mm256_loadu_ps(acc + 8 * q);
  for (int64_t kb = kb0; kb < kb1; kb += 2, vals += vstride, meta += mstride) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const uint8_t* xb = reinterpret_cast<const uint8_t*>(xp + (kb + h) * 8 * kRowPanel);
      const uint32_t m = meta[2 * h];
      const float* v = vals + 8 * h;
      const uint32_t off[4] = {(m << 8) & 0x300u, (m << 6) & 0x300u, ((m << 4) & 0x300u) + 0x400u,
                               ((m << 2) & 0x300u) + 0x400u};
      const int vi[4] = {2 * c, 2 * c + 1, 4 + 2 * c, 5 + 2 * c};
      // The block's 8 values are loaded once and each kept weight is broadcast from the register
      // by vpermps (shuffle pipe, idle here): 8 x loads + 1/4 value load per 8 FMAs instead of 9
      // loads (the kernel is load-bound: 2 loads/cycle feed 2 FMAs/cycle); ~3-5 % faster.
      const __m256 vb = _mm256_loadu_ps(v);
      for (int t = 0; t < 4; ++t) {
        const __m256 wb = _mm256_permutevar8x32_ps(vb, _mm256_set1_epi32(vi[t]));
        const float* xr = reinterpret_cast<const float*>(xb + off[t]);
        fma8(a, wb, xr);
      }
    }
  }
  for (int q = 0; q < 8; ++q) _mm256_storeu_ps(acc + 8 * q, a[q]);
}

// The chunk walk (prefetches, f16/bf16 widening) is x86/s24_rows_walk.h; per pair, its two
// channels one after the other (16 accumulators for both would spill).
template <DType DT>
void frows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc) {
  x86::s24_rows_walk<DT>(xp, w, p0, p1, kb0, kb1, acc,
                         [&](const float* vals, int64_t vstride, const uint8_t* meta, int64_t mstride, float* a) {
                           for (int c = 0; c < 2; ++c)
                             frows_channel(xp, vals, vstride, meta + c, mstride, c, kb0, kb1, a + c * kRowPanel);
                         });
}

// Software prefetch distance of the s8 matrix-vector kernel (bytes ahead in a super-panel's
// stream), issued as two prefetches per 76-byte group, spread over the loop: with bursts of 19
// prefetches per block, or none, one stream ran at ~25 GB/s on 2 cores whatever DRAM delivered;
// 2 KB ahead measured best (1 KB slower; 3-4 KB no better). kS8MvPanels: super-panels the matrix-vector kernel
// streams at once (2 measured ~1.6x dense at m = 1 against ~1.4-1.6x for 1 and 4).
constexpr int64_t kS8PrefetchBytes = 2048;
constexpr int kS8MvPanels = 2;

// s8 tile: MR rows x NJ sub-panels (8 channels each, starting at sub-panel j0) of super-panel
// sp. Per group and sub-panel: one 32-bit broadcast of the 8 codes + vpsrlvd puts code c in the
// low 3 bits of lane c (vpermd reads only those), vpmovsxbw widens the 16 values, then per row
// vpermd gathers the 8 x pairs from the group's table row, vpmaddwd + vpaddd accumulate exactly.
// GEMM tiles use MR = 4, NJ = 2: 8 accumulators + 2 codes + 2 values + table + product = 14
// ymm, the 4 rows sharing each widened value vector and code vector.
template <int MR, int NJ>
void s8tile(const int32_t* tab, int64_t ldt, const S24S8Panels& w, int64_t sp, int j0, int64_t b0, int64_t b1,
            int32_t* acc, int64_t ld_acc, ChunkPrefetch pf = {}) {
  __m256i a[MR][NJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) a[r][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * ld_acc + j * 8));
  const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;  // codes follow the block's values
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = w.block(sp, b);
    const int32_t* t = tab + b * kS8BlockGroups * 8;
    pf.upto(b - b0 + 1, b1 - b0);
    for (int gi = 0; gi < kS8BlockGroups; ++gi) {
      __m256i idx[NJ], wv[NJ];
      for (int j = 0; j < NJ; ++j) {
        uint32_t word;
        std::memcpy(&word, blk + kCodes + gi * 12 + (j0 + j) * 3, 4);
        idx[j] = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), shifts);
        wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + gi * 64 + (j0 + j) * 16)));
      }
      for (int r = 0; r < MR; ++r) {
        const __m256i xt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + r * ldt + gi * 8));
        for (int j = 0; j < NJ; ++j)
          a[r][j] = _mm256_add_epi32(a[r][j], _mm256_madd_epi16(_mm256_permutevar8x32_epi32(xt, idx[j]), wv[j]));
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * ld_acc + j * 8), a[r][j]);
}

// Matrix-vector: NS super-panels at once (two streams per core keep more DRAM reads in flight). Per
// group: one table load, then per sub-panel code broadcast + vpsrlvd, vpmovsxbw, vpermd,
// vpmaddwd, vpaddd; 4 NS accumulators.
template <int NS>
void s8mv(const int32_t* tab, const S24S8Panels& w, int64_t sp, int64_t b0, int64_t b1, int32_t* acc) {
  __m256i a[NS][4];
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < 4; ++j) a[s][j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + s * kS8Channels + j * 8));
  const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;
  for (int64_t b = b0; b < b1; ++b) {
    const int32_t* t = tab + b * kS8BlockGroups * 8;
    const uint8_t* blk[NS];
    for (int s = 0; s < NS; ++s) blk[s] = w.block(sp + s, b);
    for (int gi = 0; gi < kS8BlockGroups; ++gi) {
      // Prefetch spread over the groups (a group is 76 bytes: two lines per group cover all 19).
      for (int s = 0; s < NS; ++s) {
        _mm_prefetch(reinterpret_cast<const char*>(blk[s] + kS8PrefetchBytes + gi * 76), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(blk[s] + kS8PrefetchBytes + gi * 76 + 63), _MM_HINT_T0);
      }
      const __m256i xt = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + gi * 8));
      for (int s = 0; s < NS; ++s)
        for (int j = 0; j < 4; ++j) {
          uint32_t word;
          std::memcpy(&word, blk[s] + kCodes + gi * 12 + j * 3, 4);
          const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)), shifts);
          const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[s] + gi * 64 + j * 16)));
          a[s][j] = _mm256_add_epi32(a[s][j], _mm256_madd_epi16(_mm256_permutevar8x32_epi32(xt, idx), wv));
        }
    }
  }
  for (int s = 0; s < NS; ++s)
    for (int j = 0; j < 4; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + s * kS8Channels + j * 8), a[s][j]);
}

template <int NJ>
void s8tile_rows(int mr, const int32_t* tab, int64_t ldt, const S24S8Panels& w, int64_t sp, int j0, int64_t b0,
                 int64_t b1, int32_t* acc, int64_t ld_acc, ChunkPrefetch pf) {
  switch (mr) {
    case 1: s8tile<1, NJ>(tab, ldt, w, sp, j0, b0, b1, acc, ld_acc, pf); break;
    case 2: s8tile<2, NJ>(tab, ldt, w, sp, j0, b0, b1, acc, ld_acc, pf); break;
    case 3: s8tile<3, NJ>(tab, ldt, w, sp, j0, b0, b1, acc, ld_acc, pf); break;
    default: s8tile<4, NJ>(tab, ldt, w, sp, j0, b0, b1, acc, ld_acc, pf); break;
  }
}

// ---- s8 large-m rows kernel (kernels/sparse24.h) ----------------------------------------------

// vpshufb control of pair code t: in every dword (one row's 4 x of a group) byte i0 goes to byte 1
// and byte i1 to byte 3, bytes 0 and 2 are zeroed, so vpsraw 8 leaves s16 x[i0] | x[i1] << 16.
inline __m256i pair_ctl(int t) {
  static constexpr int kPos[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  const __m256i base = _mm256_set1_epi32(static_cast<int32_t>(0x80u | (kPos[t][0] << 8) | (0x80u << 16) |
                                                              (static_cast<uint32_t>(kPos[t][1]) << 24)));
  return _mm256_add_epi32(base, _mm256_setr_epi32(0, 0x04000400, 0x08000800, 0x0c000c00, 0, 0x04000400, 0x08000800,
                                                  0x0c000c00));
}

// Builds the chunk's table rt[g][t][64] for groups [g0, g0 + gn) (gn <= 8) of the panel: per 8
// rows, one 32-byte load per row (8 groups), an 8x8 dword transpose (vector g: lane i = row
// r0 + i's 4 x of group g0 + g), then per pair code vpshufb + vpsraw + store. ~0.8 K ops per
// 4-group chunk against ~40 K in the channel loop of a 512-channel work item. Rows past `rows` and x past
// k read as zero.
void s8rows_table(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, int64_t g0, int gn, int32_t* rt,
                  const __m256i (&ctl)[6]) {
  const int64_t c0 = 4 * g0, avail = k - c0;  // valid bytes of the chunk in a row
  for (int r0 = 0; r0 < kRowPanel; r0 += 8) {
    __m256i R[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t r = r0 + i;
      if (r >= rows) {
        R[i] = _mm256_setzero_si256();
      } else if (avail >= 32) {
        R[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ldx + c0));
      } else {
        alignas(32) int8_t b[32] = {};
        std::memcpy(b, x + r * ldx + c0, static_cast<size_t>(avail));
        R[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b));
      }
    }
    const __m256i t0 = _mm256_unpacklo_epi32(R[0], R[1]), t1 = _mm256_unpackhi_epi32(R[0], R[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(R[2], R[3]), t3 = _mm256_unpackhi_epi32(R[2], R[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(R[4], R[5]), t5 = _mm256_unpackhi_epi32(R[4], R[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(R[6], R[7]), t7 = _mm256_unpackhi_epi32(R[6], R[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    const __m256i T[8] = {_mm256_permute2x128_si256(u0, u4, 0x20), _mm256_permute2x128_si256(u1, u5, 0x20),
                          _mm256_permute2x128_si256(u2, u6, 0x20), _mm256_permute2x128_si256(u3, u7, 0x20),
                          _mm256_permute2x128_si256(u0, u4, 0x31), _mm256_permute2x128_si256(u1, u5, 0x31),
                          _mm256_permute2x128_si256(u2, u6, 0x31), _mm256_permute2x128_si256(u3, u7, 0x31)};
    for (int g = 0; g < gn; ++g)
      for (int t = 0; t < 6; ++t)
        _mm256_store_si256(reinterpret_cast<__m256i*>(rt + (g * 6 + t) * kRowPanel + r0),
                           _mm256_srai_epi16(_mm256_shuffle_epi8(T[g], ctl[t]), 8));
  }
}

// a[q] += vpmaddwd(bc, table entry [8q, 8q + 8)) for q < 8, in asm: GCC 12 compiled the
// intrinsics with the products in fresh registers and 8 vmovdqa per group rotating them back into
// the accumulators (36 instructions per group instead of 28), and the 6-wide dispatch, not the
// vpmaddwd pipes, set the pace. The entry is at rt + D + off (D: the group's constant
// displacement, off: code * 256), so no address arithmetic per group. One product register
// suffices (renaming).
template <int D>
[[gnu::always_inline]] inline void madd8(__m256i (&a)[8], __m256i bc, const int32_t* rt, uint64_t off) {
  __m256i p;
  asm("vpmaddwd %c[d](%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a0], %[a0]\n\t"
      "vpmaddwd %c[d]+32(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a1], %[a1]\n\t"
      "vpmaddwd %c[d]+64(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a2], %[a2]\n\t"
      "vpmaddwd %c[d]+96(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a3], %[a3]\n\t"
      "vpmaddwd %c[d]+128(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a4], %[a4]\n\t"
      "vpmaddwd %c[d]+160(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a5], %[a5]\n\t"
      "vpmaddwd %c[d]+192(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a6], %[a6]\n\t"
      "vpmaddwd %c[d]+224(%[t],%[o]), %[b], %[p]\n\t"
      "vpaddd %[p], %[a7], %[a7]"
      : [a0] "+x"(a[0]), [a1] "+x"(a[1]), [a2] "+x"(a[2]), [a3] "+x"(a[3]), [a4] "+x"(a[4]), [a5] "+x"(a[5]),
        [a6] "+x"(a[6]), [a7] "+x"(a[7]), [p] "=&x"(p)
      : [t] "r"(rt), [o] "r"(off), [b] "x"(bc), [d] "i"(D),
        "m"(*reinterpret_cast<const int32_t(*)[kS8RowsChunkGroups * 6 * kRowPanel]>(rt)));
}

// Group g of channel C (of its 8-channel sub-panel): the code word's 3 bits of channel C become
// the table offset code * 256 bytes with one shift and one mask (C is a constant); the two kept
// values are broadcast as an s16 pair (vpbroadcastw + vpmovsxbw); then madd8. codes / vals: the
// sub-panel's code word / the channel's values at the chunk's first group (12 / 64 bytes per group).
template <int C, int G>
[[gnu::always_inline]] inline void s8rows_group(__m256i (&a)[8], const int32_t* rt, const uint8_t* codes, const uint8_t* vals) {
  uint32_t word;
  std::memcpy(&word, codes + 12 * G, 4);
  const uint64_t off = C < 3 ? (word << (8 - 3 * C)) & 0x700u : (word >> (3 * C - 8)) & 0x700u;
  int16_t v2;
  std::memcpy(&v2, vals + kS8Channels * 2 * G, 2);
  madd8<G * 6 * kRowPanel * 4>(a, _mm256_cvtepi8_epi16(_mm_set1_epi16(v2)), rt, off);
}

template <int C, int... G>
[[gnu::always_inline]] inline void s8rows_groups(std::integer_sequence<int, G...>, __m256i (&a)[8], const int32_t* rt, const uint8_t* codes,
                          const uint8_t* vals) {
  (s8rows_group<C, G>(a, rt, codes, vals), ...);
}

// One channel over a full chunk of NG groups: 64 rows in 8 s32 accumulators (8 independent
// chains), loaded / stored once per chunk (zero on the first), the groups unrolled (constant
// displacements everywhere).
template <int C, int NG>
void s8rows_channel(const int32_t* rt, const uint8_t* codes, const uint8_t* vals, bool first, int32_t* acc) {
  __m256i a[8];
  for (int q = 0; q < 8; ++q)
    a[q] = first ? _mm256_setzero_si256() : _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + 8 * q));
  s8rows_groups<C>(std::make_integer_sequence<int, NG>{}, a, rt, codes, vals);
  for (int q = 0; q < 8; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(acc + 8 * q), a[q]);
}

// The last, partial chunk of k (gn groups), channel c of its sub-panel given at run time.
void s8rows_channel_tail(const int32_t* rt, const uint8_t* codes, const uint8_t* vals, int c, int gn, bool first,
                         int32_t* acc) {
  __m256i a[8];
  for (int q = 0; q < 8; ++q)
    a[q] = first ? _mm256_setzero_si256() : _mm256_load_si256(reinterpret_cast<const __m256i*>(acc + 8 * q));
  for (int g = 0; g < gn; ++g) {
    uint32_t word;
    std::memcpy(&word, codes + 12 * g, 4);
    int16_t v2;
    std::memcpy(&v2, vals + kS8Channels * 2 * g, 2);
    madd8<0>(a, _mm256_cvtepi8_epi16(_mm_set1_epi16(v2)), rt + g * 6 * kRowPanel, ((word >> (3 * c)) & 7u) << 8);
  }
  for (int q = 0; q < 8; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(acc + 8 * q), a[q]);
}

template <int NG, int... C>
inline void s8rows_subpanel(std::integer_sequence<int, C...>, const int32_t* rt, const uint8_t* codes,
                            const uint8_t* vals, bool first, int32_t* acc) {
  (s8rows_channel<C, NG>(rt, codes, vals + 2 * C, first, acc + C * kRowPanel), ...);
}

}  // namespace

void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0,
                  int64_t kb1, float* acc, int64_t ld_acc) {
  switch (w.dtype) {
    case DType::f16: fmm<DType::f16>(x, ldx, rows, w, p0, p1, kb0, kb1, acc, ld_acc); break;
    case DType::bf16: fmm<DType::bf16>(x, ldx, rows, w, p0, p1, kb0, kb1, acc, ld_acc); break;
    default: fmm<DType::f32>(x, ldx, rows, w, p0, p1, kb0, kb1, acc, ld_acc); break;
  }
}

void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc) {
  static_assert(kRowPanel == 64, "frows_channel holds 64 rows in 8 accumulators");
  switch (w.dtype) {
    case DType::f16: frows<DType::f16>(xp, w, p0, p1, kb0, kb1, acc); break;
    case DType::bf16: frows<DType::bf16>(xp, w, p0, p1, kb0, kb1, acc); break;
    default: frows<DType::f32>(xp, w, p0, p1, kb0, kb1, acc); break;
  }
}

// 8 x 8 tiles: 8 channels' 8-row runs (one load each) transposed to 8 row vectors of 8 channels,
// converted and stored as one vector per row (partial at the last columns / rows).
void s24_rows_out(const void* acc, bool s32_acc, int64_t rows, int64_t ncols, const float* scale, const float* pts,
                  DType odt, void* y, int64_t ldy) {
  const int64_t es = dtype_size(odt);
  const float* a = static_cast<const float*>(acc);  // s32 bits moved as f32 until converted
  // Rows outer: an 8-row block's output rows are written left to right (channels inner), so
  // each y line is completed while in L1 (y rows are n elements apart: a multiple of 4 KB at
  // n = 4096, so a channels-outer order would keep 64 partial lines in one L1 set).
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < ncols; c0 += 8) {
      const int nc = static_cast<int>(std::min<int64_t>(8, ncols - c0));
      __m256 sc = _mm256_set1_ps(1.0f);
      if (s32_acc && odt != DType::s32) {
        if (nc == 8) {
          sc = _mm256_loadu_ps(scale + c0);
        } else {
          alignas(32) float sb[8] = {};
          for (int i = 0; i < nc; ++i) sb[i] = scale[c0 + i];
          sc = _mm256_load_ps(sb);
        }
      }
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(a + (c0 + i) * kRowPanel + r0);
      const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
      const __m256 T[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                           _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                           _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                           _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      const int nr = static_cast<int>(std::min<int64_t>(8, rows - r0));
      for (int j = 0; j < nr; ++j) {
        uint8_t* out = static_cast<uint8_t*>(y) + ((r0 + j) * ldy + c0) * es;
        if (odt == DType::s32) {
          const __m256i iv = _mm256_castps_si256(T[j]);
          if (nc == 8) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), iv);
          else _mm256_maskstore_epi32(reinterpret_cast<int*>(out),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(nc), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), iv);
          continue;
        }
        __m256 f = T[j];
        if (s32_acc) {
          // int -> f32 rounds to nearest even like static_cast<float>; then the two products in
          // the reference's order (separate multiplies: nothing to contract into an FMA).
          f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_castps_si256(f)), sc);
          if (pts) f = _mm256_mul_ps(f, _mm256_set1_ps(pts[r0 + j]));
        }
        if (nc == 8) store8(odt, out, f);
        else store8_partial(odt, out, f, nc);
      }
    }
  }
}

void s24_s8_xtable(const int8_t* x, int64_t k, int64_t groups_pad, int32_t* tab) {
  // Both 128-bit lanes hold the group's 4 s16 in their low 8 bytes; dword e of the result takes
  // bytes {2 i0, 2 i0 + 1, 2 i1, 2 i1 + 1} for pair e; entries 6, 7 are zeroed (control 0x80).
  const __m256i ctl = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 4, 5, 0, 1, 6, 7, 2, 3, 4, 5,
                                       2, 3, 6, 7, 4, 5, 6, 7, -1, -1, -1, -1, -1, -1, -1, -1);
  const int64_t groups = k / 4;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    int64_t q;
    std::memcpy(&q, x + 4 * g, 8);
    const __m128i v = _mm_cvtepi8_epi16(_mm_cvtsi64_si128(q));  // groups g, g + 1 as s16
    const __m256i lo = _mm256_broadcastq_epi64(v);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_castsi128_si256(v), 0x55);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 8), _mm256_shuffle_epi8(lo, ctl));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 8 + 8), _mm256_shuffle_epi8(hi, ctl));
  }
  if (g < groups) {
    int32_t q;
    std::memcpy(&q, x + 4 * g, 4);
    const __m128i v = _mm_cvtepi8_epi16(_mm_cvtsi32_si128(q));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 8), _mm256_shuffle_epi8(_mm256_broadcastq_epi64(v), ctl));
    ++g;
  }
  for (; g < groups_pad; ++g) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tab + g * 8), _mm256_setzero_si256());
}

void s24_s8_mm(const int32_t* tab, int64_t ldt, int64_t rows, const S24S8Panels& w, int64_t sp0, int64_t sp1,
               int64_t b0, int64_t b1, int32_t* acc, int64_t ld_acc) {
  if (rows == 1) {
    int64_t sp = sp0;
    for (; sp + kS8MvPanels <= sp1; sp += kS8MvPanels) s8mv<kS8MvPanels>(tab, w, sp, b0, b1, acc + (sp - sp0) * kS8Channels);
    for (; sp < sp1; ++sp) s8mv<1>(tab, w, sp, b0, b1, acc + (sp - sp0) * kS8Channels);
    return;
  }
  // Row tiles inside a super-panel's chunk: the chunk (L1-sized) is reused by every row tile, and
  // a 4-row tile's table chunk is reused by both halves of the super-panel.
  constexpr int kMR = 4;
  for (int64_t sp = sp0; sp < sp1; ++sp) {
    // The first row tile's two halves over this super-panel's chunk (the passes that read it
    // from DRAM) prefetch, into L2, half each of the chunk read next: the next super-panel's, or
    // after the last one the first one's next chunk. Before, each tile prefetched 2 KB ahead in
    // its own stream, which missed the start of every chunk (the next super-panel's comes next,
    // not this one's next chunk). bench sparse24 s24_s8, avx2, speedup over dense (alternated
    // runs): m = 2 0.57-0.80 -> 0.95-1.39, m = 4 0.64-0.72 -> 0.89-1.14, m = 8 0.89-0.97 ->
    // 1.17-1.24, m = 16 0.90-1.01 -> 1.02-1.14, m = 32 0.95-1.03 -> 1.08-1.13 (keeping the 2 KB
    // bursts as well was slower: 0.80-1.13).
    const uint8_t* next = nullptr;
    int64_t total = 0;
    if (sp + 1 < sp1) next = w.block(sp + 1, b0), total = (b1 - b0) * kS8BlockBytes;
    else if (b1 < w.kblocks) next = w.block(sp0, b1), total = (std::min(w.kblocks, 2 * b1 - b0) - b1) * kS8BlockBytes;
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      for (int j0 = 0; j0 < 4; j0 += 2)
        s8tile_rows<2>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), tab + r0 * ldt, ldt, w, sp, j0, b0, b1,
                       acc + r0 * ld_acc + (sp - sp0) * kS8Channels + j0 * 8, ld_acc,
                       r0 == 0 ? ChunkPrefetch::half(next, total, j0 == 0 ? 0 : 1) : ChunkPrefetch{});
  }
}

}  // namespace qllm::kernels::avx2

namespace qllm::kernels::avx2 {


// Walk of the rows kernel. The table is built once per k range of kS8RowsRangeGroups groups
// (192 KB, in L2), then the item's channels run in blocks of kS8RowsBlockPanels super-panels
// (64 channels: their 64-row accumulators, 16 KB), chunk by chunk of kS8RowsChunkGroups groups
// (one 12 KB slice of the table, read from L2 once per channel block and then hot in L1).
// Session 4 built a 4-group table per chunk and swept all 512 channels of the item per chunk;
// what the bare kernel (one panel, 4096 channels, k = 7168, 1 thread) says: the chunk size is
// what matters (8 groups: 0.23 ns per vpmaddwd against 0.25 for 4, 0.28 for 16, with blocks of
// 1 to 16 super-panels within 3 %: the accumulators' L2 round trips were not the cost). The range
// table is what lets 8-group chunks pay off: a 12 KB table rebuilt per chunk was no faster than
// 6 KB in session 4. Prefetch: a super-panel's data two chunks ahead (value lines + code lines).
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void* scratch) {
  static_assert(kRowPanel == 64 && kS8BlockGroups % kS8RowsChunkGroups == 0 && kS8RowsRangeGroups % kS8BlockGroups == 0,
                "s8rows_channel holds 64 rows in 8 accumulators; a chunk lies in one block; ranges start at a block");
  constexpr int64_t kCodes = kS8BlockGroups * kS8Channels * 2;
  int32_t* rt = static_cast<int32_t*>(scratch);
  __m256i ctl[6];
  for (int t = 0; t < 6; ++t) ctl[t] = pair_ctl(t);
  const int64_t groups = k / 4, nsp = sp1 - sp0;
  if (groups == 0) std::memset(acc, 0, static_cast<size_t>(nsp * kS8Channels * kRowPanel) * sizeof(int32_t));
  constexpr int kCh = kS8RowsChunkGroups;
  constexpr int64_t kEntry = 6 * kRowPanel;  // s32 of one group of the table
  for (int64_t r0g = 0; r0g < groups; r0g += kS8RowsRangeGroups) {
    const int64_t r1g = std::min(groups, r0g + kS8RowsRangeGroups);
    for (int64_t g = r0g; g < r1g; g += 8)
      s8rows_table(x, ldx, rows, k, g, static_cast<int>(std::min<int64_t>(8, r1g - g)), rt + (g - r0g) * kEntry, ctl);
    for (int64_t cb = sp0; cb < sp1; cb += kS8RowsBlockPanels) {
      const int64_t cbe = std::min(sp1, cb + kS8RowsBlockPanels);
      for (int64_t g0 = r0g; g0 < r1g; g0 += kCh) {
        const int gn = static_cast<int>(std::min<int64_t>(kCh, r1g - g0));
        const int32_t* rc = rt + (g0 - r0g) * kEntry;
        const int64_t b = g0 / kS8BlockGroups, gi0 = g0 % kS8BlockGroups;
        const int64_t pg = g0 + 2 * kCh;  // prefetch target group
        for (int64_t sp = cb; sp < cbe; ++sp) {
          if (pg < groups) {
            const uint8_t* pb = w.block(sp, pg / kS8BlockGroups);
            const int64_t pgi = pg % kS8BlockGroups;
            for (int l = 0; l < kCh; ++l)
              _mm_prefetch(reinterpret_cast<const char*>(pb + (pgi + l) * kS8Channels * 2), _MM_HINT_T0);
            for (int l = 0; l < kCh * 12; l += 64)
              _mm_prefetch(reinterpret_cast<const char*>(pb + kCodes + pgi * 12 + l), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(pb + kCodes + pgi * 12 + kCh * 12 - 1), _MM_HINT_T0);
          }
          const uint8_t* blk = w.block(sp, b);
          int32_t* a = acc + (sp - sp0) * kS8Channels * kRowPanel;
          for (int j = 0; j < 4; ++j) {
            const uint8_t* codes = blk + kCodes + gi0 * 12 + 3 * j;
            const uint8_t* vals = blk + gi0 * kS8Channels * 2 + 16 * j;
            int32_t* aj = a + 8 * j * kRowPanel;
            if (gn == kCh) s8rows_subpanel<kCh>(std::make_integer_sequence<int, 8>{}, rc, codes, vals, g0 == 0, aj);
            else
              for (int c = 0; c < 8; ++c) s8rows_channel_tail(rc, codes, vals + 2 * c, c, gn, g0 == 0, aj + c * kRowPanel);
          }
        }
      }
    }
  }
}

}  // namespace qllm::kernels::avx2
