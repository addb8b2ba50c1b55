// Python bindings: `import qllm`; operators under `qllm.ops`, with SPEC's argument names.
//
// Inputs: numpy arrays, or anything numpy can view (CPU torch tensors are converted with
// .detach().numpy(); a torch.bfloat16 tensor is read through its bits). Non-contiguous arrays
// are copied to contiguous ones. Outputs are numpy arrays; bfloat16 outputs are np.uint16 arrays
// holding the bf16 bits (torch.from_numpy(y).view(torch.bfloat16) gives the tensor).
// Errors raise qllm.Error (a ValueError) with the operator's message. The GIL is released while
// an operator runs.
#include "common.h"

namespace qllm::pybind {

std::unique_ptr<Context>& ctx_slot() {
  static std::unique_ptr<Context> c;
  return c;
}
Context& ctx() {
  if (!ctx_slot()) ctx_slot() = std::make_unique<Context>();
  return *ctx_slot();
}

}  // namespace qllm::pybind

using namespace qllm;
using namespace qllm::pybind;

PYBIND11_MODULE(qllm, m) {
  m.doc() = "qllm: fast quantised MoE inference on CPUs (operators in qllm.ops)";
  static py::exception<Error> error(m, "Error", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      error(e.what());
    }
  });

  m.def("set_threads", [](int n) { ctx_slot() = std::make_unique<Context>(ContextOptions{n, true, Isa::ref}); },
        py::arg("n"), "Use n threads (0: QLLM_NUM_THREADS or physical cores).");
  m.def("set_isa", [](const std::string& isa) {
    ctx_slot() = std::make_unique<Context>(ContextOptions{ctx().threads(), false, parse_isa(isa)});
  }, py::arg("isa"), "Force the kernels: 'ref', 'avx2' or 'avx512'.");
  m.def("info", [] {
    py::dict d;
    d["isa"] = isa_name(ctx().isa());
    d["threads"] = ctx().threads();
    py::list s;
    for (Isa i : supported_isas()) s.append(isa_name(i));
    d["supported_isas"] = s;
    d["cpu"] = cpu_features().brand;
    d["packed_layout_version"] = kPackedLayoutVersion;
    return d;
  });

  py::module_ ops = m.def_submodule("ops", "qllm operators (see docs/operators.md)");
  bind_moe_ffn(m, ops);
  bind_moe_routing(m, ops);
  bind_weight_quant(m, ops);
  bind_sparse24(m, ops);
  bind_attention(m, ops);
}
