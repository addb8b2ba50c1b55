#include "qllm/ops/moe_routing.h"

#include <algorithm>
#include <cstring>

#include "kernels/kernels.h"
#include "kernels/moe.h"
#include "ops/plan.h"
#include "qllm/core/error.h"

namespace qllm {

using kernels::kPanel;

ScoringFunc parse_scoring_func(const std::string& name, const char* op) {
  if (name == "softmax") return ScoringFunc::softmax;
  if (name == "sigmoid") return ScoringFunc::sigmoid;
  throw_invalid(op, "scoring_func", "scoring_func = '", name, "' (expected softmax or sigmoid)");
}

namespace {

// Checks that every value of an s32 index tensor lies in [0, limit); names the first bad one.
void check_index_range(const char* op, const char* arg, const TensorView& t, int64_t limit, const char* what) {
  const int32_t* v = t.data<int32_t>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i)
    if (v[i] < 0 || v[i] >= limit)
      throw_invalid(op, arg, arg, "[", i, "] = ", v[i], " is outside [0, ", limit, ") (", what, ")");
}

}  // namespace

// ---- moe_gating_topk -------------------------------------------------------------------------

size_t moe_gating_topk_workspace_size(int64_t E, const MoeGatingParams& p, int threads) {
  // Per thread: the row in f32, its scores, the scores used for choosing, the "may still be
  // chosen" flags (as floats, to keep one allocation), the group scores.
  WorkspacePlan plan;
  plan.add<float>((4 * E + std::max<int64_t>(p.n_group, 1)) * threads);
  return plan.bytes();
}

