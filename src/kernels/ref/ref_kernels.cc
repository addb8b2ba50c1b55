// Scalar reference kernels: the test oracle. Written for obviousness, not speed: every output
// element is computed on its own with the SPEC formula, in SPEC's order of operations.
#include <cmath>

#include "kernels/kernels.h"
#include "kernels/ref/math.h"

namespace qllm::kernels {

float FloatPanels::at(int64_t kk, int64_t s) const {
  const int64_t off = (s / kPanel) * panel_elems() + kk * kPanel + (s % kPanel);
  switch (dtype) {
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(data)[off]);
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(data)[off]);
    default: return static_cast<const float*>(data)[off];
  }
}

int64_t a_bytes_pairs(int64_t k) { return (k + 1) / 2 * 2 * static_cast<int64_t>(sizeof(int16_t)); }

namespace {

void store_f32(DType dt, void* out, int64_t i, float v) {
  switch (dt) {
    case DType::f16: static_cast<uint16_t*>(out)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(out)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

int32_t dot_s8(const int16_t* a, const Int8Panels& b, int64_t slot) {
  // Wrapping s32 accumulation, as vpaddd does; ops/ bounds k so that it never wraps.
  uint32_t acc = 0;
  for (int64_t kk = 0; kk < b.k; ++kk)
    acc += static_cast<uint32_t>(static_cast<int32_t>(a[kk]) * static_cast<int32_t>(b.at(kk, slot)));
  return static_cast<int32_t>(acc);
}

// Reads weights of either layout through Int8Panels::at; activations are s16 (prepare_a_ref).
void int8_gemm_ref(const void* a, int64_t lda, int64_t rows, const Int8Panels& b, int64_t p0,
                   int64_t p1, const Int8Epilogue& ep) {
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* ar = reinterpret_cast<const int16_t*>(static_cast<const uint8_t*>(a) + r * lda);
    const float rs = ep.row_scale ? ep.row_scale[r] : 1.0f;
    for (int64_t p = p0; p < p1; ++p) {
      if (ep.kind == Epi::swiglu) {
        for (int64_t j = 0; j < kPanel / 2; ++j) {
          const int64_t col = p * (kPanel / 2) + j;
          if (col >= ep.out_cols) break;
          const int64_t sg = p * kPanel + j, su = sg + kPanel / 2;
          const float g = (static_cast<float>(dot_s8(ar, b, sg)) * ep.col_scale[sg]) * rs;
          const float u = (static_cast<float>(dot_s8(ar, b, su)) * ep.col_scale[su]) * rs;
          static_cast<float*>(ep.out)[r * ep.ldo + col] = u * silu_qllm(g);
        }
        continue;
      }
      for (int64_t s = p * kPanel; s < (p + 1) * kPanel && s < ep.out_cols; ++s) {
        const int32_t acc = dot_s8(ar, b, s);
        if (ep.kind == Epi::s32) {
          static_cast<int32_t*>(ep.out)[r * ep.ldo + s] = acc;
        } else {
          store_f32(ep.out_dtype, ep.out, r * ep.ldo + s, (static_cast<float>(acc) * ep.col_scale[s]) * rs);
        }
      }
    }
  }
}

void float_gemm_ref(const float* a, int64_t lda, int64_t rows, const FloatPanels& b, int64_t p0,
                    int64_t p1, const FloatEpilogue& ep) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t s = p0 * kPanel; s < p1 * kPanel && s < b.n; ++s) {
      float acc = 0.0f;
      for (int64_t kk = 0; kk < b.k; ++kk) acc = std::fma(a[r * lda + kk], b.at(kk, s), acc);
      if (ep.bias) acc += ep.bias[s];
      store_f32(ep.out_dtype, ep.out, r * ep.ldo + s, acc);
    }
  }
}

void s8_to_s16_ref(const int8_t* x, int64_t k, int16_t* out, int64_t kpad) {
  for (int64_t i = 0; i < kpad; ++i) out[i] = i < k ? x[i] : 0;
}

void prepare_a_ref(const int8_t* x, int64_t k, void* out) {
  s8_to_s16_ref(x, k, static_cast<int16_t*>(out), a_bytes_pairs(k) / 2);
}

void to_f32_ref(const void* x, DType dt, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    switch (dt) {
      case DType::f16: out[i] = f16_to_f32(static_cast<const uint16_t*>(x)[i]); break;
      case DType::bf16: out[i] = bf16_to_f32(static_cast<const uint16_t*>(x)[i]); break;
      default: out[i] = static_cast<const float*>(x)[i]; break;
    }
  }
}

void from_f32_ref(const float* x, int64_t n, DType dt, void* out) {
  for (int64_t i = 0; i < n; ++i) store_f32(dt, out, i, x[i]);
}

float quantize_row_ref(const float* v, const float* smooth, int64_t n, int8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = max_ps(std::fabs(smooth ? v[i] * smooth[i] : v[i]), amax);
  if (amax == 0.0f) {
    for (int64_t i = 0; i < n; ++i) q[i] = 0;
    return 0.0f;
  }
  const float inv = 127.0f / amax;
  for (int64_t i = 0; i < n; ++i) q[i] = quantize_one(smooth ? v[i] * smooth[i] : v[i], inv);
  return amax / 127.0f;
}

void swiglu_row_ref(const float* x, int64_t h, bool activate_left, float* y) {
  for (int64_t j = 0; j < h; ++j) {
    const float a = activate_left ? x[j] : x[h + j];
    const float b = activate_left ? x[h + j] : x[j];
    y[j] = b * silu_qllm(a);
  }
}

void dequant_row_ref(const int32_t* acc, int64_t n, const float* scale, float row_scale, DType dt, void* y) {
  for (int64_t c = 0; c < n; ++c) store_f32(dt, y, c, (static_cast<float>(acc[c]) * scale[c]) * row_scale);
}

}  // namespace

const KernelTable& ref_table() {
  static const KernelTable t{Isa::ref,       int8_gemm_ref,    Int8Layout::pairs, a_bytes_pairs,
                             prepare_a_ref,  float_gemm_ref,   s8_to_s16_ref,     to_f32_ref,
                             from_f32_ref,   quantize_row_ref, swiglu_row_ref,    dequant_row_ref};
  return t;
}

}  // namespace qllm::kernels
