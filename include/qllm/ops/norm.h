// Norms and rotary position embedding (SPEC section 8).
//
// All of them work row by row in f32 (inputs f32/f16/bf16, converted exactly; the result rounded
// once, to nearest even, to the output dtype) and accept the output aliasing the input (in place).
// Rows are independent and run on ctx.pool(); scratch comes from the workspace (no heap).
#pragma once

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"

namespace qllm {

// y[rows, h] = x * rsqrt(mean(x^2) + eps) * gamma. x, y: [rows, h] f32/f16/bf16 (y may be x);
// gamma [h] f32/f16/bf16.
void rms_norm(Context& ctx, const TensorView& x, const TensorView& gamma, float eps, const TensorView& y,
              Workspace* ws = nullptr);

// residual += x (rounded to residual's dtype), then y = rms_norm(residual). residual [rows, h] is
// updated in place; y may alias x (not residual).
void add_rms_norm(Context& ctx, const TensorView& x, const TensorView& residual, const TensorView& gamma, float eps,
                  const TensorView& y, Workspace* ws = nullptr);

// y = (x - mean(x)) * rsqrt(var(x) + eps) * gamma + beta (biased variance, two-pass, like torch).
// gamma [h] required, beta [h] optional (absent: 0). y may alias x.
void layer_norm(Context& ctx, const TensorView& x, const TensorView& gamma, const TensorView& beta, float eps,
                const TensorView& y, Workspace* ws = nullptr);

// Scratch of the three norms for rows of h elements: two f32 rows per thread plus gamma/beta.
size_t norm_workspace_size(int64_t h, int threads);

enum class RopeStyle { neox, gptj };

struct RopeParams {
  float theta = 10000.0f;
  int64_t rotary_dim = 0;  // 0: the whole head (D); else even and <= D
  RopeStyle style = RopeStyle::neox;
};

// In place on q[T, Hq, D] and k[T, Hkv, D] (either may be absent, not both; same dtype family
// f32/f16/bf16 each), positions[T] s32 or s64 (>= 0). For i < rotary_dim / 2,
// angle = pos * theta^(-2i / rotary_dim) (computed in double, cos/sin rounded to f32);
// neox rotates the pair (x[i], x[i + rotary_dim/2]), gptj the pair (x[2i], x[2i+1]):
// (a, b) -> (a cos - b sin, b cos + a sin). Dims past rotary_dim are left unchanged.
void rope(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& positions,
          const RopeParams& p, Workspace* ws = nullptr);
size_t rope_workspace_size(int64_t T, int64_t D, int64_t rotary_dim, int threads);

}  // namespace qllm