void moe_gating_topk(Context& ctx, const MoeGatingArgs& a, const TensorView& weights, const TensorView& expert_ids,
                     const MoeGatingParams& p, Workspace* ws) {
  constexpr const char* op = "moe_gating_topk";
  check::present(op, "logits", a.logits);
  check::dtype_float(op, "logits", a.logits);
  check::ndim(op, "logits", a.logits, 2);
  check::contiguous(op, "logits", a.logits);
  const int64_t T = a.logits.dim(0), E = a.logits.dim(1);
  if (E < 1) throw_invalid(op, "logits", "logits must have at least one expert column, got ", a.logits.shape_str());
  const int64_t k = p.top_k;
  if (k < 1 || k > E) throw_invalid(op, "top_k", "top_k = ", k, " must be in [1, num_experts = ", E, "]");
  if (p.n_group < 1) throw_invalid(op, "n_group", "n_group = ", p.n_group, " must be >= 1");
  if (E % p.n_group != 0)
    throw_invalid(op, "n_group", "n_group = ", p.n_group, " does not divide the number of experts ", E);
  if (p.topk_group < 1 || p.topk_group > p.n_group)
    throw_invalid(op, "topk_group", "topk_group = ", p.topk_group, " must be in [1, n_group = ", p.n_group, "]");
  const int64_t per_group = E / p.n_group;
  const bool grouped = p.n_group > 1;
  if (grouped && k > p.topk_group * per_group)
    throw_invalid(op, "top_k", "top_k = ", k, " exceeds the ", p.topk_group * per_group,
                  " experts that grouped selection allows (topk_group = ", p.topk_group, " groups of ", per_group, ")");
  if (a.e_score_correction_bias.present()) {
    check::dtype(op, "e_score_correction_bias", a.e_score_correction_bias, DType::f32);
    check::shape(op, "e_score_correction_bias", a.e_score_correction_bias, {E});
  }
  check::dtype(op, "weights", weights, DType::f32);
  check::shape(op, "weights", weights, {T, k});
  check::dtype(op, "expert_ids", expert_ids, DType::s32);
  check::shape(op, "expert_ids", expert_ids, {T, k});
  if (T == 0) return;

  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::MoeKernels& mk = kernels::moe_kernels(ctx.isa());
  const int nt = ctx.threads();
  const int64_t per_thread = 4 * E + p.n_group;
  Workspace& arena = ws ? *ws : ctx.workspace(moe_gating_topk_workspace_size(E, p, nt));
  float* scratch = arena.alloc<float>(per_thread * nt, op);
  const size_t lsz = static_cast<size_t>(dtype_size(a.logits.dtype()));
  const float* bias = a.e_score_correction_bias.present() ? a.e_score_correction_bias.data<float>() : nullptr;
  const kernels::Score sf = p.scoring == ScoringFunc::softmax ? kernels::Score::softmax : kernels::Score::sigmoid;

  ctx.pool().parallel_for(T, 16, [&](int64_t b, int64_t e, int tid) {
    float* row = scratch + tid * per_thread;
    float* score = row + E;
    float* choice = score + E;
    float* allowed = choice + E;  // 1: may still be chosen
    float* gscore = allowed + E;
    for (int64_t t = b; t < e; ++t) {
      kt.to_f32(static_cast<const uint8_t*>(a.logits.raw()) + t * E * lsz, a.logits.dtype(), E, row);
      mk.score_row(row, E, sf, score);
      if (bias) mk.add_row(score, bias, E, choice);
      else std::memcpy(choice, score, E * sizeof(float));
      for (int64_t x = 0; x < E; ++x) allowed[x] = 1.0f;
      if (grouped) {
        // A group's score is the sum of its best two choice scores (its only one if it has one).
        for (int64_t g = 0; g < p.n_group; ++g) {
          const float* c = choice + g * per_group;
          int64_t b1 = 0;
          for (int64_t x = 1; x < per_group; ++x)
            if (c[x] > c[b1]) b1 = x;
          int64_t b2 = -1;
          for (int64_t x = 0; x < per_group; ++x)
            if (x != b1 && (b2 < 0 || c[x] > c[b2])) b2 = x;
          gscore[g] = b2 < 0 ? c[b1] : c[b1] + c[b2];
        }
        // Keep the topk_group best groups (ties to the lower group id); mask the rest.
        for (int64_t x = 0; x < E; ++x) allowed[x] = 0.0f;
        for (int64_t r = 0; r < p.topk_group; ++r) {
          int64_t best = -1;
          for (int64_t g = 0; g < p.n_group; ++g) {
            if (allowed[g * per_group] != 0.0f) continue;  // already kept
            if (best < 0 || gscore[g] > gscore[best]) best = g;
          }
          for (int64_t x = 0; x < per_group; ++x) allowed[best * per_group + x] = 1.0f;
        }
      }
      // top-k by repeated selection: k * E compares, which at k = 8, E = 256 is cheaper than a
      // heap and keeps the tie rule (strictly greater wins, so the lower id stays) obvious.
      // Whatever the scores (NaN included), the k picks are distinct allowed experts.
      float* w = weights.mutable_data<float>() + t * k;
      int32_t* ids = expert_ids.mutable_data<int32_t>() + t * k;
      for (int64_t j = 0; j < k; ++j) {
        int64_t best = -1;
        for (int64_t x = 0; x < E; ++x) {
          if (allowed[x] == 0.0f) continue;
          if (best < 0 || choice[x] > choice[best]) best = x;
        }
        allowed[best] = 0.0f;
        ids[j] = static_cast<int32_t>(best);
        w[j] = score[best];
      }
      if (p.renormalize) {
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) sum += w[j];
        // An all-zero choice (sigmoid underflow) keeps zero weights instead of dividing by 0.
        if (sum != 0.0f)
          for (int64_t j = 0; j < k; ++j) w[j] = w[j] / sum;
      }
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] * p.routed_scaling_factor;
    }
  });
}

// ---- moe_init_routing ------------------------------------------------------------------------

size_t moe_init_routing_workspace_size(int64_t T, int64_t h, int64_t k, int64_t E, bool quantize, int threads) {
  WorkspacePlan plan;
  plan.add<int64_t>(E + 1);   // running positions of the counting sort
  plan.add<int32_t>(T * k);   // source token per expanded row, when the caller does not want it
  if (quantize) {
    plan.add<int8_t>(T * h);  // each token quantised once
    plan.add<float>(T);
    plan.add<float>(h * threads);
  }
  return plan.bytes();
}

