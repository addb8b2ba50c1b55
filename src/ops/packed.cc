#include "qllm/ops/packed.h"

#include <cstring>
#include <string>

#include "kernels/kernels.h"
#include "ops/pack_panels.h"
#include "qllm/core/arena.h"
#include "qllm/core/error.h"

namespace qllm {

using kernels::kPanel;

namespace detail {
void AlignedDelete::operator()(uint8_t* p) const { aligned_free(p); }
}  // namespace detail

int64_t permute_block(WeightUpPermute p) {
  switch (p) {
    case WeightUpPermute::n128: return 128;
    case WeightUpPermute::n256: return 256;
    default: return 0;
  }
}

WeightUpPermute parse_weight_up_permute(const char* name, const char* op) {
  const std::string n = name;
  if (n == "none" || n == "NONE") return WeightUpPermute::none;
  if (n == "n128" || n == "N128") return WeightUpPermute::n128;
  if (n == "n256" || n == "N256") return WeightUpPermute::n256;
  throw_invalid(op, "weight_up_permute", "weight_up_permute = '", n, "' (expected none, n128 or n256)");
}

namespace detail {

int64_t panel_group_bytes(DType dt, int64_t k, int64_t n, Int8Layout layout) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t gs = int8_group(layout);
  const int64_t bytes = dt == DType::s8 ? panels * ((k + gs - 1) / gs) * gs * kPanel
                                        : panels * k * kPanel * dtype_size(dt);
  return static_cast<int64_t>(align_up(static_cast<size_t>(bytes)));
}

void pack_panels(const void* w, DType dt, int64_t k, int64_t n_src, bool transposed,
                 const int64_t* slot_col, int64_t nslots, uint8_t* out, Int8Layout layout,
                 int32_t* colsum) {
  const int64_t panels = (nslots + kPanel - 1) / kPanel;
  const int64_t es = dtype_size(dt);
  const uint8_t* src = static_cast<const uint8_t*>(w);
  auto src_at = [&](int64_t kk, int64_t col) -> const uint8_t* {
    return src + (transposed ? col * k + kk : kk * n_src + col) * es;
  };
  if (dt == DType::s8) {
    const int64_t gs = int8_group(layout), kg = (k + gs - 1) / gs;
    for (int64_t p = 0; p < panels; ++p) {
      int8_t* pp = reinterpret_cast<int8_t*>(out) + p * kg * gs * kPanel;
      for (int64_t s = 0; s < kPanel; ++s) {
        const int64_t slot = p * kPanel + s;
        const int64_t col = slot < nslots ? (slot_col ? slot_col[slot] : slot) : -1;
        int32_t sum = 0;
        for (int64_t kk = 0; kk < gs * kg; ++kk) {
          const int8_t v = (col >= 0 && kk < k) ? *reinterpret_cast<const int8_t*>(src_at(kk, col)) : 0;
          pp[(kk / gs) * gs * kPanel + s * gs + (kk % gs)] = v;
          sum += v;
        }
        if (colsum) colsum[slot] = sum;
      }
    }
    return;
  }
  for (int64_t p = 0; p < panels; ++p) {
    uint8_t* pp = out + p * k * kPanel * es;
    for (int64_t s = 0; s < kPanel; ++s) {
      const int64_t slot = p * kPanel + s;
      const int64_t col = slot < nslots ? (slot_col ? slot_col[slot] : slot) : -1;
      for (int64_t kk = 0; kk < k; ++kk) {
        uint8_t* d = pp + (kk * kPanel + s) * es;
        if (col >= 0) std::memcpy(d, src_at(kk, col), es);
        else std::memset(d, 0, es);
      }
    }
  }
}

}  // namespace detail

// ---- PackedWeight ------------------------------------------------------------------------

namespace {

struct WeightDims { int64_t g, k, n; };

WeightDims weight_dims(const char* op, const TensorView& w, bool transpose_w) {
  check::present(op, "w", w);
  if (w.ndim() != 2 && w.ndim() != 3)
    throw_invalid(op, "w", "w must be [G, k, n] (or [G, n, k] with transpose_w), got shape ", w.shape_str());
  if (w.dtype() != DType::s8 && !is_float(w.dtype()))
    throw_invalid(op, "w", "w must be int8, float32, float16 or bfloat16, got ", dtype_name(w.dtype()));
  check::contiguous(op, "w", w);
  const int64_t g = w.ndim() == 3 ? w.dim(0) : 1;
  const int64_t a = w.dim(-2), b = w.dim(-1);
  return transpose_w ? WeightDims{g, b, a} : WeightDims{g, a, b};
}

}  // namespace

