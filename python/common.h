// Shared plumbing of the Python bindings: the module's context, input conversion (numpy arrays,
// CPU torch tensors, bfloat16 as bits) and output allocation. Each operator family binds itself
// in its own bind_*.cc through one of the functions declared at the end.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qllm/qllm.h"

namespace qllm::pybind {

namespace py = pybind11;

// The module's context: created on first use from QLLM_NUM_THREADS / QLLM_ISA, replaceable
// (set_threads / set_isa). Defined once, in qllm_module.cc.
std::unique_ptr<Context>& ctx_slot();
Context& ctx();


// An input held as a contiguous numpy array plus the qllm dtype it stands for.
struct Arg {
  py::array arr;
  DType dt = DType::f32;
  TensorView view() const {
    std::vector<int64_t> shape(arr.shape(), arr.shape() + arr.ndim());
    if (shape.empty()) shape.push_back(1);
    return TensorView(arr.data(), dt, shape.data(), static_cast<int>(shape.size()));
  }
};

inline DType numpy_dtype(const py::array& a, const char* op, const char* arg) {
  const py::dtype d = a.dtype();
  const char k = d.kind();
  const auto sz = d.itemsize();
  if (k == 'f' && sz == 4) return DType::f32;
  if (k == 'f' && sz == 2) return DType::f16;
  if (k == 'i' && sz == 1) return DType::s8;
  if (k == 'i' && sz == 4) return DType::s32;
  if (k == 'i' && sz == 8) return DType::s64;
  if (k == 'u' && sz == 1) return DType::u8;
  throw_invalid(op, arg, arg, " has numpy dtype ", std::string(py::str(static_cast<const py::handle&>(d))),
                ", which qllm does not take (float32, float16, bfloat16, int8, int32, int64, uint8)");
}

inline Arg to_arg(const py::handle& obj, const char* op, const char* arg) {
  Arg out;
  py::object o = py::reinterpret_borrow<py::object>(obj);
  bool bf16 = false;
  if (py::hasattr(o, "detach") && py::hasattr(o, "numpy")) {  // a torch tensor
    const std::string dev = py::str(o.attr("device"));
    if (dev != "cpu") throw_invalid(op, arg, arg, " is a torch tensor on ", dev, "; qllm runs on CPU tensors");
    o = o.attr("detach")();
    if (std::string(py::str(o.attr("dtype"))) == "torch.bfloat16") {
      py::object torch = py::module_::import("torch");
      o = o.attr("view")(torch.attr("int16"));
      bf16 = true;
    }
    o = o.attr("numpy")();
  }
  if (!py::isinstance<py::array>(o)) o = py::module_::import("numpy").attr("asarray")(o);
  py::array a = o.cast<py::array>();
  if (!(a.flags() & py::array::c_style)) a = py::module_::import("numpy").attr("ascontiguousarray")(a);
  const py::dtype d = a.dtype();
  // bfloat16 travels as its bits: a torch.bfloat16 tensor, or a np.uint16 array (qllm's own
  // bfloat16 outputs are returned that way).
  if (bf16 || (d.kind() == 'u' && d.itemsize() == 2)) out.dt = DType::bf16;
  else out.dt = numpy_dtype(a, op, arg);
  out.arr = a;
  return out;
}

inline std::optional<Arg> opt_arg(const py::object& obj, const char* op, const char* arg) {
  if (obj.is_none()) return std::nullopt;
  return to_arg(obj, op, arg);
}
inline TensorView view_or_empty(const std::optional<Arg>& a) { return a ? a->view() : TensorView(); }

inline py::array new_array(DType dt, std::vector<int64_t> shape) {
  std::vector<py::ssize_t> s(shape.begin(), shape.end());
  switch (dt) {
    case DType::f32: return py::array_t<float>(s);
    case DType::f16: return py::array(py::dtype("float16"), s);
    case DType::bf16: return py::array_t<uint16_t>(s);
    case DType::s8: return py::array_t<int8_t>(s);
    case DType::s32: return py::array_t<int32_t>(s);
    case DType::s64: return py::array_t<int64_t>(s);
    default: return py::array_t<uint8_t>(s);
  }
}
inline TensorView out_view(py::array& a, DType dt) {
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  return TensorView(a.mutable_data(), dt, shape.data(), static_cast<int>(shape.size()));
}

inline GroupListType parse_glt(const std::string& s, const char* op) {
  if (s == "cumsum") return GroupListType::cumsum;
  if (s == "count") return GroupListType::count;
  throw_invalid(op, "group_list_type", "group_list_type = '", s, "' (expected cumsum or count)");
}

// Binders, one per operator family; `m` is the module, `ops` its qllm.ops submodule.
void bind_moe_ffn(py::module_& m, py::module_& ops);
void bind_moe_routing(py::module_& m, py::module_& ops);
void bind_weight_quant(py::module_& m, py::module_& ops);
void bind_sparse24(py::module_& m, py::module_& ops);
void bind_attention(py::module_& m, py::module_& ops);

}  // namespace qllm::pybind
