#include "qllm/model/moe_layer.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/moe.h"
#include "qllm/core/error.h"
#include "qllm/ops/grouped_matmul.h"
#include "qllm/ops/moe_ffn.h"
#include "qllm/ops/quant.h"

namespace qllm {

namespace {

constexpr const char* kOp = "MoeLayer";

// Row-major f32 copy of a float tensor (conversion happens once, at build time).
std::vector<float> to_f32_vec(const TensorView& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  kernels::ref_table().to_f32(t.raw(), t.dtype(), t.numel(), v.data());
  return v;
}

void check_weight(const char* arg, const TensorView& t, std::initializer_list<int64_t> dims) {
  check::present(kOp, arg, t);
  check::dtype_float(kOp, arg, t);
  check::shape(kOp, arg, t, dims);
}

// Symmetric per-output-channel int8 quantisation of rows [n, k] (SPEC section 0 formula per row).
void quantize_rows(const float* w, int64_t n, int64_t k, int8_t* q, float* scale) {
  for (int64_t r = 0; r < n; ++r) scale[r] = kernels::ref_table().quantize_row(w + r * k, nullptr, k, q + r * k);
}

std::shared_ptr<const PackedWeight> pack_router(const MoeLayerConfig& cfg, const TensorView& router,
                                                const TensorView& shared_gate, Isa isa) {
  const int64_t E = cfg.num_experts, h = cfg.hidden_size;
  check_weight("router", router, {E, h});
  std::vector<float> r = to_f32_vec(router);
  if (cfg.shared_gated()) {
    check_weight("shared_expert_gate", shared_gate, {1, h});
    const std::vector<float> g = to_f32_vec(shared_gate);
    r.insert(r.end(), g.begin(), g.end());  // one more output column: the shared expert's gate logit
  } else if (shared_gate.present()) {
    throw_invalid(kOp, "shared_expert_gate", "shared_expert_gate is only used with shared_expert_intermediate_size > 0");
  }
  const int64_t n = E + (cfg.shared_gated() ? 1 : 0);
  return std::make_shared<PackedWeight>(PackedWeight::pack(TensorView(r.data(), DType::f32, {n, h}), true, isa));
}

}  // namespace

void MoeLayerConfig::validate() const {
  if (hidden_size < 1) throw_invalid(kOp, "hidden_size", "hidden_size = ", hidden_size, " must be >= 1");
  if (num_experts < 1) throw_invalid(kOp, "num_experts", "num_experts = ", num_experts, " must be >= 1");
  if (moe_intermediate_size < 1)
    throw_invalid(kOp, "moe_intermediate_size", "moe_intermediate_size = ", moe_intermediate_size, " must be >= 1");
  if (num_experts_per_tok < 1 || num_experts_per_tok > num_experts)
    throw_invalid(kOp, "num_experts_per_tok", "num_experts_per_tok = ", num_experts_per_tok, " must be in [1, num_experts = ",
                  num_experts, "]");
  if (n_group < 1 || num_experts % n_group != 0)
    throw_invalid(kOp, "n_group", "n_group = ", n_group, " must be >= 1 and divide num_experts = ", num_experts);
  if (topk_group < 1 || topk_group > n_group)
    throw_invalid(kOp, "topk_group", "topk_group = ", topk_group, " must be in [1, n_group = ", n_group, "]");
  if (n_group > 1 && num_experts_per_tok > topk_group * (num_experts / n_group))
    throw_invalid(kOp, "num_experts_per_tok", "num_experts_per_tok = ", num_experts_per_tok, " exceeds the ",
                  topk_group * (num_experts / n_group), " experts that grouped selection allows");
  if (n_shared_experts < 0) throw_invalid(kOp, "n_shared_experts", "n_shared_experts = ", n_shared_experts, " is negative");
  if (shared_expert_intermediate_size < 0)
    throw_invalid(kOp, "shared_expert_intermediate_size", "shared_expert_intermediate_size is negative");
  if (n_shared_experts > 0 && shared_expert_intermediate_size > 0)
    throw_invalid(kOp, "n_shared_experts",
                  "set n_shared_experts (DeepSeek, ungated shared expert) or shared_expert_intermediate_size "
                  "(Qwen2-MoE, gated), not both");
}

MoeExperts parse_moe_experts(const char* name, const char* op) {
  const std::string s = name;
  if (s == "w8a8") return MoeExperts::w8a8;
  if (s == "float32" || s == "f32") return MoeExperts::f32;
  if (s == "bfloat16" || s == "bf16") return MoeExperts::bf16;
  throw_invalid(op, "experts", "experts = '", s, "' (expected w8a8, float32 or bfloat16)");
}

MoeLayer MoeLayer::from_hf(const MoeLayerConfig& cfg, const MoeLayerHfWeights& w, MoeExperts fmt, Isa isa) {
  cfg.validate();
  const int64_t E = cfg.num_experts, h = cfg.hidden_size, I = cfg.moe_intermediate_size, Is = cfg.shared_intermediate();
  check_weight("gate_proj", w.gate_proj, {E, I, h});
  check_weight("up_proj", w.up_proj, {E, I, h});
  check_weight("down_proj", w.down_proj, {E, h, I});
  if (Is > 0) {
    check_weight("shared_gate_proj", w.shared_gate_proj, {Is, h});
    check_weight("shared_up_proj", w.shared_up_proj, {Is, h});
    check_weight("shared_down_proj", w.shared_down_proj, {h, Is});
  } else if (w.shared_gate_proj.present() || w.shared_up_proj.present() || w.shared_down_proj.present()) {
    throw_invalid(kOp, "shared_gate_proj", "shared expert weights given but the config has no shared expert");
  }
  MoeLayer L;
  L.cfg_ = cfg;
  L.format_ = fmt;
  L.router_ = pack_router(cfg, w.router, w.shared_expert_gate, isa);
  if (w.e_score_correction_bias.present()) {
    check::dtype(kOp, "e_score_correction_bias", w.e_score_correction_bias, DType::f32);
    check::shape(kOp, "e_score_correction_bias", w.e_score_correction_bias, {E});
    L.bias_ = to_f32_vec(w.e_score_correction_bias);
  }

  if (fmt == MoeExperts::w8a8) {
    // weight1 [G, h, 2I] (gate columns, then up), weight2 [G, h, I] as the fused operator takes them.
    auto quantize_ffn = [&](const TensorView& gate, const TensorView& up, const TensorView& down, int64_t G, int64_t inter) {
      std::vector<int8_t> w1(static_cast<size_t>(G * h * 2 * inter)), w2(static_cast<size_t>(G * h * inter));
      std::vector<float> s1(static_cast<size_t>(G * 2 * inter)), s2(static_cast<size_t>(G * h));
      std::vector<int8_t> q(static_cast<size_t>(inter * h));
      // One expert's matrix at a time in f32 (read in place when it already is f32), so
      // converting never holds a second full copy of the checkpoint's experts.
      std::vector<float> tmp;
      auto slice = [&](const TensorView& t, int64_t g, int64_t n) -> const float* {
        if (t.dtype() == DType::f32) return t.data<float>() + g * n;
        tmp.resize(static_cast<size_t>(n));
        kernels::ref_table().to_f32(t.data<uint8_t>() + g * n * dtype_size(t.dtype()), t.dtype(), n, tmp.data());
        return tmp.data();
      };
      for (int64_t g = 0; g < G; ++g) {
        for (int half = 0; half < 2; ++half) {
          const float* src = slice(half == 0 ? gate : up, g, inter * h);
          quantize_rows(src, inter, h, q.data(), s1.data() + g * 2 * inter + half * inter);
          // weight1 is [k1 = h, n1 = 2I]: transpose the [I, h] rows into columns.
          for (int64_t c = 0; c < inter; ++c)
            for (int64_t kk = 0; kk < h; ++kk) w1[(g * h + kk) * 2 * inter + half * inter + c] = q[c * h + kk];
        }
        quantize_rows(slice(down, g, h * inter), h, inter, w2.data() + g * h * inter, s2.data() + g * h);
      }
      return std::make_shared<PackedExpertFFN>(PackedExpertFFN::pack(
          TensorView(w1.data(), DType::s8, {G, h, 2 * inter}), TensorView(s1.data(), DType::f32, {G, 2 * inter}),
          TensorView(w2.data(), DType::s8, {G, h, inter}), TensorView(s2.data(), DType::f32, {G, h}), WeightUpPermute::none,
          kOp, isa));
    };
    L.q_experts_ = quantize_ffn(w.gate_proj, w.up_proj, w.down_proj, E, I);
    if (Is > 0) L.q_shared_ = quantize_ffn(w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, 1, Is);
    return L;
  }

  // Float experts: gate|up stacked as one [G, 2I, h] Linear weight, down [G, h, I]; kept in `dt`.
  const DType dt = fmt == MoeExperts::f32 ? DType::f32 : DType::bf16;
  auto pack_float = [&](const TensorView& gate, const TensorView& up, const TensorView& down, int64_t G, int64_t inter) {
    const std::vector<float> gf = to_f32_vec(gate), uf = to_f32_vec(up), df = to_f32_vec(down);
    std::vector<float> gu(static_cast<size_t>(G * 2 * inter * h));
    for (int64_t g = 0; g < G; ++g) {
      std::memcpy(gu.data() + g * 2 * inter * h, gf.data() + g * inter * h, inter * h * sizeof(float));
      std::memcpy(gu.data() + (g * 2 + 1) * inter * h, uf.data() + g * inter * h, inter * h * sizeof(float));
    }
    auto pack = [&](const std::vector<float>& v, int64_t n, int64_t k) {
      if (dt == DType::f32) return std::make_shared<PackedWeight>(PackedWeight::pack(TensorView(v.data(), DType::f32, {G, n, k}), true, isa));
      std::vector<uint16_t> b(v.size());
      kernels::ref_table().from_f32(v.data(), static_cast<int64_t>(v.size()), DType::bf16, b.data());
      return std::make_shared<PackedWeight>(PackedWeight::pack(TensorView(b.data(), DType::bf16, {G, n, k}), true, isa));
    };
    return std::make_pair(pack(gu, 2 * inter, h), pack(df, h, inter));
  };
  std::tie(L.f_gate_up_, L.f_down_) = pack_float(w.gate_proj, w.up_proj, w.down_proj, E, I);
  if (Is > 0) std::tie(L.f_shared_gate_up_, L.f_shared_down_) = pack_float(w.shared_gate_proj, w.shared_up_proj, w.shared_down_proj, 1, Is);
  return L;
}

MoeLayer MoeLayer::from_packed(const MoeLayerConfig& cfg, const TensorView& router, const TensorView& bias,
                               PackedExpertFFN experts, std::optional<PackedExpertFFN> shared,
                               const TensorView& shared_gate, Isa isa) {
  cfg.validate();
  const int64_t E = cfg.num_experts, h = cfg.hidden_size, I = cfg.moe_intermediate_size, Is = cfg.shared_intermediate();
  if (experts.groups() != E || experts.k1() != h || experts.n1() != 2 * I || experts.n2() != h)
    throw_invalid(kOp, "experts", "packed experts must hold ", E, " experts of [", h, " -> 2 x ", I, " -> ", h, "], got ",
                  experts.groups(), " of [", experts.k1(), " -> ", experts.n1(), " -> ", experts.n2(), "]");
  if (Is > 0) {
    if (!shared) throw_invalid(kOp, "shared", "the config has a shared expert (intermediate ", Is, ") but none was given");
    if (shared->groups() != 1 || shared->k1() != h || shared->n1() != 2 * Is || shared->n2() != h)
      throw_invalid(kOp, "shared", "the packed shared expert must be one expert of [", h, " -> 2 x ", Is, " -> ", h, "]");
  } else if (shared) {
    throw_invalid(kOp, "shared", "a shared expert was given but the config has none");
  }
  MoeLayer L;
  L.cfg_ = cfg;
  L.format_ = MoeExperts::w8a8;
  L.router_ = pack_router(cfg, router, shared_gate, isa);
  if (bias.present()) {
    check::dtype(kOp, "e_score_correction_bias", bias, DType::f32);
    check::shape(kOp, "e_score_correction_bias", bias, {E});
    L.bias_ = to_f32_vec(bias);
  }
  L.q_experts_ = std::make_shared<PackedExpertFFN>(std::move(experts));
  if (shared) L.q_shared_ = std::make_shared<PackedExpertFFN>(std::move(*shared));
  return L;
}

size_t MoeLayer::router_bytes() const { return router_->bytes(); }
size_t MoeLayer::expert_bytes() const {
  if (q_experts_) return q_experts_->group_bytes();
  return (f_gate_up_->bytes() + f_down_->bytes()) / static_cast<size_t>(cfg_.num_experts);
}
size_t MoeLayer::shared_bytes() const {
  if (q_shared_) return q_shared_->bytes();
  if (f_shared_gate_up_) return f_shared_gate_up_->bytes() + f_shared_down_->bytes();
  return 0;
}
size_t MoeLayer::weight_bytes() const {
  return router_bytes() + shared_bytes() + (q_experts_ ? q_experts_->bytes() : f_gate_up_->bytes() + f_down_->bytes());
}

namespace {

// Every buffer of one forward pass, carved in this order from one workspace; `sub` is the
// region the operators inside the layer use as their own workspace (one at a time).
struct Buffers {
  float* x32 = nullptr;     // [T, h] f32 (x converted, when x is not f32)
  float* logits = nullptr;  // [T, E'] router output (E' = E + 1 with a shared-expert gate)
  float* logitsE = nullptr; // [T, E] when E' != E
  int64_t* glist = nullptr; // [1] = T, the router's one-group list
  float* w = nullptr;       // [T, k] routing weights
  int32_t* ids = nullptr;   // [T, k]
  void* ex = nullptr;       // [R, h] gathered rows: s8 (W8A8) or the experts' dtype
  float* es = nullptr;      // [R] per-row scales (W8A8)
  int64_t* cum = nullptr;   // [E]
  int32_t* idx = nullptr;   // [R] expanded_row_idx
  float* h1 = nullptr;      // float experts: [R, 2I] f32
  void* act = nullptr;      // float experts: [R, I] experts' dtype
  float* rows = nullptr;    // [R + T, h] f32: expert outputs, then the shared expert's
  int8_t* xq = nullptr;     // [T, h] W8A8 shared expert: x quantised
  float* xqs = nullptr;     // [T]
  void* xe = nullptr;       // float experts: x in the experts' dtype [T, h]
  float* sh1 = nullptr;     // float shared: [T, 2Is] f32
  void* sact = nullptr;     // float shared: [T, Is]
  float* wext = nullptr;    // [T, k + 1] weights incl. the shared expert's
  int32_t* iext = nullptr;  // [T * (k + 1)]
  float* gate = nullptr;    // [T] sigmoid of the shared-expert gate logit
  void* sub = nullptr;
  size_t sub_bytes = 0;
};

}  // namespace

// The operators' own workspace sizes, for views of the right shapes (no data is read).
static size_t sub_workspace(const MoeLayer& L, const MoeLayerConfig& c, int64_t T, int threads,
                            const PackedWeight* router, const PackedExpertFFN* qe, const PackedExpertFFN* qs,
                            const PackedWeight* fgu, const PackedWeight* fd, const PackedWeight* fsgu, const PackedWeight* fsd) {
  (void)L;
  const int64_t E = c.num_experts, h = c.hidden_size, k = c.num_experts_per_tok, R = T * k;
  const int64_t I = c.moe_intermediate_size, Is = c.shared_intermediate();
  size_t m = 0;
  auto upd = [&](size_t v) { m = std::max(m, v); };
  const int64_t one = 1;
  GroupedMatmulArgs ra;
  ra.x = TensorView(nullptr, DType::f32, {T, h});
  ra.packed_w = router;
  ra.group_list = TensorView(&one, DType::s64, {1});
  upd(grouped_matmul_workspace_size(ra, {GroupListType::cumsum, false, DType::f32}));
  MoeGatingParams gp;
  gp.top_k = k;
  gp.n_group = c.n_group;
  upd(moe_gating_topk_workspace_size(E, gp, threads));
  upd(moe_init_routing_workspace_size(T, h, k, E, qe != nullptr, threads));
  upd(moe_finalize_routing_workspace_size(h, threads));
  if (qe) {
    MoeFfnArgs fa;
    fa.x1 = TensorView(nullptr, DType::s8, {R, h});
    fa.per_token_scale1 = TensorView(nullptr, DType::f32, {R});
    fa.group_list = TensorView(nullptr, DType::s64, {E});
    fa.packed = qe;
    MoeFfnParams fp;
    fp.out_dtype = DType::f32;
    upd(gmm_deq_swiglu_quant_gmm_deq_workspace_size(fa, fp, threads));
    if (qs) {
      DynamicQuantArgs da;
      da.x = TensorView(nullptr, DType::f32, {T, h});
      upd(dynamic_quant_workspace_size(da, threads));
      fa.x1 = TensorView(nullptr, DType::s8, {T, h});
      fa.per_token_scale1 = TensorView(nullptr, DType::f32, {T});
      fa.group_list = TensorView(nullptr, DType::s64, {1});
      fa.packed = qs;
      upd(gmm_deq_swiglu_quant_gmm_deq_workspace_size(fa, fp, threads));
    }
  } else {
    const DType dt = fgu->dtype();
    auto gmm = [&](int64_t rows, int64_t kk, int64_t G, const PackedWeight* pw) {
      GroupedMatmulArgs a;
      a.x = TensorView(nullptr, dt, {rows, kk});
      a.packed_w = pw;
      a.group_list = TensorView(nullptr, DType::s64, {G});
      upd(grouped_matmul_workspace_size(a, {GroupListType::cumsum, false, DType::f32}));
    };
    gmm(R, h, E, fgu);
    gmm(R, I, E, fd);
    upd(swiglu_workspace_size(TensorView(nullptr, DType::f32, {R, 2 * I}), threads));
    if (fsgu) {
      gmm(T, h, 1, fsgu);
      gmm(T, Is, 1, fsd);
      upd(swiglu_workspace_size(TensorView(nullptr, DType::f32, {T, 2 * Is}), threads));
    }
  }
  return m;
}

static Buffers carve(const MoeLayerConfig& c, bool w8a8, DType expert_dt, bool has_shared, int64_t T, size_t sub_bytes,
                     Workspace* ws, WorkspacePlan* plan) {
  const int64_t E = c.num_experts, h = c.hidden_size, k = c.num_experts_per_tok, R = T * k;
  const int64_t I = c.moe_intermediate_size, Is = c.shared_intermediate();
  const int64_t Ep = E + (c.shared_gated() ? 1 : 0);
  const size_t esz = static_cast<size_t>(dtype_size(expert_dt));
  Buffers b;
  auto take = [&](auto*& p, size_t count) {
    using T_ = std::remove_pointer_t<std::remove_reference_t<decltype(p)>>;
    if (plan) plan->add<T_>(count);
    else p = ws->alloc<T_>(count, kOp);
  };
  auto take_bytes = [&](void*& p, size_t bytes) {
    if (plan) plan->add<uint8_t>(bytes);
    else p = ws->alloc<uint8_t>(bytes, kOp);
  };
  take(b.x32, T * h);
  take(b.logits, T * Ep);
  if (Ep != E) take(b.logitsE, T * E);
  take(b.glist, 1);
  take(b.w, T * k);
  take(b.ids, T * k);
  take_bytes(b.ex, R * h * (w8a8 ? 1 : esz));
  take(b.es, R);
  take(b.cum, E);
  take(b.idx, R);
  take(b.rows, (R + T) * h);
  take(b.wext, T * (k + 1));
  take(b.iext, T * (k + 1));
  take(b.gate, T);
  if (w8a8) {
    if (has_shared) {
      take(b.xq, T * h);
      take(b.xqs, T);
    }
  } else {
    take_bytes(b.xe, T * h * esz);
    take(b.h1, R * 2 * I);
    take_bytes(b.act, R * I * esz);
    if (has_shared) {
      take(b.sh1, T * 2 * Is);
      take_bytes(b.sact, T * Is * esz);
    }
  }
  b.sub_bytes = sub_bytes;
  take_bytes(b.sub, sub_bytes);
  return b;
}

size_t MoeLayer::workspace_size(int64_t T, int threads) const {
  const size_t sub = sub_workspace(*this, cfg_, T, threads, router_.get(), q_experts_.get(), q_shared_.get(),
                                   f_gate_up_.get(), f_down_.get(), f_shared_gate_up_.get(), f_shared_down_.get());
  WorkspacePlan plan;
  carve(cfg_, format_ == MoeExperts::w8a8, format_ == MoeExperts::bf16 ? DType::bf16 : DType::f32,
        q_shared_ || f_shared_gate_up_, T, sub, nullptr, &plan);
  return plan.bytes();
}

void MoeLayer::forward(Context& ctx, const TensorView& x, const TensorView& out, Workspace* ws_in) const {
  const int64_t E = cfg_.num_experts, h = cfg_.hidden_size, k = cfg_.num_experts_per_tok;
  const int64_t I = cfg_.moe_intermediate_size, Is = cfg_.shared_intermediate();
  const int64_t Ep = E + (cfg_.shared_gated() ? 1 : 0);
  check::present(kOp, "x", x);
  if (x.dtype() != DType::f32 && x.dtype() != DType::bf16)
    throw_invalid(kOp, "x", "x must be float32 or bfloat16, got ", dtype_name(x.dtype()));
  check::ndim(kOp, "x", x, 2);
  check::contiguous(kOp, "x", x);
  if (x.dim(1) != h) throw_invalid(kOp, "x", "x must be [T, hidden_size = ", h, "], got ", x.shape_str());
  const int64_t T = x.dim(0), R = T * k;
  if (out.dtype() != DType::f32 && out.dtype() != DType::bf16)
    throw_invalid(kOp, "out", "out must be float32 or bfloat16, got ", dtype_name(out.dtype()));
  check::shape(kOp, "out", out, {T, h});
  if (q_experts_ && ctx.isa() != Isa::ref && q_experts_->int8_layout() != ctx.kernels().int8_layout)
    throw_invalid(kOp, "experts", "the experts were packed in the ", int8_layout_name(q_experts_->int8_layout()),
                  " int8 layout but this context's ISA ", isa_name(ctx.isa()), " reads ",
                  int8_layout_name(ctx.kernels().int8_layout), "; build the layer for ", isa_name(ctx.isa()));
  if (T == 0) return;

  const bool w8a8 = format_ == MoeExperts::w8a8;
  const DType edt = format_ == MoeExperts::bf16 ? DType::bf16 : DType::f32;
  const bool has_shared = Is > 0;
  const int nt = ctx.threads();
  const size_t sub_bytes = sub_workspace(*this, cfg_, T, nt, router_.get(), q_experts_.get(), q_shared_.get(),
                                         f_gate_up_.get(), f_down_.get(), f_shared_gate_up_.get(), f_shared_down_.get());
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(workspace_size(T, nt));
  const Buffers b = carve(cfg_, w8a8, edt, has_shared, T, sub_bytes, &ws, nullptr);
  // Each operator inside gets the same sub-region, reset before each use.
  auto sub = [&] { return Workspace(b.sub, b.sub_bytes); };
  const kernels::KernelTable& kt = ctx.kernels();
  ThreadPool& pool = ctx.pool();

  // 1. Router logits in f32 (and the Qwen2 shared-expert gate logit as column E).
  const float* x32 = x.data<float>();
  if (x.dtype() != DType::f32) {
    pool.parallel_for(T, 8, [&](int64_t s, int64_t e, int) {
      for (int64_t t = s; t < e; ++t) kt.to_f32(x.data<uint16_t>() + t * h, x.dtype(), h, b.x32 + t * h);
    });
    x32 = b.x32;
  }
  b.glist[0] = T;
  {
    GroupedMatmulArgs ra;
    ra.x = TensorView(x32, DType::f32, {T, h});
    ra.packed_w = router_.get();
    ra.group_list = TensorView(b.glist, DType::s64, {1});
    Workspace s = sub();
    grouped_matmul(ctx, ra, TensorView(b.logits, DType::f32, {T, Ep}), {GroupListType::cumsum, false, DType::f32}, &s);
  }
  const float* logits = b.logits;
  if (Ep != E) {
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(b.logitsE + t * E, b.logits + t * Ep, E * sizeof(float));
      b.gate[t] = b.logits[t * Ep + E];
    }
    // sigmoid, with the same deterministic exp as everything else.
    kernels::moe_kernels(ctx.isa()).score_row(b.gate, T, kernels::Score::sigmoid, b.gate);
    logits = b.logitsE;
  }

