// grouped_matmul (SPEC section 1): y[rows of group g] = x[rows of group g] @ W_g.
//
// Float path: x and w f32/f16/bf16 (same dtype), f32 accumulation, optional bias [G, n],
// output f32/f16/bf16. Quantised path (W8A8): x and w s8, exact s32 accumulation; output s32
// (raw) or f32/f16/bf16 = ((f32(acc) * scale[g, c]) * per_token_scale[r]).
// Rows past the group total are zero. Throws qllm::Error on bad input, writing nothing.
#pragma once

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

struct GroupedMatmulParams {
  GroupListType group_list_type = GroupListType::cumsum;
  bool transpose_w = false;      // raw w is [G, n, k] (Linear layout) instead of [G, k, n]
  DType out_dtype = DType::f32;  // float: f32/f16/bf16; s8: s32 (raw) or f32/f16/bf16
};

struct GroupedMatmulArgs {
  TensorView x;                         // [m, k]
  TensorView w;                         // raw weights, packed per call; or use packed_w
  const PackedWeight* packed_w = nullptr;
  TensorView group_list;                // [G] s64
  TensorView bias;                      // [G, n] f32 or x's dtype, optional (float path)
  TensorView scale;                     // [G, n] f32 (s8 path with float output)
  TensorView per_token_scale;           // [m] f32, optional (s8 path with float output)
};

size_t grouped_matmul_workspace_size(const GroupedMatmulArgs& args, const GroupedMatmulParams& p = {});

// y: [m, n] of p.out_dtype. ws: at least grouped_matmul_workspace_size() bytes; nullptr uses
// the context's arena.
void grouped_matmul(Context& ctx, const GroupedMatmulArgs& args, const TensorView& y,
                    const GroupedMatmulParams& p = {}, Workspace* ws = nullptr);

namespace detail {
// Validates a group list (SPEC section 1) and writes G + 1 row offsets (offsets[0] = 0).
// Throws naming `op`. Returns the total row count.
int64_t group_offsets(const char* op, const TensorView& group_list, GroupListType type,
                      int64_t m, int64_t expected_groups, int64_t* offsets);
}  // namespace detail

}  // namespace qllm
