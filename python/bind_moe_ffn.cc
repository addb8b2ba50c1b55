// Bindings of SPEC sections 1-3: grouped_matmul, the quantisation/activation operators, the fused
// expert FFN and the packed weights they take.
#include "common.h"

namespace qllm::pybind {
namespace {

py::array py_grouped_matmul(const py::object& x, const py::object& w, const py::object& group_list,
                            const py::object& bias, const py::object& scale, const py::object& per_token_scale,
                            const std::string& group_list_type, bool transpose_w, const py::object& out_dtype,
                            const PackedWeight* packed_w) {
  constexpr const char* op = "grouped_matmul";
  const Arg xa = to_arg(x, op, "x");
  std::optional<Arg> wa;
  if (!w.is_none()) wa = to_arg(w, op, "w");
  const Arg gl = to_arg(group_list, op, "group_list");
  const auto ba = opt_arg(bias, op, "bias"), sa = opt_arg(scale, op, "scale"), pa = opt_arg(per_token_scale, op, "per_token_scale");
  GroupedMatmulArgs a;
  a.x = xa.view();
  a.w = view_or_empty(wa);
  a.packed_w = packed_w;
  a.group_list = gl.view();
  a.bias = view_or_empty(ba);
  a.scale = view_or_empty(sa);
  a.per_token_scale = view_or_empty(pa);
  GroupedMatmulParams p;
  p.group_list_type = parse_glt(group_list_type, op);
  p.transpose_w = transpose_w;
  if (!out_dtype.is_none()) p.out_dtype = parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  else if (xa.dt == DType::s8) p.out_dtype = sa ? DType::f32 : DType::s32;
  else p.out_dtype = xa.dt;
  const int64_t n = packed_w ? packed_w->n() : (a.w.ndim() == 3 ? (transpose_w ? a.w.dim(1) : a.w.dim(2)) : 0);
  if (!packed_w && !wa) throw_invalid(op, "w", "w is required but was not given");
  if (a.x.ndim() != 2) throw_invalid(op, "x", "x must be [m, k], got shape ", a.x.shape_str());
  py::array y = new_array(p.out_dtype, {a.x.dim(0), n});
  const TensorView yv = out_view(y, p.out_dtype);
  {
    py::gil_scoped_release nogil;
    grouped_matmul(ctx(), a, yv, p);
  }
  return y;
}

py::tuple py_dynamic_quant(const py::object& x, const py::object& smooth_scales, const py::object& group_index) {
  constexpr const char* op = "dynamic_quant";
  const Arg xa = to_arg(x, op, "x");
  const auto sa = opt_arg(smooth_scales, op, "smooth_scales"), ga = opt_arg(group_index, op, "group_index");
  DynamicQuantArgs a;
  a.x = xa.view();
  a.smooth_scales = view_or_empty(sa);
  a.group_index = view_or_empty(ga);
  if (a.x.ndim() != 2) throw_invalid(op, "x", "x must be [rows, h], got shape ", a.x.shape_str());
  py::array q = new_array(DType::s8, {a.x.dim(0), a.x.dim(1)});
  py::array s = new_array(DType::f32, {a.x.dim(0)});
  const TensorView qv = out_view(q, DType::s8), sv = out_view(s, DType::f32);
  {
    py::gil_scoped_release nogil;
    dynamic_quant(ctx(), a, qv, sv);
  }
  return py::make_tuple(q, s);
}

py::array py_swiglu(const py::object& x, bool activate_left, const py::object& out_dtype) {
  constexpr const char* op = "swiglu";
  const Arg xa = to_arg(x, op, "x");
  const TensorView xv = xa.view();
  if (xv.ndim() != 2) throw_invalid(op, "x", "x must be [rows, 2h], got shape ", xv.shape_str());
  const DType odt = out_dtype.is_none() ? xa.dt : parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  py::array y = new_array(odt, {xv.dim(0), xv.dim(1) / 2});
  const TensorView yv = out_view(y, odt);
  {
    py::gil_scoped_release nogil;
    swiglu(ctx(), xv, yv, activate_left);
  }
  return y;
}

py::tuple py_swiglu_quant(const py::object& x, bool activate_left) {
  constexpr const char* op = "swiglu_quant";
  const Arg xa = to_arg(x, op, "x");
  const TensorView xv = xa.view();
  if (xv.ndim() != 2) throw_invalid(op, "x", "x must be [rows, 2h], got shape ", xv.shape_str());
  py::array q = new_array(DType::s8, {xv.dim(0), xv.dim(1) / 2});
  py::array s = new_array(DType::f32, {xv.dim(0)});
  const TensorView qv = out_view(q, DType::s8), sv = out_view(s, DType::f32);
  {
    py::gil_scoped_release nogil;
    swiglu_quant(ctx(), xv, qv, sv, activate_left);
  }
  return py::make_tuple(q, s);
}

py::array py_dequant(const py::object& acc, const py::object& scale, const py::object& per_token_scale,
                     const std::string& out_dtype) {
  constexpr const char* op = "dequant";
  const Arg aa = to_arg(acc, op, "acc"), sa = to_arg(scale, op, "scale");
  const auto pa = opt_arg(per_token_scale, op, "per_token_scale");
  const TensorView av = aa.view();
  if (av.ndim() != 2) throw_invalid(op, "acc", "acc must be [rows, n], got shape ", av.shape_str());
  const DType odt = parse_dtype(out_dtype, op, "out_dtype");
  py::array y = new_array(odt, {av.dim(0), av.dim(1)});
  const TensorView yv = out_view(y, odt);
  {
    py::gil_scoped_release nogil;
    dequant(ctx(), av, sa.view(), view_or_empty(pa), yv);
  }
  return y;
}

py::array run_ffn(bool grouped, const py::object& x1, const py::object& weight1, const py::object& scale1,
                  const py::object& per_token_scale1, const py::object& group_list, const py::object& weight2,
                  const py::object& scale2, const std::string& group_list_type, const std::string& weight_up_permute,
                  const std::string& out_dtype, const PackedExpertFFN* packed) {
  const char* op = grouped ? "gmm_deq_swiglu_quant_gmm_deq" : "mm_deq_swiglu_quant_mm_deq";
  const Arg xa = to_arg(x1, op, "x1");
  const auto w1 = opt_arg(weight1, op, "weight1"), s1 = opt_arg(scale1, op, "scale1"), w2 = opt_arg(weight2, op, "weight2"),
             s2 = opt_arg(scale2, op, "scale2"), gl = opt_arg(group_list, op, "group_list");
  const auto pts = opt_arg(per_token_scale1, op, "per_token_scale1");
  MoeFfnArgs a;
  a.x1 = xa.view();
  a.per_token_scale1 = view_or_empty(pts);
  a.group_list = view_or_empty(gl);
  a.weight1 = view_or_empty(w1);
  a.scale1 = view_or_empty(s1);
  a.weight2 = view_or_empty(w2);
  a.scale2 = view_or_empty(s2);
  a.packed = packed;
  MoeFfnParams p;
  p.group_list_type = parse_glt(group_list_type, op);
  p.weight_up_permute = parse_weight_up_permute(weight_up_permute.c_str(), op);
  p.out_dtype = parse_dtype(out_dtype, op, "out_dtype");
  if (a.x1.ndim() != 2) throw_invalid(op, "x1", "x1 must be [m, k1], got shape ", a.x1.shape_str());
  int64_t n2 = 0;
  if (packed) n2 = packed->n2();
  else if (!a.weight2.present()) throw_invalid(op, "weight2", "weight2 is required but was not given");
  else n2 = a.weight2.dim(a.weight2.ndim() >= 2 ? -2 : 0);
  py::array out = new_array(p.out_dtype, {a.x1.dim(0), n2});
  const TensorView ov = out_view(out, p.out_dtype);
  {
    py::gil_scoped_release nogil;
    if (grouped) gmm_deq_swiglu_quant_gmm_deq(ctx(), a, ov, p);
    else mm_deq_swiglu_quant_mm_deq(ctx(), a, ov, p);
  }
  return out;
}

py::tuple py_permute_weight_up(const py::object& w, const py::object& scale, int64_t T) {
  constexpr const char* op = "permute_weight_up";
  const Arg wa = to_arg(w, op, "w");
  const auto sa = opt_arg(scale, op, "scale");
  const TensorView wv = wa.view();
  std::vector<int64_t> shape(wv.shape(), wv.shape() + wv.ndim());
  py::array wo = new_array(wa.dt, shape);
  py::object so = py::none();
  TensorView sov;
  if (sa) {
    const TensorView sv = sa->view();
    py::array s = new_array(DType::f32, std::vector<int64_t>(sv.shape(), sv.shape() + sv.ndim()));
    sov = out_view(s, DType::f32);
    so = s;
  }
  permute_weight_up(wv, view_or_empty(sa), T, out_view(wo, wa.dt), sov);
  return py::make_tuple(wo, so);
}

}  // namespace

void bind_moe_ffn(py::module_& m, py::module_& ops) {
  py::class_<PackedWeight>(m, "PackedWeight", "Grouped weights packed once for grouped_matmul.")
      .def(py::init([](const py::object& w, bool transpose_w) {
             const Arg a = to_arg(w, "PackedWeight", "w");
             return PackedWeight::pack(a.view(), transpose_w, ctx().isa());  // for the module's ISA
           }),
           py::arg("w"), py::arg("transpose_w") = false)
      .def_property_readonly("groups", &PackedWeight::groups)
      .def_property_readonly("k", &PackedWeight::k)
      .def_property_readonly("n", &PackedWeight::n)
      .def_property_readonly("nbytes", &PackedWeight::bytes);

  py::class_<PackedExpertFFN>(m, "PackedExpertFFN", "Expert FFN weights packed once for the fused operator.")
      .def(py::init([](const py::object& w1, const py::object& s1, const py::object& w2, const py::object& s2,
                       const std::string& perm) {
             const char* op = "PackedExpertFFN";
             const Arg a1 = to_arg(w1, op, "weight1"), b1 = to_arg(s1, op, "scale1"), a2 = to_arg(w2, op, "weight2"),
                       b2 = to_arg(s2, op, "scale2");
             return PackedExpertFFN::pack(a1.view(), b1.view(), a2.view(), b2.view(), parse_weight_up_permute(perm.c_str(), op), op,
                                          ctx().isa());
           }),
           py::arg("weight1"), py::arg("scale1"), py::arg("weight2"), py::arg("scale2"), py::arg("weight_up_permute") = "none")
      .def_property_readonly("groups", &PackedExpertFFN::groups)
      .def_property_readonly("k1", &PackedExpertFFN::k1)
      .def_property_readonly("n1", &PackedExpertFFN::n1)
      .def_property_readonly("k2", &PackedExpertFFN::k2)
      .def_property_readonly("n2", &PackedExpertFFN::n2)
      .def_property_readonly("nbytes", &PackedExpertFFN::bytes);

  ops.def("grouped_matmul",
          [](const py::object& x, const py::object& w, const py::object& group_list, const py::object& bias,
             const py::object& scale, const py::object& pts, const std::string& glt, bool tw, const py::object& odt,
             const PackedWeight* packed_w) { return py_grouped_matmul(x, w, group_list, bias, scale, pts, glt, tw, odt, packed_w); },
          py::arg("x"), py::arg("w") = py::none(), py::arg("group_list") = py::none(), py::arg("bias") = py::none(),
          py::arg("scale") = py::none(), py::arg("per_token_scale") = py::none(), py::arg("group_list_type") = "cumsum",
          py::arg("transpose_w") = false, py::arg("out_dtype") = py::none(), py::arg("packed_w") = nullptr,
          "y = x @ w[g] per group. Float path (x, w float; out_dtype defaults to x's dtype) or W8A8 "
          "(x, w int8; out int32 without scale, else dequantised, default float32).");
  ops.def("dynamic_quant", &py_dynamic_quant, py::arg("x"), py::arg("smooth_scales") = py::none(),
          py::arg("group_index") = py::none(), "Per-row symmetric int8 quantisation: returns (q int8, scale float32).");
  ops.def("swiglu", &py_swiglu, py::arg("x"), py::arg("activate_left") = true, py::arg("out_dtype") = py::none(),
          "y = silu(a) * b with (a, b) the halves of x's last axis (swapped if not activate_left).");
  ops.def("swiglu_quant", &py_swiglu_quant, py::arg("x"), py::arg("activate_left") = true,
          "swiglu then dynamic_quant, intermediate in float32: returns (q int8, scale float32).");
  ops.def("dequant", &py_dequant, py::arg("acc"), py::arg("scale"), py::arg("per_token_scale") = py::none(),
          py::arg("out_dtype") = "float32", "y = (float(acc) * scale[c]) * per_token_scale[r].");
  ops.def("gmm_deq_swiglu_quant_gmm_deq",
          [](const py::object& x1, const py::object& w1, const py::object& s1, const py::object& pts, const py::object& gl,
             const py::object& w2, const py::object& s2, const std::string& glt, const std::string& perm,
             const std::string& odt, const PackedExpertFFN* packed) {
            return run_ffn(true, x1, w1, s1, pts, gl, w2, s2, glt, perm, odt, packed);
          },
          py::arg("x1"), py::arg("weight1") = py::none(), py::arg("scale1") = py::none(),
          py::arg("per_token_scale1") = py::none(), py::arg("group_list") = py::none(), py::arg("weight2") = py::none(),
          py::arg("scale2") = py::none(), py::arg("group_list_type") = "cumsum", py::arg("weight_up_permute") = "none",
          py::arg("out_dtype") = "float16", py::arg("packed") = nullptr,
          "The fused int8 expert FFN (SPEC section 3). Pass packed=qllm.PackedExpertFFN(...) instead of the "
          "four weight arguments to pack once and reuse.");
  ops.def("mm_deq_swiglu_quant_mm_deq",
          [](const py::object& x1, const py::object& w1, const py::object& s1, const py::object& pts, const py::object& w2,
             const py::object& s2, const std::string& perm, const std::string& odt, const PackedExpertFFN* packed) {
            return run_ffn(false, x1, w1, s1, pts, py::none(), w2, s2, "cumsum", perm, odt, packed);
          },
          py::arg("x1"), py::arg("weight1") = py::none(), py::arg("scale1") = py::none(),
          py::arg("per_token_scale1") = py::none(), py::arg("weight2") = py::none(), py::arg("scale2") = py::none(),
          py::arg("weight_up_permute") = "none", py::arg("out_dtype") = "float16", py::arg("packed") = nullptr,
          "Single-expert fused FFN: weight1 [k1, n1], scale1 [n1], weight2 [n2, k2], scale2 [n2].");
  ops.def("permute_weight_up", &py_permute_weight_up, py::arg("w"), py::arg("scale") = py::none(), py::arg("T") = 256,
          "Natural [.., k1, n1] gate|up weight (and scale) to the N128/N256 block layout: returns (w, scale).");
}

}  // namespace qllm::pybind
