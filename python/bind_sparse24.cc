// Bindings of SPEC section 6: prune_24 / compress_24 / decompress_24, PackedSparse24 and
// sparse24_matmul.
#include "common.h"

namespace qllm::pybind {
namespace {

py::tuple compress(const py::object& w, bool prune) {
  const char* op = prune ? "prune_24" : "compress_24";
  const Arg wa = to_arg(w, op, "w");
  const TensorView wv = wa.view();
  if (wv.ndim() != 2) throw_invalid(op, "w", "w must be [n, k], got shape ", wv.shape_str());
  const int64_t n = wv.dim(0), k = wv.dim(1);
  py::array vals = new_array(wa.dt, {n, k / 2});
  py::array meta = new_array(DType::u8, {n, sparse24_meta_cols(k)});
  const TensorView vv = out_view(vals, wa.dt), mv = out_view(meta, DType::u8);
  {
    py::gil_scoped_release nogil;
    if (prune) prune_24(wv, vv, mv);
    else compress_24(wv, vv, mv);
  }
  return py::make_tuple(vals, meta);
}

py::array py_decompress(const py::object& values, const py::object& meta) {
  constexpr const char* op = "decompress_24";
  const Arg va = to_arg(values, op, "values"), ma = to_arg(meta, op, "meta");
  const TensorView vv = va.view();
  if (vv.ndim() != 2) throw_invalid(op, "values", "values must be [n, k/2], got shape ", vv.shape_str());
  py::array w = new_array(va.dt, {vv.dim(0), 2 * vv.dim(1)});
  const TensorView wv = out_view(w, va.dt);
  {
    py::gil_scoped_release nogil;
    decompress_24(vv, ma.view(), wv);
  }
  return w;
}

py::array py_matmul(const py::object& x, const py::object& values, const py::object& meta, const py::object& scale,
                    const py::object& per_token_scale, const py::object& out_dtype, const PackedSparse24* packed) {
  constexpr const char* op = "sparse24_matmul";
  const Arg xa = to_arg(x, op, "x");
  const auto va = opt_arg(values, op, "values"), ma = opt_arg(meta, op, "meta"), sa = opt_arg(scale, op, "scale"),
             pa = opt_arg(per_token_scale, op, "per_token_scale");
  Sparse24MatmulArgs a;
  a.x = xa.view();
  a.values = view_or_empty(va);
  a.meta = view_or_empty(ma);
  a.packed = packed;
  a.scale = view_or_empty(sa);
  a.per_token_scale = view_or_empty(pa);
  Sparse24MatmulParams p;
  if (!out_dtype.is_none()) p.out_dtype = parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
  else if (xa.dt == DType::s8) p.out_dtype = sa ? DType::f32 : DType::s32;
  else p.out_dtype = xa.dt;
  if (!packed && !(va && ma)) throw_invalid(op, "values", "give values and meta, or packed");
  if (a.x.ndim() != 2) throw_invalid(op, "x", "x must be [m, k], got shape ", a.x.shape_str());
  const int64_t n = packed ? packed->n() : (a.values.ndim() >= 1 ? a.values.dim(0) : 0);
  py::array y = new_array(p.out_dtype, {a.x.dim(0), n});
  const TensorView yv = out_view(y, p.out_dtype);
  {
    py::gil_scoped_release nogil;
    sparse24_matmul(ctx(), a, yv, p);
  }
  return y;
}

}  // namespace

void bind_sparse24(py::module_& m, py::module_& ops) {
  py::class_<PackedSparse24>(m, "PackedSparse24", "A 2:4 compressed weight (values, meta) packed once for sparse24_matmul.")
      .def(py::init([](const py::object& values, const py::object& meta) {
             const Arg v = to_arg(values, "PackedSparse24", "values"), mt = to_arg(meta, "PackedSparse24", "meta");
             return PackedSparse24::pack(v.view(), mt.view());
           }),
           py::arg("values"), py::arg("meta"))
      .def_property_readonly("n", &PackedSparse24::n)
      .def_property_readonly("k", &PackedSparse24::k)
      .def_property_readonly("dtype", [](const PackedSparse24& p) { return std::string(dtype_name(p.dtype())); })
      .def_property_readonly("nbytes", &PackedSparse24::bytes);
  ops.def("prune_24", [](const py::object& w) { return compress(w, true); }, py::arg("w"),
          "w [n, k] -> (values [n, k/2], meta [n, ceil(k/8)] uint8), keeping the two largest magnitudes of every "
          "group of 4 (ties: lower position).");
  ops.def("compress_24", [](const py::object& w) { return compress(w, false); }, py::arg("w"),
          "As prune_24 for a weight that is already 2:4 sparse; raises qllm.Error (naming row and group) otherwise.");
  ops.def("decompress_24", &py_decompress, py::arg("values"), py::arg("meta"),
          "(values [n, k/2], meta [n, ceil(k/8)]) -> the dense 2:4 weight [n, k].");
  ops.def("sparse24_matmul", &py_matmul, py::arg("x"), py::arg("values") = py::none(), py::arg("meta") = py::none(),
          py::arg("scale") = py::none(), py::arg("per_token_scale") = py::none(), py::arg("out_dtype") = py::none(),
          py::arg("packed") = nullptr,
          "y = x @ W.T with W the decompressed 2:4 weight. Float x with float values (out_dtype defaults to x's), or "
          "int8 x with int8 values (W8A8: int32 without scale, else (acc * scale[c]) * per_token_scale[r], default "
          "float32). Pass packed=qllm.PackedSparse24(values, meta) to pack once.");
}

}  // namespace qllm::pybind
