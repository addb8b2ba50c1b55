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
// loads, not the FMAs, set the pace), and 1 row x 8 pairs for the memory-bound matrix-vector
// case (8 independent chains).
//
// s8: x is widened to s16 once; a ymm of 16 s16 spans two blocks, vpshufb (in-lane) gathers the
// kept x of both channels with a control built from a 256-entry table indexed by the channel's
// meta byte (4 positions -> 8 byte indices), and vpmaddwd multiplies and adds each group's pair
// exactly in s32.
#include <immintrin.h>

#include <array>
#include <cstring>

#include "kernels/sparse24.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels::avx2 {

namespace {

inline int32_t load_u32(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <DType DT, int MR, int PR>
void ftile(const float* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, float* acc,
           int64_t ld_acc) {
  constexpr int64_t es = dtype_size(DT);
  __m256 a[PR][MR];
  // One pointer per pair; meta and values are reached through two shared running offsets, so
  // 8 pairs need 8 + 2 general registers and nothing spills.
  const uint8_t* v[PR];
  for (int j = 0; j < PR; ++j) {
    v[j] = w.values(p + j);
    for (int r = 0; r < MR; ++r) a[j][r] = _mm256_loadu_ps(acc + r * ld_acc + j * 8);
  }
  const int64_t moff = w.kb * 8 * es;
  // Lane shifts: lane 4h + 2c + s reads bits 8c + 4h + 2s of the block's u16 (kernels/sparse24.h);
  // the odd block of a pair of blocks sits 16 bits higher in the 32-bit load.
  const __m256i sh0 = _mm256_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14);
  const __m256i sh1 = _mm256_add_epi32(sh0, _mm256_set1_epi32(16));
  for (int64_t kb = kb0; kb < kb1; kb += 2) {
    const int64_t vo = kb * 8 * es, mo = moff + kb * 2;
    if constexpr (MR == 1) {
      // Matrix-vector: 8 pairs are 8 value streams; fetch 1 KB ahead of each.
      for (int j = 0; j < PR; ++j) _mm_prefetch(reinterpret_cast<const char*>(v[j] + vo + 1024), _MM_HINT_T0);
    }
    for (int h = 0; h < 2; ++h) {
      __m256i idx[PR];
      __m256 vv[PR];
      for (int j = 0; j < PR; ++j) {
        idx[j] = _mm256_srlv_epi32(_mm256_set1_epi32(load_u32(reinterpret_cast<const uint16_t*>(v[j] + mo))), h ? sh1 : sh0);
        vv[j] = load8(DT, v[j] + vo + h * 8 * es);
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

template <DType DT, int PR>
void ftile_rows(int mr, const float* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, float* acc,
                int64_t ld_acc) {
  switch (mr) {
    case 1: ftile<DT, 1, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    case 2: ftile<DT, 2, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    case 3: ftile<DT, 3, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    default: ftile<DT, 4, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
  }
}

template <DType DT>
void fmm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0,
         int64_t kb1, float* acc, int64_t ld_acc) {
  constexpr int kMR = 4;
  if (rows == 1) {
    int64_t p = p0;
    for (; p + 8 <= p1; p += 8) ftile<DT, 1, 8>(x, ldx, w, p, kb0, kb1, acc + (p - p0) * 8, ld_acc);
    for (; p < p1; ++p) ftile<DT, 1, 1>(x, ldx, w, p, kb0, kb1, acc + (p - p0) * 8, ld_acc);
    return;
  }
  // Pairs outer: a pair's chunk (L1-sized) is reused by every row tile while x's chunk stays in L2.
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      ftile_rows<DT, 2>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                        acc + r0 * ld_acc + (p - p0) * 8, ld_acc);
  for (; p < p1; ++p)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      ftile_rows<DT, 1>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                        acc + r0 * ld_acc + (p - p0) * 8, ld_acc);
}

// Meta byte of one channel for one block (positions p0, p1 of group 0, p2, p3 of group 1) ->
// vpshufb control picking s16 elements p0, p1, 4 + p2, 4 + p3 of the block (two bytes each).
constexpr std::array<uint64_t, 256> make_lut() {
  std::array<uint64_t, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e[4] = {b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + ((b >> 6) & 3)};
    uint64_t v = 0;
    for (int i = 0; i < 4; ++i) {
      v |= static_cast<uint64_t>(2 * e[i]) << (16 * i);
      v |= static_cast<uint64_t>(2 * e[i] + 1) << (16 * i + 8);
    }
    t[b] = v;
  }
  return t;
}
alignas(64) constexpr std::array<uint64_t, 256> kLut = make_lut();

template <int MR, int PR>
void itile(const int16_t* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1, int32_t* acc,
           int64_t ld_acc) {
  __m256i a[PR][MR];
  const uint8_t* v[PR];  // as ftile: one pointer per pair, shared running offsets
  for (int j = 0; j < PR; ++j) {
    v[j] = w.values(p + j);
    for (int r = 0; r < MR; ++r) a[j][r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + r * ld_acc + j * 8));
  }
  const int64_t moff = w.kb * 8;
  for (int64_t kb = kb0; kb < kb1; kb += 2) {
    const int64_t vo = kb * 8, mo = moff + kb * 2;
    if constexpr (MR == 1) {
      for (int j = 0; j < PR; ++j) _mm_prefetch(reinterpret_cast<const char*>(v[j] + vo + 1024), _MM_HINT_T0);
    }
    __m256i ctrl[PR], wv[PR];
    for (int j = 0; j < PR; ++j) {
      uint32_t mb;  // A(kb), B(kb), A(kb+1), B(kb+1)
      std::memcpy(&mb, v[j] + mo, 4);
      ctrl[j] = _mm256_setr_epi64x(static_cast<int64_t>(kLut[mb & 0xff]), static_cast<int64_t>(kLut[(mb >> 8) & 0xff]),
                                   static_cast<int64_t>(kLut[(mb >> 16) & 0xff]), static_cast<int64_t>(kLut[mb >> 24]));
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v[j] + vo)));
    }
    for (int r = 0; r < MR; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ldx + kb * 8));
      for (int j = 0; j < PR; ++j)
        a[j][r] = _mm256_add_epi32(a[j][r], _mm256_madd_epi16(_mm256_shuffle_epi8(xv, ctrl[j]), wv[j]));
    }
  }
  for (int j = 0; j < PR; ++j)
    for (int r = 0; r < MR; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * ld_acc + j * 8), a[j][r]);
}

