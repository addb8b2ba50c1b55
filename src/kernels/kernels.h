// The kernel table: one implementation of every kernel per ISA, same signatures.
//
// Kernels trust their arguments (ops/ validates) and never throw or allocate. kernels/ref is the
// scalar ground truth; kernels/x86/avx2 (-mavx2 -mfma -mf16c) and kernels/x86/avx512 (adds
// AVX-512 F/BW/VL/VNNI, int8 GEMM only) are only called when the CPU has them. ref reads every
// packed layout defined here, so a test can run the same packed weight through ref and a SIMD
// table and demand identical bits.
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"
#include "qllm/core/int8_layout.h"

namespace qllm::kernels {

// ---- Packed weight panels (layout version 2; docs/packed-layout.md) -------------------------
//
// A weight B[k, n] (n output columns, reduction depth k) is stored as ceil(n / 16) panels of
// 16 columns ("slots"). Within a panel, k runs outermost, so one thread streams a panel from
// start to end and the hardware prefetcher sees one sequential stream.
constexpr int kPanel = 16;

// int8 weights come in one of two layouts, chosen by the ISA that will read them:
//  - pairs (AVX2, ref): k is taken in pairs, each pair of a slot adjacent, so that one 16-byte
//    load widened to 16 x s16 lines up with vpmaddwd's pairwise products: byte offset of
//    (kk, s) inside a panel is (kk / 2) * 32 + s * 2 + kk % 2.
//  - quads (AVX-512 VNNI): k in fours, so that one 64-byte zmm load lines up with vpdpbusd's
//    four u8 x s8 products per s32 lane: offset (kk / 4) * 64 + s * 4 + kk % 4. Quad-packed
//    weights carry colsum[slot] = sum_k w[k, slot], for the u8 activation offset (below).
// k is padded with zero rows to a whole group; missing slots are zero.

struct Int8Panels {
  const int8_t* data = nullptr;
  int64_t k = 0;    // depth
  int64_t kg = 0;   // depth in groups of int8_group(layout): ceil(k / group)
  int64_t n = 0;    // real columns (slots past n are zero)
  Int8Layout layout = Int8Layout::pairs;
  const int32_t* colsum = nullptr;  // quads: [panels * 16] column sums
  int64_t panels() const { return (n + kPanel - 1) / kPanel; }
  int64_t panel_bytes() const { return kg * int8_group(layout) * kPanel; }
  int8_t at(int64_t kk, int64_t s) const {
    const int64_t gs = int8_group(layout);
    return data[(s / kPanel) * panel_bytes() + (kk / gs) * gs * kPanel + (s % kPanel) * gs + (kk % gs)];
  }
};

// float (f32, f16 or bf16 elements): element offset of (kk, s) inside a panel is kk * 16 + s.
struct FloatPanels {
  const void* data = nullptr;
  DType dtype = DType::f32;
  int64_t k = 0;
  int64_t n = 0;
  int64_t panels() const { return (n + kPanel - 1) / kPanel; }
  int64_t panel_elems() const { return k * kPanel; }
  float at(int64_t kk, int64_t s) const;
};

// What the int8 GEMM does with each s32 tile before it leaves the kernel (FBGEMM-style output
// pipeline, so dequant -> SwiGLU is an epilogue and not extra passes over memory).
enum class Epi : uint8_t {
  s32,      // out[r, c] = acc
  dequant,  // out[r, c] = out_dtype((f32(acc) * col_scale[c]) * row_scale[r])
  swiglu,   // fused-FFN panels: slots 0..7 gate, 8..15 up of natural columns 8p..8p+7;
            // h = (f32(acc) * col_scale[slot]) * row_scale[r]; out[r, 8p + j] = up * silu(gate), f32
};

struct Int8Epilogue {
  Epi kind = Epi::s32;
  const float* col_scale = nullptr;  // indexed by slot (packed order)
  const float* row_scale = nullptr;  // [rows] of this call, nullptr means 1
  DType out_dtype = DType::s32;      // s32 for Epi::s32, f32/f16/bf16 for dequant, f32 for swiglu
  void* out = nullptr;               // row 0, column 0 of the output matrix
  int64_t ldo = 0;                   // output row stride in elements
  int64_t out_cols = 0;              // real output columns (n, or n / 2 for swiglu)
};

struct FloatEpilogue {
  const float* bias = nullptr;  // [n] f32 or nullptr
  DType out_dtype = DType::f32;
  void* out = nullptr;
  int64_t ldo = 0;
};

// rows x panels [p0, p1) of A @ B. `a` holds `rows` rows prepared by the same table's
// int8_prepare_a, `lda` bytes apart.
using Int8GemmFn = void (*)(const void* a, int64_t lda, int64_t rows, const Int8Panels& b,
                            int64_t p0, int64_t p1, const Int8Epilogue& ep);
// Same for floats: `a` holds rows of b.k f32 values.
using FloatGemmFn = void (*)(const float* a, int64_t lda, int64_t rows, const FloatPanels& b,
                             int64_t p0, int64_t p1, const FloatEpilogue& ep);

struct KernelTable {
  Isa isa;
  Int8GemmFn int8_gemm;
  // The weight layout int8_gemm reads (ref reads either), and how it wants its activations:
  // int8_a_bytes(k) bytes per row, written by int8_prepare_a from k s8 values.
  Int8Layout int8_layout;
  int64_t (*int8_a_bytes)(int64_t k);
  void (*int8_prepare_a)(const int8_t* x, int64_t k, void* out);
  FloatGemmFn float_gemm;
  // out[0, kpad) = x widened to s16, zero past k.
  void (*s8_to_s16)(const int8_t* x, int64_t k, int16_t* out, int64_t kpad);
  void (*to_f32)(const void* x, DType dtype, int64_t n, float* out);
  void (*from_f32)(const float* x, int64_t n, DType dtype, void* out);
  // SPEC section 0 per-row quantisation of v (times smooth, if given); returns the scale.
  float (*quantize_row)(const float* v, const float* smooth, int64_t n, int8_t* q);
  // y[j] = b * silu(a) with (a, b) = (x[j], x[h + j]), or swapped when !activate_left.
  void (*swiglu_row)(const float* x, int64_t h, bool activate_left, float* y);
  // y[c] = out_dtype((f32(acc[c]) * scale[c]) * row_scale)
  void (*dequant_row)(const int32_t* acc, int64_t n, const float* scale, float row_scale,
                      DType out_dtype, void* y);
  // Rows of int8_gemm's microkernel tile: row blocks that are a multiple of it leave no
  // part-filled strip (6 for the AVX2 s16 kernel, 8 for VNNI).
  int64_t int8_tile_rows = 6;
};

const KernelTable& table(Isa isa);
const KernelTable& ref_table();
const KernelTable& avx2_table();    // x86 builds only (QLLM_HAVE_AVX2)
const KernelTable& avx512_table();  // AVX-512 VNNI int8 GEMM, everything else from avx2_table()

// Activation preparation shared by the tables that read pairs: s8 widened to s16, zero padded
// to a whole pair. (int8_a_bytes / int8_prepare_a of ref and avx2.)
int64_t a_bytes_pairs(int64_t k);

}  // namespace qllm::kernels