void moe_init_routing(Context& ctx, const TensorView& x, const TensorView& expert_ids, int64_t E,
                      const MoeInitRoutingOutputs& o, bool quantize, Workspace* ws_in) {
  constexpr const char* op = "moe_init_routing";
  check::present(op, "x", x);
  check::ndim(op, "x", x, 2);
  check::contiguous(op, "x", x);
  if (quantize) check::dtype_float(op, "x", x);
  else if (!is_float(x.dtype()) && x.dtype() != DType::s8)
    throw_invalid(op, "x", "x must be float32, float16, bfloat16 or int8, got ", dtype_name(x.dtype()));
  const int64_t T = x.dim(0), h = x.dim(1);
  check::dtype(op, "expert_ids", expert_ids, DType::s32);
  check::ndim(op, "expert_ids", expert_ids, 2);
  check::contiguous(op, "expert_ids", expert_ids);
  if (expert_ids.dim(0) != T)
    throw_invalid(op, "expert_ids", "expert_ids must be [T, k] with T = ", T, " (x's rows), got ", expert_ids.shape_str());
  const int64_t k = expert_ids.dim(1);
  if (k < 1) throw_invalid(op, "expert_ids", "expert_ids must have k >= 1 columns, got ", expert_ids.shape_str());
  if (E < 1) throw_invalid(op, "num_experts", "num_experts = ", E, " must be >= 1");
  const int64_t R = T * k;
  check::dtype(op, "expanded_x", o.expanded_x, quantize ? DType::s8 : x.dtype());
  check::shape(op, "expanded_x", o.expanded_x, {R, h});
  check::dtype(op, "expanded_row_idx", o.expanded_row_idx, DType::s32);
  check::shape(op, "expanded_row_idx", o.expanded_row_idx, {R});
  if (o.expert_count.present()) {
    check::dtype(op, "expert_count", o.expert_count, DType::s64);
    check::shape(op, "expert_count", o.expert_count, {E});
  }
  if (o.expert_cumsum.present()) {
    check::dtype(op, "expert_cumsum", o.expert_cumsum, DType::s64);
    check::shape(op, "expert_cumsum", o.expert_cumsum, {E});
  }
  if (o.source_token.present()) {
    check::dtype(op, "source_token", o.source_token, DType::s32);
    check::shape(op, "source_token", o.source_token, {R});
  }
  if (quantize) {
    check::dtype(op, "expanded_scale", o.expanded_scale, DType::f32);
    check::shape(op, "expanded_scale", o.expanded_scale, {R});
  } else if (o.expanded_scale.present()) {
    throw_invalid(op, "expanded_scale", "expanded_scale is only written when quantising");
  }
  check_index_range(op, "expert_ids", expert_ids, E, "num_experts");

  const kernels::KernelTable& kt = ctx.kernels();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(moe_init_routing_workspace_size(T, h, k, E, quantize, ctx.threads()));
  int64_t* pos = ws.alloc<int64_t>(E + 1, op);
  int32_t* src = o.source_token.present() ? o.source_token.mutable_data<int32_t>() : ws.alloc<int32_t>(R, op);

  // Counting sort on the expert id: stable, so rows of one expert stay in token-major order.
  const int32_t* ids = expert_ids.data<int32_t>();
  std::fill(pos, pos + E + 1, 0);
  for (int64_t i = 0; i < R; ++i) ++pos[ids[i] + 1];
  for (int64_t e = 0; e < E; ++e) {
    if (o.expert_count.present()) o.expert_count.mutable_data<int64_t>()[e] = pos[e + 1];
    pos[e + 1] += pos[e];
    if (o.expert_cumsum.present()) o.expert_cumsum.mutable_data<int64_t>()[e] = pos[e + 1];
  }
  int32_t* row_idx = o.expanded_row_idx.mutable_data<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    const int64_t dest = pos[ids[i]]++;
    row_idx[i] = static_cast<int32_t>(dest);
    src[dest] = static_cast<int32_t>(i / k);
  }
  if (R == 0 || h == 0) return;

  ThreadPool& pool = ctx.pool();
  if (!quantize) {
    const size_t rb = static_cast<size_t>(h * dtype_size(x.dtype()));
    pool.parallel_for(R, 64, [&](int64_t b, int64_t e, int) {
      for (int64_t r = b; r < e; ++r)
        std::memcpy(o.expanded_x.mutable_data<uint8_t>() + r * rb, x.data<uint8_t>() + src[r] * rb, rb);
    });
    return;
  }
  // Quantising a row depends only on the row, so each token is quantised once and its s8 row
  // copied to each of its k places (k times less quantisation work than quantising the gathered rows).
  int8_t* q = ws.alloc<int8_t>(T * h, op);
  float* qs = ws.alloc<float>(T, op);
  float* rows32 = ws.alloc<float>(h * ctx.threads(), op);
  const size_t xsz = static_cast<size_t>(dtype_size(x.dtype()));
  pool.parallel_for(T, 8, [&](int64_t b, int64_t e, int tid) {
    float* f = rows32 + tid * h;
    for (int64_t t = b; t < e; ++t) {
      const float* v = x.data<float>() + t * h;
      if (x.dtype() != DType::f32) {
        kt.to_f32(x.data<uint8_t>() + t * h * xsz, x.dtype(), h, f);
        v = f;
      }
      qs[t] = kt.quantize_row(v, nullptr, h, q + t * h);
    }
  });
  float* es = o.expanded_scale.mutable_data<float>();
  pool.parallel_for(R, 64, [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      std::memcpy(o.expanded_x.mutable_data<int8_t>() + r * h, q + src[r] * h, h);
      es[r] = qs[src[r]];
    }
  });
}