namespace {
// Bytes of the column sums stored after an int8 group's panels (one s32 per slot).
int64_t colsum_bytes(DType dt, int64_t n) {
  return dt == DType::s8 ? static_cast<int64_t>(align_up(static_cast<size_t>((n + kPanel - 1) / kPanel * kPanel * 4))) : 0;
}
}  // namespace

size_t PackedWeight::packed_bytes(DType dtype, int64_t groups, int64_t k, int64_t n, Int8Layout layout) {
  return static_cast<size_t>(groups * (detail::panel_group_bytes(dtype, k, n, layout) + colsum_bytes(dtype, n)));
}

void PackedWeight::init(const TensorView& w, bool transpose_w, uint8_t* memory, Int8Layout layout) {
  const WeightDims d = weight_dims("PackedWeight", w, transpose_w);
  dtype_ = w.dtype();
  layout_ = layout;
  groups_ = d.g;
  k_ = d.k;
  n_ = d.n;
  panel_bytes_ = detail::panel_group_bytes(dtype_, k_, n_, layout_);
  group_bytes_ = panel_bytes_ + colsum_bytes(dtype_, n_);
  const int64_t src_group = k_ * n_ * dtype_size(dtype_);
  data_ = memory;
  for (int64_t g = 0; g < groups_; ++g)
    detail::pack_panels(w.data<uint8_t>() + g * src_group, dtype_, k_, n_, transpose_w, nullptr, n_,
                        memory + g * group_bytes_, layout_,
                        dtype_ == DType::s8 ? const_cast<int32_t*>(colsum(g)) : nullptr);
}

PackedWeight PackedWeight::pack(const TensorView& w, bool transpose_w, Isa isa) {
  const WeightDims d = weight_dims("PackedWeight", w, transpose_w);
  const Int8Layout layout = int8_layout_for(isa);
  PackedWeight pw;
  pw.owned_.reset(static_cast<uint8_t*>(aligned_malloc(packed_bytes(w.dtype(), d.g, d.k, d.n, layout))));
  pw.init(w, transpose_w, pw.owned_.get(), layout);
  return pw;
}

PackedWeight PackedWeight::pack_into(const TensorView& w, bool transpose_w, void* memory, Int8Layout layout) {
  PackedWeight pw;
  pw.init(w, transpose_w, static_cast<uint8_t*>(memory), layout);
  return pw;
}

// ---- PackedExpertFFN ---------------------------------------------------------------------

