// Scalar reference of the attention kernels: the exact arithmetic described in
// kernels/attention.h, written plainly.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/attention.h"
#include "kernels/norm.h"
#include "kernels/ref/math.h"
#include "qllm/core/error.h"

namespace qllm::kernels {

namespace {

void load_row(const KvSource& s, const void* base, const float* scale, int64_t j, int64_t D, int64_t Dp, float* out) {
  const int64_t off = s.token_offset(j, s.token_stride, s.block_stride);
  switch (s.dtype) {
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int64_t d = 0; d < D; ++d) out[d] = f16_to_f32(p[d]);
      break;
    }
    case DType::bf16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (int64_t d = 0; d < D; ++d) out[d] = bf16_to_f32(p[d]);
      break;
    }
    case DType::s8: {
      const int8_t* p = static_cast<const int8_t*>(base) + off;
      const float sc = scale[s.token_offset(j, s.scale_token_stride, s.scale_block_stride)];
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]) * sc;
      break;
    }
    default: {
      const float* p = static_cast<const float*>(base) + off;
      for (int64_t d = 0; d < D; ++d) out[d] = p[d];
      break;
    }
  }
  for (int64_t d = D; d < Dp; ++d) out[d] = 0.0f;
}

void load_kv_ref(const KvSource& s, int64_t j0, int64_t n, int64_t D, int64_t Dp, float* kt, float* vt) {
  for (int64_t j = 0; j < n; ++j) {
    load_row(s, s.k, s.k_scale, j0 + j, D, Dp, kt + j * Dp);
    load_row(s, s.v, s.v_scale, j0 + j, D, Dp, vt + j * Dp);
  }
}

void attend_ref(const float* q, int64_t rows, int64_t Dp, const float* kt, const float* vt, int64_t n, int64_t j0,
                const int64_t* lo, const int64_t* hi, float* s, float* m, float* l, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t a = std::max<int64_t>(lo[r] - j0, 0), b = std::min<int64_t>(hi[r] - j0, n);
    if (a >= b) continue;
    const float* qr = q + r * Dp;
    float* sr = s + r * n;
    float mt = kNegInf;
    for (int64_t j = a; j < b; ++j) {
      float lanes[8] = {};
      for (int64_t d = 0; d < Dp; ++d) lanes[d % 8] = std::fma(qr[d], kt[j * Dp + d], lanes[d % 8]);
      sr[j] = lane_tree8(lanes);
      mt = max_ps(sr[j], mt);
    }
    const float mn = max_ps(mt, m[r]);
    const float alpha = m[r] == kNegInf ? 0.0f : exp_qllm(m[r] - mn);
    float lanes[8] = {};
    for (int64_t j = a; j < b; ++j) {
      sr[j] = exp_qllm(sr[j] - mn);
      lanes[j % 8] = lanes[j % 8] + sr[j];
    }
    l[r] = l[r] * alpha + lane_tree8(lanes);
    m[r] = mn;
    float* ar = acc + r * Dp;
    for (int64_t d = 0; d < Dp; ++d) {
      float o = ar[d] * alpha;
      for (int64_t j = a; j < b; ++j) o = std::fma(sr[j], vt[j * Dp + d], o);
      ar[d] = o;
    }
  }
}