// ---- grouped_matmul_with_routing -------------------------------------------------------------

namespace {

constexpr const char* kGmmOp = "grouped_matmul_with_routing";
// Rows per work item (a multiple of the 6-row microkernel; the routed rows of one expert reuse
// each weight panel this many times while it is in L1/L2).
constexpr int64_t kRowBlock = 96;
// UP: 4 panels (64 columns) per item, as grouped_matmul. DOWN: an item owns a column range for
// all experts (so the scatter-add has one writer per output element), up to 16 panels wide so
// that the routed rows are re-read at most n / 256 times.
constexpr int64_t kUpPanels = 4;
constexpr int64_t kDownMaxPanels = 16;

struct GmmPlan {
  bool quant = false;
  int64_t T = 0, rows = 0, k = 0, n = 0, E = 0;
  DType adt = DType::f32;
  int64_t down_panels = 1;
};

GmmPlan gmm_validate(const GmmRoutingArgs& a, const TensorView& out, const GmmRoutingParams& p, int threads) {
  GmmPlan pl;
  const bool up = p.direction == RoutingDirection::up;
  pl.quant = check::matmul_operand(kGmmOp, "ac", a.ac);
  pl.adt = a.ac.dtype();
  if (p.top_k < 1) throw_invalid(kGmmOp, "top_k", "top_k = ", p.top_k, " must be >= 1");
  pl.k = a.ac.dim(1);
  check::present(kGmmOp, "out", out);
  check::ndim(kGmmOp, "out", out, 2);
  if (up) {
    pl.T = a.ac.dim(0);
    pl.rows = pl.T * p.top_k;
  } else {
    pl.T = out.dim(0);
    pl.rows = a.ac.dim(0);
    if (pl.rows != pl.T * p.top_k)
      throw_invalid(kGmmOp, "ac", "DOWN: ac must be [T * top_k, k] = [", pl.T * p.top_k, ", k] for out's T = ", pl.T,
                    " and top_k = ", p.top_k, ", got ", a.ac.shape_str());
  }
  DType wdt;
  int64_t wk;
  if (a.packed) {
    if (a.weight.present()) throw_invalid(kGmmOp, "weight", "give either weight or packed, not both");
    wdt = a.packed->dtype(); wk = a.packed->k(); pl.n = a.packed->n(); pl.E = a.packed->groups();
  } else {
    check::present(kGmmOp, "weight", a.weight);
    if (a.weight.ndim() != 3)
      throw_invalid(kGmmOp, "weight", "weight must be [E, n, k] (transpose_b) or [E, k, n], got ", a.weight.shape_str());
    check::contiguous(kGmmOp, "weight", a.weight);
    wdt = a.weight.dtype(); pl.E = a.weight.dim(0);
    wk = p.transpose_b ? a.weight.dim(2) : a.weight.dim(1);
    pl.n = p.transpose_b ? a.weight.dim(1) : a.weight.dim(2);
  }
  if (wdt != pl.adt) throw_invalid(kGmmOp, "weight", "weight must have ac's dtype ", dtype_name(pl.adt), ", got ", dtype_name(wdt));
  if (wk != pl.k)
    throw_invalid(kGmmOp, "weight", "weight's reduction size ", wk, " does not match ac's k = ", pl.k);
  if (pl.quant && pl.k > 131072)
    throw_invalid(kGmmOp, "ac", "k = ", pl.k, " exceeds 131072, where s32 accumulation could overflow");
  check::shape(kGmmOp, "out", out, {up ? pl.rows : pl.T, pl.n});
  check::dtype_float(kGmmOp, "out", out);
  if (out.dtype() != p.out_dtype)
    throw_invalid(kGmmOp, "out", "out has dtype ", dtype_name(out.dtype()), " but out_dtype is ", dtype_name(p.out_dtype));
  if (a.expert_cumsum.present() && a.expert_cumsum.dtype() != DType::s64 && a.expert_cumsum.dtype() != DType::s32)
    throw_invalid(kGmmOp, "expert_cumsum", "expert_cumsum must be int64 or int32, got ", dtype_name(a.expert_cumsum.dtype()));
  check::present(kGmmOp, "expert_cumsum", a.expert_cumsum);
  check::shape(kGmmOp, "expert_cumsum", a.expert_cumsum, {pl.E});
  check::dtype(kGmmOp, "expert_index", a.expert_index, DType::s32);
  check::shape(kGmmOp, "expert_index", a.expert_index, {pl.rows});
  if (pl.quant) {
    check::dtype(kGmmOp, "nscale", a.nscale, DType::f32);
    check::shape(kGmmOp, "nscale", a.nscale, {pl.E, pl.n});
    check::dtype(kGmmOp, "mscale", a.mscale, DType::f32);
    check::shape(kGmmOp, "mscale", a.mscale, {a.ac.dim(0)});
  } else if (a.nscale.present() || a.mscale.present()) {
    throw_invalid(kGmmOp, "nscale", "nscale / mscale only apply to int8 ac and weight");
  }
  const int64_t panels = ceil_div(pl.n, kPanel);
  pl.down_panels = std::clamp<int64_t>(panels / (4 * std::max(threads, 1)), 1, kDownMaxPanels);
  return pl;
}

// The expert offsets: validated (non-decreasing, last = rows) into offsets[E + 1].
void routing_offsets(const TensorView& cum, int64_t E, int64_t rows, int64_t* offsets) {
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t v = cum.dtype() == DType::s64 ? cum.data<int64_t>()[e] : cum.data<int32_t>()[e];
    if (e == 0 && v < 0)
      throw_invalid(kGmmOp, "expert_cumsum", "expert_cumsum[0] = ", v, " is negative");
    if (e > 0 && v < offsets[e])
      throw_invalid(kGmmOp, "expert_cumsum", "expert_cumsum[", e, "] = ", v, " < expert_cumsum[", e - 1, "] = ", offsets[e],
                    "; expert_cumsum must be non-decreasing");
    offsets[e + 1] = v;
  }
  if (offsets[E] != rows)
    throw_invalid(kGmmOp, "expert_cumsum", "expert_cumsum must end at the number of routed rows ", rows,
                  " (T * top_k), got ", offsets[E]);
}