PackedExpertFFN PackedExpertFFN::pack(const TensorView& weight1, const TensorView& scale1,
                                      const TensorView& weight2, const TensorView& scale2,
                                      WeightUpPermute permute, const char* op, Isa isa) {
  check::dtype(op, "weight1", weight1, DType::s8);
  check::dtype(op, "scale1", scale1, DType::f32);
  check::dtype(op, "weight2", weight2, DType::s8);
  check::dtype(op, "scale2", scale2, DType::f32);
  const bool grouped = weight1.ndim() == 3;
  if (weight1.ndim() != 2 && weight1.ndim() != 3)
    throw_invalid(op, "weight1", "weight1 must be [G, k1, n1], got shape ", weight1.shape_str());
  const int64_t G = grouped ? weight1.dim(0) : 1;
  const int64_t k1 = weight1.dim(-2), n1 = weight1.dim(-1);
  if (G < 1) throw_invalid(op, "weight1", "weight1 must hold at least one expert, got shape ", weight1.shape_str());
  if (k1 < 1) throw_invalid(op, "weight1", "k1 = weight1.shape[-2] must be >= 1, got ", k1);
  if (n1 < 2 || n1 % 2 != 0) throw_invalid(op, "weight1", "n1 = weight1.shape[-1] must be even and >= 2 (gate and up halves), got ", n1);
  const int64_t T = permute_block(permute);
  if (T && n1 % T != 0)
    throw_invalid(op, "weight1", "n1 = ", n1, " must be a multiple of the permute block T = ", T);
  // s32 accumulation is exact while k * 128 * 128 < 2^31.
  if (k1 > 131072) throw_invalid(op, "weight1", "k1 = ", k1, " exceeds 131072, where s32 accumulation could overflow");
  const int64_t k2 = n1 / 2;
  if (grouped) {
    check::shape(op, "scale1", scale1, {G, n1});
    check::ndim(op, "weight2", weight2, 3);
    if (weight2.dim(0) != G || weight2.dim(2) != k2)
      throw_invalid(op, "weight2", "weight2 must be [G, n2, k2] = [", G, ", n2, ", k2, "] (k2 = n1 / 2), got ", weight2.shape_str());
  } else {
    check::shape(op, "scale1", scale1, {n1});
    check::ndim(op, "weight2", weight2, 2);
    if (weight2.dim(1) != k2)
      throw_invalid(op, "weight2", "weight2 must be [n2, k2] with k2 = n1 / 2 = ", k2, ", got ", weight2.shape_str());
  }
  check::contiguous(op, "weight1", weight1);
  check::contiguous(op, "weight2", weight2);
  const int64_t n2 = weight2.dim(-2);
  if (n2 < 1) throw_invalid(op, "weight2", "n2 = weight2.shape[-2] must be >= 1, got ", n2);
  if (grouped) check::shape(op, "scale2", scale2, {G, n2});
  else check::shape(op, "scale2", scale2, {n2});

  PackedExpertFFN f;
  f.groups_ = G; f.k1_ = k1; f.n1_ = n1; f.k2_ = k2; f.n2_ = n2;
  f.layout_ = int8_layout_for(isa);
  // weight1 slots: panel p holds natural gate columns 8p..8p+7 then up columns 8p..8p+7.
  const int64_t panels1 = (k2 + kPanel / 2 - 1) / (kPanel / 2);
  const int64_t slots1 = panels1 * kPanel;
  const int64_t panels2 = (n2 + kPanel - 1) / kPanel;
  f.part_bytes_[0] = static_cast<size_t>(detail::panel_group_bytes(DType::s8, k1, slots1, f.layout_));
  f.part_bytes_[1] = align_up(static_cast<size_t>(slots1) * sizeof(float));
  f.part_bytes_[2] = align_up(static_cast<size_t>(slots1) * sizeof(int32_t));
  f.part_bytes_[3] = static_cast<size_t>(detail::panel_group_bytes(DType::s8, k2, n2, f.layout_));
  f.part_bytes_[4] = align_up(static_cast<size_t>(panels2 * kPanel) * sizeof(float));
  f.part_bytes_[5] = align_up(static_cast<size_t>(panels2 * kPanel) * sizeof(int32_t));
  for (size_t b : f.part_bytes_) f.group_block_ += b;
  f.bytes_ = G * f.group_block_;
  f.buf_.reset(static_cast<uint8_t*>(aligned_malloc(f.bytes_)));
  std::memset(f.buf_.get(), 0, f.bytes_);

  // Where natural column c of the [gate | up] matrix lives in the given weight1.
  auto given_col = [&](int64_t c) -> int64_t {
    if (!T) return c;
    const int64_t h = c / k2, rest = c % k2, b = rest / (T / 2), j = rest % (T / 2);
    return b * T + h * (T / 2) + j;
  };
  std::unique_ptr<int64_t[]> slot_col(new int64_t[slots1]);
  for (int64_t s = 0; s < slots1; ++s) {
    const int64_t p = s / kPanel, j = s % kPanel;
    const int64_t nat = p * (kPanel / 2) + (j % (kPanel / 2));  // natural column within a half
    slot_col[s] = nat < k2 ? given_col((j < kPanel / 2 ? 0 : k2) + nat) : -1;
  }
  for (int64_t g = 0; g < G; ++g) {
    detail::pack_panels(weight1.data<int8_t>() + g * k1 * n1, DType::s8, k1, n1, false, slot_col.get(),
                        slots1, reinterpret_cast<uint8_t*>(const_cast<int8_t*>(f.w1(g))), f.layout_,
                        const_cast<int32_t*>(f.c1(g)));
    float* s1 = const_cast<float*>(f.s1(g));
    for (int64_t s = 0; s < slots1; ++s) s1[s] = slot_col[s] >= 0 ? scale1.data<float>()[g * n1 + slot_col[s]] : 0.0f;
    detail::pack_panels(weight2.data<int8_t>() + g * n2 * k2, DType::s8, k2, n2, true, nullptr, n2,
                        reinterpret_cast<uint8_t*>(const_cast<int8_t*>(f.w2(g))), f.layout_,
                        const_cast<int32_t*>(f.c2(g)));
    std::memcpy(const_cast<float*>(f.s2(g)), scale2.data<float>() + g * n2, n2 * sizeof(float));
  }
  return f;
}

const uint8_t* PackedExpertFFN::part(int64_t g, int i) const {
  const uint8_t* p = buf_.get() + g * group_block_;
  for (int j = 0; j < i; ++j) p += part_bytes_[j];
  return p;
}

size_t PackedExpertFFN::group_bytes() const {
  // What the kernels read: the real weight bytes and scales, not the alignment padding.
  return static_cast<size_t>(k1_ * n1_ + n1_ * 4 + n2_ * k2_ + n2_ * 4);
}

}  // namespace qllm
