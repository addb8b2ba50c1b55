// Quantisation and activation operators (SPEC section 2).
#pragma once

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

// q[rows, h] s8 and scale[rows] f32 by the SPEC section 0 formula, per row of x (f32/f16/bf16).
// smooth_scales: optional [h], or [G, h] with group_index [G] (s64 CUMSUM) saying which rows use
// which vector; rows past group_index[G-1] are quantised without smoothing.
struct DynamicQuantArgs {
  TensorView x;
  TensorView smooth_scales;  // optional, f32
  TensorView group_index;    // required when smooth_scales is 2-d
};
void dynamic_quant(Context& ctx, const DynamicQuantArgs& args, const TensorView& q,
                   const TensorView& scale, Workspace* ws = nullptr);
size_t dynamic_quant_workspace_size(const DynamicQuantArgs& args, int threads);

// y[rows, h] = b * silu(a), (a, b) = (x[:, :h], x[:, h:]) (or swapped when !activate_left),
// computed in f32; x f32/f16/bf16; y f32/f16/bf16.
void swiglu(Context& ctx, const TensorView& x, const TensorView& y, bool activate_left = true,
            Workspace* ws = nullptr);
size_t swiglu_workspace_size(const TensorView& x, int threads);

// swiglu then dynamic_quant, fused, the intermediate kept in f32.
void swiglu_quant(Context& ctx, const TensorView& x, const TensorView& q, const TensorView& scale,
                  bool activate_left = true, Workspace* ws = nullptr);
size_t swiglu_quant_workspace_size(const TensorView& x, int threads);

// y[rows, n] = out_dtype((f32(acc) * scale[c]) * per_token_scale[r]); acc s32; scale [n] f32;
// per_token_scale [rows] f32 (optional: 1).
void dequant(Context& ctx, const TensorView& acc, const TensorView& scale,
             const TensorView& per_token_scale, const TensorView& y);

}  // namespace qllm
