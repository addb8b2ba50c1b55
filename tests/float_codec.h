// f32 <-> f32/f16/bf16 byte buffers for tests of float operators, and the output roundings.
#pragma once

#include <cstring>
#include <vector>

#include "qllm/core/dtype.h"

namespace qllm::test {

inline std::vector<uint8_t> encode(const std::vector<float>& v, DType dt) {
  std::vector<uint8_t> out(v.size() * dtype_size(dt));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::f32) std::memcpy(out.data() + 4 * i, &v[i], 4);
    else {
      const uint16_t h = dt == DType::f16 ? f32_to_f16(v[i]) : f32_to_bf16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}
inline std::vector<float> decode(const std::vector<uint8_t>& b, DType dt) {
  const size_t n = b.size() / dtype_size(dt);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (dt == DType::f32) std::memcpy(&v[i], b.data() + 4 * i, 4);
    else {
      uint16_t h;
      std::memcpy(&h, b.data() + 2 * i, 2);
      v[i] = dt == DType::f16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
  }
  return v;
}
// Unit roundoff of the output dtype (the final rounding of every result).
inline double out_eps(DType dt) { return dt == DType::f32 ? 0x1p-24 : dt == DType::f16 ? 0x1p-11 : 0x1p-8; }
// Half the spacing of the output dtype's subnormals (f16 results below 2^-14 round absolutely).
inline double out_abs(DType dt) { return dt == DType::f16 ? 0x1p-25 : 0.0; }

}  // namespace qllm::test
