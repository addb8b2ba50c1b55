// weight_quant_matmul, quantize_weight, dequantize_weight (SPEC section 5) and the packed
// weight they share. Arguments are validated here; the kernels (kernels/wq.h) trust them.
#include "qllm/ops/weight_quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/wq.h"
#include "ops/plan.h"
#include "qllm/core/arena.h"
#include "qllm/core/error.h"

namespace qllm {

using kernels::kWqPanel;
using kernels::WqPanels;

namespace {

constexpr const char* kMatmul = "weight_quant_matmul";

float load_float(const TensorView& t, int64_t i) {
  switch (t.dtype()) {
    case DType::f16: return f16_to_f32(t.data<uint16_t>()[i]);
    case DType::bf16: return bf16_to_f32(t.data<uint16_t>()[i]);
    default: return t.data<float>()[i];
  }
}

void store_float(const TensorView& t, int64_t i, float v) {
  switch (t.dtype()) {
    case DType::f16: t.mutable_data<uint16_t>()[i] = f32_to_f16(v); break;
    case DType::bf16: t.mutable_data<uint16_t>()[i] = f32_to_bf16(v); break;
    default: t.mutable_data<float>()[i] = v; break;
  }
}

// A validated quantised weight in the user's layout: w (s8 or s4x2), its logical k and n, and the
// scale/offset views.
struct QuantSrc {
  TensorView w, scale, offset;
  int bits = 8;
  bool transpose = false;
  int64_t k = 0, n = 0, group_size = 0, groups = 0;