  // 2. Gating.
  {
    MoeGatingArgs ga;
    ga.logits = TensorView(logits, DType::f32, {T, E});
    if (!bias_.empty()) ga.e_score_correction_bias = TensorView(bias_.data(), DType::f32, {E});
    MoeGatingParams gp;
    gp.top_k = k;
    gp.scoring = cfg_.scoring_func;
    gp.n_group = cfg_.n_group;
    gp.topk_group = cfg_.topk_group;
    gp.renormalize = cfg_.norm_topk_prob;
    gp.routed_scaling_factor = cfg_.routed_scaling_factor;
    Workspace s = sub();
    moe_gating_topk(ctx, ga, TensorView(b.w, DType::f32, {T, k}), TensorView(b.ids, DType::s32, {T, k}), gp, &s);
  }

  // 3. Dispatch: rows gathered in expert order (W8A8: quantised per token on the way).
  const void* xsrc = x32;
  DType xsrc_dt = DType::f32;
  if (!w8a8) {
    if (x.dtype() == edt) {
      xsrc = x.raw();
      xsrc_dt = edt;
    } else {
      pool.parallel_for(T, 8, [&](int64_t s, int64_t e, int) {
        for (int64_t t = s; t < e; ++t)
          kt.from_f32(x32 + t * h, h, edt, static_cast<uint8_t*>(b.xe) + t * h * dtype_size(edt));
      });
      xsrc = b.xe;
      xsrc_dt = edt;
    }
  }
  {
    MoeInitRoutingOutputs o;
    o.expanded_x = TensorView(b.ex, w8a8 ? DType::s8 : xsrc_dt, {R, h});
    o.expanded_row_idx = TensorView(b.idx, DType::s32, {R});
    o.expert_cumsum = TensorView(b.cum, DType::s64, {E});
    if (w8a8) o.expanded_scale = TensorView(b.es, DType::f32, {R});
    Workspace s = sub();
    moe_init_routing(ctx, TensorView(xsrc, xsrc_dt, {T, h}), TensorView(b.ids, DType::s32, {T, k}), E, o, w8a8, &s);
  }

