// Internal: the one routine that writes the panel layout of kernels.h (layout version 2).
#pragma once

#include <cstdint>

#include "qllm/core/dtype.h"
#include "qllm/core/int8_layout.h"

namespace qllm::detail {

// Bytes of one group's panels, rounded up to 64 (int8 weights in `layout`).
int64_t panel_group_bytes(DType dt, int64_t k, int64_t n, Int8Layout layout = Int8Layout::pairs);

// Packs B[k, n_src] (w row-major [k, n_src], or [n_src, k] when transposed) so that slot s of
// the output holds source column slot_col[s] (identity when slot_col is null; -1 = zeros).
// `nslots` slots are written, rounded up to whole panels with zeros. For int8 weights, `colsum`
// (if not null, one entry per slot of whole panels) receives sum_k B[k, slot].
void pack_panels(const void* w, DType dt, int64_t k, int64_t n_src, bool transposed,
                 const int64_t* slot_col, int64_t nslots, uint8_t* out,
                 Int8Layout layout = Int8Layout::pairs, int32_t* colsum = nullptr);

}  // namespace qllm::detail
