// The chunk walk of the 2:4 float large-m rows kernels (kernels/sparse24.h), shared by the AVX2
// and AVX-512 kernel files: both include it, and each compiles its own copy (anonymous
// namespace), so the linker cannot hand one ISA's code to the other. What differs per ISA is
// the per-pair register kernel, passed in as `pair`.
//
// Software prefetch: a chunk of a super-panel is only (kb1 - kb0) / 2 steps (~1 KB), too short
// for the hardware prefetcher, and the weights come from DRAM (each 64-row panel re-reads them),
// so on entering a super-panel the next one's chunk (or, at the end, the first one's next chunk)
// is requested, ~8 channel passes (~2 K cycles) ahead. The next x chunk is requested spread over
// the pairs (x is read from L2/L3 once per chunk and then reused by every pair from L1).
// f16/bf16 values: on entering a super-panel its chunk of values is converted to f32 once into a
// 1 KB stack buffer (converting per block and broadcasting from a just-stored vector stalled on
// store forwarding: ~1.1x dense against f32's ~1.4x).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "kernels/sparse24.h"
#include "kernels/x86/avx2/simd.h"

namespace qllm::kernels::x86 {

namespace {

// Calls pair(vals, vstride, meta, mstride, acc_pair) for every pair p of [p0, p1) over the
// blocks [kb0, kb1): vals = the pair's 16 values of the chunk's first step (f32; vstride floats
// per step), meta = its meta u32 of the first step (mstride bytes per step), acc_pair = its two
// channels' 64-row accumulators (acc + 2 (p - p0) * kRowPanel).
template <DType DT, class Pair>
[[gnu::always_inline]] inline void s24_rows_walk(const float* xp, const S24Panels& w, int64_t p0, int64_t p1,
                                                 int64_t kb0, int64_t kb1, float* acc, Pair&& pair) {
  constexpr int64_t es = dtype_size(DT);
  constexpr int64_t step = s24_step_bytes(es);
  constexpr int64_t kMaxSteps = 8;  // chunk (kb1 - kb0) / 2 <= kMaxSteps (ops/sparse24.cc: 4)
  alignas(64) float buf[kMaxSteps * kFP * 16];
  const int64_t nsteps = (kb1 - kb0) / 2;
  const int64_t wbytes = nsteps * step;
  const int64_t xbytes = (kb1 - kb0) * 8 * kRowPanel * 4, npairs = p1 - p0;
  const uint8_t* xnext = reinterpret_cast<const uint8_t*>(xp + kb1 * 8 * kRowPanel);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* st = w.step(p, kb0 / 2);
    const int64_t pj = p % kFP;
    if (pj == 0 || p == p0) {
      const uint8_t* nx = p - pj + kFP < p1 ? w.step(p - pj + kFP, kb0 / 2) : w.step(p0, kb1 / 2);
      for (int64_t l = 0; l < wbytes; l += 64) _mm_prefetch(reinterpret_cast<const char*>(nx + l), _MM_HINT_T0);
      if constexpr (DT != DType::f32)
        for (int64_t s = 0; s < nsteps && s < kMaxSteps; ++s)
          for (int i = 0; i < kFP * 2; ++i)
            _mm256_store_ps(buf + s * kFP * 16 + i * 8, avx2::load8(DT, st + s * step + i * 8 * es));
    }
    const int64_t xl0 = xbytes * (p - p0) / npairs, xl1 = xbytes * (p - p0 + 1) / npairs;
    for (int64_t l = xl0 & ~int64_t{63}; l < xl1; l += 64) _mm_prefetch(reinterpret_cast<const char*>(xnext + l), _MM_HINT_T1);
    if constexpr (DT == DType::f32)
      pair(reinterpret_cast<const float*>(st + pj * 16 * es), step / 4, st + kFP * 16 * es + pj * 4, step,
           acc + 2 * (p - p0) * kRowPanel);
    else
      pair(buf + pj * 16, int64_t{kFP * 16}, st + kFP * 16 * es + pj * 4, step, acc + 2 * (p - p0) * kRowPanel);
  }
}

}  // namespace

}  // namespace qllm::kernels::x86
