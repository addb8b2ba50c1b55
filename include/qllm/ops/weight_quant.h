// Weight-only quantised matmul (SPEC section 5): W8A16 / W4A16.
//
//   W'[kk, c] = (w[kk, c] + offset[g, c]) * scale[g, c],  g = kk / group_size
//   y = x @ W' + bias   (f32 accumulation; y in x's dtype or f32)
//
// x f32/f16/bf16 [m, k]; w s8 [k, n] or s4x2 [k, n/2] (two values per byte along n), or the
// Linear layout [n, k] / [n, k/2] with transpose_w. scale/offset (f32, f16 or bf16) are
// per-channel [n] (group_size = 0) or per-group [ceil(k / group_size), n] with group_size a
// multiple of 32 and <= k. Offset is optional (symmetric when absent); bias [n] optional.
//
// The weights are packed once into a PackedQuantWeight (docs/packed-layout.md, "weight-only
// panels"): 16-column panels streaming k, with the group's scales (and offsets) after the group's
// weights, so one thread reads one sequential stream. The packed form is the same for every ISA.
#pragma once

#include <cstdint>

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

class PackedQuantWeight {
 public:
  // w: s8 or s4x2 in [k, n] (or [n, k] when transpose_w), scale/offset as above (offset may be
  // absent). group_size 0: per-channel. Throws qllm::Error naming `op` on bad input.
  static PackedQuantWeight pack(const TensorView& w, const TensorView& scale, const TensorView& offset,
                                int64_t group_size, bool transpose_w,
                                const char* op = "PackedQuantWeight");

  int bits() const { return bits_; }            // 8 (s8) or 4 (s4x2)
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  int64_t group_size() const { return group_size_; }  // 0: per-channel
  int64_t groups() const { return groups_; }          // rows of the scale (1 per-channel)
  bool has_offset() const { return has_offset_; }
  size_t bytes() const { return bytes_; }             // everything a matmul reads: weights + scales (+ offsets)
  const uint8_t* data() const { return buf_.get(); }
  // Internal: the packed geometry (kernels/wq.h).
  int64_t kgroup() const;       // k per group in the packed form (multiple of the k-block)
  int64_t group_bytes() const;  // bytes of one full group of one panel
  int64_t panel_bytes() const;

 private:
  int bits_ = 8;
  int64_t k_ = 0, n_ = 0, group_size_ = 0, groups_ = 0;
  bool has_offset_ = false;
  size_t bytes_ = 0;
  detail::AlignedBuffer buf_;
};

struct WeightQuantMatmulParams {
  bool transpose_w = false;   // raw w is [n, k] (Linear layout); ignored with packed_w
  int64_t group_size = 0;     // 0: per-channel scale [n]; else a multiple of 32, <= k
};

struct WeightQuantMatmulArgs {
  TensorView x;       // [m, k] f32/f16/bf16
  TensorView w;       // raw s8 / s4x2 weights, packed per call into the workspace; or packed_w
  TensorView scale;   // [n] or [ceil(k / group_size), n]
  TensorView offset;  // optional, scale's shape
  TensorView bias;    // optional [n], f32 or x's dtype
  const PackedQuantWeight* packed_w = nullptr;  // instead of w / scale / offset
};

size_t weight_quant_matmul_workspace_size(const WeightQuantMatmulArgs& args, const WeightQuantMatmulParams& p,
                                          int threads);

// y: [m, n], x's dtype or f32 (y's dtype is the output dtype). ws: at least
// weight_quant_matmul_workspace_size() bytes; nullptr uses the context's arena.
void weight_quant_matmul(Context& ctx, const WeightQuantMatmulArgs& args, const TensorView& y,
                         const WeightQuantMatmulParams& p = {}, Workspace* ws = nullptr);

// quantize_weight: w float [k, n] (or [n, k] with transpose_w) -> q, scale, offset.
//   q: s8 with w's shape (bits 8), or s4x2 with the contiguous axis halved (bits 4; that axis
//   must be even). scale (and offset): f32 [n] per-channel or [ceil(k / group_size), n].
//   symmetric: scale = amax / 127 (or / 7), q = rint(v * (127 / amax)) (or 7), offset not written
//   (pass an absent view). asymmetric: lo = min(v, 0), hi = max(v, 0), scale = (hi - lo) / 255
//   (or / 15), z = clamp(rint(-lo / scale), 0, 255), q = clamp(rint(v / scale) + z, 0, 255) - 128
//   (or 15, - 8) and offset = 128 - z (or 8 - z), so that (q + offset) * scale = (q_u - z) * scale.
//   An all-zero group gives scale 0, q 0, offset 0. Divisions are computed as products with
//   the f32 inverse (inv = 127 / amax, inv = 255 / (hi - lo)), rounding half to even.
struct QuantizeWeightParams {
  int bits = 8;               // 8 or 4
  int64_t group_size = 0;     // 0: per-channel
  bool symmetric = true;
  bool transpose_w = false;   // w is [n, k]
};
void quantize_weight(const TensorView& w, const TensorView& q, const TensorView& scale, const TensorView& offset,
                     const QuantizeWeightParams& p = {});

// dequantize_weight: W' = (q + offset) * scale, in q's layout ([k, n] or [n, k] with
// transpose_w; for s4x2 the full, unpacked size), out f32/f16/bf16.
void dequantize_weight(const TensorView& q, const TensorView& scale, const TensorView& offset, const TensorView& out,
                       int64_t group_size = 0, bool transpose_w = false);

}  // namespace qllm
