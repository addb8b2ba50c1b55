#include "qllm/ops/moe_ffn.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include "kernels/kernels.h"
#include "ops/plan.h"
#include "qllm/core/error.h"
#include "qllm/ops/grouped_matmul.h"

namespace qllm {

using kernels::kPanel;

namespace {

// Rows per block of the fused pipeline. A block's intermediates are A1 (rows x k1 s16),
// Y (rows x k2 f32) and A2 (rows x k2 s16): at 132 rows and DeepSeek sizes about 3.5 MiB,
// which stays in the L3 shared by the cores working on the block, while every weight panel
// streamed from DRAM is reused by all 132 rows (22 strips of the 6-row microkernel).
constexpr int64_t kMaxBlockRows = 132;

// Panels per work item in each matmul: fine enough to balance two threads on 128+ panels,
// coarse enough that claiming costs nothing.
constexpr int64_t kPanelGrain = 4;

struct FfnShape {
  int64_t m = 0, G = 0, k1 = 0, n1 = 0, k2 = 0, n2 = 0;
};

// The largest block that is a whole number of microkernel strips: 132 rows for the 6-row AVX2
// tile, 128 for the 8-row VNNI tile (132 would leave a 4-row strip, half as efficient, in
// every panel).
int64_t max_block_rows(int64_t tile) { return kMaxBlockRows / tile * tile; }

int64_t block_rows(int64_t rows, int64_t tile) {
  // Split `rows` into equal blocks no larger than max_block_rows, rounded up to the tile.
  const int64_t maxb = max_block_rows(tile);
  const int64_t nb = ceil_div(rows, maxb);
  return std::min(maxb, ceil_div(ceil_div(rows, nb), tile) * tile);
}

FfnShape validate(const char* op, const MoeFfnArgs& a, const MoeFfnParams& p, bool grouped) {
  FfnShape s;
  check::dtype(op, "x1", a.x1, DType::s8);
  check::ndim(op, "x1", a.x1, 2);
  check::contiguous(op, "x1", a.x1);
  s.m = a.x1.dim(0);
  s.k1 = a.x1.dim(1);
  if (a.packed) {
    if (a.weight1.present() || a.weight2.present() || a.scale1.present() || a.scale2.present())
      throw_invalid(op, "packed", "give either packed weights or weight1/scale1/weight2/scale2, not both");
    s.G = a.packed->groups(); s.n1 = a.packed->n1(); s.k2 = a.packed->k2(); s.n2 = a.packed->n2();
    if (a.packed->k1() != s.k1)
      throw_invalid(op, "x1", "x1 must be [m, k1] with k1 = ", a.packed->k1(), " (the packed weight1's k1), got ", a.x1.shape_str());
    if (!grouped && s.G != 1)
      throw_invalid(op, "packed", "mm_deq_swiglu_quant_mm_deq takes one expert, the packed weights hold ", s.G);
  } else {
    check::present(op, "weight1", a.weight1);
    check::dtype(op, "weight1", a.weight1, DType::s8);
    check::ndim(op, "weight1", a.weight1, grouped ? 3 : 2);
    s.G = grouped ? a.weight1.dim(0) : 1;
    s.n1 = a.weight1.dim(-1);
    if (a.weight1.dim(-2) != s.k1)
      throw_invalid(op, "weight1", "weight1 must be ", grouped ? "[G, k1, n1]" : "[k1, n1]", " with k1 = ", s.k1,
                    " (x1's last dimension), got ", a.weight1.shape_str());
    // Everything else about the weights is checked by PackedExpertFFN::pack.
    check::ndim(op, "weight2", a.weight2, grouped ? 3 : 2);
    s.k2 = s.n1 / 2;
    s.n2 = a.weight2.dim(-2);
  }
  check::dtype(op, "per_token_scale1", a.per_token_scale1, DType::f32);
  check::shape(op, "per_token_scale1", a.per_token_scale1, {s.m});
  if (grouped) {
    check::present(op, "group_list", a.group_list);
  } else if (a.group_list.present()) {
    throw_invalid(op, "group_list", "mm_deq_swiglu_quant_mm_deq takes no group_list (one expert, all rows)");
  }
  if (!is_float(p.out_dtype))
    throw_invalid(op, "out_dtype", "out_dtype must be float16, bfloat16 or float32, got ", dtype_name(p.out_dtype));
  return s;
}

// One contiguous run of rows of one group inside a block.
struct Segment {
  int64_t g, r0, rows, slot;  // slot: first row of the block buffers it occupies
};

// One matmul of a block: work items (segment, kPanelGrain panels) claimed by the threads, so
// uneven experts balance. setup(segment, weights, epilogue) names the weights and epilogue.
template <class Setup>
void matmul_phase(ThreadPool& pool, const kernels::KernelTable& kt, const Segment* segs, int64_t nseg,
                  int64_t panels, const uint8_t* A, int64_t ab, Setup&& setup) {
  const int64_t chunks = ceil_div(panels, kPanelGrain);
  pool.parallel_for(nseg * chunks, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t it = b; it < e; ++it) {
      const Segment& sg = segs[it / chunks];
      const int64_t c = it % chunks;
      kernels::Int8Panels w;
      kernels::Int8Epilogue ep;
      setup(sg, w, ep);
      kt.int8_gemm(A + sg.slot * ab, ab, sg.rows, w, c * kPanelGrain, std::min(panels, (c + 1) * kPanelGrain), ep);
    }
  });
}

