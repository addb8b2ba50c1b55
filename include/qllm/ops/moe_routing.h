// MoE routing (SPEC section 4): choose experts per token, gather tokens by expert, run the
// experts' matmuls on routed rows, and combine the results back per token.
//
//   logits [T, E] --moe_gating_topk--> weights [T, k], expert_ids [T, k]
//   x [T, h] --moe_init_routing--> expanded_x [T*k, h] in expert order (+ per-row int8 quant),
//                                  expanded_row_idx, expert_count / expert_cumsum, source_token
//   grouped_matmul_with_routing: UP (gather by source token) / DOWN (scatter-add per token)
//   rows [T*k, h] --moe_finalize_routing--> out [T, h] = skip + sum_j w * (row + bias)
//
// Every index (expert ids, counts, row indices) is validated before any work; nothing is written
// to outputs when input is rejected.
#pragma once

#include <string>

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

enum class ScoringFunc { softmax, sigmoid };
ScoringFunc parse_scoring_func(const std::string& name, const char* op);  // "softmax" | "sigmoid"

// ---- moe_gating_topk -------------------------------------------------------------------------

struct MoeGatingParams {
  int64_t top_k = 1;
  ScoringFunc scoring = ScoringFunc::softmax;
  int64_t n_group = 1;                // > 1: grouped selection (DeepSeek-V3)
  int64_t topk_group = 1;             // groups kept, by the sum of their best two scores
  bool renormalize = false;           // weights divided by their sum (norm_topk_prob)
  float routed_scaling_factor = 1.0f; // weights multiplied (after renormalising)
};

struct MoeGatingArgs {
  TensorView logits;                   // [T, E] f32, f16 or bf16
  TensorView e_score_correction_bias;  // [E] f32, optional: added for choosing, not to the weights
};

// weights: [T, k] f32; expert_ids: [T, k] s32. Per token the chosen experts come in descending
// order of their (bias-corrected) score, ties to the lower expert id.
// ws: at least moe_gating_topk_workspace_size() bytes; nullptr uses the context's arena.
size_t moe_gating_topk_workspace_size(int64_t num_experts, const MoeGatingParams& p, int threads);
void moe_gating_topk(Context& ctx, const MoeGatingArgs& args, const TensorView& weights,
                     const TensorView& expert_ids, const MoeGatingParams& p, Workspace* ws = nullptr);

// ---- moe_init_routing ------------------------------------------------------------------------

struct MoeInitRoutingOutputs {
  TensorView expanded_x;        // [T*k, h]: x's dtype, or s8 when quantising
  TensorView expanded_row_idx;  // [T*k] s32: position in expanded_x of pair t*k + j
  TensorView expert_count;      // [E] s64, optional
  TensorView expert_cumsum;     // [E] s64 (inclusive), optional
  TensorView source_token;      // [T*k] s32, optional: token of each expanded row (expert_index)
  TensorView expanded_scale;    // [T*k] f32: required when quantising, else absent
};

// x [T, h] f32/f16/bf16 (or s8 without quantisation); expert_ids [T, k] s32 in [0, num_experts).
// The pairs are ordered by a stable sort on the expert id (token-major within an expert).
// With `quantize`, every gathered row is quantised per SPEC section 0 (s8 + scale).
size_t moe_init_routing_workspace_size(int64_t T, int64_t h, int64_t k, int64_t num_experts, bool quantize,
                                       int threads);
void moe_init_routing(Context& ctx, const TensorView& x, const TensorView& expert_ids, int64_t num_experts,
                      const MoeInitRoutingOutputs& out, bool quantize = false, Workspace* ws = nullptr);

// ---- grouped_matmul_with_routing -------------------------------------------------------------

enum class RoutingDirection { up, down };

struct GmmRoutingParams {
  RoutingDirection direction = RoutingDirection::up;
  bool transpose_b = true;     // raw weight [E, n, k] (true) or [E, k, n]
  int64_t top_k = 1;
  DType out_dtype = DType::f16;  // float path: f32/f16/bf16; int8 path: f16/bf16 (or f32)
};

struct GmmRoutingArgs {
  TensorView ac;               // UP: [T, k]; DOWN: [T*top_k, k] in expert order. f32/f16/bf16 or s8
  TensorView weight;           // raw [E, n, k] / [E, k, n] (packed per call), or packed:
  const PackedWeight* packed = nullptr;
  TensorView expert_cumsum;    // [E] s64 or s32, inclusive, last = T*top_k
  TensorView expert_index;     // [T*top_k] s32 in [0, T): source (UP) / destination (DOWN) token
  TensorView nscale;           // [E, n] f32 (int8 path)
  TensorView mscale;           // [rows of ac] f32 (int8 path)
};

// UP: out [T*top_k, n], out[i] = ac[expert_index[i]] @ W_e(i).
// DOWN: out [T, n], out[expert_index[i]] += ac[i] @ W_e(i) accumulated in f32 in row order, cast
// once; tokens that receive no row are 0. int8: each product is (f32(acc) * mscale[row]) * nscale[e, c].
size_t grouped_matmul_with_routing_workspace_size(const GmmRoutingArgs& args, const TensorView& out,
                                                  const GmmRoutingParams& p, int threads);
void grouped_matmul_with_routing(Context& ctx, const GmmRoutingArgs& args, const TensorView& out,
                                 const GmmRoutingParams& p, Workspace* ws = nullptr);

// ---- moe_finalize_routing --------------------------------------------------------------------

struct MoeFinalizeArgs {
  TensorView rows;              // [R, h] f32/f16/bf16 (R >= T*k): the experts' outputs, expert order
  TensorView weights;           // [T, k] f32
  TensorView expanded_row_idx;  // [T*k] s32 in [0, R)
  TensorView bias;              // [E, h] f32, optional (needs expert_ids)
  TensorView expert_ids;        // [T, k] s32, with bias
  TensorView skip;              // [T, h] f32/f16/bf16, optional
};

// out [T, h] f32/f16/bf16: out[t] = skip[t] + sum_j weights[t, j] * (rows[idx[t*k + j]] + bias[e]),
// the sum in f32 in j order, then skip added, cast once.
size_t moe_finalize_routing_workspace_size(int64_t h, int threads);
void moe_finalize_routing(Context& ctx, const MoeFinalizeArgs& args, const TensorView& out, Workspace* ws = nullptr);

}  // namespace qllm
