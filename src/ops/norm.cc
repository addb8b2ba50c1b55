// rms_norm, add_rms_norm, layer_norm, rope (SPEC section 8): argument checks, f32 row scratch
// from the workspace, rows in parallel. The math is in kernels/norm.h.
#include "qllm/ops/norm.h"

#include <cmath>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/norm.h"
#include "qllm/core/error.h"

namespace qllm {

namespace {

int64_t floats_aligned(int64_t n) { return static_cast<int64_t>(align_up(n * sizeof(float)) / sizeof(float)); }

// x is [..., h] contiguous float; returns rows.
int64_t check_rows(const char* op, const char* arg, const TensorView& x) {
  check::present(op, arg, x);
  check::dtype_float(op, arg, x);
  check::contiguous(op, arg, x);
  return x.numel() / std::max<int64_t>(1, x.dim(-1));
}

void check_same_shape(const char* op, const char* arg, const TensorView& t, const TensorView& like) {
  check::present(op, arg, t);
  check::dtype_float(op, arg, t);
  check::contiguous(op, arg, t);
  bool same = t.ndim() == like.ndim();
  for (int i = 0; same && i < t.ndim(); ++i) same = t.dim(i) == like.dim(i);
  if (!same) throw_invalid(op, arg, arg, " must have shape ", like.shape_str(), ", got ", t.shape_str());
}

void check_vec(const char* op, const char* arg, const TensorView& t, int64_t h) {
  check::dtype_float(op, arg, t);
  check::shape(op, arg, t, {h});
}

// f32 copy of a [h] parameter vector in the workspace.
const float* param_f32(Context& ctx, Workspace& ws, const TensorView& t, int64_t h, const char* op) {
  if (!t.present()) return nullptr;
  float* p = ws.alloc<float>(h, op);
  ctx.kernels().to_f32(t.raw(), t.dtype(), h, p);
  return p;
}

const uint8_t* row_ptr(const TensorView& t, int64_t r, int64_t h) {
  return t.data<uint8_t>() + r * h * dtype_size(t.dtype());
}
uint8_t* row_mut(const TensorView& t, int64_t r, int64_t h) {
  return t.mutable_data<uint8_t>() + r * h * dtype_size(t.dtype());
}

enum class NormKind { rms, add_rms, layer };

void run_norm(Context& ctx, NormKind kind, const char* op, const TensorView& x, const TensorView& residual,
              const TensorView& gamma, const TensorView& beta, float eps, const TensorView& y, Workspace* ws_in) {
  const int64_t rows = check_rows(op, "x", x);
  if (x.ndim() < 1 || x.dim(-1) < 1) throw_invalid(op, "x", "x must be [rows, h] with h >= 1, got ", x.shape_str());
  const int64_t h = x.dim(-1);
  if (kind == NormKind::add_rms) check_same_shape(op, "residual", residual, x);
  check::present(op, "gamma", gamma);
  check_vec(op, "gamma", gamma, h);
  if (beta.present()) check_vec(op, "beta", beta, h);
  check_same_shape(op, "y", y, x);
  if (!(eps >= 0.0f) || !std::isfinite(eps)) throw_invalid(op, "eps", "eps must be finite and >= 0, got ", eps);
  const int T = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(norm_workspace_size(h, T));
  const float* g = param_f32(ctx, ws, gamma, h, op);
  const float* b = param_f32(ctx, ws, beta, h, op);
  const int64_t rs = floats_aligned(h);
  float* scratch = ws.alloc<float>(static_cast<size_t>(T) * 2 * rs, op);
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::NormKernels& nk = kernels::norm_kernels(ctx.isa());
  ctx.pool().parallel_for(rows, 16, [&](int64_t r0, int64_t r1, int tid) {
    float* xr = scratch + tid * 2 * rs;
    float* yr = xr + rs;
    for (int64_t r = r0; r < r1; ++r) {
      kt.to_f32(row_ptr(x, r, h), x.dtype(), h, xr);
      if (kind == NormKind::add_rms) {
        // residual += x, rounded to residual's dtype; the norm reads the rounded sum (what
        // `residual = residual + x; rms_norm(residual)` gives in PyTorch).
        kt.to_f32(row_ptr(residual, r, h), residual.dtype(), h, yr);
        for (int64_t i = 0; i < h; ++i) yr[i] = yr[i] + xr[i];
        kt.from_f32(yr, h, residual.dtype(), row_mut(residual, r, h));
        kt.to_f32(row_ptr(residual, r, h), residual.dtype(), h, xr);
      }
      if (kind == NormKind::layer) nk.layer_norm_row(xr, g, b, h, eps, yr);
      else nk.rms_norm_row(xr, g, h, eps, yr);
      kt.from_f32(yr, h, y.dtype(), row_mut(y, r, h));
    }
  });
}

}  // namespace

size_t norm_workspace_size(int64_t h, int threads) {
  WorkspacePlan w;
  w.add<float>(h);  // gamma
  w.add<float>(h);  // beta
  w.add<float>(static_cast<size_t>(threads) * 2 * floats_aligned(h));
  return w.bytes();
}

void rms_norm(Context& ctx, const TensorView& x, const TensorView& gamma, float eps, const TensorView& y, Workspace* ws) {
  run_norm(ctx, NormKind::rms, "rms_norm", x, TensorView(), gamma, TensorView(), eps, y, ws);
}

void add_rms_norm(Context& ctx, const TensorView& x, const TensorView& residual, const TensorView& gamma, float eps,
                  const TensorView& y, Workspace* ws) {
  run_norm(ctx, NormKind::add_rms, "add_rms_norm", x, residual, gamma, TensorView(), eps, y, ws);
}

void layer_norm(Context& ctx, const TensorView& x, const TensorView& gamma, const TensorView& beta, float eps,
                const TensorView& y, Workspace* ws) {
  run_norm(ctx, NormKind::layer, "layer_norm", x, TensorView(), gamma, beta, eps, y, ws);
}

// ---- rope ------------------------------------------------------------------------------------

size_t rope_workspace_size(int64_t T, int64_t D, int64_t rotary_dim, int threads) {
  const int64_t rd = rotary_dim == 0 ? D : rotary_dim;
  WorkspacePlan w;
  w.add<float>(static_cast<size_t>(T) * rd);  // cos | sin per token
  w.add<double>(rd / 2);                      // inverse frequencies
  w.add<float>(static_cast<size_t>(threads) * floats_aligned(D));
  return w.bytes();
}

void rope(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& positions, const RopeParams& p,
          Workspace* ws_in) {
  constexpr const char* op = "rope";
  if (!q.present() && !k.present()) throw_invalid(op, "q", "at least one of q and k must be given");
  int64_t T = -1, D = -1;
  for (const auto& [t, name] : {std::pair<const TensorView&, const char*>{q, "q"}, {k, "k"}}) {
    if (!t.present()) continue;
    check::dtype_float(op, name, t);
    check::ndim(op, name, t, 3);
    check::contiguous(op, name, t);
    if (T >= 0 && t.dim(0) != T) throw_invalid(op, name, "k has ", t.dim(0), " tokens but q has ", T);
    if (D >= 0 && t.dim(2) != D) throw_invalid(op, name, "k has head size ", t.dim(2), " but q has ", D);
    T = t.dim(0);
    D = t.dim(2);
  }
  check::present(op, "positions", positions);
  if (positions.dtype() != DType::s32 && positions.dtype() != DType::s64)
    throw_invalid(op, "positions", "positions must be s32 or s64, got ", dtype_name(positions.dtype()));
  check::shape(op, "positions", positions, {T});
  const int64_t rd = p.rotary_dim == 0 ? D : p.rotary_dim;
  if (rd < 2 || rd > D || rd % 2 != 0)
    throw_invalid(op, "rotary_dim", "rotary_dim must be even and in [2, head size ", D, "], got ", rd);
  if (!(p.theta > 0.0f) || !std::isfinite(p.theta)) throw_invalid(op, "theta", "theta must be finite and > 0, got ", p.theta);
  auto pos_at = [&](int64_t t) {
    return positions.dtype() == DType::s32 ? static_cast<int64_t>(positions.data<int32_t>()[t]) : positions.data<int64_t>()[t];
  };
  for (int64_t t = 0; t < T; ++t)
    if (pos_at(t) < 0) throw_invalid(op, "positions", "positions[", t, "] = ", pos_at(t), " is negative");
  const int Tn = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(rope_workspace_size(T, D, rd, Tn));
  const int64_t half = rd / 2;
  float* cs = ws.alloc<float>(static_cast<size_t>(T) * rd, op);
  double* inv = ws.alloc<double>(half, op);
  float* scratch = ws.alloc<float>(static_cast<size_t>(Tn) * floats_aligned(D), op);
  for (int64_t i = 0; i < half; ++i) inv[i] = std::pow(static_cast<double>(p.theta), -2.0 * static_cast<double>(i) / rd);
  // cos/sin per (token, i) in double, rounded once to f32: the same table for every ISA.
  ctx.pool().parallel_for(T, 64, [&](int64_t t0, int64_t t1, int) {
    for (int64_t t = t0; t < t1; ++t) {
      const double pos = static_cast<double>(pos_at(t));
      for (int64_t i = 0; i < half; ++i) {
        cs[t * rd + i] = static_cast<float>(std::cos(pos * inv[i]));
        cs[t * rd + half + i] = static_cast<float>(std::sin(pos * inv[i]));
      }
    }
  });
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::NormKernels& nk = kernels::norm_kernels(ctx.isa());
  const bool neox = p.style == RopeStyle::neox;
  const int64_t Hq = q.present() ? q.dim(1) : 0, Hk = k.present() ? k.dim(1) : 0;
  const int64_t rs = floats_aligned(D);
  ctx.pool().parallel_for(T * (Hq + Hk), 32, [&](int64_t r0, int64_t r1, int tid) {
    float* row = scratch + tid * rs;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (Hq + Hk), hh = r % (Hq + Hk);
      const TensorView& v = hh < Hq ? q : k;
      const int64_t H = hh < Hq ? Hq : Hk, h = hh < Hq ? hh : hh - Hq;
      uint8_t* ptr = v.mutable_data<uint8_t>() + (t * H + h) * D * dtype_size(v.dtype());
      // Only the rotated dims are converted and written back: the rest stay bit-identical.
      kt.to_f32(ptr, v.dtype(), rd, row);
      nk.rope_row(row, cs + t * rd, cs + t * rd + half, half, neox);
      kt.from_f32(row, rd, v.dtype(), ptr);
    }
  });
}

}  // namespace qllm