size_t workspace_bytes(const FfnShape& s) {
  const int64_t mb = std::min<int64_t>(std::max<int64_t>(s.m, 1), kMaxBlockRows);
  // Activation rows are sized for the larger of the kernels' forms (s16 pairs).
  WorkspacePlan w;
  w.add<int64_t>(s.G + 1);                                // row offsets
  w.add<Segment>(s.G + 1);                                // segments of the current block
  w.add<uint8_t>(mb * kernels::a_bytes_pairs(s.k1));      // A1: block rows of x1, kernel form
  w.add<float>(mb * s.k2);                                // Y: SwiGLU output, f32
  w.add<int8_t>(mb * s.k2);                               // q2 as s8
  w.add<uint8_t>(mb * kernels::a_bytes_pairs(s.k2));      // A2: q2, kernel form
  w.add<float>(mb);                                       // s2
  return w.bytes();
}

void run(Context& ctx, const char* op, const MoeFfnArgs& a, const TensorView& out,
         const MoeFfnParams& p, Workspace* ws_in, bool grouped) {
  const FfnShape s = validate(op, a, p, grouped);
  // Raw weights are packed for this call (validated there; throws before any output is touched).
  std::optional<PackedExpertFFN> local;
  const PackedExpertFFN* pk = a.packed;
  if (!pk) {
    local.emplace(PackedExpertFFN::pack(a.weight1, a.scale1, a.weight2, a.scale2, p.weight_up_permute, op, ctx.isa()));
    pk = &*local;
  }
  const kernels::KernelTable& kt = ctx.kernels();
  if (kt.isa != Isa::ref && pk->int8_layout() != kt.int8_layout)
    throw_invalid(op, "packed", "the packed weights are in the ", int8_layout_name(pk->int8_layout()),
                  " layout, but this context's ISA ", isa_name(kt.isa), " reads ", int8_layout_name(kt.int8_layout),
                  "; pack them for ", isa_name(kt.isa));
  check::dtype(op, "out", out, p.out_dtype);
  check::shape(op, "out", out, {s.m, s.n2});

  Workspace& ws = ws_in ? *ws_in : ctx.workspace(workspace_bytes(s));
  int64_t* offsets = ws.alloc<int64_t>(s.G + 1, op);
  int64_t total = s.m;
  if (grouped) total = detail::group_offsets(op, a.group_list, p.group_list_type, s.m, s.G, offsets);
  else { offsets[0] = 0; offsets[1] = s.m; }
  // Validation is complete; from here on the output is written.

  // Blocks of at most max_block_rows <= kMaxBlockRows rows (what the workspace is sized for).
  const int64_t mb = std::min<int64_t>(std::max<int64_t>(s.m, 1), max_block_rows(kt.int8_tile_rows));
  const int64_t kg1 = pk->kg1(), kg2 = pk->kg2();
  const int64_t ab1 = kt.int8_a_bytes(s.k1), ab2 = kt.int8_a_bytes(s.k2);
  Segment* segs = ws.alloc<Segment>(s.G + 1, op);
  uint8_t* A1 = ws.alloc<uint8_t>(mb * ab1, op);
  float* Y = ws.alloc<float>(mb * s.k2, op);
  int8_t* Q2 = ws.alloc<int8_t>(mb * s.k2, op);
  uint8_t* A2 = ws.alloc<uint8_t>(mb * ab2, op);
  float* S2 = ws.alloc<float>(mb, op);

  const size_t osz = static_cast<size_t>(dtype_size(p.out_dtype));
  uint8_t* outp = out.mutable_data<uint8_t>();
  if (total < s.m) std::memset(outp + total * s.n2 * osz, 0, (s.m - total) * s.n2 * osz);

  ThreadPool& pool = ctx.pool();
  const int8_t* x1 = a.x1.data<int8_t>();
  const float* pts1 = a.per_token_scale1.data<float>();
  const int64_t panels1 = ceil_div(s.k2, kPanel / 2), panels2 = ceil_div(s.n2, kPanel);

  // Blocks of at most mb rows. Groups of up to mb rows are packed whole into shared blocks, so
  // decode-sized groups (a few rows per expert) run as one block with three barriers in all and
  // threads balanced across experts; larger groups are cut into equal blocks of their own.
  int64_t g = 0, pos = 0;
  while (g < s.G) {
    int64_t nseg = 0, used = 0;
    while (g < s.G) {
      const int64_t left = offsets[g + 1] - std::max(pos, offsets[g]);
      if (left <= 0) { ++g; continue; }
      const int64_t r0 = std::max(pos, offsets[g]);
      const int64_t grows = offsets[g + 1] - offsets[g];
      if (grows > mb) {
        if (used > 0) break;  // a big group starts a block of its own
        const int64_t take = std::min(left, block_rows(grows, kt.int8_tile_rows));
        segs[nseg++] = {g, r0, take, 0};
        used = take;
        pos = r0 + take;
        if (pos >= offsets[g + 1]) ++g;
        break;
      }
      if (used + left > mb) break;
      segs[nseg++] = {g, r0, left, used};
      used += left;
      pos = offsets[g + 1];
      ++g;
    }
    if (nseg == 0) break;

    // 1. The block's activations in the int8 kernel's form.
    pool.parallel_for(nseg, 1, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i)
        for (int64_t r = 0; r < segs[i].rows; ++r)
          kt.int8_prepare_a(x1 + (segs[i].r0 + r) * s.k1, s.k1, A1 + (segs[i].slot + r) * ab1);
    });
    // 2. matmul 1 with the dequant + SwiGLU epilogue: Y[rows, k2] in natural order, f32.
    matmul_phase(pool, kt, segs, nseg, panels1, A1, ab1, [&](const Segment& sg, kernels::Int8Panels& w, kernels::Int8Epilogue& e) {
      w = {pk->w1(sg.g), s.k1, kg1, panels1 * kPanel, pk->int8_layout(), pk->c1(sg.g)};
      e.kind = kernels::Epi::swiglu;
      e.col_scale = pk->s1(sg.g);
      e.row_scale = pts1 + sg.r0;
      e.out_dtype = DType::f32;
      e.out = Y + sg.slot * s.k2;
      e.ldo = s.k2;
      e.out_cols = s.k2;
    });
    // 3. Per-row dynamic quant of Y (SPEC section 0), in the kernel's form for matmul 2.
    pool.parallel_for(used, 4, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r) {
        S2[r] = kt.quantize_row(Y + r * s.k2, nullptr, s.k2, Q2 + r * s.k2);
        kt.int8_prepare_a(Q2 + r * s.k2, s.k2, A2 + r * ab2);
      }
    });
    // 4. matmul 2 with the dequant epilogue straight into the output rows.
    matmul_phase(pool, kt, segs, nseg, panels2, A2, ab2, [&](const Segment& sg, kernels::Int8Panels& w, kernels::Int8Epilogue& e) {
      w = {pk->w2(sg.g), s.k2, kg2, s.n2, pk->int8_layout(), pk->c2(sg.g)};
      e.kind = kernels::Epi::dequant;
      e.col_scale = pk->s2(sg.g);
      e.row_scale = S2 + sg.slot;
      e.out_dtype = p.out_dtype;
      e.out = outp + sg.r0 * s.n2 * osz;
      e.ldo = s.n2;
      e.out_cols = s.n2;
    });
  }
}

}  // namespace

