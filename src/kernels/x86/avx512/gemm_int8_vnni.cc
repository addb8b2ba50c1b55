// AVX-512 VNNI int8 GEMM, exact s8 x s8 -> s32, on quad-packed weights (kernels.h).
//
// vpdpbusd multiplies four u8 x s8 pairs per s32 lane and adds them to the lane without
// saturation: 64 multiply-adds per zmm instruction, against 16 per vpmaddwd on AVX2. Its first
// operand must be unsigned, so activations are stored as u = x + 128 (x ^ 0x80) and
//   sum_k x w = sum_k u w - 128 * sum_k w = acc - 128 * colsum[slot],
// with colsum computed at packing time. Everything is exact modulo 2^32, and the true result
// fits s32 (ops/ bounds k), so the wrapped intermediate does no harm.
//
// Microkernel: 8 rows x 16 columns: one zmm of weights per k-quad (64 bytes, no widening),
// 8 zmm accumulators, one 32-bit broadcast per row. Zen 4 runs a zmm vpdpbusd as two 256-bit
// halves, so 8 independent accumulators cover its latency; more rows would only add broadcasts.
#include <immintrin.h>

#include <array>
#include <cstring>
#include <utility>

#include "kernels/kernels.h"
#include "kernels/x86/avx2/int8_common.h"

namespace qllm::kernels::avx512 {

namespace {

constexpr int kMR = 8;

int64_t a_bytes(int64_t k) { return (k + 3) / 4 * 4; }

// u = x + 128, padded with 128 (x = 0) to a whole quad; the padded weight rows are zero.
void prepare_a(const int8_t* x, int64_t k, void* out) {
  uint8_t* u = static_cast<uint8_t*>(out);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) _mm512_storeu_si512(u + i, _mm512_xor_si512(_mm512_loadu_si512(x + i), flip));
  for (; i < a_bytes(k); ++i) u[i] = i < k ? static_cast<uint8_t>(x[i] ^ 0x80) : 0x80;
}

template <int MR>
void tile(const uint8_t* a, int64_t lda, const int8_t* bp, int64_t kq, const int32_t* colsum, int32_t* c,
          const int8_t* pf) {
  __m512i acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kq; ++q) {
    if (pf) _mm_prefetch(reinterpret_cast<const char*>(pf + q * 64), _MM_HINT_T0);
    const __m512i b = _mm512_loadu_si512(bp + q * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t quad;
      std::memcpy(&quad, a + r * lda + 4 * q, 4);
      acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(quad), b);
    }
  }
  // 128 * colsum (a multiply, not vpslld: GCC 12 warns falsely inside _mm512_slli_epi32)
  const __m512i corr = _mm512_mullo_epi32(_mm512_loadu_si512(colsum), _mm512_set1_epi32(128));
  for (int r = 0; r < MR; ++r) _mm512_storeu_si512(c + r * kPanel, _mm512_sub_epi32(acc[r], corr));
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*, int32_t*, const int8_t*);
template <size_t... I>
constexpr std::array<TileFn, sizeof...(I)> make_tiles(std::index_sequence<I...>) {
  return {&tile<static_cast<int>(I) + 1>...};
}
constexpr auto kTiles = make_tiles(std::make_index_sequence<kMR>{});

void int8_gemm(const void* a_bytes_ptr, int64_t lda, int64_t rows, const Int8Panels& b, int64_t p0, int64_t p1,
               const Int8Epilogue& ep) {
  const uint8_t* a = static_cast<const uint8_t*>(a_bytes_ptr);
  alignas(64) int32_t c[kMR * kPanel];
  avx2::int8_panel_loop<kMR>(rows, b, p0, p1, c, ep, [&](int mr, int64_t r0, int64_t p, const int8_t* bp, const int8_t* pf) {
    kTiles[mr - 1](a + r0 * lda, lda, bp, b.kg, b.colsum + p * kPanel, c, pf);
  });
}

}  // namespace
}  // namespace qllm::kernels::avx512

namespace qllm::kernels {

const KernelTable& avx512_table() {
  static const KernelTable t = [] {
    KernelTable k = avx2_table();  // conversions, quantisation, SwiGLU, float GEMM: the AVX2 ones
    k.isa = Isa::avx512;
    k.int8_gemm = avx512::int8_gemm;
    k.int8_layout = Int8Layout::quads;
    k.int8_tile_rows = avx512::kMR;
    k.int8_a_bytes = avx512::a_bytes;
    k.int8_prepare_a = avx512::prepare_a;
    return k;
  }();
  return t;
}

}  // namespace qllm::kernels