size_t gmm_workspace(const GmmPlan& pl, bool packed, int threads) {
  WorkspacePlan w;
  w.add<int64_t>(pl.E + 1);
  w.add<int64_t>(pl.E + 1);
  if (pl.quant) w.add<uint8_t>(pl.rows * kernels::a_bytes_pairs(pl.k));  // pairs: the larger form
  else w.add<float>(pl.rows * pl.k);
  const int64_t tile_cols = std::max(kUpPanels, kDownMaxPanels) * kPanel;
  w.add<float>(threads * kRowBlock * tile_cols);  // per-thread result tile (s32 or f32)
  w.add<float>(threads * tile_cols);              // per-thread f32 row
  w.add<float>(pl.T * pl.n);                      // DOWN accumulator
  if (!packed)
    w.add<uint8_t>(std::max(PackedWeight::packed_bytes(pl.adt, pl.E, pl.k, pl.n, Int8Layout::pairs),
                            PackedWeight::packed_bytes(pl.adt, pl.E, pl.k, pl.n, Int8Layout::quads)));
  return w.bytes();
}

}  // namespace

size_t grouped_matmul_with_routing_workspace_size(const GmmRoutingArgs& a, const TensorView& out,
                                                  const GmmRoutingParams& p, int threads) {
  return gmm_workspace(gmm_validate(a, out, p, threads), a.packed != nullptr, threads);
}