  // Signed value at logical (kk, c).
  int q(int64_t kk, int64_t c) const {
    if (bits == 8) return w.data<int8_t>()[transpose ? c * k + kk : kk * n + c];
    // s4x2: two values per byte along the contiguous axis, element 2i in the low nibble.
    const int64_t idx = transpose ? c * k + kk : kk * n + c;  // logical element index
    const uint8_t b = w.data<uint8_t>()[idx / 2];
    const int v = (idx % 2) ? (b >> 4) : (b & 0xF);
    return v >= 8 ? v - 16 : v;
  }
  int64_t group_of(int64_t kk) const { return group_size ? kk / group_size : 0; }
};

// Clamps a rounded float to [lo, hi]; NaN (non-finite weights are not checked) becomes 0.
int clamp_int(float v, int lo, int hi) {
  if (!(v == v)) return 0;
  return static_cast<int>(std::clamp(v, static_cast<float>(lo), static_cast<float>(hi)));
}

void check_group_size(const char* op, int64_t gs, int64_t k) {
  if (gs < 0 || (gs > 0 && gs % 32 != 0))
    throw_invalid(op, "group_size", "group_size must be 0 (per-channel) or a positive multiple of 32, got ", gs);
  if (gs > k)
    throw_invalid(op, "group_size", "group_size = ", gs, " is larger than k = ", k,
                  "; use group_size = 0 for one scale per channel");
}

// Checks a scale/offset view against the grouping: [n] (or [1, n]) per-channel, else [groups, n].
void check_scale(const char* op, const char* arg, const TensorView& t, int64_t groups, int64_t n, int64_t gs, int64_t k,
                 int bits, bool transpose) {
  check::present(op, arg, t);
  if (!is_float(t.dtype()))
    throw_invalid(op, arg, arg, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype()));
  check::contiguous(op, arg, t);
  const bool ok = gs == 0 ? ((t.ndim() == 1 && t.dim(0) == n) || (t.ndim() == 2 && t.dim(0) == 1 && t.dim(1) == n))
                          : (t.ndim() == 2 && t.dim(0) == groups && t.dim(1) == n);
  if (ok) return;
  if (bits == 4 && !transpose && t.ndim() >= 1 && t.dim(-1) % 2 == 1 && t.dim(-1) == n - 1)
    throw_invalid(op, arg, arg, " has ", t.dim(-1), " (odd) columns, but s4x2 w [k, n/2] packs columns in pairs (n = ", n,
                  "); an odd n cannot be stored as s4x2 along n: pad n or use transpose_w");
  if (gs == 0)
    throw_invalid(op, arg, arg, " must be [n] = [", n, "] for per-channel scaling (group_size = 0), got shape ",
                  t.shape_str());
  throw_invalid(op, arg, arg, " must be [ceil(k / group_size), n] = [", groups, ", ", n, "] for k = ", k,
                ", group_size = ", gs, ", got shape ", t.shape_str());
}

// Validates w / scale / offset / group_size; k_expected >= 0 also checks w's reduction size.
QuantSrc validate_src(const char* op, const TensorView& w, const TensorView& scale, const TensorView& offset,
                      int64_t gs, bool transpose, int64_t k_expected) {
  QuantSrc s;
  check::present(op, "w", w);
  if (w.dtype() != DType::s8 && w.dtype() != DType::s4x2)
    throw_invalid(op, "w", "w must be int8 (s8) or packed int4 (s4x2), got ", dtype_name(w.dtype()));
  if (w.ndim() != 2)
    throw_invalid(op, "w", "w must be 2-d ([k, n], or [n, k] with transpose_w), got shape ", w.shape_str());
  check::contiguous(op, "w", w);
  s.bits = w.dtype() == DType::s8 ? 8 : 4;
  s.transpose = transpose;
  s.k = transpose ? w.dim(1) : w.dim(0);
  s.n = transpose ? w.dim(0) : w.dim(1);
  if (s.bits == 4) {
    if (transpose) s.k *= 2;
    else s.n *= 2;
    if (transpose && k_expected >= 0 && k_expected % 2 == 1)
      throw_invalid(op, "w", "s4x2 w [n, k/2] packs k in pairs, but x has k = ", k_expected,
                    " (odd); pad k to an even size");
  }
  if (k_expected >= 0 && s.k != k_expected)
    throw_invalid(op, "w", "w's reduction size ", s.k, " does not match x's k = ", k_expected,
                  transpose ? (s.bits == 4 ? " (w is s4x2 [n, k/2] with transpose_w)" : " (w is [n, k] with transpose_w)")
                            : (s.bits == 4 ? " (w is s4x2 [k, n/2])" : " (w is [k, n])"));
  if (s.k < 1) throw_invalid(op, "w", "w must have k >= 1, got shape ", w.shape_str());
  check_group_size(op, gs, s.k);
  s.group_size = gs;
  s.groups = gs ? ceil_div(s.k, gs) : 1;
  check_scale(op, "scale", scale, s.groups, s.n, gs, s.k, s.bits, transpose);
  if (offset.present()) check_scale(op, "offset", offset, s.groups, s.n, gs, s.k, s.bits, transpose);
  s.w = w;
  s.scale = scale;
  s.offset = offset;
  return s;
}

WqPanels geometry(int bits, int64_t k, int64_t n, int64_t gs, bool has_offset) {
  WqPanels g;
  g.bits = bits;
  g.k = k;
  g.n = n;
  const int KB = g.kb_k();
  g.kgroup = gs ? gs : ceil_div(k, KB) * KB;
  g.groups = gs ? ceil_div(k, gs) : 1;
  g.has_offset = has_offset;
  return g;
}

size_t packed_size(const WqPanels& g) { return static_cast<size_t>(g.panels() * g.panel_bytes()); }

// Writes the layout of kernels/wq.h.
void pack_src(const QuantSrc& s, const WqPanels& g, uint8_t* out) {
  std::memset(out, 0, packed_size(g));
  const int KB = g.kb_k(), B = g.bits, bias = g.bias();
  const uint32_t vmask = (1u << B) - 1u;
  for (int64_t p = 0; p < g.panels(); ++p) {
    for (int64_t gi = 0; gi < g.groups; ++gi) {
      uint8_t* gp = out + p * g.panel_bytes() + gi * g.group_bytes();
      const int64_t nkb = g.group_kblocks(gi);
      for (int sl = 0; sl < kWqPanel; ++sl) {
        const int64_t c = p * kWqPanel + sl;
        for (int64_t kb = 0; kb < nkb; ++kb) {
          uint32_t d = 0;
          for (int i = 0; i < KB; ++i) {
            const int64_t kk = gi * g.kgroup + kb * KB + i;
            const int q = (c < g.n && kk < g.k) ? s.q(kk, c) : 0;
            const uint32_t v = i < KB - 1 ? static_cast<uint32_t>(q + bias) : static_cast<uint32_t>(q) & vmask;
            d |= (v & vmask) << (i * B);
          }
          std::memcpy(gp + kb * kernels::kWqBlockBytes + 4 * sl, &d, 4);
        }
        float* sc = reinterpret_cast<float*>(gp + nkb * kernels::kWqBlockBytes);
        const int64_t si = gi * g.n + c;
        sc[sl] = c < g.n ? load_float(s.scale, si) : 0.0f;
        if (g.has_offset) sc[kWqPanel + sl] = c < g.n ? load_float(s.offset, si) : 0.0f;
      }
    }
  }
}

WqPanels panels_of(const PackedQuantWeight& pw) {
  WqPanels g = geometry(pw.bits(), pw.k(), pw.n(), pw.group_size(), pw.has_offset());
  g.data = pw.data();
  return g;
}

}  // namespace