// One head's rows (the definition, head by head; the order of heads does not change any value).
void decode_head(const float* q, const int16_t* q16, const float* qs, int64_t rows, int64_t D, int64_t Dp, const KvSource& src,
                 int64_t j0, int64_t n, int64_t Tk, float* s, float* tmp, float* m, float* l, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const bool s8 = src.dtype == DType::s8;
  const int64_t Dq = decode_q16_width(D);
  for (int64_t j = 0; j < n; ++j) {
    if (s8) {
      const int8_t* k = static_cast<const int8_t*>(src.k) + src.token_offset(j0 + j, src.token_stride, src.block_stride);
      const float ks = src.k_scale[src.token_offset(j0 + j, src.scale_token_stride, src.scale_block_stride)];
      for (int64_t r = 0; r < rows; ++r) {
        int32_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<int32_t>(q16[r * Dq + d]) * k[d];
        s[r * Tk + j] = (static_cast<float>(dot) * ks) * qs[r];
      }
    } else {
      load_row(src, src.k, nullptr, j0 + j, D, Dp, tmp);
      for (int64_t r = 0; r < rows; ++r) {
        float lanes[8] = {};
        for (int64_t d = 0; d < Dp; ++d) lanes[d % 8] = std::fma(q[r * Dp + d], tmp[d], lanes[d % 8]);
        s[r * Tk + j] = lane_tree8(lanes);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * Tk;
    float mt = kNegInf;
    for (int64_t j = 0; j < n; ++j) mt = max_ps(sr[j], mt);
    const float mn = max_ps(mt, m[r]);
    const float alpha = m[r] == kNegInf ? 0.0f : exp_qllm(m[r] - mn);
    float lanes[8] = {};
    for (int64_t j = 0; j < n; ++j) {
      sr[j] = exp_qllm(sr[j] - mn);
      lanes[j % 8] = lanes[j % 8] + sr[j];
      // s8: the P.V weight carries the value scale (l sums the plain probabilities).
      if (s8) sr[j] = sr[j] * src.v_scale[src.token_offset(j0 + j, src.scale_token_stride, src.scale_block_stride)];
    }
    l[r] = l[r] * alpha + lane_tree8(lanes);
    m[r] = mn;
    for (int64_t d = 0; d < Dp; ++d) acc[r * Dp + d] = acc[r * Dp + d] * alpha;
  }
  if (s8) {  // integer P.V over blocks of kDecPvBlock keys (kernels/attention.h)
    int32_t* isum = reinterpret_cast<int32_t*>(tmp);  // D int32
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b0 = 0; b0 < n; b0 += kDecPvBlock) {
        const int64_t b1 = std::min(n, b0 + kDecPvBlock);
        const float* w = s + r * Tk;
        float wmax = 0.0f;
        for (int64_t j = b0; j < b1; ++j) wmax = max_ps(w[j], wmax);
        if (!(wmax >= kDecPvMinWeight)) continue;
        const float inv = 127.0f / wmax, sw = wmax / 127.0f;
        for (int64_t d = 0; d < D; ++d) isum[d] = 0;
        for (int64_t j = b0; j < b1; ++j) {
          const int32_t wq = static_cast<int32_t>(std::min(std::nearbyint(w[j] * inv), 127.0f));
          const int8_t* v = static_cast<const int8_t*>(src.v) + src.token_offset(j0 + j, src.token_stride, src.block_stride);
          for (int64_t d = 0; d < D; ++d) isum[d] += wq * v[d];
        }
        for (int64_t d = 0; d < D; ++d) acc[r * Dp + d] = std::fma(static_cast<float>(isum[d]), sw, acc[r * Dp + d]);
      }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    load_row(src, src.v, nullptr, j0 + j, D, Dp, tmp);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) acc[r * Dp + d] = std::fma(s[r * Tk + j], tmp[d], acc[r * Dp + d]);
  }
}

void decode_ref(const float* q, const int16_t* q16, const int8_t* /*q8: the same values as q16*/, const float* qs, int64_t g, int64_t H, int64_t RH, int64_t D, int64_t Dp,
                const KvSource& src, int64_t j0, int64_t n, int64_t Tk, float* s, float* tmp, float* m, float* l, float* acc) {
  const int64_t Dq = decode_q16_width(D);
  for (int64_t h = 0; h < H; ++h) {
    KvSource sh = src;
    sh.k = static_cast<const uint8_t*>(src.k) + h * D * dtype_size(src.dtype);
    sh.v = static_cast<const uint8_t*>(src.v) + h * D * dtype_size(src.dtype);
    if (src.dtype == DType::s8) {
      sh.k_scale = src.k_scale + h;
      sh.v_scale = src.v_scale + h;
    }
    const int64_t r0 = h * RH;
    decode_head(q + r0 * Dp, q16 + r0 * Dq, qs + r0, g, D, Dp, sh, j0, n, Tk, s, tmp, m + r0, l + r0, acc + r0 * Dp);
  }
}

void merge_ref(const float* part, int64_t nsplit, int64_t stride, int64_t D, float* o) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float M = kNegInf;
  for (int64_t sp = 0; sp < nsplit; ++sp) M = max_ps(part[sp * stride], M);
  float L = 0.0f;
  for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
  if (M != kNegInf) {
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      const float* src = part + sp * stride;
      if (src[0] == kNegInf) continue;
      const float w = exp_qllm(src[0] - M);
      L = std::fma(src[1], w, L);
      for (int64_t d = 0; d < D; ++d) o[d] = std::fma(src[2 + d], w, o[d]);
    }
  }
  for (int64_t d = 0; d < D; ++d) o[d] = L > 0.0f ? o[d] / L : 0.0f;
}

}  // namespace

const AttnKernels& attn_kernels_ref() {
  static const AttnKernels t{load_kv_ref, attend_ref, decode_ref, merge_ref};
  return t;
}

const AttnKernels& attn_kernels(Isa isa) {
#if QLLM_HAVE_AVX2
  if (isa == Isa::avx2) return attn_kernels_avx2();
  if (isa == Isa::avx512) return attn_kernels_avx512();
#endif
  if (isa != Isa::ref) throw_invalid("qllm", "isa", "ISA ", isa_name(isa), " was not compiled into this build");
  return attn_kernels_ref();
}

}  // namespace qllm::kernels
