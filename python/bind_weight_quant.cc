// Bindings of SPEC section 5: weight_quant_matmul, quantize_weight, dequantize_weight and the
// packed weight. 4-bit weights (s4x2) travel as uint8 arrays of the packed bytes (two int4 per
// byte, element 2i in the low nibble); int8 arrays are s8 weights.
#include "common.h"

namespace qllm::pybind {
namespace {

Arg weight_arg(const py::object& w, const char* op) {
  Arg a = to_arg(w, op, "w");
  if (a.dt == DType::u8) a.dt = DType::s4x2;
  return a;
}

py::array py_weight_quant_matmul(const py::object& x, const py::object& w, const py::object& scale, const py::object& offset,
                                 const py::object& bias, int64_t group_size, bool transpose_w, const py::object& out_dtype,
                                 const PackedQuantWeight* packed_w) {
  constexpr const char* op = "weight_quant_matmul";
  const Arg xa = to_arg(x, op, "x");
  std::optional<Arg> wa;
  if (!w.is_none()) wa = weight_arg(w, op);
  const auto sa = opt_arg(scale, op, "scale"), oa = opt_arg(offset, op, "offset"), ba = opt_arg(bias, op, "bias");
  WeightQuantMatmulArgs a;
  a.x = xa.view();
  a.w = view_or_empty(wa);
  a.scale = view_or_empty(sa);
  a.offset = view_or_empty(oa);
  a.bias = view_or_empty(ba);
  a.packed_w = packed_w;
  WeightQuantMatmulParams p;
  p.transpose_w = transpose_w;
  p.group_size = group_size;
  if (!packed_w && !wa) throw_invalid(op, "w", "w (with scale) or packed_w is required");
  if (a.x.ndim() != 2) throw_invalid(op, "x", "x must be [m, k], got shape ", a.x.shape_str());
  const DType odt = out_dtype.is_none() ? xa.dt : parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  int64_t n = 0;
  if (packed_w) n = packed_w->n();
  else if (a.w.ndim() == 2) n = (transpose_w ? a.w.dim(0) : a.w.dim(1)) * (a.w.dtype() == DType::s4x2 && !transpose_w ? 2 : 1);
  py::array y = new_array(odt, {a.x.dim(0), n});
  const TensorView yv = out_view(y, odt);
  {
    py::gil_scoped_release nogil;
    weight_quant_matmul(ctx(), a, yv, p);
  }
  return y;
}

py::tuple py_quantize_weight(const py::object& w, int bits, int64_t group_size, bool symmetric, bool transpose_w) {
  constexpr const char* op = "quantize_weight";
  const Arg wa = to_arg(w, op, "w");
  const TensorView wv = wa.view();
  if (wv.ndim() != 2) throw_invalid(op, "w", "w must be 2-d ([k, n], or [n, k] with transpose_w), got shape ", wv.shape_str());
  if (bits != 8 && bits != 4) throw_invalid(op, "bits", "bits must be 8 or 4, got ", bits);
  const int64_t k = transpose_w ? wv.dim(1) : wv.dim(0), n = transpose_w ? wv.dim(0) : wv.dim(1);
  if (bits == 4 && wv.dim(1) % 2 == 1)
    throw_invalid(op, "w", "bits = 4 packs two values per byte along w's last axis, which has odd size ", wv.dim(1),
                  " (shape ", wv.shape_str(), "); pad it to an even size");
  if (group_size < 0 || (group_size > 0 && (group_size % 32 != 0 || group_size > k)))
    throw_invalid(op, "group_size", "group_size must be 0 (per-channel) or a positive multiple of 32 that is <= k = ", k,
                  ", got ", group_size);
  const DType qdt = bits == 8 ? DType::s8 : DType::s4x2;
  py::array q = new_array(bits == 8 ? DType::s8 : DType::u8, {wv.dim(0), bits == 8 ? wv.dim(1) : wv.dim(1) / 2});
  std::vector<int64_t> sshape = group_size ? std::vector<int64_t>{(k + group_size - 1) / group_size, n} : std::vector<int64_t>{n};
  py::array s = new_array(DType::f32, sshape);
  py::object o = py::none();
  TensorView ov;
  if (!symmetric) {
    py::array oarr = new_array(DType::f32, sshape);
    ov = out_view(oarr, DType::f32);
    o = oarr;
  }
  const TensorView qv = out_view(q, qdt), sv = out_view(s, DType::f32);
  QuantizeWeightParams p{bits, group_size, symmetric, transpose_w};
  {
    py::gil_scoped_release nogil;
    quantize_weight(wv, qv, sv, ov, p);
  }
  return py::make_tuple(q, s, o);
}

py::array py_dequantize_weight(const py::object& w, const py::object& scale, const py::object& offset, int64_t group_size,
                               bool transpose_w, const std::string& out_dtype) {
  constexpr const char* op = "dequantize_weight";
  const Arg wa = weight_arg(w, op);
  const Arg sa = to_arg(scale, op, "scale");
  const auto oa = opt_arg(offset, op, "offset");
  const TensorView wv = wa.view();
  if (wv.ndim() != 2) throw_invalid(op, "w", "w must be 2-d, got shape ", wv.shape_str());
  const DType odt = parse_dtype(out_dtype, op, "out_dtype");
  const int64_t d1 = wv.dim(1) * (wv.dtype() == DType::s4x2 ? 2 : 1);
  py::array out = new_array(odt, {wv.dim(0), d1});
  const TensorView outv = out_view(out, odt);
  {
    py::gil_scoped_release nogil;
    dequantize_weight(wv, sa.view(), view_or_empty(oa), outv, group_size, transpose_w);
  }
  return out;
}

}  // namespace

void bind_weight_quant(py::module_& m, py::module_& ops) {
  py::class_<PackedQuantWeight>(m, "PackedQuantWeight",
                                "Weight-only quantised weights (int8, or int4 as uint8 packed pairs) packed once, with "
                                "their scales and offsets, for weight_quant_matmul.")
      .def(py::init([](const py::object& w, const py::object& scale, const py::object& offset, int64_t group_size,
                       bool transpose_w) {
             const char* op = "PackedQuantWeight";
             const Arg wa = weight_arg(w, op), sa = to_arg(scale, op, "scale");
             const auto oa = opt_arg(offset, op, "offset");
             return PackedQuantWeight::pack(wa.view(), sa.view(), view_or_empty(oa), group_size, transpose_w, op);
           }),
           py::arg("w"), py::arg("scale"), py::arg("offset") = py::none(), py::arg("group_size") = 0,
           py::arg("transpose_w") = false)
      .def_property_readonly("bits", &PackedQuantWeight::bits)
      .def_property_readonly("k", &PackedQuantWeight::k)
      .def_property_readonly("n", &PackedQuantWeight::n)
      .def_property_readonly("group_size", &PackedQuantWeight::group_size)
      .def_property_readonly("has_offset", &PackedQuantWeight::has_offset)
      .def_property_readonly("nbytes", &PackedQuantWeight::bytes);

  ops.def("weight_quant_matmul", &py_weight_quant_matmul, py::arg("x"), py::arg("w") = py::none(),
          py::arg("scale") = py::none(), py::arg("offset") = py::none(), py::arg("bias") = py::none(),
          py::arg("group_size") = 0, py::arg("transpose_w") = false, py::arg("out_dtype") = py::none(),
          py::arg("packed_w") = nullptr,
          "y = x @ W' + bias with W' = (w + offset) * scale per channel (group_size 0) or per group of k. "
          "w int8, or uint8 holding packed int4 pairs; [k, n] or [n, k] with transpose_w. out_dtype: x's "
          "dtype (default) or float32.");
  ops.def("quantize_weight", &py_quantize_weight, py::arg("w"), py::arg("bits") = 8, py::arg("group_size") = 0,
          py::arg("symmetric") = true, py::arg("transpose_w") = false,
          "Quantise a float weight: returns (q, scale, offset); q int8 (bits 8) or uint8 packed int4 pairs "
          "(bits 4), offset None when symmetric.");
  ops.def("dequantize_weight", &py_dequantize_weight, py::arg("w"), py::arg("scale"), py::arg("offset") = py::none(),
          py::arg("group_size") = 0, py::arg("transpose_w") = false, py::arg("out_dtype") = "float32",
          "W' = (w + offset) * scale in w's layout (int4 unpacked).");
}

}  // namespace qllm::pybind