// ---- PackedQuantWeight -------------------------------------------------------------------------

PackedQuantWeight PackedQuantWeight::pack(const TensorView& w, const TensorView& scale, const TensorView& offset,
                                          int64_t group_size, bool transpose_w, const char* op) {
  const QuantSrc s = validate_src(op, w, scale, offset, group_size, transpose_w, -1);
  const WqPanels g = geometry(s.bits, s.k, s.n, group_size, offset.present());
  PackedQuantWeight pw;
  pw.bits_ = s.bits;
  pw.k_ = s.k;
  pw.n_ = s.n;
  pw.group_size_ = group_size;
  pw.groups_ = s.groups;
  pw.has_offset_ = offset.present();
  pw.bytes_ = packed_size(g);
  if (pw.bytes_) {
    pw.buf_.reset(static_cast<uint8_t*>(aligned_malloc(pw.bytes_)));
    pack_src(s, g, pw.buf_.get());
  }
  return pw;
}

int64_t PackedQuantWeight::kgroup() const { return geometry(bits_, k_, n_, group_size_, has_offset_).kgroup; }
int64_t PackedQuantWeight::group_bytes() const { return geometry(bits_, k_, n_, group_size_, has_offset_).group_bytes(); }
int64_t PackedQuantWeight::panel_bytes() const { return geometry(bits_, k_, n_, group_size_, has_offset_).panel_bytes(); }

// ---- weight_quant_matmul -----------------------------------------------------------------------

