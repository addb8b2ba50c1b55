// Kernels of the 2:4 sparse matmul, one table per ISA (ref reads the same packed layout, so the
// tests run one packed weight through ref and AVX2 and demand identical bits).
//
// Packed layout (PackedSparse24): output channels in pairs (A = 2p, B = 2p + 1; B is zero when n
// is odd). k is padded with all-zero groups to a multiple of 16, giving KB (even) blocks of 8.
// A pair's block is pair_bytes long: values [KB][8] (dtype) then meta [KB] u16
// (low byte: A's meta byte for the block's two groups g0 = 2kb, g1 = 2kb + 1; high byte: B's).
// The 8 values of block kb are ordered for the kernel's gather:
//   float (vpermilps on x[8kb, 8kb+8), one group per 128-bit lane):
//     A.g0.v0 A.g0.v1 B.g0.v0 B.g0.v1 | A.g1.v0 A.g1.v1 B.g1.v0 B.g1.v1
//   s8    (vpshufb on x as s16, one block per 128-bit lane, then vpmaddwd on pairs):
//     A.g0.v0 A.g0.v1 A.g1.v0 A.g1.v1 | B.g0.v0 B.g0.v1 B.g1.v0 B.g1.v1
// Both give 8 accumulator lanes per (row, pair) in which lanes {0, 1, 4, 5} belong to A and
// {2, 3, 6, 7} to B (s8: a ymm spans two blocks, each 128-bit half A, A, B, B).
#pragma once

#include <cstdint>

#include "qllm/core/cpu.h"
#include "qllm/core/dtype.h"

namespace qllm::kernels {

struct S24Panels {
  const uint8_t* data = nullptr;
  DType dtype = DType::f32;
  int64_t kb = 0;          // blocks of 8 along k (even)
  int64_t pair_bytes = 0;  // bytes of one pair's block
  const uint8_t* values(int64_t pair) const { return data + pair * pair_bytes; }
  const uint16_t* meta(int64_t pair) const {
    return reinterpret_cast<const uint16_t*>(data + pair * pair_bytes + kb * 8 * dtype_size(dtype));
  }
};

// acc[r * ld_acc + (p - p0) * 8 + lane] += the lanes' products over blocks [kb0, kb1) (even
// bounds), for rows [0, rows) and pairs [p0, p1). Float: x rows of f32, ldx apart, zero past k;
// each lane accumulates its terms in block order with one FMA each. s8: x rows as s16, exact.
using S24FloatFn = void (*)(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0,
                            int64_t p1, int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);
using S24Int8Fn = void (*)(const int16_t* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0,
                           int64_t p1, int64_t kb0, int64_t kb1, int32_t* acc, int64_t ld_acc);

struct Sparse24Kernels {
  Isa isa;
  S24FloatFn float_mm;
  S24Int8Fn int8_mm;
};

const Sparse24Kernels& sparse24_kernels(Isa isa);

namespace ref {
void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                  int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);
void s24_int8_mm(const int16_t* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                 int64_t kb0, int64_t kb1, int32_t* acc, int64_t ld_acc);
}  // namespace ref
namespace avx2 {
void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                  int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc);
void s24_int8_mm(const int16_t* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                 int64_t kb0, int64_t kb1, int32_t* acc, int64_t ld_acc);
}  // namespace avx2

}  // namespace qllm::kernels