size_t gmm_deq_swiglu_quant_gmm_deq_workspace_size(const MoeFfnArgs& a, const MoeFfnParams& p, int) {
  return workspace_bytes(validate("gmm_deq_swiglu_quant_gmm_deq", a, p, true));
}

void gmm_deq_swiglu_quant_gmm_deq(Context& ctx, const MoeFfnArgs& a, const TensorView& out,
                                  const MoeFfnParams& p, Workspace* ws) {
  run(ctx, "gmm_deq_swiglu_quant_gmm_deq", a, out, p, ws, true);
}

void mm_deq_swiglu_quant_mm_deq(Context& ctx, const MoeFfnArgs& a, const TensorView& out,
                                const MoeFfnParams& p, Workspace* ws) {
  run(ctx, "mm_deq_swiglu_quant_mm_deq", a, out, p, ws, false);
}

void permute_weight_up(const TensorView& w, const TensorView& scale, int64_t T,
                       const TensorView& w_out, const TensorView& scale_out) {
  constexpr const char* op = "permute_weight_up";
  if (T != 128 && T != 256) throw_invalid(op, "T", "T must be 128 or 256, got ", T);
  check::present(op, "w", w);
  if (w.dtype() != DType::s8 && !is_float(w.dtype()))
    throw_invalid(op, "w", "w must be int8 or a float dtype, got ", dtype_name(w.dtype()));
  if (w.ndim() != 2 && w.ndim() != 3) throw_invalid(op, "w", "w must be [k1, n1] or [G, k1, n1], got ", w.shape_str());
  check::contiguous(op, "w", w);
  const int64_t n1 = w.dim(-1);
  if (n1 % T != 0) throw_invalid(op, "w", "n1 = ", n1, " must be a multiple of T = ", T);
  const int64_t G = w.ndim() == 3 ? w.dim(0) : 1, k1 = w.dim(-2);
  check::dtype(op, "w_out", w_out, w.dtype());
  if (w.ndim() == 3) check::shape(op, "w_out", w_out, {G, k1, n1});
  else check::shape(op, "w_out", w_out, {k1, n1});
  if (scale.present()) {
    check::dtype(op, "scale", scale, DType::f32);
    if (w.ndim() == 3) check::shape(op, "scale", scale, {G, n1});
    else check::shape(op, "scale", scale, {n1});
    check::dtype(op, "scale_out", scale_out, DType::f32);
    if (w.ndim() == 3) check::shape(op, "scale_out", scale_out, {G, n1});
    else check::shape(op, "scale_out", scale_out, {n1});
  }
  if (w_out.raw() == w.raw()) throw_invalid(op, "w_out", "w_out must not alias w");
  const int64_t half = n1 / 2, es = dtype_size(w.dtype());
  // Permuted column p = b*T + h*(T/2) + j holds natural column h*(n1/2) + b*(T/2) + j.
  auto natural = [&](int64_t pc) {
    const int64_t b = pc / T, h = (pc % T) / (T / 2), j = pc % (T / 2);
    return h * half + b * (T / 2) + j;
  };
  const uint8_t* src = w.data<uint8_t>();
  uint8_t* dst = w_out.mutable_data<uint8_t>();
  for (int64_t row = 0; row < G * k1; ++row)
    for (int64_t pc = 0; pc < n1; ++pc)
      std::memcpy(dst + (row * n1 + pc) * es, src + (row * n1 + natural(pc)) * es, es);
  if (scale.present())
    for (int64_t g = 0; g < G; ++g)
      for (int64_t pc = 0; pc < n1; ++pc)
        scale_out.mutable_data<float>()[g * n1 + pc] = scale.data<float>()[g * n1 + natural(pc)];
}

}  // namespace qllm
