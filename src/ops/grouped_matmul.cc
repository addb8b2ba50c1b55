#include "qllm/ops/grouped_matmul.h"

#include <cstring>

#include "kernels/kernels.h"
#include "ops/plan.h"
#include "qllm/core/error.h"

namespace qllm {

using kernels::kPanel;

namespace detail {

int64_t group_offsets(const char* op, const TensorView& gl, GroupListType type, int64_t m,
                      int64_t expected_groups, int64_t* offsets) {
  check::dtype(op, "group_list", gl, DType::s64);
  check::ndim(op, "group_list", gl, 1);
  check::contiguous(op, "group_list", gl);
  const int64_t G = gl.dim(0);
  if (expected_groups >= 0 && G != expected_groups)
    throw_invalid(op, "group_list", "group_list must have ", expected_groups,
                  " entries (one per weight group), got ", G);
  const int64_t* v = gl.data<int64_t>();
  offsets[0] = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (type == GroupListType::cumsum) {
      if (v[g] < 0) throw_invalid(op, "group_list", "group_list[", g, "] = ", v[g], " is negative");
      if (g > 0 && v[g] < v[g - 1])
        throw_invalid(op, "group_list", "group_list[", g, "] = ", v[g], " < group_list[", g - 1, "] = ", v[g - 1],
                      "; group_list must be non-decreasing (cumsum)");
      offsets[g + 1] = v[g];
    } else {
      if (v[g] < 0) throw_invalid(op, "group_list", "group_list[", g, "] = ", v[g], " is negative; counts must be >= 0");
      if (v[g] > m - offsets[g])
        throw_invalid(op, "group_list", "group_list counts sum past m = ", m, " at group ", g);
      offsets[g + 1] = offsets[g] + v[g];
    }
    if (offsets[g + 1] > m)
      throw_invalid(op, "group_list", "group_list total ", offsets[g + 1], " at group ", g, " exceeds m = ", m, " rows");
  }
  return offsets[G];
}

}  // namespace detail

namespace {

constexpr const char* kOp = "grouped_matmul";

struct Plan {
  bool quant = false;
  int64_t m = 0, k = 0, n = 0, G = 0;
  DType xdt = DType::f32;
  const PackedWeight* packed = nullptr;
};

Plan validate(const GroupedMatmulArgs& a, const GroupedMatmulParams& p) {
  Plan pl;
  pl.quant = check::matmul_operand(kOp, "x", a.x);
  pl.xdt = a.x.dtype();
  pl.m = a.x.dim(0);
  pl.k = a.x.dim(1);
  DType wdt;
  int64_t wk, wn, wg;
  if (a.packed_w) {
    if (a.w.present()) throw_invalid(kOp, "w", "give either w or packed_w, not both");
    wdt = a.packed_w->dtype(); wk = a.packed_w->k(); wn = a.packed_w->n(); wg = a.packed_w->groups();
  } else {
    check::present(kOp, "w", a.w);
    if (a.w.ndim() != 3) throw_invalid(kOp, "w", "w must be [G, k, n] (or [G, n, k] with transpose_w), got shape ", a.w.shape_str());
    check::contiguous(kOp, "w", a.w);
    wdt = a.w.dtype(); wg = a.w.dim(0);
    wk = p.transpose_w ? a.w.dim(2) : a.w.dim(1);
    wn = p.transpose_w ? a.w.dim(1) : a.w.dim(2);
  }
  if (wdt != pl.xdt)
    throw_invalid(kOp, "w", "w must have x's dtype ", dtype_name(pl.xdt), ", got ", dtype_name(wdt));
  if (wk != pl.k)
    throw_invalid(kOp, "w", "w's reduction size ", wk, " does not match x's k = ", pl.k,
                  p.transpose_w ? " (w is [G, n, k] with transpose_w)" : " (w is [G, k, n])");
  if (pl.quant && pl.k > 131072)
    throw_invalid(kOp, "x", "k = ", pl.k, " exceeds 131072, where s32 accumulation could overflow");
  pl.G = wg;
  pl.n = wn;
  pl.packed = a.packed_w;
  if (pl.quant) {
    if (p.out_dtype != DType::s32 && !is_float(p.out_dtype))
      throw_invalid(kOp, "out_dtype", "out_dtype for int8 inputs must be int32, float32, float16 or bfloat16, got ", dtype_name(p.out_dtype));
    if (a.bias.present()) throw_invalid(kOp, "bias", "bias is not supported on the int8 path");
    if (is_float(p.out_dtype)) {
      check::dtype(kOp, "scale", a.scale, DType::f32);
      check::shape(kOp, "scale", a.scale, {pl.G, pl.n});
      if (a.per_token_scale.present()) {
        check::dtype(kOp, "per_token_scale", a.per_token_scale, DType::f32);
        check::shape(kOp, "per_token_scale", a.per_token_scale, {pl.m});
      }
    } else if (a.scale.present() || a.per_token_scale.present()) {
      throw_invalid(kOp, "scale", "scale / per_token_scale given but out_dtype is int32 (raw accumulators)");
    }
  } else {
    if (!is_float(p.out_dtype))
      throw_invalid(kOp, "out_dtype", "out_dtype for float inputs must be float32, float16 or bfloat16, got ", dtype_name(p.out_dtype));
    if (a.scale.present() || a.per_token_scale.present())
      throw_invalid(kOp, "scale", "scale / per_token_scale only apply to int8 inputs");
    if (a.bias.present()) {
      if (a.bias.dtype() != DType::f32 && a.bias.dtype() != pl.xdt)
        throw_invalid(kOp, "bias", "bias must be float32 or x's dtype, got ", dtype_name(a.bias.dtype()));
      check::shape(kOp, "bias", a.bias, {pl.G, pl.n});
    }
  }
  return pl;
}

// Rows per work item: a multiple of the 6-row microkernel, big enough that a panel read from
// memory is reused by many rows, small enough that the converted rows stay in L2/L3.
constexpr int64_t kRowBlock = 96;
// Panels per work item: 4 panels = 64 columns, fine enough to balance two or more threads
// even when one group has few rows.
constexpr int64_t kPanelBlock = 4;

}  // namespace

