// Scalar reference of the 2:4 sparse kernels (the ground truth for the AVX2 ones), plus the
// per-ISA table. It reads the packed layout of kernels/sparse24.h lane by lane and accumulates
// each lane in block order with one fused multiply-add per term, exactly as the AVX2 kernel does,
// so the two agree to the bit.
#include <cmath>

#include "kernels/sparse24.h"
#include "qllm/core/error.h"

namespace qllm::kernels {

namespace ref {

namespace {

inline float value_f32(DType dt, const uint8_t* vals, int64_t i) {
  switch (dt) {
    case DType::f16: return f16_to_f32(reinterpret_cast<const uint16_t*>(vals)[i]);
    case DType::bf16: return bf16_to_f32(reinterpret_cast<const uint16_t*>(vals)[i]);
    default: return reinterpret_cast<const float*>(vals)[i];
  }
}

// Position (0..3) of slot v (0/1) of group h (0/1) of the block, for column c (0 = A, 1 = B).
inline int pos(uint16_t meta, int c, int h, int v) { return (meta >> (8 * c + 4 * h + 2 * v)) & 3; }

}  // namespace

void s24_float_mm(const float* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                  int64_t kb0, int64_t kb1, float* acc, int64_t ld_acc) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* vals = w.values(p);
    const uint16_t* meta = w.meta(p);
    for (int64_t r = 0; r < rows; ++r) {
      float* a = acc + r * ld_acc + (p - p0) * 8;
      const float* xr = x + r * ldx;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        // Float order: lane l = 4h + 2c + v (group h, column c, slot v).
        for (int l = 0; l < 8; ++l) {
          const int h = l / 4, c = (l / 2) % 2, v = l % 2;
          const float xv = xr[8 * kb + 4 * h + pos(meta[kb], c, h, v)];
          a[l] = std::fma(value_f32(w.dtype, vals, kb * 8 + l), xv, a[l]);
        }
      }
    }
  }
}

void s24_int8_mm(const int16_t* x, int64_t ldx, int64_t rows, const S24Panels& w, int64_t p0, int64_t p1,
                 int64_t kb0, int64_t kb1, int32_t* acc, int64_t ld_acc) {
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* vals = reinterpret_cast<const int8_t*>(w.values(p));
    const uint16_t* meta = w.meta(p);
    for (int64_t r = 0; r < rows; ++r) {
      int32_t* a = acc + r * ld_acc + (p - p0) * 8;
      const int16_t* xr = x + r * ldx;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        // s8 order: value l = 4c + 2h + v; lane (4 * (kb % 2) + 2c + h) sums the group's two terms.
        for (int l = 0; l < 8; ++l) {
          const int c = l / 4, h = (l / 2) % 2, v = l % 2;
          const int32_t xv = xr[8 * kb + 4 * h + pos(meta[kb], c, h, v)];
          a[4 * (kb % 2) + 2 * c + h] += static_cast<int32_t>(vals[kb * 8 + l]) * xv;
        }
      }
    }
  }
}

}  // namespace ref

const Sparse24Kernels& sparse24_kernels(Isa isa) {
  static const Sparse24Kernels ref_k{Isa::ref, ref::s24_float_mm, ref::s24_int8_mm};
#if QLLM_HAVE_AVX2
  // avx512 has no kernels of its own for this family: it runs the AVX2 ones.
  static const Sparse24Kernels avx2_k{Isa::avx2, avx2::s24_float_mm, avx2::s24_int8_mm};
  static const Sparse24Kernels avx512_k{Isa::avx512, avx2::s24_float_mm, avx2::s24_int8_mm};
#endif
  switch (isa) {
    case Isa::ref: return ref_k;
#if QLLM_HAVE_AVX2
    case Isa::avx2: return avx2_k;
    case Isa::avx512: return avx512_k;
#else
    default: break;
#endif
  }
  throw_invalid("sparse24_matmul", "isa", "ISA ", isa_name(isa), " was not compiled into this build");
}

}  // namespace qllm::kernels
