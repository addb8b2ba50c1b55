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
    for (int64_t r = 0; r < rows; ++r) {
      float* a = acc + r * ld_acc + (p - p0) * 8;
      const float* xr = x + r * ldx;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const uint8_t* vals = w.values(p, kb);
        const uint16_t meta = w.meta(p, kb);
        // Float order: lane l = 4h + 2c + v (group h, column c, slot v).
        for (int l = 0; l < 8; ++l) {
          const int h = l / 4, c = (l / 2) % 2, v = l % 2;
          const float xv = xr[8 * kb + 4 * h + pos(meta, c, h, v)];
          a[l] = std::fma(value_f32(w.dtype, vals, l), xv, a[l]);
        }
      }
    }
  }
}

// Per channel and row one chain in ascending k: the block's kept terms g0.v0, g0.v1, g1.v0,
// g1.v1 (lanes 2c, 2c + 1, 4 + 2c, 5 + 2c of the block's values), exactly the AVX2 order.
void s24_float_rows(const float* xp, const S24Panels& w, int64_t p0, int64_t p1, int64_t kb0, int64_t kb1, float* acc) {
  for (int64_t p = p0; p < p1; ++p)
    for (int c = 0; c < 2; ++c) {
      float* a = acc + (2 * (p - p0) + c) * kRowPanel;
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const uint8_t* vals = w.values(p, kb);
        const uint16_t meta = w.meta(p, kb);
        for (int t = 0; t < 4; ++t) {
          const int h = t / 2, v = t % 2;
          const float wv = value_f32(w.dtype, vals, 4 * h + 2 * c + v);
          const float* xr = xp + (8 * kb + 4 * h + pos(meta, c, h, v)) * kRowPanel;
          for (int r = 0; r < kRowPanel; ++r) a[r] = std::fma(wv, xr[r], a[r]);
        }
      }
    }
}

// The six position pairs in code order (kernels/sparse24.h).
constexpr int kPairPos[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

void s24_s8_xtable(const int8_t* x, int64_t k, int64_t groups_pad, int32_t* tab) {
  for (int64_t g = 0; g < groups_pad; ++g) {
    int32_t* t = tab + g * 8;
    for (int e = 0; e < 8; ++e) {
      int32_t v = 0;
      if (e < 6 && 4 * g < k) {
        const int32_t lo = x[4 * g + kPairPos[e][0]], hi = x[4 * g + kPairPos[e][1]];
        v = static_cast<int32_t>(static_cast<uint32_t>(lo & 0xffff) | (static_cast<uint32_t>(hi) << 16));
      }
      t[e] = v;
    }
  }
}

void s24_s8_mm(const int32_t* tab, int64_t ldt, int64_t rows, const S24S8Panels& w, int64_t sp0, int64_t sp1,
               int64_t b0, int64_t b1, int32_t* acc, int64_t ld_acc) {
  for (int64_t sp = sp0; sp < sp1; ++sp)
    for (int64_t r = 0; r < rows; ++r) {
      int32_t* a = acc + r * ld_acc + (sp - sp0) * kS8Channels;
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* blk = w.block(sp, b);
        for (int gi = 0; gi < kS8BlockGroups; ++gi) {
          const int32_t* t = tab + r * ldt + (b * kS8BlockGroups + gi) * 8;
          for (int ch = 0; ch < kS8Channels; ++ch) {
            const int j = ch / 8, c = ch % 8;
            const uint8_t* cw = blk + kS8BlockGroups * kS8Channels * 2 + gi * 12 + j * 3;
            const uint32_t word = cw[0] | (cw[1] << 8) | (cw[2] << 16);
            const int code = (word >> (3 * c)) & 7;
            const int8_t* v = reinterpret_cast<const int8_t*>(blk + gi * kS8Channels * 2 + ch * 2);
            // The table entry's halves are the two kept x (s16); both products are exact in s32.
            const int32_t e = t[code];
            const int32_t xlo = static_cast<int16_t>(e & 0xffff), xhi = e >> 16;
            a[ch] += v[0] * xlo + v[1] * xhi;
          }
        }
      }
    }
}