namespace {

struct Plan {
  int64_t m = 0, k = 0, n = 0;
  DType xdt = DType::f32;
  WqPanels g;  // geometry (data filled in later)
  QuantSrc src;
  const PackedQuantWeight* packed = nullptr;
};

Plan validate(const WeightQuantMatmulArgs& a, const WeightQuantMatmulParams& p) {
  Plan pl;
  check::present(kMatmul, "x", a.x);
  check::ndim(kMatmul, "x", a.x, 2);
  check::contiguous(kMatmul, "x", a.x);
  pl.xdt = a.x.dtype();
  if (!is_float(pl.xdt))
    throw_invalid(kMatmul, "x", "x must be float32, float16 or bfloat16 (weight-only quantisation), got ",
                  dtype_name(pl.xdt));
  pl.m = a.x.dim(0);
  pl.k = a.x.dim(1);
  if (a.packed_w) {
    if (a.w.present()) throw_invalid(kMatmul, "w", "give either w (with scale/offset) or packed_w, not both");
    if (a.scale.present() || a.offset.present())
      throw_invalid(kMatmul, "scale", "scale/offset are part of packed_w; do not pass them again");
    const PackedQuantWeight& pw = *a.packed_w;
    if (pw.k() != pl.k)
      throw_invalid(kMatmul, "packed_w", "packed_w's reduction size ", pw.k(), " does not match x's k = ", pl.k);
    pl.n = pw.n();
    pl.g = panels_of(pw);
    pl.packed = a.packed_w;
  } else {
    pl.src = validate_src(kMatmul, a.w, a.scale, a.offset, p.group_size, p.transpose_w, pl.k);
    pl.n = pl.src.n;
    pl.g = geometry(pl.src.bits, pl.k, pl.n, p.group_size, a.offset.present());
  }
  if (a.bias.present()) {
    if (a.bias.dtype() != DType::f32 && a.bias.dtype() != pl.xdt)
      throw_invalid(kMatmul, "bias", "bias must be float32 or x's dtype ", dtype_name(pl.xdt), ", got ",
                    dtype_name(a.bias.dtype()));
    check::shape(kMatmul, "bias", a.bias, {pl.n});
  }
  return pl;
}

// The matrix-vector kernel serves up to this many rows (each row adds FMAs per decoded
// weight; past 8 rows, dequantising a tile once and running the GEMM microkernel is cheaper).
constexpr int64_t kGemvMaxRows = 8;
// GEMM blocking: a 256-deep k slice of 4 panels dequantised to f32 is 64 KiB (L2), reused by
// every 6-row strip of a row block; a row block of up to 252 rows (42 strips) keeps its
// 252 x 64 f32 accumulator tile in L2 too, and amortises each dequantised tile over >= 42 strips.
constexpr int64_t kKc = 256;
constexpr int64_t kPanelsPerItem = 4;
constexpr int64_t kRowBlock = 252;

struct GemmGeom {
  int64_t strips = 0, rb_rows = 0, row_blocks = 0, pblocks = 0;
};
GemmGeom gemm_geom(int64_t m, int64_t panels) {
  GemmGeom gg;
  gg.strips = ceil_div(m, kernels::kWqMR);
  gg.row_blocks = ceil_div(m, kRowBlock);
  gg.rb_rows = ceil_div(ceil_div(m, std::max<int64_t>(gg.row_blocks, 1)), kernels::kWqMR) * kernels::kWqMR;
  gg.pblocks = ceil_div(panels, kPanelsPerItem);
  return gg;
}

size_t workspace_of(const Plan& pl, const kernels::WqKernels& wk, int threads) {
  WorkspacePlan w;
  if (!pl.packed) w.add<uint8_t>(packed_size(pl.g));
  w.add<float>(pl.m * pl.k);  // x in f32
  w.add<float>(pl.n);         // bias in f32
  if (pl.m <= kGemvMaxRows) {
    w.add<float>(pl.m * wk.gemv_prep_floats(pl.g));
  } else {
    const GemmGeom gg = gemm_geom(pl.m, pl.g.panels());
    w.add<float>(gg.strips * kernels::kWqMR * pl.k);  // x in 6-row strips
    for (int t = 0; t < threads; ++t) {
      w.add<float>(kPanelsPerItem * kKc * kWqPanel);         // dequantised tiles
      w.add<float>(gg.rb_rows * kPanelsPerItem * kWqPanel);  // accumulators
    }
  }
  return w.bytes();
}

}  // namespace

size_t weight_quant_matmul_workspace_size(const WeightQuantMatmulArgs& a, const WeightQuantMatmulParams& p, int threads) {
  const Plan pl = validate(a, p);
  // The larger of the ISAs' needs, so one size serves any context.
  return std::max({workspace_of(pl, kernels::wq_ref_kernels(), threads),
                   workspace_of(pl, kernels::wq_kernels(Isa::avx2), threads),
                   workspace_of(pl, kernels::wq_kernels(Isa::avx512), threads)});
}