  // 4. Experts -> rows[0, R); 5. shared expert -> rows[R, R + T).
  float* shared_rows = b.rows + R * h;
  if (w8a8) {
    MoeFfnArgs fa;
    fa.x1 = TensorView(b.ex, DType::s8, {R, h});
    fa.per_token_scale1 = TensorView(b.es, DType::f32, {R});
    fa.group_list = TensorView(b.cum, DType::s64, {E});
    fa.packed = q_experts_.get();
    MoeFfnParams fp;
    fp.out_dtype = DType::f32;
    {
      Workspace s = sub();
      gmm_deq_swiglu_quant_gmm_deq(ctx, fa, TensorView(b.rows, DType::f32, {R, h}), fp, &s);
    }
    if (has_shared) {
      DynamicQuantArgs da;
      da.x = TensorView(x32, DType::f32, {T, h});
      {
        Workspace s = sub();
        dynamic_quant(ctx, da, TensorView(b.xq, DType::s8, {T, h}), TensorView(b.xqs, DType::f32, {T}), &s);
      }
      MoeFfnArgs sa;
      sa.x1 = TensorView(b.xq, DType::s8, {T, h});
      sa.per_token_scale1 = TensorView(b.xqs, DType::f32, {T});
      sa.packed = q_shared_.get();
      Workspace s = sub();
      mm_deq_swiglu_quant_mm_deq(ctx, sa, TensorView(shared_rows, DType::f32, {T, h}), fp, &s);
    }
  } else {
    const GroupedMatmulParams f32out{GroupListType::cumsum, false, DType::f32};
    auto ffn = [&](const void* in, int64_t rows, const TensorView& glist, const PackedWeight* gu, const PackedWeight* dn,
                   int64_t inter, float* h1, void* act, float* o) {
      GroupedMatmulArgs a1;
      a1.x = TensorView(in, edt, {rows, h});
      a1.packed_w = gu;
      a1.group_list = glist;
      {
        Workspace s = sub();
        grouped_matmul(ctx, a1, TensorView(h1, DType::f32, {rows, 2 * inter}), f32out, &s);
      }
      {
        // SwiGLU rounded to the experts' dtype, as the float model computes it.
        Workspace s = sub();
        swiglu(ctx, TensorView(h1, DType::f32, {rows, 2 * inter}), TensorView(act, edt, {rows, inter}), true, &s);
      }
      GroupedMatmulArgs a2;
      a2.x = TensorView(act, edt, {rows, inter});
      a2.packed_w = dn;
      a2.group_list = glist;
      Workspace s = sub();
      grouped_matmul(ctx, a2, TensorView(o, DType::f32, {rows, h}), f32out, &s);
    };
    ffn(b.ex, R, TensorView(b.cum, DType::s64, {E}), f_gate_up_.get(), f_down_.get(), I, b.h1, b.act, b.rows);
    if (has_shared)
      ffn(xsrc, T, TensorView(b.glist, DType::s64, {1}), f_shared_gate_up_.get(), f_shared_down_.get(), Is, b.sh1, b.sact,
          shared_rows);
  }

  // 6. Combine: the shared expert is one more "routed" row per token, last in the sum, with
  // weight 1 (DeepSeek) or sigmoid(gate logit) (Qwen2-MoE).
  int64_t kk = k;
  const float* wts = b.w;
  const int32_t* rix = b.idx;
  if (has_shared) {
    kk = k + 1;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        b.wext[t * kk + j] = b.w[t * k + j];
        b.iext[t * kk + j] = b.idx[t * k + j];
      }
      b.wext[t * kk + k] = cfg_.shared_gated() ? b.gate[t] : 1.0f;
      b.iext[t * kk + k] = static_cast<int32_t>(R + t);
    }
    wts = b.wext;
    rix = b.iext;
  }
  MoeFinalizeArgs fa;
  fa.rows = TensorView(b.rows, DType::f32, {R + (has_shared ? T : 0), h});
  fa.weights = TensorView(wts, DType::f32, {T, kk});
  fa.expanded_row_idx = TensorView(rix, DType::s32, {T * kk});
  Workspace s = sub();
  moe_finalize_routing(ctx, fa, out, &s);
}

}  // namespace qllm