size_t grouped_matmul_workspace_size(const GroupedMatmulArgs& a, const GroupedMatmulParams& p) {
  const Plan pl = validate(a, p);
  WorkspacePlan w;
  w.add<int64_t>(pl.G + 1);                                   // offsets
  w.add<int64_t>(pl.G + 1);                                   // work-item prefix
  if (pl.quant) w.add<uint8_t>(pl.m * kernels::a_bytes_pairs(pl.k));  // prepared x (pairs: the larger form)
  else w.add<float>(pl.m * pl.k);                             // x in f32
  if (!pl.quant) w.add<float>(pl.G * pl.n);                   // bias in f32
  if (!pl.packed)
    w.add<uint8_t>(std::max(PackedWeight::packed_bytes(pl.xdt, pl.G, pl.k, pl.n, Int8Layout::pairs),
                            PackedWeight::packed_bytes(pl.xdt, pl.G, pl.k, pl.n, Int8Layout::quads)));
  return w.bytes();
}

void grouped_matmul(Context& ctx, const GroupedMatmulArgs& a, const TensorView& y,
                    const GroupedMatmulParams& p, Workspace* ws_in) {
  const Plan pl = validate(a, p);
  const kernels::KernelTable& kt = ctx.kernels();
  if (pl.quant && pl.packed && kt.isa != Isa::ref && pl.packed->int8_layout() != kt.int8_layout)
    throw_invalid(kOp, "packed_w", "packed_w holds int8 weights in the ", int8_layout_name(pl.packed->int8_layout()),
                  " layout, but this context's ISA ", isa_name(kt.isa), " reads ", int8_layout_name(kt.int8_layout),
                  "; pack them for ", isa_name(kt.isa));
  check::dtype(kOp, "y", y, p.out_dtype);
  check::shape(kOp, "y", y, {pl.m, pl.n});
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(grouped_matmul_workspace_size(a, p));
  int64_t* offsets = ws.alloc<int64_t>(pl.G + 1, kOp);
  const int64_t total = detail::group_offsets(kOp, a.group_list, p.group_list_type, pl.m, pl.G, offsets);
  // All input is valid from here on; nothing was written before this point.

  ThreadPool& pool = ctx.pool();
  const size_t osz = static_cast<size_t>(dtype_size(p.out_dtype));
  // Rows past the group total are zero.
  if (total < pl.m) std::memset(y.mutable_data<uint8_t>() + total * pl.n * osz, 0, (pl.m - total) * pl.n * osz);
  if (total == 0 || pl.n == 0) return;

  int64_t* item_prefix = ws.alloc<int64_t>(pl.G + 1, kOp);
  const int64_t abytes = pl.quant ? kt.int8_a_bytes(pl.k) : 0;
  void* xa = pl.quant ? static_cast<void*>(ws.alloc<uint8_t>(pl.m * abytes, kOp))
                      : static_cast<void*>(ws.alloc<float>(pl.m * pl.k, kOp));
  float* bias32 = pl.quant ? nullptr : ws.alloc<float>(pl.G * pl.n, kOp);
  PackedWeight local;
  const PackedWeight* pw = pl.packed;
  if (!pw) {
    local = PackedWeight::pack_into(a.w, p.transpose_w,
                                    ws.alloc<uint8_t>(PackedWeight::packed_bytes(pl.xdt, pl.G, pl.k, pl.n, kt.int8_layout), kOp),
                                    kt.int8_layout);
    pw = &local;
  }
  if (a.bias.present()) kt.to_f32(a.bias.raw(), a.bias.dtype(), pl.G * pl.n, bias32);

  // Convert the activations once (s8 -> the int8 kernel's form, or float -> f32).
  pool.parallel_for(total, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      if (pl.quant) kt.int8_prepare_a(a.x.data<int8_t>() + r * pl.k, pl.k, static_cast<uint8_t*>(xa) + r * abytes);
      else kt.to_f32(a.x.data<uint8_t>() + r * pl.k * dtype_size(pl.xdt), pl.xdt, pl.k, static_cast<float*>(xa) + r * pl.k);
    }
  });

  // Work items (group, row block, panel block), claimed dynamically so that uneven groups
  // balance across threads.
  const int64_t panels = (pl.n + kPanel - 1) / kPanel;
  const int64_t pblocks = (panels + kPanelBlock - 1) / kPanelBlock;
  item_prefix[0] = 0;
  for (int64_t g = 0; g < pl.G; ++g)
    item_prefix[g + 1] = item_prefix[g] + ceil_div(offsets[g + 1] - offsets[g], kRowBlock) * pblocks;
  const int64_t items = item_prefix[pl.G];

  pool.parallel_for(items, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t it = b; it < e; ++it) {
      const int64_t g = find_group(item_prefix, pl.G, it);
      const int64_t local_it = it - item_prefix[g];
      const int64_t rb = local_it / pblocks, pb = local_it % pblocks;
      const int64_t r0 = offsets[g] + rb * kRowBlock;
      const int64_t rows = std::min(kRowBlock, offsets[g + 1] - r0);
      const int64_t p0 = pb * kPanelBlock, p1 = std::min(panels, p0 + kPanelBlock);
      const uint8_t* gdata = pw->panels(g);
      if (pl.quant) {
        const int64_t gs = int8_group(pw->int8_layout());
        const kernels::Int8Panels bp{reinterpret_cast<const int8_t*>(gdata), pl.k, (pl.k + gs - 1) / gs, pl.n,
                                     pw->int8_layout(), pw->colsum(g)};
        kernels::Int8Epilogue ep;
        ep.kind = is_float(p.out_dtype) ? kernels::Epi::dequant : kernels::Epi::s32;
        ep.col_scale = is_float(p.out_dtype) ? a.scale.data<float>() + g * pl.n : nullptr;
        ep.row_scale = a.per_token_scale.present() ? a.per_token_scale.data<float>() + r0 : nullptr;
        ep.out_dtype = p.out_dtype;
        ep.out = y.mutable_data<uint8_t>() + r0 * pl.n * osz;
        ep.ldo = pl.n;
        ep.out_cols = pl.n;
        kt.int8_gemm(static_cast<const uint8_t*>(xa) + r0 * abytes, abytes, rows, bp, p0, p1, ep);
      } else {
        const kernels::FloatPanels bp{gdata, pl.xdt, pl.k, pl.n};
        kernels::FloatEpilogue ep;
        ep.bias = a.bias.present() ? bias32 + g * pl.n : nullptr;
        ep.out_dtype = p.out_dtype;
        ep.out = y.mutable_data<uint8_t>() + r0 * pl.n * osz;
        ep.ldo = pl.n;
        kt.float_gemm(static_cast<const float*>(xa) + r0 * pl.k, pl.k, rows, bp, p0, p1, ep);
      }
    }
  });
}

}  // namespace qllm
