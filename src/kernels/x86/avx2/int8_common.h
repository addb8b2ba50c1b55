// What every x86 int8 kernel shares: the epilogues (s32 / dequant / SwiGLU, AVX2 code) and the
// panel-outer schedule with its prefetching. A kernel supplies only its tile function.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace qllm::kernels::avx2 {

// Applies the epilogue to an mr x 16 s32 tile c[mr][16] (exact values) of panel p whose rows
// start at row r0.
void int8_epilogue(const int32_t* c, int mr, int64_t r0, int64_t p, const Int8Epilogue& ep);

// Panel-outer: each panel is read from memory once and reused from L2 by every row strip of
// `rows`. The weights come from DRAM, and the hardware prefetcher alone leaves the first strip
// of each panel stalled on it; so the first strip prefetches kPrefetchAhead bytes ahead in its
// panel (about two DRAM latencies of streaming at one core's share of the bandwidth; on huge
// pages 4 KiB measured 0-7% faster than 1, 2 and 8 KiB at 1-16 rows per expert, see
// docs/design.md decision 5), and the last strip of a multi-strip panel pulls in the next
// panel of this call's range. tile(mr, r0, p, panel, prefetch) fills c with an mr-row tile.
template <int kMR, class Tile>
inline void int8_panel_loop(int64_t rows, const Int8Panels& b, int64_t p0, int64_t p1, int32_t* c,
                            const Int8Epilogue& ep, Tile&& tile) {
  constexpr int64_t kPrefetchAhead = 4096;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* bp = b.data + p * b.panel_bytes();
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int mr = static_cast<int>(rows - r0 < kMR ? rows - r0 : kMR);
      const bool first = r0 == 0, last = r0 + kMR >= rows;
      const int8_t* pf = first ? bp + kPrefetchAhead : (last && p + 1 < p1) ? bp + b.panel_bytes() : nullptr;
      tile(mr, r0, p, bp, pf);
      int8_epilogue(c, mr, r0, p, ep);
    }
  }
}

}  // namespace qllm::kernels::avx2
