#include "qllm/core/dtype.h"

#include "qllm/core/error.h"

namespace qllm {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::s8: return "int8";
    case DType::s32: return "int32";
    case DType::s64: return "int64";
    case DType::u8: return "uint8";
    case DType::s4x2: return "s4x2";
  }
  return "?";
}

DType parse_dtype(const std::string& n, const char* op, const char* arg) {
  if (n == "float32" || n == "f32" || n == "fp32") return DType::f32;
  if (n == "float16" || n == "f16" || n == "fp16" || n == "half") return DType::f16;
  if (n == "bfloat16" || n == "bf16") return DType::bf16;
  if (n == "int8" || n == "s8") return DType::s8;
  if (n == "int32" || n == "s32") return DType::s32;
  if (n == "int64" || n == "s64") return DType::s64;
  if (n == "uint8" || n == "u8") return DType::u8;
  if (n == "s4x2") return DType::s4x2;
  throw_invalid(op, arg, arg, " = '", n, "' is not a dtype (expected float32, float16, bfloat16, int8, int32, ...)");
}

}  // namespace qllm
