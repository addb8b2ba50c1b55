#include "qllm/ops/quant.h"

#include <algorithm>

#include "kernels/kernels.h"
#include "ops/plan.h"
#include "qllm/core/error.h"

namespace qllm {

namespace {

// Per-thread f32 row scratch: rows are converted one at a time so that any row length works
// without a whole-tensor copy.
float* thread_rows(Workspace& ws, int threads, int64_t per_thread, const char* op) {
  return ws.alloc<float>(static_cast<size_t>(threads) * align_up(per_thread * sizeof(float)) / sizeof(float), op);
}
int64_t row_stride(int64_t per_thread) { return static_cast<int64_t>(align_up(per_thread * sizeof(float)) / sizeof(float)); }

void check_rows_2d(const char* op, const char* arg, const TensorView& t) {
  check::dtype_float(op, arg, t);
  check::ndim(op, arg, t, 2);
  check::contiguous(op, arg, t);
}

}  // namespace

// ---- dynamic_quant -----------------------------------------------------------------------

size_t dynamic_quant_workspace_size(const DynamicQuantArgs& a, int threads) {
  check_rows_2d("dynamic_quant", "x", a.x);
  WorkspacePlan w;
  w.add<float>(static_cast<size_t>(threads) * row_stride(a.x.dim(1)));  // one f32 row per thread
  return w.bytes();
}

void dynamic_quant(Context& ctx, const DynamicQuantArgs& a, const TensorView& q,
                   const TensorView& scale, Workspace* ws_in) {
  constexpr const char* op = "dynamic_quant";
  check_rows_2d(op, "x", a.x);
  const int64_t rows = a.x.dim(0), h = a.x.dim(1);
  check::dtype(op, "q", q, DType::s8);
  check::shape(op, "q", q, {rows, h});
  check::dtype(op, "scale", scale, DType::f32);
  check::shape(op, "scale", scale, {rows});
  int64_t G = 0;
  const int64_t* gidx = nullptr;
  if (a.smooth_scales.present()) {
    check::dtype(op, "smooth_scales", a.smooth_scales, DType::f32);
    if (a.smooth_scales.ndim() == 1) {
      check::shape(op, "smooth_scales", a.smooth_scales, {h});
      if (a.group_index.present()) throw_invalid(op, "group_index", "group_index needs 2-d smooth_scales [G, h]");
    } else {
      check::ndim(op, "smooth_scales", a.smooth_scales, 2);
      check::shape(op, "smooth_scales", a.smooth_scales, {-1, h});
      G = a.smooth_scales.dim(0);
      check::dtype(op, "group_index", a.group_index, DType::s64);
      check::shape(op, "group_index", a.group_index, {G});
      gidx = a.group_index.data<int64_t>();
      for (int64_t g = 0; g < G; ++g) {
        if (gidx[g] < 0 || gidx[g] > rows)
          throw_invalid(op, "group_index", "group_index[", g, "] = ", gidx[g], " is outside [0, rows = ", rows, "]");
        if (g > 0 && gidx[g] < gidx[g - 1])
          throw_invalid(op, "group_index", "group_index[", g, "] = ", gidx[g], " < group_index[", g - 1, "] = ", gidx[g - 1],
                        "; group_index must be non-decreasing (cumsum)");
      }
    }
  } else if (a.group_index.present()) {
    throw_invalid(op, "group_index", "group_index given without smooth_scales");
  }
  const int T = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(dynamic_quant_workspace_size(a, T));
  const int64_t rs = row_stride(h);
  float* scratch = thread_rows(ws, T, rs, op);
  const kernels::KernelTable& kt = ctx.kernels();
  const DType dt = a.x.dtype();
  ctx.pool().parallel_for(rows, 8, [&](int64_t b, int64_t e, int tid) {
    float* row = scratch + tid * rs;
    for (int64_t r = b; r < e; ++r) {
      const float* smooth = nullptr;
      if (G == 0 && a.smooth_scales.present()) smooth = a.smooth_scales.data<float>();
      if (G > 0) {
        // Row r belongs to the first group g with r < group_index[g].
        const int64_t g = std::upper_bound(gidx, gidx + G, r) - gidx;
        smooth = g < G ? a.smooth_scales.data<float>() + g * h : nullptr;
      }
      kt.to_f32(a.x.data<uint8_t>() + r * h * dtype_size(dt), dt, h, row);
      scale.mutable_data<float>()[r] = kt.quantize_row(row, smooth, h, q.mutable_data<int8_t>() + r * h);
    }
  });
}

// ---- swiglu / swiglu_quant ---------------------------------------------------------------

size_t swiglu_workspace_size(const TensorView& x, int threads) {
  check_rows_2d("swiglu", "x", x);
  WorkspacePlan w;
  w.add<float>(static_cast<size_t>(threads) * (row_stride(x.dim(1)) + row_stride(x.dim(1) / 2)));
  return w.bytes();
}

size_t swiglu_quant_workspace_size(const TensorView& x, int threads) {
  return swiglu_workspace_size(x, threads);
}

namespace {

int64_t swiglu_half(const char* op, const TensorView& x) {
  check_rows_2d(op, "x", x);
  const int64_t w = x.dim(1);
  if (w % 2 != 0) throw_invalid(op, "x", "x's last dimension must be even (2h), got ", w);
  return w / 2;
}

// Runs body(row, y_f32) for every row after computing its SwiGLU in f32.
template <class F>
void for_each_swiglu_row(Context& ctx, const TensorView& x, bool activate_left, Workspace& ws,
                         const char* op, F&& body) {
  const int64_t rows = x.dim(0), h = x.dim(1) / 2;
  const int T = ctx.threads();
  const int64_t sx = row_stride(2 * h), sy = row_stride(h);
  float* scratch = thread_rows(ws, T, sx + sy, op);
  const kernels::KernelTable& kt = ctx.kernels();
  ctx.pool().parallel_for(rows, 8, [&](int64_t b, int64_t e, int tid) {
    float* xr = scratch + tid * (sx + sy);
    float* yr = xr + sx;
    for (int64_t r = b; r < e; ++r) {
      kt.to_f32(x.data<uint8_t>() + r * 2 * h * dtype_size(x.dtype()), x.dtype(), 2 * h, xr);
      kt.swiglu_row(xr, h, activate_left, yr);
      body(r, yr);
    }
  });
}

}  // namespace

void swiglu(Context& ctx, const TensorView& x, const TensorView& y, bool activate_left, Workspace* ws_in) {
  constexpr const char* op = "swiglu";
  const int64_t h = swiglu_half(op, x);
  check::dtype_float(op, "y", y);
  check::shape(op, "y", y, {x.dim(0), h});
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(swiglu_workspace_size(x, ctx.threads()));
  const kernels::KernelTable& kt = ctx.kernels();
  const DType ydt = y.dtype();
  for_each_swiglu_row(ctx, x, activate_left, ws, op, [&](int64_t r, const float* yr) {
    kt.from_f32(yr, h, ydt, y.mutable_data<uint8_t>() + r * h * dtype_size(ydt));
  });
}

void swiglu_quant(Context& ctx, const TensorView& x, const TensorView& q, const TensorView& scale,
                  bool activate_left, Workspace* ws_in) {
  constexpr const char* op = "swiglu_quant";
  const int64_t h = swiglu_half(op, x);
  check::dtype(op, "q", q, DType::s8);
  check::shape(op, "q", q, {x.dim(0), h});
  check::dtype(op, "scale", scale, DType::f32);
  check::shape(op, "scale", scale, {x.dim(0)});
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(swiglu_quant_workspace_size(x, ctx.threads()));
  const kernels::KernelTable& kt = ctx.kernels();
  for_each_swiglu_row(ctx, x, activate_left, ws, op, [&](int64_t r, const float* yr) {
    scale.mutable_data<float>()[r] = kt.quantize_row(yr, nullptr, h, q.mutable_data<int8_t>() + r * h);
  });
}

// ---- dequant -----------------------------------------------------------------------------

void dequant(Context& ctx, const TensorView& acc, const TensorView& scale,
             const TensorView& per_token_scale, const TensorView& y) {
  constexpr const char* op = "dequant";
  check::dtype(op, "acc", acc, DType::s32);
  check::ndim(op, "acc", acc, 2);
  check::contiguous(op, "acc", acc);
  const int64_t rows = acc.dim(0), n = acc.dim(1);
  check::dtype(op, "scale", scale, DType::f32);
  check::shape(op, "scale", scale, {n});
  if (per_token_scale.present()) {
    check::dtype(op, "per_token_scale", per_token_scale, DType::f32);
    check::shape(op, "per_token_scale", per_token_scale, {rows});
  }
  check::dtype_float(op, "y", y);
  check::shape(op, "y", y, {rows, n});
  const kernels::KernelTable& kt = ctx.kernels();
  const DType ydt = y.dtype();
  ctx.pool().parallel_for(rows, 8, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r)
      kt.dequant_row(acc.data<int32_t>() + r * n, n, scale.data<float>(),
                     per_token_scale.present() ? per_token_scale.data<float>()[r] : 1.0f, ydt,
                     y.mutable_data<uint8_t>() + r * n * dtype_size(ydt));
  });
}

}  // namespace qllm
