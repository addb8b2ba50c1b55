// Bindings of SPEC section 4 (MoE routing operators) and of the whole MoE block (qllm.MoeLayer).
#include "common.h"

namespace qllm::pybind {
namespace {

py::tuple py_gating(const py::object& logits, int64_t top_k, const std::string& scoring, const py::object& bias,
                    int64_t n_group, int64_t topk_group, bool renormalize, float scale) {
  constexpr const char* op = "moe_gating_topk";
  const Arg la = to_arg(logits, op, "logits");
  const auto ba = opt_arg(bias, op, "e_score_correction_bias");
  MoeGatingArgs a;
  a.logits = la.view();
  a.e_score_correction_bias = view_or_empty(ba);
  MoeGatingParams p;
  p.top_k = top_k;
  p.scoring = parse_scoring_func(scoring, op);
  p.n_group = n_group;
  p.topk_group = topk_group;
  p.renormalize = renormalize;
  p.routed_scaling_factor = scale;
  if (a.logits.ndim() != 2) throw_invalid(op, "logits", "logits must be [T, E], got shape ", a.logits.shape_str());
  const int64_t T = a.logits.dim(0), k = std::max<int64_t>(top_k, 0);
  py::array w = new_array(DType::f32, {T, k}), ids = new_array(DType::s32, {T, k});
  const TensorView wv = out_view(w, DType::f32), iv = out_view(ids, DType::s32);
  {
    py::gil_scoped_release nogil;
    moe_gating_topk(ctx(), a, wv, iv, p);
  }
  return py::make_tuple(w, ids);
}

py::tuple py_init_routing(const py::object& x, const py::object& expert_ids, int64_t num_experts, bool quantize) {
  constexpr const char* op = "moe_init_routing";
  const Arg xa = to_arg(x, op, "x"), ia = to_arg(expert_ids, op, "expert_ids");
  const TensorView xv = xa.view(), iv = ia.view();
  if (xv.ndim() != 2) throw_invalid(op, "x", "x must be [T, h], got shape ", xv.shape_str());
  if (iv.ndim() != 2) throw_invalid(op, "expert_ids", "expert_ids must be [T, k], got shape ", iv.shape_str());
  const int64_t R = iv.dim(0) * iv.dim(1), h = xv.dim(1), E = std::max<int64_t>(num_experts, 0);
  const DType xdt = quantize ? DType::s8 : xa.dt;
  py::array ex = new_array(xdt, {R, h}), idx = new_array(DType::s32, {R}), cnt = new_array(DType::s64, {E}),
            cum = new_array(DType::s64, {E}), src = new_array(DType::s32, {R});
  py::object scale = py::none();
  MoeInitRoutingOutputs o;
  o.expanded_x = out_view(ex, xdt);
  o.expanded_row_idx = out_view(idx, DType::s32);
  o.expert_count = out_view(cnt, DType::s64);
  o.expert_cumsum = out_view(cum, DType::s64);
  o.source_token = out_view(src, DType::s32);
  if (quantize) {
    py::array s = new_array(DType::f32, {R});
    o.expanded_scale = out_view(s, DType::f32);
    scale = s;
  }
  {
    py::gil_scoped_release nogil;
    moe_init_routing(ctx(), xv, iv, num_experts, o, quantize);
  }
  return py::make_tuple(ex, idx, cnt, cum, src, scale);
}

py::array py_gmm_routing(const py::object& ac, const py::object& weight, const py::object& cum, const py::object& index,
                         const std::string& direction, int64_t top_k, bool transpose_b, const py::object& nscale,
                         const py::object& mscale, const py::object& out_dtype) {
  constexpr const char* op = "grouped_matmul_with_routing";
  const Arg aa = to_arg(ac, op, "ac"), wa = to_arg(weight, op, "weight"), ca = to_arg(cum, op, "expert_cumsum"),
            ia = to_arg(index, op, "expert_index");
  const auto na = opt_arg(nscale, op, "nscale"), ma = opt_arg(mscale, op, "mscale");
  GmmRoutingArgs a;
  a.ac = aa.view();
  a.weight = wa.view();
  a.expert_cumsum = ca.view();
  a.expert_index = ia.view();
  a.nscale = view_or_empty(na);
  a.mscale = view_or_empty(ma);
  GmmRoutingParams p;
  if (direction == "up") p.direction = RoutingDirection::up;
  else if (direction == "down") p.direction = RoutingDirection::down;
  else throw_invalid(op, "direction", "direction = '", direction, "' (expected up or down)");
  p.top_k = top_k;
  p.transpose_b = transpose_b;
  if (!out_dtype.is_none()) p.out_dtype = parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  else p.out_dtype = aa.dt == DType::s8 ? DType::f16 : aa.dt;
  if (a.ac.ndim() != 2) throw_invalid(op, "ac", "ac must be 2-d, got shape ", a.ac.shape_str());
  if (a.weight.ndim() != 3) throw_invalid(op, "weight", "weight must be [E, n, k] or [E, k, n], got shape ", a.weight.shape_str());
  if (top_k < 1) throw_invalid(op, "top_k", "top_k = ", top_k, " must be >= 1");
  const int64_t n = transpose_b ? a.weight.dim(1) : a.weight.dim(2);
  const bool up = p.direction == RoutingDirection::up;
  if (!up && a.ac.dim(0) % top_k != 0)
    throw_invalid(op, "ac", "DOWN: ac's rows ", a.ac.dim(0), " are not a multiple of top_k = ", top_k);
  const int64_t orows = up ? a.ac.dim(0) * top_k : a.ac.dim(0) / top_k;
  py::array out = new_array(p.out_dtype, {orows, n});
  const TensorView ov = out_view(out, p.out_dtype);
  {
    py::gil_scoped_release nogil;
    grouped_matmul_with_routing(ctx(), a, ov, p);
  }
  return out;
}

py::array py_finalize(const py::object& rows, const py::object& weights, const py::object& idx, const py::object& bias,
                      const py::object& expert_ids, const py::object& skip, const py::object& out_dtype) {
  constexpr const char* op = "moe_finalize_routing";
  const Arg ra = to_arg(rows, op, "rows"), wa = to_arg(weights, op, "weights"), ia = to_arg(idx, op, "expanded_row_idx");
  const auto ba = opt_arg(bias, op, "bias"), ea = opt_arg(expert_ids, op, "expert_ids"), sa = opt_arg(skip, op, "skip");
  MoeFinalizeArgs a;
  a.rows = ra.view();
  a.weights = wa.view();
  a.expanded_row_idx = ia.view();
  a.bias = view_or_empty(ba);
  a.expert_ids = view_or_empty(ea);
  a.skip = view_or_empty(sa);
  if (a.rows.ndim() != 2) throw_invalid(op, "rows", "rows must be [R, h], got shape ", a.rows.shape_str());
  if (a.weights.ndim() != 2) throw_invalid(op, "weights", "weights must be [T, k], got shape ", a.weights.shape_str());
  const DType odt = out_dtype.is_none() ? ra.dt : parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  py::array out = new_array(odt, {a.weights.dim(0), a.rows.dim(1)});
  const TensorView ov = out_view(out, odt);
  {
    py::gil_scoped_release nogil;
    moe_finalize_routing(ctx(), a, ov);
  }
  return out;
}

// A Hugging Face config dict (DeepSeek-V3, Qwen2/3-MoE or Mixtral names) to MoeLayerConfig.
MoeLayerConfig config_from_dict(const py::dict& d) {
  constexpr const char* op = "MoeLayer";
  auto get_i = [&](std::initializer_list<const char*> keys, int64_t dflt) {
    for (const char* k : keys)
      if (d.contains(k) && !d[k].is_none()) return d[k].cast<int64_t>();
    return dflt;
  };
  MoeLayerConfig c;
  c.hidden_size = get_i({"hidden_size"}, 0);
  c.num_experts = get_i({"num_experts", "n_routed_experts", "num_local_experts"}, 0);
  c.num_experts_per_tok = get_i({"num_experts_per_tok"}, 1);
  c.n_group = get_i({"n_group"}, 1);
  c.topk_group = get_i({"topk_group"}, 1);
  c.moe_intermediate_size = get_i({"moe_intermediate_size", "intermediate_size"}, 0);
  c.n_shared_experts = get_i({"n_shared_experts"}, 0);
  c.shared_expert_intermediate_size = get_i({"shared_expert_intermediate_size"}, 0);
  if (d.contains("norm_topk_prob")) c.norm_topk_prob = d["norm_topk_prob"].cast<bool>();
  if (d.contains("routed_scaling_factor")) c.routed_scaling_factor = d["routed_scaling_factor"].cast<float>();
  if (d.contains("scoring_func")) c.scoring_func = parse_scoring_func(d["scoring_func"].cast<std::string>(), op);
  return c;
}

}  // namespace

void bind_moe_routing(py::module_& m, py::module_& ops) {
  ops.def("moe_gating_topk", &py_gating, py::arg("logits"), py::arg("top_k"), py::arg("scoring_func") = "softmax",
          py::arg("e_score_correction_bias") = py::none(), py::arg("n_group") = 1, py::arg("topk_group") = 1,
          py::arg("renormalize") = false, py::arg("routed_scaling_factor") = 1.0f,
          "Expert choice per token: returns (weights float32 [T, k], expert_ids int32 [T, k]), best first, "
          "ties to the lower id.");
  ops.def("moe_init_routing", &py_init_routing, py::arg("x"), py::arg("expert_ids"), py::arg("num_experts"),
          py::arg("quantize") = false,
          "Gather token rows by expert: returns (expanded_x, expanded_row_idx, expert_count, expert_cumsum, "
          "source_token, expanded_scale or None).");
  ops.def("grouped_matmul_with_routing", &py_gmm_routing, py::arg("ac"), py::arg("weight"), py::arg("expert_cumsum"),
          py::arg("expert_index"), py::arg("direction") = "up", py::arg("top_k") = 1, py::arg("transpose_b") = true,
          py::arg("nscale") = py::none(), py::arg("mscale") = py::none(), py::arg("out_dtype") = py::none(),
          "ATB GroupedMatmulWithRouting: UP out[i] = ac[expert_index[i]] @ W_e, DOWN out[expert_index[i]] += ac[i] @ W_e.");
  ops.def("moe_finalize_routing", &py_finalize, py::arg("rows"), py::arg("weights"), py::arg("expanded_row_idx"),
          py::arg("bias") = py::none(), py::arg("expert_ids") = py::none(), py::arg("skip") = py::none(),
          py::arg("out_dtype") = py::none(),
          "out[t] = skip[t] + sum_j weights[t, j] * (rows[expanded_row_idx[t*k + j]] + bias[expert]).");

  py::class_<MoeLayer>(m, "MoeLayer", "A whole MoE block (router, gating, experts, shared expert, combine).")
      .def(py::init([](const py::dict& config, const py::dict& weights, const std::string& experts) {
             const char* op = "MoeLayer";
             const MoeLayerConfig c = config_from_dict(config);
             // Keep the converted arrays alive while the layer is built (packing copies them).
             std::vector<Arg> keep;
             auto w = [&](const char* name) -> TensorView {
               if (!weights.contains(name) || weights[name].is_none()) return TensorView();
               keep.push_back(to_arg(weights[name], op, name));
               return keep.back().view();
             };
             for (auto item : weights) {
               const std::string k = py::str(item.first);
               static const char* known[] = {"router", "e_score_correction_bias", "gate_proj", "up_proj", "down_proj",
                                             "shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate"};
               bool ok = false;
               for (const char* kn : known) ok = ok || k == kn;
               if (!ok) throw_invalid(op, "weights", "unknown weight '", k, "'");
             }
             keep.reserve(9);
             MoeLayerHfWeights hw;
             hw.router = w("router");
             hw.e_score_correction_bias = w("e_score_correction_bias");
             hw.gate_proj = w("gate_proj");
             hw.up_proj = w("up_proj");
             hw.down_proj = w("down_proj");
             hw.shared_gate_proj = w("shared_gate_proj");
             hw.shared_up_proj = w("shared_up_proj");
             hw.shared_down_proj = w("shared_down_proj");
             hw.shared_expert_gate = w("shared_expert_gate");
             py::gil_scoped_release nogil;
             return MoeLayer::from_hf(c, hw, parse_moe_experts(experts.c_str(), op), ctx().isa());
           }),
           py::arg("config"), py::arg("weights"), py::arg("experts") = "w8a8",
           "config: a Hugging Face config dict (DeepSeek-V3, Qwen2/3-MoE or Mixtral keys). weights: router, "
           "gate_proj/up_proj [E, I, h], down_proj [E, h, I], optional e_score_correction_bias and shared_* "
           "(HF layouts). experts: 'w8a8' (quantised per channel at build), 'float32' or 'bfloat16'.")
      .def("__call__", [](const MoeLayer& L, const py::object& x, const py::object& out_dtype) {
             const char* op = "MoeLayer";
             const Arg xa = to_arg(x, op, "x");
             const TensorView xv = xa.view();
             if (xv.ndim() != 2) throw_invalid(op, "x", "x must be [T, hidden_size], got shape ", xv.shape_str());
             const DType odt = out_dtype.is_none() ? xa.dt : parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
             py::array out = new_array(odt, {xv.dim(0), xv.dim(1)});
             const TensorView ov = out_view(out, odt);
             {
               py::gil_scoped_release nogil;
               L.forward(ctx(), xv, ov);
             }
             return out;
           }, py::arg("x"), py::arg("out_dtype") = py::none(), "Runs the block on x [T, hidden] (float32 or bfloat16).")
      .def_property_readonly("weight_bytes", &MoeLayer::weight_bytes)
      .def_property_readonly("expert_bytes", &MoeLayer::expert_bytes);
}

}  // namespace qllm::pybind