void weight_quant_matmul(Context& ctx, const WeightQuantMatmulArgs& a, const TensorView& y,
                         const WeightQuantMatmulParams& p, Workspace* ws_in) {
  Plan pl = validate(a, p);
  check::present(kMatmul, "y", y);
  if (y.dtype() != pl.xdt && y.dtype() != DType::f32)
    throw_invalid(kMatmul, "y", "y must have x's dtype ", dtype_name(pl.xdt), " or float32, got ", dtype_name(y.dtype()));
  check::shape(kMatmul, "y", y, {pl.m, pl.n});
  // All input is valid from here on; nothing was written before this point.
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::WqKernels& wk = kernels::wq_kernels(ctx.isa());
  const int T = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(workspace_of(pl, wk, T));
  if (pl.m == 0 || pl.n == 0) return;
  ThreadPool& pool = ctx.pool();
  WqPanels g = pl.g;
  if (!pl.packed) {
    uint8_t* buf = ws.alloc<uint8_t>(packed_size(g), kMatmul);
    pack_src(pl.src, g, buf);
    g.data = buf;
  }
  float* x32 = ws.alloc<float>(pl.m * pl.k, kMatmul);
  float* bias32 = ws.alloc<float>(pl.n, kMatmul);
  if (a.bias.present()) kt.to_f32(a.bias.raw(), a.bias.dtype(), pl.n, bias32);
  const int64_t esz = dtype_size(pl.xdt);
  const int64_t panels = g.panels();

  if (pl.m <= kGemvMaxRows) {
    const int64_t ldp = wk.gemv_prep_floats(g);
    float* prep = ws.alloc<float>(pl.m * ldp, kMatmul);
    // x's conversion and preparation, split over the threads by (row, group): each group's part
    // of `prep` depends on its own k only. Serial, it cost ~5-10% of a k = 14336 call once the
    // weight stream ran at 55+ GB/s. Items of >= 1024 k keep the split's overhead small.
    const int64_t G = g.groups;
    const int64_t grain = std::max<int64_t>(1, 1024 / g.kgroup);
    const uint8_t* xin = a.x.data<uint8_t>();
    pool.parallel_for(pl.m * G, grain, [&](int64_t b, int64_t e, int) {
      for (int64_t u = b; u < e;) {
        const int64_t r = u / G, g0 = u % G, g1 = std::min(G, g0 + (e - u));
        const int64_t k0 = g0 * g.kgroup, k1 = std::min(pl.k, g1 * g.kgroup);
        if (k1 > k0) kt.to_f32(xin + (r * pl.k + k0) * esz, pl.xdt, k1 - k0, x32 + r * pl.k + k0);
        if (ldp) wk.gemv_prepare(g, x32 + r * pl.k, prep + r * ldp, g0, g1);
        u += g1 - g0;
      }
    });
    const kernels::WqGemvX xv{x32, pl.k, prep, ldp};
    kernels::FloatEpilogue ep;
    ep.bias = a.bias.present() ? bias32 : nullptr;
    ep.out_dtype = y.dtype();
    ep.out = y.mutable_data<uint8_t>();
    ep.ldo = pl.n;
    // Panels in chunks of 4 (64 columns): each thread streams whole panels, and 16+ chunks per
    // thread balance the two threads when one is slowed by a neighbour.
    pool.parallel_for(panels, 4, [&](int64_t b, int64_t e, int) { wk.gemv(g, xv, pl.m, b, e, ep); });
    return;
  }

  // GEMM path: x converted and laid out in strips of 6 rows ([strip][k][6], zero rows past m),
  // so the microkernel's broadcasts read one contiguous stream.
  const GemmGeom gg = gemm_geom(pl.m, panels);
  float* xs = ws.alloc<float>(gg.strips * kernels::kWqMR * pl.k, kMatmul);
  pool.parallel_for(gg.strips, 4, [&](int64_t b, int64_t e, int) {
    for (int64_t s = b; s < e; ++s) {
      float* dst = xs + s * kernels::kWqMR * pl.k;
      for (int r = 0; r < kernels::kWqMR; ++r) {
        const int64_t row = s * kernels::kWqMR + r;
        float* xr = x32 + std::min(row, pl.m - 1) * pl.k;
        if (row < pl.m) kt.to_f32(a.x.data<uint8_t>() + row * pl.k * esz, pl.xdt, pl.k, xr);
        for (int64_t kk = 0; kk < pl.k; ++kk) dst[kk * kernels::kWqMR + r] = row < pl.m ? xr[kk] : 0.0f;
      }
    }
  });
  float* tiles[64];
  float* accs[64];
  const int nt = std::min(T, 64);
  for (int t = 0; t < nt; ++t) {
    tiles[t] = ws.alloc<float>(kPanelsPerItem * kKc * kWqPanel, kMatmul);
    accs[t] = ws.alloc<float>(gg.rb_rows * kPanelsPerItem * kWqPanel, kMatmul);
  }
  const int64_t items = gg.row_blocks * gg.pblocks;
  const DType odt = y.dtype();
  const int64_t osz = dtype_size(odt);
  constexpr int64_t ldc = kPanelsPerItem * kWqPanel;
  pool.parallel_for(items, 1, [&](int64_t b, int64_t e, int tid) {
    float* tile = tiles[tid % nt];
    float* acc = accs[tid % nt];
    alignas(64) float row[kPanelsPerItem * kWqPanel];
    for (int64_t it = b; it < e; ++it) {
      // Column blocks vary fastest, so the two threads share the row block's x strips in L3.
      const int64_t rb = it / gg.pblocks, pb = it % gg.pblocks;
      const int64_t r0 = rb * gg.rb_rows, r1 = std::min(pl.m, r0 + gg.rb_rows);
      if (r0 >= r1) continue;
      const int64_t p0 = pb * kPanelsPerItem, np = std::min(panels - p0, kPanelsPerItem);
      for (int64_t k0 = 0; k0 < pl.k; k0 += kKc) {
        const int64_t k1 = std::min(pl.k, k0 + kKc);
        for (int64_t j = 0; j < np; ++j) wk.dequant(g, p0 + j, k0, k1, tile + j * kKc * kWqPanel);
        for (int64_t r = r0; r < r1; r += kernels::kWqMR) {
          const int mr = static_cast<int>(std::min<int64_t>(kernels::kWqMR, r1 - r));
          const float* as = xs + (r / kernels::kWqMR) * kernels::kWqMR * pl.k + k0 * kernels::kWqMR;
          for (int64_t j = 0; j < np; ++j)
            wk.micro(as, tile + j * kKc * kWqPanel, k1 - k0, acc + (r - r0) * ldc + j * kWqPanel, ldc, mr, k0 > 0);
        }
      }
      // Epilogue: + bias (after the k sum, as the reference), converted to y's dtype.
      const int64_t c0 = p0 * kWqPanel, nc = std::min(pl.n - c0, np * kWqPanel);
      for (int64_t r = r0; r < r1; ++r) {
        const float* ar = acc + (r - r0) * ldc;
        for (int64_t c = 0; c < nc; ++c) row[c] = a.bias.present() ? ar[c] + bias32[c0 + c] : ar[c];
        kt.from_f32(row, nc, odt, y.mutable_data<uint8_t>() + (r * pl.n + c0) * osz);
      }
    }
  });
}