template <int PR>
void itile_rows(int mr, const int16_t* x, int64_t ldx, const S24Panels& w, int64_t p, int64_t kb0, int64_t kb1,
                int32_t* acc, int64_t ld_acc) {
  switch (mr) {
    case 1: itile<1, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    case 2: itile<2, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    case 3: itile<3, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
    default: itile<4, PR>(x, ldx, w, p, kb0, kb1, acc, ld_acc); break;
  }
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

void s24_int8_mm(const int16_t* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                 int64_t kb0, int64_t kb1, int32_t* acc, int64_t ld_acc) {
  constexpr int kMR = 4;  // 8 accumulators + 2 controls + 2 weight vectors + x + temporaries
  if (rows == 1) {
    int64_t p = p0;
    for (; p + 8 <= p1; p += 8) itile<1, 8>(x, ldx, w, p, kb0, kb1, acc + (p - p0) * 8, ld_acc);
    for (; p < p1; ++p) itile<1, 1>(x, ldx, w, p, kb0, kb1, acc + (p - p0) * 8, ld_acc);
    return;
  }
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      itile_rows<2>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                    acc + r0 * ld_acc + (p - p0) * 8, ld_acc);
  for (; p < p1; ++p)
    for (int64_t r0 = 0; r0 < rows; r0 += kMR)
      itile_rows<1>(static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR), x + r0 * ldx, ldx, w, p, kb0, kb1,
                    acc + r0 * ld_acc + (p - p0) * 8, ld_acc);
}

}  // namespace qllm::kernels::avx2
