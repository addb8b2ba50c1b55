// The fused int8 expert FFN (SPEC section 3): CANN's GmmDeqSwigluQuantGmmDeq and its
// single-expert form MmDeqSwigluQuantMmDeq.
//
// Per group g and row r: acc1 = x1 @ weight1[g] (s32); h = (f32(acc1) * scale1) * per_token_scale1;
// y = up * silu(gate) in natural order; (q2, s2) = per-row dynamic quant of y;
// acc2 = q2 @ weight2[g]^T (s32); out = out_dtype((f32(acc2) * scale2[g]) * s2).
//
// Work is done in blocks of rows: the block's [rows, n1] matmul output never exists — SwiGLU is
// applied in the matmul epilogue — and its [rows, k2] intermediate (f32, then s8) stays in
// cache between the two matmuls. Rows past the group total are zero.
#pragma once

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

struct MoeFfnParams {
  GroupListType group_list_type = GroupListType::cumsum;
  WeightUpPermute weight_up_permute = WeightUpPermute::none;  // layout of raw weight1 / scale1
  DType out_dtype = DType::f16;                               // f16, bf16 or f32
};

struct MoeFfnArgs {
  TensorView x1;                          // [m, k1] s8
  TensorView per_token_scale1;            // [m] f32
  TensorView group_list;                  // [G] s64 (ignored by mm_deq_swiglu_quant_mm_deq)
  // Either raw weights (packed per call: convenient, slow) ...
  TensorView weight1;                     // [G, k1, n1] s8
  TensorView scale1;                      // [G, n1] f32
  TensorView weight2;                     // [G, n2, k2] s8
  TensorView scale2;                      // [G, n2] f32
  // ... or weights packed once (the fast path; weight_up_permute was fixed at packing).
  const PackedExpertFFN* packed = nullptr;
};

size_t gmm_deq_swiglu_quant_gmm_deq_workspace_size(const MoeFfnArgs& args, const MoeFfnParams& p,
                                                   int threads);

// out: [m, n2] of p.out_dtype.
void gmm_deq_swiglu_quant_gmm_deq(Context& ctx, const MoeFfnArgs& args, const TensorView& out,
                                  const MoeFfnParams& p = {}, Workspace* ws = nullptr);

// Single expert: weight1 [k1, n1], scale1 [n1], weight2 [n2, k2], scale2 [n2]; no group list.
void mm_deq_swiglu_quant_mm_deq(Context& ctx, const MoeFfnArgs& args, const TensorView& out,
                                const MoeFfnParams& p = {}, Workspace* ws = nullptr);

// Reorders natural weight1 [.., k1, n1] and scale1 [.., n1] into the T-block layout of SPEC
// section 3 (T = 128 or 256): w_out/scale_out must have the same shapes. n1 % T == 0.
void permute_weight_up(const TensorView& w, const TensorView& scale, int64_t T,
                       const TensorView& w_out, const TensorView& scale_out);

}  // namespace qllm