// Large-m s8: the same exact dot products, read from the packed super-panels channel by channel
// (integer sums: any order gives the same bits). Rows past `rows` are 0; no scratch needed.
void s24_s8_rows(const int8_t* x, int64_t ldx, int64_t rows, int64_t k, const S24S8Panels& w, int64_t sp0, int64_t sp1,
                 int32_t* acc, void*) {
  const int64_t groups = k / 4;
  for (int64_t sp = sp0; sp < sp1; ++sp)
    for (int ch = 0; ch < kS8Channels; ++ch) {
      int32_t* a = acc + ((sp - sp0) * kS8Channels + ch) * kRowPanel;
      const int j = ch / 8, c = ch % 8;
      for (int64_t r = 0; r < kRowPanel; ++r) a[r] = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* blk = w.block(sp, g / kS8BlockGroups);
        const int64_t gi = g % kS8BlockGroups;
        const uint8_t* cw = blk + kS8BlockGroups * kS8Channels * 2 + gi * 12 + j * 3;
        const int code = ((cw[0] | (cw[1] << 8) | (cw[2] << 16)) >> (3 * c)) & 7;
        const int8_t* v = reinterpret_cast<const int8_t*>(blk + gi * kS8Channels * 2 + ch * 2);
        for (int64_t r = 0; r < rows; ++r) {
          const int8_t* xr = x + r * ldx + 4 * g;
          a[r] += v[0] * xr[kPairPos[code][0]] + v[1] * xr[kPairPos[code][1]];
        }
      }
    }
}

// The op's epilogue: per output one conversion (int -> f32, RNE), the two f32 products in this
// order, one RNE store.
void s24_rows_out(const void* acc, bool s32_acc, int64_t rows, int64_t ncols, const float* scale, const float* pts,
                  DType odt, void* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ncols; ++c) {
      const int64_t ai = c * kRowPanel + r, yi = r * ldy + c;
      float f;
      if (s32_acc) {
        const int32_t v = static_cast<const int32_t*>(acc)[ai];
        if (odt == DType::s32) {
          static_cast<int32_t*>(y)[yi] = v;
          continue;
        }
        f = static_cast<float>(v) * scale[c];
        if (pts) f *= pts[r];
      } else {
        f = static_cast<const float*>(acc)[ai];
      }
      switch (odt) {
        case DType::f16: static_cast<uint16_t*>(y)[yi] = f32_to_f16(f); break;
        case DType::bf16: static_cast<uint16_t*>(y)[yi] = f32_to_bf16(f); break;
        default: static_cast<float*>(y)[yi] = f; break;
      }
    }
}

}  // namespace ref

#if QLLM_HAVE_AVX2
namespace {
// The avx512 s8 rows kernel needs AVX-512 VBMI (vpermb, vpmultishiftqb) besides the avx512 set.
bool avx512_s8_rows() { return isa_supported(Isa::avx512) && cpu_features().avx512vbmi; }
}  // namespace
#endif

const Sparse24Kernels& sparse24_kernels(Isa isa) {
  static const Sparse24Kernels ref_k{Isa::ref, ref::s24_float_mm, ref::s24_float_rows, ref::s24_s8_xtable, ref::s24_s8_mm,
                                     ref::s24_s8_rows, false, 40, ref::s24_rows_out};
#if QLLM_HAVE_AVX2
  // avx512: its own zmm rows kernel where the CPU runs AVX-512; the rest are the AVX2 kernels.
  static const Sparse24Kernels avx2_k{Isa::avx2, avx2::s24_float_mm, avx2::s24_float_rows, avx2::s24_s8_xtable, avx2::s24_s8_mm,
                                      avx2::s24_s8_rows, false, 40, avx2::s24_rows_out};
  static const Sparse24Kernels avx512_k{Isa::avx512, avx2::s24_float_mm,
                                        isa_supported(Isa::avx512) ? avx512::s24_float_rows : avx2::s24_float_rows,
                                        avx2::s24_s8_xtable, avx2::s24_s8_mm,
                                        avx512_s8_rows() ? avx512::s24_s8_rows : avx2::s24_s8_rows, avx512_s8_rows(),
                                        avx512_s8_rows() ? 1 : 40, avx2::s24_rows_out};
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