void grouped_matmul_with_routing(Context& ctx, const GmmRoutingArgs& a, const TensorView& out,
                                 const GmmRoutingParams& p, Workspace* ws_in) {
  const int nt = ctx.threads();
  const GmmPlan pl = gmm_validate(a, out, p, nt);
  const bool up = p.direction == RoutingDirection::up;
  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::MoeKernels& mk = kernels::moe_kernels(ctx.isa());
  if (pl.quant && a.packed && kt.isa != Isa::ref && a.packed->int8_layout() != kt.int8_layout)
    throw_invalid(kGmmOp, "packed", "packed holds int8 weights in the ", int8_layout_name(a.packed->int8_layout()),
                  " layout, but this context's ISA ", isa_name(kt.isa), " reads ", int8_layout_name(kt.int8_layout),
                  "; pack them for ", isa_name(kt.isa));
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(gmm_workspace(pl, a.packed != nullptr, nt));
  int64_t* offsets = ws.alloc<int64_t>(pl.E + 1, kGmmOp);
  routing_offsets(a.expert_cumsum, pl.E, pl.rows, offsets);
  check_index_range(kGmmOp, "expert_index", a.expert_index, pl.T, "token ids, T");
  // All input is valid from here on.

  ThreadPool& pool = ctx.pool();
  const int32_t* tok = a.expert_index.data<int32_t>();
  const DType odt = p.out_dtype;
  const size_t osz = static_cast<size_t>(dtype_size(odt));
  const int64_t abytes = pl.quant ? kt.int8_a_bytes(pl.k) : pl.k * static_cast<int64_t>(sizeof(float));
  int64_t* item_prefix = ws.alloc<int64_t>(pl.E + 1, kGmmOp);
  uint8_t* A = ws.alloc<uint8_t>(pl.rows * abytes, kGmmOp);
  const int64_t tile_cols = std::max(kUpPanels, kDownMaxPanels) * kPanel;
  float* tiles = ws.alloc<float>(nt * kRowBlock * tile_cols, kGmmOp);
  float* rowbuf = ws.alloc<float>(nt * tile_cols, kGmmOp);
  float* acc = nullptr;
  if (!up) acc = odt == DType::f32 ? out.mutable_data<float>() : ws.alloc<float>(pl.T * pl.n, kGmmOp);
  PackedWeight local;
  const PackedWeight* pw = a.packed;
  if (!pw) {
    local = PackedWeight::pack_into(a.weight, p.transpose_b,
                                    ws.alloc<uint8_t>(PackedWeight::packed_bytes(pl.adt, pl.E, pl.k, pl.n, kt.int8_layout), kGmmOp),
                                    kt.int8_layout);
    pw = &local;
  }
  if (!up) {
    pool.parallel_for(pl.T, 16, [&](int64_t b, int64_t e, int) { std::memset(acc + b * pl.n, 0, (e - b) * pl.n * sizeof(float)); });
  }
  if (pl.rows == 0 || pl.n == 0) {
    if (!up && odt != DType::f32)
      pool.parallel_for(pl.T, 16, [&](int64_t b, int64_t e, int) { std::memset(out.mutable_data<uint8_t>() + b * pl.n * osz, 0, (e - b) * pl.n * osz); });
    return;
  }

  // Activations in the kernels' form, gathered by source token for UP (row i <- ac[tok[i]]).
  const size_t asz = static_cast<size_t>(dtype_size(pl.adt));
  pool.parallel_for(pl.rows, 16, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t s = up ? tok[i] : i;
      if (pl.quant) kt.int8_prepare_a(a.ac.data<int8_t>() + s * pl.k, pl.k, A + i * abytes);
      else kt.to_f32(a.ac.data<uint8_t>() + s * pl.k * asz, pl.adt, pl.k, reinterpret_cast<float*>(A + i * abytes));
    }
  });

  const int64_t panels = ceil_div(pl.n, kPanel);
  // Runs rows [r0, r0 + rows) of expert e on panels [p0, p1) into the thread's tile
  // (s32 for int8, f32 for float), `tcols` columns wide.
  auto run_tile = [&](int64_t e, int64_t r0, int64_t rows, int64_t p0, int64_t p1, void* tile, int64_t tcols) {
    const int64_t c0 = p0 * kPanel, ncols = std::min(pl.n, p1 * kPanel) - c0;
    if (pl.quant) {
      const int64_t gs = int8_group(pw->int8_layout());
      const int64_t kg = ceil_div(pl.k, gs);
      // A view of just these panels, so the kernel's column 0 is column c0.
      const kernels::Int8Panels bp{reinterpret_cast<const int8_t*>(pw->panels(e)) + p0 * kg * gs * kPanel, pl.k, kg, ncols,
                                   pw->int8_layout(), pw->colsum(e) + c0};
      kernels::Int8Epilogue ep;
      ep.kind = kernels::Epi::s32;
      ep.out_dtype = DType::s32;
      ep.out = tile;
      ep.ldo = tcols;
      ep.out_cols = ncols;
      kt.int8_gemm(A + r0 * abytes, abytes, rows, bp, 0, p1 - p0, ep);
    } else {
      const kernels::FloatPanels bp{pw->panels(e) + p0 * pl.k * kPanel * asz, pl.adt, pl.k, ncols};
      kernels::FloatEpilogue ep;
      ep.out_dtype = DType::f32;
      ep.out = tile;
      ep.ldo = tcols;
      kt.float_gemm(reinterpret_cast<const float*>(A + r0 * abytes), pl.k, rows, bp, 0, p1 - p0, ep);
    }
    return ncols;
  };
  const float* nscale = pl.quant ? a.nscale.data<float>() : nullptr;
  const float* mscale = pl.quant ? a.mscale.data<float>() : nullptr;

  if (up) {
    // Items (expert, row block, panel block), claimed dynamically: a crowded expert simply
    // owns more items, so skewed routing balances.
    const int64_t pblocks = ceil_div(panels, kUpPanels);
    item_prefix[0] = 0;
    for (int64_t e = 0; e < pl.E; ++e)
      item_prefix[e + 1] = item_prefix[e] + ceil_div(offsets[e + 1] - offsets[e], kRowBlock) * pblocks;
    pool.parallel_for(item_prefix[pl.E], 1, [&](int64_t b, int64_t end, int tid) {
      void* tile = tiles + tid * kRowBlock * tile_cols;
      float* f = rowbuf + tid * tile_cols;
      for (int64_t it = b; it < end; ++it) {
        const int64_t e = find_group(item_prefix, pl.E, it);
        const int64_t li = it - item_prefix[e];
        const int64_t r0 = offsets[e] + (li / pblocks) * kRowBlock;
        const int64_t rows = std::min(kRowBlock, offsets[e + 1] - r0);
        const int64_t p0 = (li % pblocks) * kUpPanels, p1 = std::min(panels, p0 + kUpPanels);
        const int64_t c0 = p0 * kPanel;
        const int64_t ncols = run_tile(e, r0, rows, p0, p1, tile, tile_cols);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = r0 + r;
          uint8_t* dst = out.mutable_data<uint8_t>() + (i * pl.n + c0) * osz;
          if (pl.quant) {
            mk.scale_acc_row(static_cast<int32_t*>(tile) + r * tile_cols, ncols, mscale[tok[i]], nscale + e * pl.n + c0, f, false);
            kt.from_f32(f, ncols, odt, dst);
          } else {
            kt.from_f32(static_cast<float*>(tile) + r * tile_cols, ncols, odt, dst);
          }
        }
      }
    });
    return;
  }

  // DOWN: an item is a column range; it walks every expert's rows in order, so each output
  // element has one writer and its sum runs in row order whatever the thread count.
  const int64_t pw_panels = pl.down_panels;
  const int64_t items = ceil_div(panels, pw_panels);
  pool.parallel_for(items, 1, [&](int64_t b, int64_t end, int tid) {
    void* tile = tiles + tid * kRowBlock * tile_cols;
    for (int64_t it = b; it < end; ++it) {
      const int64_t p0 = it * pw_panels, p1 = std::min(panels, p0 + pw_panels);
      const int64_t c0 = p0 * kPanel;
      for (int64_t e = 0; e < pl.E; ++e) {
        for (int64_t r0 = offsets[e]; r0 < offsets[e + 1]; r0 += kRowBlock) {
          const int64_t rows = std::min(kRowBlock, offsets[e + 1] - r0);
          const int64_t ncols = run_tile(e, r0, rows, p0, p1, tile, tile_cols);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = r0 + r;
            float* dst = acc + tok[i] * pl.n + c0;
            if (pl.quant)
              mk.scale_acc_row(static_cast<int32_t*>(tile) + r * tile_cols, ncols, mscale[i], nscale + e * pl.n + c0, dst, true);
            else
              mk.add_row(dst, static_cast<float*>(tile) + r * tile_cols, ncols, dst);
          }
        }
      }
    }
  });
  if (odt != DType::f32)
    pool.parallel_for(pl.T, 16, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) kt.from_f32(acc + t * pl.n, pl.n, odt, out.mutable_data<uint8_t>() + t * pl.n * osz);
    });
}

