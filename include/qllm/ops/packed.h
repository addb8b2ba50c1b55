// Prepacked weights: the weights of a grouped matmul or of a fused expert FFN, rearranged once
// into the panel layout the kernels stream (docs/packed-layout.md, layout version 2).
//
// Weights are constant across calls, so packing is paid once (FBGEMM's PackBMatrix idea). A
// packed weight is the only copy the library keeps: pack, then drop the original.
#pragma once

#include <cstdint>
#include <memory>

#include "qllm/core/cpu.h"
#include "qllm/core/int8_layout.h"
#include "qllm/core/tensor.h"

namespace qllm {

constexpr int kPackedLayoutVersion = 2;

enum class GroupListType { cumsum, count };

// Column order of weight1 / scale1 in the fused expert FFN (SPEC section 3).
enum class WeightUpPermute { none, n128, n256 };
int64_t permute_block(WeightUpPermute p);  // 0 for none, else T
WeightUpPermute parse_weight_up_permute(const char* name, const char* op);  // "none" | "n128" | "n256"

namespace detail {
struct AlignedDelete { void operator()(uint8_t* p) const; };
using AlignedBuffer = std::unique_ptr<uint8_t, AlignedDelete>;
}  // namespace detail

// Grouped weight for grouped_matmul: G matrices B_g[k, n] in 16-column panels.
// int8 (s8) weights are stored in the int8 layout of the ISA they are packed for, with their
// column sums; float weights keep their dtype.
class PackedWeight {
 public:
  // w: [G, k, n], or [G, n, k] when transpose_w (the Linear layout). s8, f32, f16 or bf16.
  // A 2-d w is taken as G = 1. `isa`: the ISA whose kernels will read it (a Context of another
  // ISA that reads another int8 layout rejects it; ref reads both).
  static PackedWeight pack(const TensorView& w, bool transpose_w, Isa isa = default_isa());
  // Bytes pack() needs for such a weight (for callers that pack into a workspace).
  static size_t packed_bytes(DType dtype, int64_t groups, int64_t k, int64_t n,
                             Int8Layout layout = Int8Layout::pairs);
  // Packs into caller memory (64-byte aligned, packed_bytes() long) without owning it.
  static PackedWeight pack_into(const TensorView& w, bool transpose_w, void* memory,
                                Int8Layout layout = Int8Layout::pairs);

  DType dtype() const { return dtype_; }
  Int8Layout int8_layout() const { return layout_; }
  int64_t groups() const { return groups_; }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  // Group g's panels, and (s8) its column sums, one per slot of whole panels.
  const uint8_t* panels(int64_t g) const { return data_ + g * group_bytes_; }
  const int32_t* colsum(int64_t g) const {
    return reinterpret_cast<const int32_t*>(data_ + g * group_bytes_ + panel_bytes_);
  }
  size_t bytes() const { return static_cast<size_t>(group_bytes_ * groups_); }

 private:
  void init(const TensorView& w, bool transpose_w, uint8_t* memory, Int8Layout layout);

  DType dtype_ = DType::s8;
  Int8Layout layout_ = Int8Layout::pairs;
  int64_t groups_ = 0, k_ = 0, n_ = 0, panel_bytes_ = 0, group_bytes_ = 0;
  detail::AlignedBuffer owned_;
  const uint8_t* data_ = nullptr;
};

// Weights of a fused int8 expert FFN (GmmDeqSwigluQuantGmmDeq), packed for it:
// weight1's panels interleave 8 gate and the 8 matching up columns, so SwiGLU runs on the
// matmul's output registers whatever permutation weight1 arrived in; weight2 is in plain panels.
class PackedExpertFFN {
 public:
  // weight1 [G, k1, n1] s8 (columns in `permute` order), scale1 [G, n1] f32,
  // weight2 [G, n2, k2] s8 with k2 = n1 / 2, scale2 [G, n2] f32. 2-d/1-d forms mean G = 1.
  // `isa`: the ISA whose kernels will read it (decides the int8 layout, as for PackedWeight).
  static PackedExpertFFN pack(const TensorView& weight1, const TensorView& scale1,
                              const TensorView& weight2, const TensorView& scale2,
                              WeightUpPermute permute, const char* op = "PackedExpertFFN",
                              Isa isa = default_isa());

  int64_t groups() const { return groups_; }
  int64_t k1() const { return k1_; }
  int64_t n1() const { return n1_; }
  int64_t k2() const { return k2_; }
  int64_t n2() const { return n2_; }
  size_t bytes() const { return bytes_; }
  // Bytes of weights and scales that one pass over group g reads (for bandwidth figures).
  size_t group_bytes() const;

  Int8Layout int8_layout() const { return layout_; }

  // Internal accessors used by the operator. Group g's block is
  // [w1 | s1 | c1 | w2 | s2 | c2], each part 64-byte aligned.
  const int8_t* w1(int64_t g) const { return reinterpret_cast<const int8_t*>(part(g, 0)); }
  const float* s1(int64_t g) const { return reinterpret_cast<const float*>(part(g, 1)); }    // by slot
  const int32_t* c1(int64_t g) const { return reinterpret_cast<const int32_t*>(part(g, 2)); }  // colsum by slot
  const int8_t* w2(int64_t g) const { return reinterpret_cast<const int8_t*>(part(g, 3)); }
  const float* s2(int64_t g) const { return reinterpret_cast<const float*>(part(g, 4)); }    // by column, padded
  const int32_t* c2(int64_t g) const { return reinterpret_cast<const int32_t*>(part(g, 5)); }
  // Depth of each matmul in k-groups of the layout.
  int64_t kg1() const { return (k1_ + int8_group(layout_) - 1) / int8_group(layout_); }
  int64_t kg2() const { return (k2_ + int8_group(layout_) - 1) / int8_group(layout_); }

 private:
  const uint8_t* part(int64_t g, int i) const;

  int64_t groups_ = 0, k1_ = 0, n1_ = 0, k2_ = 0, n2_ = 0;
  Int8Layout layout_ = Int8Layout::pairs;
  size_t part_bytes_[6] = {};  // sizes of w1, s1, c1, w2, s2, c2 in one group
  size_t group_block_ = 0, bytes_ = 0;
  detail::AlignedBuffer buf_;
};

}  // namespace qllm