// ---- quantize_weight / dequantize_weight -----------------------------------------------------

void quantize_weight(const TensorView& w, const TensorView& q, const TensorView& scale, const TensorView& offset,
                     const QuantizeWeightParams& p) {
  constexpr const char* op = "quantize_weight";
  check::present(op, "w", w);
  check::dtype_float(op, "w", w);
  check::ndim(op, "w", w, 2);
  check::contiguous(op, "w", w);
  if (p.bits != 8 && p.bits != 4) throw_invalid(op, "bits", "bits must be 8 or 4, got ", p.bits);
  const int64_t k = p.transpose_w ? w.dim(1) : w.dim(0), n = p.transpose_w ? w.dim(0) : w.dim(1);
  if (k < 1) throw_invalid(op, "w", "w must have k >= 1, got shape ", w.shape_str());
  check_group_size(op, p.group_size, k);
  const int64_t groups = p.group_size ? ceil_div(k, p.group_size) : 1;
  if (p.bits == 4 && w.dim(1) % 2 == 1)
    throw_invalid(op, "w", "bits = 4 packs two values per byte along w's last axis, which has odd size ", w.dim(1),
                  " (shape ", w.shape_str(), "); pad it to an even size");
  check::dtype(op, "q", q, p.bits == 8 ? DType::s8 : DType::s4x2);
  check::shape(op, "q", q, {w.dim(0), p.bits == 8 ? w.dim(1) : w.dim(1) / 2});
  check::dtype(op, "scale", scale, DType::f32);
  if (p.group_size) check::shape(op, "scale", scale, {groups, n});
  else check::shape(op, "scale", scale, {n});
  if (p.symmetric) {
    if (offset.present()) throw_invalid(op, "offset", "offset is only produced by asymmetric quantisation (symmetric = false)");
  } else {
    check::present(op, "offset", offset);
    check::dtype(op, "offset", offset, DType::f32);
    if (p.group_size) check::shape(op, "offset", offset, {groups, n});
    else check::shape(op, "offset", offset, {n});
  }
  const int qmax = p.bits == 8 ? 127 : 7;            // symmetric
  const int qrange = p.bits == 8 ? 255 : 15;         // asymmetric
  const int half = (qrange + 1) / 2;                 // 128 or 8
  const int64_t gs = p.group_size ? p.group_size : k;
  auto at = [&](int64_t kk, int64_t c) { return load_float(w, p.transpose_w ? c * k + kk : kk * n + c); };
  auto put = [&](int64_t kk, int64_t c, int v) {
    const int64_t idx = p.transpose_w ? c * k + kk : kk * n + c;
    if (p.bits == 8) {
      q.mutable_data<int8_t>()[idx] = static_cast<int8_t>(v);
    } else {
      uint8_t& b = q.mutable_data<uint8_t>()[idx / 2];
      const uint8_t nib = static_cast<uint8_t>(v) & 0xF;
      b = (idx % 2) ? static_cast<uint8_t>((b & 0x0F) | (nib << 4)) : static_cast<uint8_t>((b & 0xF0) | nib);
    }
  };
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t kb = g * gs, ke = std::min(k, kb + gs);
    for (int64_t c = 0; c < n; ++c) {
      float sc = 0, off = 0;
      if (p.symmetric) {
        float amax = 0;
        for (int64_t kk = kb; kk < ke; ++kk) amax = std::max(amax, std::fabs(at(kk, c)));
        const float inv = amax > 0 ? static_cast<float>(qmax) / amax : 0.0f;
        sc = amax / static_cast<float>(qmax);
        for (int64_t kk = kb; kk < ke; ++kk) {
          put(kk, c, clamp_int(round_half_even(at(kk, c) * inv), -qmax, qmax));
        }
      } else {
        float lo = 0, hi = 0;
        for (int64_t kk = kb; kk < ke; ++kk) {
          lo = std::min(lo, at(kk, c));
          hi = std::max(hi, at(kk, c));
        }
        const float range = hi - lo;
        const float inv = range > 0 ? static_cast<float>(qrange) / range : 0.0f;
        sc = range / static_cast<float>(qrange);
        const int z = range > 0 ? clamp_int(round_half_even(-lo * inv), 0, qrange) : 0;
        off = range > 0 ? static_cast<float>(half - z) : 0.0f;
        for (int64_t kk = kb; kk < ke; ++kk) {
          const int u = range > 0 ? clamp_int(round_half_even(at(kk, c) * inv) + static_cast<float>(z), 0, qrange) : half;
          put(kk, c, u - half);
        }
      }
      scale.mutable_data<float>()[g * n + c] = sc;
      if (!p.symmetric) offset.mutable_data<float>()[g * n + c] = off;
    }
  }
}

void dequantize_weight(const TensorView& q, const TensorView& scale, const TensorView& offset, const TensorView& out,
                       int64_t group_size, bool transpose_w) {
  constexpr const char* op = "dequantize_weight";
  const QuantSrc s = validate_src(op, q, scale, offset, group_size, transpose_w, -1);
  check::present(op, "out", out);
  check::dtype_float(op, "out", out);
  check::shape(op, "out", out, {transpose_w ? s.n : s.k, transpose_w ? s.k : s.n});
  for (int64_t kk = 0; kk < s.k; ++kk)
    for (int64_t c = 0; c < s.n; ++c) {
      const int64_t si = s.group_of(kk) * s.n + c;
      const float qv = static_cast<float>(s.q(kk, c));
      const float v = offset.present() ? (qv + load_float(offset, si)) * load_float(scale, si) : qv * load_float(scale, si);
      store_float(out, transpose_w ? c * s.k + kk : kk * s.n + c, v);
    }
}

}  // namespace qllm
