// 2:4 structured sparsity (SPEC section 6): prune_24, compress_24, decompress_24 and
// sparse24_matmul, for float weights with float activations and for int8 weights with int8
// activations (W8A8, exact s32 accumulation, per-channel and per-token scales).
//
// A weight W [n, k] (the Linear layout: n output channels, reduction depth k) is 2:4 sparse when
// every aligned group of 4 consecutive elements along k holds at most 2 non-zeros. Its compressed
// form (the interchange format) is
//   values [n, k/2]  W's dtype: the kept elements of each group, in order;
//   meta   [n, ceil(k/8)] u8: per group two 2-bit positions i0 < i1 (bits 0-1 and 2-3), two
//          groups per byte, the first in the low nibble. When k % 8 == 4 the last byte's high
//          nibble is padding and must be 0.
// A group with fewer than 2 non-zeros stores zeros: its non-zero positions are completed with the
// lowest zero positions, then sorted (an all-zero group is i0 = 0, i1 = 1 with values 0, 0).
//
// The compressed form is validated (shapes, dtypes, i0 < i1 in every group) and then packed once
// into PackedSparse24, the layout the kernels stream (docs/operators.md, "2:4 packed layout").
// sparse24_matmul accepts either form; the raw form is packed into the workspace on every call.
#pragma once

#include <cstdint>

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/packed.h"

namespace qllm {

// Bytes of one row of meta for reduction depth k: ceil(k / 8).
constexpr int64_t sparse24_meta_cols(int64_t k) { return (k + 7) / 8; }

// w [n, k] f32/f16/bf16/s8 (k a multiple of 4) -> values [n, k/2] (w's dtype), meta
// [n, ceil(k/8)] u8. Keeps the two largest magnitudes of every group (ties: lower position).
void prune_24(const TensorView& w, const TensorView& values, const TensorView& meta);
// As prune_24, but rejects (naming the row and group) a w with more than 2 non-zeros in a group.
void compress_24(const TensorView& w, const TensorView& values, const TensorView& meta);
// values [n, k/2], meta [n, ceil(k/8)] -> w [n, k] of values' dtype (zeros elsewhere).
// k is w's second dimension; meta is validated (i0 < i1, zero padding nibble).
void decompress_24(const TensorView& values, const TensorView& meta, const TensorView& w);

namespace detail { struct PackedSparse24Access; }

// A 2:4 weight packed for sparse24_matmul, as panels of output channels streamed along k.
// Float values (layout version 2): super-panels of 8 channels (4 channel pairs), one sequential
// stream each; per 16 along k it stores each pair's 16 kept values (ordered for the kernel's
// in-register gather) and then each pair's 4 bytes of positions: the bytes of the compressed form
// (values + 2 bits per kept value), with k rounded up to 16 and n to 8. s8 values: panels are 32 channels; per group each channel stores its 2
// values and a 3-bit code of its position pair (one of 6), i.e. 1.5 bits per kept value, in
// blocks of 64 along k (src/kernels/sparse24.h).
class PackedSparse24 {
 public:
  // values [n, k/2] f32/f16/bf16/s8, meta [n, ceil(k/8)] u8; k = 2 * values.dim(1).
  // Throws (naming `op`) on a bad shape/dtype or positions that are not increasing.
  static PackedSparse24 pack(const TensorView& values, const TensorView& meta,
                             const char* op = "PackedSparse24");
  // Bytes pack() needs, and packing into caller memory (64-byte aligned) without owning it.
  static size_t packed_bytes(DType dtype, int64_t n, int64_t k);
  static PackedSparse24 pack_into(const TensorView& values, const TensorView& meta, void* memory,
                                  const char* op = "PackedSparse24");

  DType dtype() const { return dtype_; }
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }
  // Super-panels: of 16 channels (float) or of 32 channels (s8).
  int64_t panels() const {
    return dtype_ == DType::s8 ? (n_ + 31) / 32 : (n_ + kFloatPanelChannels - 1) / kFloatPanelChannels;
  }
  // Output channels per float super-panel (kernels/sparse24.h: 2 * kFP).
  static constexpr int kFloatPanelChannels = 8;
  // Version of the packed float layout (2: 8-channel super-panels; 1 was per-pair streams).
  static constexpr int kFloatLayoutVersion = 2;
  int64_t kblocks() const { return kb_; }  // padded depth / 8 (float, even) or / 64 (s8)
  int64_t panel_bytes() const { return panel_bytes_; }
  const uint8_t* data() const { return data_; }
  // Bytes of the packed panels: what one pass over the weight reads.
  size_t bytes() const { return static_cast<size_t>(panel_bytes_ * panels()); }
  // Bytes of the compressed form (values + meta), what one pass over the weight must read.
  size_t compressed_bytes() const;

 private:
  friend struct detail::PackedSparse24Access;
  void init(const TensorView& values, const TensorView& meta, uint8_t* memory, const char* op);

  DType dtype_ = DType::f32;
  int64_t n_ = 0, k_ = 0, kb_ = 0, panel_bytes_ = 0;
  detail::AlignedBuffer owned_;
  const uint8_t* data_ = nullptr;
};

struct Sparse24MatmulParams {
  DType out_dtype = DType::f32;  // float x: f32/f16/bf16; s8 x: s32 (raw) or f32/f16/bf16
};

struct Sparse24MatmulArgs {
  TensorView x;                          // [m, k]: f32/f16/bf16 (float values) or s8 (s8 values)
  TensorView values, meta;               // compressed weight; or use packed
  const PackedSparse24* packed = nullptr;
  TensorView scale;                      // [n] f32 per output channel (s8 path with float output)
  TensorView per_token_scale;            // [m] f32, optional (s8 path with float output)
};

// Scratch bytes for these arguments on `ctx` (per-thread accumulator tiles, converted x, and
// the packed weight when the raw form is given).
size_t sparse24_matmul_workspace_size(const Context& ctx, const Sparse24MatmulArgs& args,
                                      const Sparse24MatmulParams& p = {});

// y [m, n] = x @ W^T with W the decompressed weight. Float path: f32 accumulation (values of
// f16/bf16 widened exactly). s8 path: exact s32 accumulation; out s32, or
// out_dtype((f32(acc) * scale[c]) * per_token_scale[r]). Throws qllm::Error on bad input,
// writing nothing. ws: at least sparse24_matmul_workspace_size() bytes; nullptr uses ctx's arena.
void sparse24_matmul(Context& ctx, const Sparse24MatmulArgs& args, const TensorView& y,
                     const Sparse24MatmulParams& p = {}, Workspace* ws = nullptr);

}  // namespace qllm
