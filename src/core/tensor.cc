#include "qllm/core/tensor.h"

#include <sstream>

#include "qllm/core/error.h"

namespace qllm {

TensorView::TensorView(const void* data, DType dtype, std::initializer_list<int64_t> shape)
    : TensorView(data, dtype, shape.begin(), static_cast<int>(shape.size())) {}

TensorView::TensorView(const void* data, DType dtype, const int64_t* shape, int ndim,
                       const int64_t* strides)
    : data_(data), dtype_(dtype), ndim_(ndim) {
  if (ndim < 1 || ndim > kMaxDims)
    throw_invalid("TensorView", "ndim", "ndim must be in [1, ", kMaxDims, "], got ", ndim);
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] < 0) throw_invalid("TensorView", "shape", "negative dimension ", shape[i]);
    shape_[i] = shape[i];
    strides_[i] = strides ? strides[i] : s;
    s *= shape[i];
  }
}

int64_t TensorView::numel() const {
  if (ndim_ == 0) return 0;
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= shape_[i];
  return n;
}

bool TensorView::contiguous() const {
  int64_t s = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << '[';
  for (int i = 0; i < ndim_; ++i) os << (i ? ", " : "") << shape_[i];
  os << ']';
  return os.str();
}

namespace check {

void present(const char* op, const char* arg, const TensorView& t) {
  if (!t.present()) throw_invalid(op, arg, arg, " is required but was not given");
}

void dtype(const char* op, const char* arg, const TensorView& t, DType expected) {
  present(op, arg, t);
  if (t.dtype() != expected)
    throw_invalid(op, arg, arg, " must be ", dtype_name(expected), ", got ", dtype_name(t.dtype()));
}

void dtype_float(const char* op, const char* arg, const TensorView& t) {
  present(op, arg, t);
  if (!is_float(t.dtype()))
    throw_invalid(op, arg, arg, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype()));
}

void contiguous(const char* op, const char* arg, const TensorView& t) {
  if (!t.contiguous()) throw_invalid(op, arg, arg, " must be contiguous (row-major), got strides that are not");
}

bool matmul_operand(const char* op, const char* arg, const TensorView& t) {
  present(op, arg, t);
  ndim(op, arg, t, 2);
  contiguous(op, arg, t);
  if (t.dtype() != DType::s8 && !is_float(t.dtype()))
    throw_invalid(op, arg, arg, " must be int8 (W8A8) or float32/float16/bfloat16, got ", dtype_name(t.dtype()));
  return t.dtype() == DType::s8;
}

void ndim(const char* op, const char* arg, const TensorView& t, int expected) {
  present(op, arg, t);
  if (t.ndim() != expected)
    throw_invalid(op, arg, arg, " must have ", expected, " dimensions, got shape ", t.shape_str());
}

void shape(const char* op, const char* arg, const TensorView& t, std::initializer_list<int64_t> dims) {
  const int nd = static_cast<int>(dims.size());
  present(op, arg, t);
  std::ostringstream want;
  want << '[';
  int i = 0;
  bool ok = t.ndim() == nd;
  for (int64_t d : dims) {
    want << (i ? ", " : "") ;
    if (d < 0) want << '*'; else want << d;
    if (ok && d >= 0 && t.dim(i) != d) ok = false;
    ++i;
  }
  want << ']';
  if (!ok) throw_invalid(op, arg, arg, " must have shape ", want.str(), ", got ", t.shape_str());
  contiguous(op, arg, t);
}

}  // namespace check
}  // namespace qllm
