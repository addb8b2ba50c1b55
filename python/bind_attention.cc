// Bindings of SPEC sections 7-8: norms, rope, flash/paged attention, the KV cache writers and
// the block manager. Operators return new arrays, except the cache writers (reshape_and_cache,
// copy_blocks), which update the cache arrays in place: those must be C-contiguous, writeable
// numpy arrays or contiguous CPU torch tensors.
#include "common.h"

namespace qllm::pybind {
namespace {

// An argument the operator writes into: it must be viewed without a copy.
Arg inplace_arg(const py::object& obj, const char* op, const char* arg) {
  if (py::hasattr(obj, "is_contiguous")) {
    if (!obj.attr("is_contiguous")().cast<bool>())
      throw_invalid(op, arg, arg, " must be a contiguous tensor (it is written in place)");
  } else if (py::isinstance<py::array>(obj)) {
    const py::array a = obj.cast<py::array>();
    if (!(a.flags() & py::array::c_style) || !a.writeable())
      throw_invalid(op, arg, arg, " must be a C-contiguous, writeable array (it is written in place)");
  } else {
    throw_invalid(op, arg, arg, " must be a numpy array or torch tensor (it is written in place)");
  }
  return to_arg(obj, op, arg);
}

KvCache cache_views(const std::vector<Arg>& a) {
  KvCache c;
  c.key_cache = a[0].view();
  c.value_cache = a[1].view();
  if (a.size() > 2) {
    c.k_scale = a[2].view();
    c.v_scale = a[3].view();
  }
  return c;
}

std::vector<Arg> cache_args(const py::object& kc, const py::object& vc, const py::object& ks, const py::object& vs,
                            const char* op, bool inplace) {
  std::vector<Arg> a;
  a.push_back(inplace ? inplace_arg(kc, op, "key_cache") : to_arg(kc, op, "key_cache"));
  a.push_back(inplace ? inplace_arg(vc, op, "value_cache") : to_arg(vc, op, "value_cache"));
  if (!ks.is_none() || !vs.is_none()) {
    if (ks.is_none() || vs.is_none()) throw_invalid(op, ks.is_none() ? "k_scale" : "v_scale", "k_scale and v_scale go together");
    a.push_back(inplace ? inplace_arg(ks, op, "k_scale") : to_arg(ks, op, "k_scale"));
    a.push_back(inplace ? inplace_arg(vs, op, "v_scale") : to_arg(vs, op, "v_scale"));
  }
  return a;
}

AttentionParams attn_params(const py::object& scale, bool causal, int64_t window) {
  AttentionParams p;
  p.scale = scale.is_none() ? 0.0f : scale.cast<float>();
  if (!scale.is_none() && p.scale == 0.0f) throw_invalid("attention", "scale", "scale must be nonzero (None: 1/sqrt(D))");
  p.causal = causal;
  p.window = window;
  return p;
}

std::vector<int64_t> shape_of(const TensorView& t) { return std::vector<int64_t>(t.shape(), t.shape() + t.ndim()); }

DType out_dt(const py::object& out_dtype, DType like, const char* op) {
  return out_dtype.is_none() ? like : parse_dtype(out_dtype.cast<std::string>(), op, "out_dtype");
}

py::array py_norm(int kind, const py::object& x, const py::object& gamma, const py::object& beta, float eps) {
  const char* op = kind == 0 ? "rms_norm" : "layer_norm";
  const Arg xa = to_arg(x, op, "x"), ga = to_arg(gamma, op, "gamma");
  const auto ba = opt_arg(beta, op, "beta");
  const TensorView xv = xa.view();
  py::array y = new_array(xa.dt, shape_of(xv));
  const TensorView yv = out_view(y, xa.dt);
  {
    py::gil_scoped_release nogil;
    if (kind == 0) rms_norm(ctx(), xv, ga.view(), eps, yv);
    else layer_norm(ctx(), xv, ga.view(), view_or_empty(ba), eps, yv);
  }
  return y;
}

py::tuple py_add_rms_norm(const py::object& x, const py::object& residual, const py::object& gamma, float eps) {
  constexpr const char* op = "add_rms_norm";
  const Arg xa = to_arg(x, op, "x"), ra = to_arg(residual, op, "residual"), ga = to_arg(gamma, op, "gamma");
  const TensorView xv = xa.view(), rv = ra.view();
  py::array r = new_array(ra.dt, shape_of(rv));  // the updated residual (the input is not modified)
  std::memcpy(r.mutable_data(), rv.raw(), rv.numel() * dtype_size(ra.dt));
  py::array y = new_array(xa.dt, shape_of(xv));
  const TensorView yv = out_view(y, xa.dt), rout = out_view(r, ra.dt);
  {
    py::gil_scoped_release nogil;
    add_rms_norm(ctx(), xv, rout, ga.view(), eps, yv);
  }
  return py::make_tuple(y, r);
}

py::tuple py_rope(const py::object& q, const py::object& k, const py::object& positions, float theta, int64_t rotary_dim,
                  const std::string& style) {
  constexpr const char* op = "rope";
  RopeParams p;
  p.theta = theta;
  p.rotary_dim = rotary_dim;
  if (style == "neox") p.style = RopeStyle::neox;
  else if (style == "gptj") p.style = RopeStyle::gptj;
  else throw_invalid(op, "style", "style = '", style, "' (expected neox or gptj)");
  const auto qa = opt_arg(q, op, "q"), ka = opt_arg(k, op, "k");
  const Arg pa = to_arg(positions, op, "positions");
  py::object qo = py::none(), ko = py::none();
  TensorView qv, kv;
  if (qa) {
    py::array a = new_array(qa->dt, shape_of(qa->view()));
    std::memcpy(a.mutable_data(), qa->arr.data(), qa->arr.nbytes());
    qv = out_view(a, qa->dt);
    qo = a;
  }
  if (ka) {
    py::array a = new_array(ka->dt, shape_of(ka->view()));
    std::memcpy(a.mutable_data(), ka->arr.data(), ka->arr.nbytes());
    kv = out_view(a, ka->dt);
    ko = a;
  }
  {
    py::gil_scoped_release nogil;
    rope(ctx(), qv, kv, pa.view(), p);
  }
  return py::make_tuple(qo, ko);
}

py::array py_flash(const py::object& q, const py::object& k, const py::object& v, const py::object& cu_q, const py::object& cu_k,
                   bool causal, const py::object& scale, int64_t window, const py::object& out_dtype) {
  constexpr const char* op = "flash_attention";
  const Arg qa = to_arg(q, op, "q"), ka = to_arg(k, op, "k"), va = to_arg(v, op, "v"), cqa = to_arg(cu_q, op, "cu_seqlens_q"),
            cka = to_arg(cu_k, op, "cu_seqlens_k");
  FlashAttentionArgs a;
  a.q = qa.view();
  a.k = ka.view();
  a.v = va.view();
  a.cu_seqlens_q = cqa.view();
  a.cu_seqlens_k = cka.view();
  if (a.q.ndim() != 3) throw_invalid(op, "q", "q must be [Tq, Hq, D], got shape ", a.q.shape_str());
  const DType odt = out_dt(out_dtype, qa.dt, op);
  py::array o = new_array(odt, shape_of(a.q));
  const TensorView ov = out_view(o, odt);
  const AttentionParams p = attn_params(scale, causal, window);
  {
    py::gil_scoped_release nogil;
    flash_attention(ctx(), a, ov, p);
  }
  return o;
}

void py_reshape_and_cache(const py::object& key, const py::object& value, const py::object& kc, const py::object& vc,
                          const py::object& slots, const py::object& ks, const py::object& vs) {
  constexpr const char* op = "reshape_and_cache";
  const Arg ka = to_arg(key, op, "key"), va = to_arg(value, op, "value"), sa = to_arg(slots, op, "slot_mapping");
  const auto c = cache_args(kc, vc, ks, vs, op, true);
  const KvCache cv = cache_views(c);
  py::gil_scoped_release nogil;
  reshape_and_cache(ctx(), ka.view(), va.view(), cv, sa.view());
}

void py_copy_blocks(const py::object& kc, const py::object& vc, const py::object& pairs, const py::object& ks,
                    const py::object& vs) {
  constexpr const char* op = "copy_blocks";
  const Arg pa = to_arg(pairs, op, "block_pairs");
  const auto c = cache_args(kc, vc, ks, vs, op, true);
  const KvCache cv = cache_views(c);
  py::gil_scoped_release nogil;
  copy_blocks(ctx(), cv, pa.view());
}

py::array py_paged(bool prefill, const py::object& q, const py::object& cu_q, const py::object& kc, const py::object& vc,
                   const py::object& bt, const py::object& cl, const py::object& ks, const py::object& vs, const py::object& scale,
                   int64_t window, const py::object& out_dtype) {
  const char* op = prefill ? "paged_prefill_attention" : "paged_attention";
  const Arg qa = to_arg(q, op, "q"), ba = to_arg(bt, op, "block_tables"), la = to_arg(cl, op, "context_lens");
  const auto ca = opt_arg(cu_q, op, "cu_seqlens_q");
  const auto c = cache_args(kc, vc, ks, vs, op, false);
  const TensorView qv = qa.view();
  if (qv.ndim() != 3) throw_invalid(op, "q", "q must be 3-d [tokens, Hq, D], got shape ", qv.shape_str());
  const DType odt = out_dt(out_dtype, qa.dt, op);
  py::array o = new_array(odt, shape_of(qv));
  const TensorView ov = out_view(o, odt);
  const AttentionParams p = attn_params(scale, true, window);
  const KvCache cv = cache_views(c);
  py::gil_scoped_release nogil;
  if (prefill) {
    PagedPrefillArgs a;
    a.q = qv;
    a.cu_seqlens_q = ca ? ca->view() : TensorView();
    a.cache = cv;
    a.block_tables = ba.view();
    a.context_lens = la.view();
    paged_prefill_attention(ctx(), a, ov, p);
  } else {
    PagedAttentionArgs a;
    a.q = qv;
    a.cache = cv;
    a.block_tables = ba.view();
    a.context_lens = la.view();
    paged_attention(ctx(), a, ov, p);
  }
  return o;
}

}  // namespace

void bind_attention(py::module_& m, py::module_& ops) {
  ops.def("rms_norm", [](const py::object& x, const py::object& g, float eps) { return py_norm(0, x, g, py::none(), eps); },
          py::arg("x"), py::arg("gamma"), py::arg("eps") = 1e-6f, "x * rsqrt(mean(x^2) + eps) * gamma over the last axis.");
  ops.def("add_rms_norm", &py_add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("gamma"), py::arg("eps") = 1e-6f,
          "(rms_norm(residual + x), residual + x); the inputs are not modified.");
  ops.def("layer_norm", [](const py::object& x, const py::object& g, const py::object& b, float eps) { return py_norm(1, x, g, b, eps); },
          py::arg("x"), py::arg("gamma"), py::arg("beta") = py::none(), py::arg("eps") = 1e-5f);
  ops.def("rope", &py_rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("theta") = 10000.0f,
          py::arg("rotary_dim") = 0, py::arg("style") = "neox", "Rotary embedding; returns (q, k) rotated (None stays None).");
  ops.def("flash_attention", &py_flash, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
          py::arg("causal") = false, py::arg("scale") = py::none(), py::arg("window") = 0, py::arg("out_dtype") = py::none());
  ops.def("reshape_and_cache", &py_reshape_and_cache, py::arg("key"), py::arg("value"), py::arg("key_cache"),
          py::arg("value_cache"), py::arg("slot_mapping"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
          "Writes key/value [T, Hkv, D] into the caches (in place) at slot_mapping.");
  ops.def("copy_blocks", &py_copy_blocks, py::arg("key_cache"), py::arg("value_cache"), py::arg("block_pairs"),
          py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  ops.def("paged_attention",
          [](const py::object& q, const py::object& kc, const py::object& vc, const py::object& bt, const py::object& cl,
             const py::object& ks, const py::object& vs, const py::object& scale, int64_t window, const py::object& od) {
            return py_paged(false, q, py::none(), kc, vc, bt, cl, ks, vs, scale, window, od);
          },
          py::arg("q"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"), py::arg("context_lens"),
          py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("scale") = py::none(), py::arg("window") = 0,
          py::arg("out_dtype") = py::none());
  ops.def("paged_prefill_attention",
          [](const py::object& q, const py::object& cu, const py::object& kc, const py::object& vc, const py::object& bt,
             const py::object& cl, const py::object& ks, const py::object& vs, const py::object& scale, int64_t window,
             const py::object& od) { return py_paged(true, q, cu, kc, vc, bt, cl, ks, vs, scale, window, od); },
          py::arg("q"), py::arg("cu_seqlens_q"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"),
          py::arg("context_lens"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(), py::arg("scale") = py::none(),
          py::arg("window") = 0, py::arg("out_dtype") = py::none());

  py::class_<KvBlockManager>(m, "KvBlockManager", "Paged KV cache block tables: fork/prefix sharing, copy-on-write.")
      .def(py::init<int32_t, int32_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("add_sequence", &KvBlockManager::add_sequence, py::arg("seq"))
      .def("fork", &KvBlockManager::fork, py::arg("parent"), py::arg("child"), py::arg("tokens") = -1)
      .def("append", [](KvBlockManager& self, int64_t seq, int64_t n) {
             std::vector<int32_t> slots;
             std::vector<KvBlockManager::Copy> copies;
             self.append(seq, n, slots, copies);
             py::array_t<int32_t> s(static_cast<py::ssize_t>(slots.size()));
             std::copy(slots.begin(), slots.end(), s.mutable_data());
             py::array_t<int32_t> c({static_cast<py::ssize_t>(copies.size()), py::ssize_t{2}});
             for (size_t i = 0; i < copies.size(); ++i) {
               c.mutable_data()[2 * i] = copies[i].src;
               c.mutable_data()[2 * i + 1] = copies[i].dst;
             }
             return py::make_tuple(s, c);
           }, py::arg("seq"), py::arg("n"), "Slots for n more tokens and the (src, dst) block copies to run first.")
      .def("blocks_needed", &KvBlockManager::blocks_needed, py::arg("seq"), py::arg("n"))
      .def("free_sequence", &KvBlockManager::free_sequence, py::arg("seq"))
      .def("block_table", [](const KvBlockManager& self, int64_t seq) {
             const auto& t = self.block_table(seq);
             py::array_t<int32_t> a(static_cast<py::ssize_t>(t.size()));
             std::copy(t.begin(), t.end(), a.mutable_data());
             return a;
           }, py::arg("seq"))
      .def("length", &KvBlockManager::length, py::arg("seq"))
      .def_property_readonly("num_free", [](const KvBlockManager& self) { return self.allocator().num_free(); })
      .def("refcount", [](const KvBlockManager& self, int32_t b) { return self.allocator().refcount(b); }, py::arg("block"));
}

}  // namespace qllm::pybind