// ---- moe_finalize_routing --------------------------------------------------------------------

size_t moe_finalize_routing_workspace_size(int64_t h, int threads) {
  WorkspacePlan plan;
  plan.add<float>(3 * h * threads);  // per thread: the f32 sum, a converted row, row + bias
  return plan.bytes();
}

void moe_finalize_routing(Context& ctx, const MoeFinalizeArgs& a, const TensorView& out, Workspace* ws) {
  constexpr const char* op = "moe_finalize_routing";
  check::present(op, "rows", a.rows);
  check::dtype_float(op, "rows", a.rows);
  check::ndim(op, "rows", a.rows, 2);
  check::contiguous(op, "rows", a.rows);
  const int64_t R = a.rows.dim(0), h = a.rows.dim(1);
  check::dtype(op, "weights", a.weights, DType::f32);
  check::ndim(op, "weights", a.weights, 2);
  check::contiguous(op, "weights", a.weights);
  const int64_t T = a.weights.dim(0), k = a.weights.dim(1);
  check::dtype(op, "expanded_row_idx", a.expanded_row_idx, DType::s32);
  check::shape(op, "expanded_row_idx", a.expanded_row_idx, {T * k});
  if (R < T * k) throw_invalid(op, "rows", "rows must have at least T * k = ", T * k, " rows, got ", a.rows.shape_str());
  check::dtype_float(op, "out", out);
  check::shape(op, "out", out, {T, h});
  if (a.skip.present()) {
    check::dtype_float(op, "skip", a.skip);
    check::shape(op, "skip", a.skip, {T, h});
  }
  int64_t E = 0;
  if (a.bias.present()) {
    check::dtype(op, "bias", a.bias, DType::f32);
    check::ndim(op, "bias", a.bias, 2);
    check::contiguous(op, "bias", a.bias);
    E = a.bias.dim(0);
    if (a.bias.dim(1) != h) throw_invalid(op, "bias", "bias must be [E, h] with h = ", h, ", got ", a.bias.shape_str());
    check::present(op, "expert_ids", a.expert_ids);
    check::dtype(op, "expert_ids", a.expert_ids, DType::s32);
    check::shape(op, "expert_ids", a.expert_ids, {T, k});
    check_index_range(op, "expert_ids", a.expert_ids, E, "bias rows, E");
  } else if (a.expert_ids.present()) {
    throw_invalid(op, "expert_ids", "expert_ids is only read with bias; give bias or leave expert_ids out");
  }
  check_index_range(op, "expanded_row_idx", a.expanded_row_idx, R, "rows of `rows`");
  if (T == 0 || h == 0) return;

  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::MoeKernels& mk = kernels::moe_kernels(ctx.isa());
  const int nt = ctx.threads();
  Workspace& arena = ws ? *ws : ctx.workspace(moe_finalize_routing_workspace_size(h, nt));
  float* scratch = arena.alloc<float>(3 * h * nt, op);
  const DType rdt = a.rows.dtype(), odt = out.dtype();
  const size_t rsz = static_cast<size_t>(dtype_size(rdt)), osz = static_cast<size_t>(dtype_size(odt));
  const int32_t* idx = a.expanded_row_idx.data<int32_t>();
  const float* w = a.weights.data<float>();
  ctx.pool().parallel_for(T, 4, [&](int64_t b, int64_t e, int tid) {
    float* acc = scratch + tid * 3 * h;
    float* row = acc + h;
    float* tmp = row + h;
    for (int64_t t = b; t < e; ++t) {
      std::memset(acc, 0, h * sizeof(float));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = idx[t * k + j];
        const float* v = a.rows.data<float>() + r * h;
        if (rdt != DType::f32) {
          kt.to_f32(a.rows.data<uint8_t>() + r * h * rsz, rdt, h, row);
          v = row;
        }
        if (a.bias.present()) {
          mk.add_row(v, a.bias.data<float>() + a.expert_ids.data<int32_t>()[t * k + j] * h, h, tmp);
          v = tmp;
        }
        mk.axpy_row(w[t * k + j], v, h, acc);
      }
      if (a.skip.present()) {
        const float* s = a.skip.data<float>() + t * h;
        if (a.skip.dtype() != DType::f32) {
          kt.to_f32(a.skip.data<uint8_t>() + t * h * static_cast<size_t>(dtype_size(a.skip.dtype())), a.skip.dtype(), h, row);
          s = row;
        }
        mk.add_row(s, acc, h, acc);
      }
      kt.from_f32(acc, h, odt, out.mutable_data<uint8_t>() + t * h * osz);
    }
  });
}

}  // namespace qllm
