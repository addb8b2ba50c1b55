// TensorView: a non-owning view of a strided n-d array (dtype, shape, strides in elements).
//
// Operators take views; they never own user memory. A default-constructed view is "absent"
// (used for optional inputs such as bias). Strides are in elements; for s4x2 the last axis is
// counted in packed bytes (two values each), which is what `shape` holds too.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "qllm/core/dtype.h"

namespace qllm {

class TensorView {
 public:
  static constexpr int kMaxDims = 6;

  TensorView() = default;
  TensorView(const void* data, DType dtype, std::initializer_list<int64_t> shape);
  TensorView(const void* data, DType dtype, const int64_t* shape, int ndim,
             const int64_t* strides = nullptr);

  bool present() const { return ndim_ > 0; }
  DType dtype() const { return dtype_; }
  int ndim() const { return ndim_; }
  int64_t dim(int i) const { return shape_[i < 0 ? i + ndim_ : i]; }
  int64_t stride(int i) const { return strides_[i < 0 ? i + ndim_ : i]; }
  const int64_t* shape() const { return shape_.data(); }
  int64_t numel() const;
  bool contiguous() const;
  std::string shape_str() const;  // "[3, 4]"

  template <class T> const T* data() const { return static_cast<const T*>(data_); }
  template <class T> T* mutable_data() const { return static_cast<T*>(const_cast<void*>(data_)); }
  const void* raw() const { return data_; }

 private:
  const void* data_ = nullptr;
  DType dtype_ = DType::f32;
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> shape_{};
  std::array<int64_t, kMaxDims> strides_{};
};

// Argument checking helpers used by every operator. Each throws qllm::Error naming op and arg.
namespace check {
void present(const char* op, const char* arg, const TensorView& t);
void dtype(const char* op, const char* arg, const TensorView& t, DType expected);
void dtype_float(const char* op, const char* arg, const TensorView& t);
void ndim(const char* op, const char* arg, const TensorView& t, int expected);
// dims[i] < 0 means "any". Also requires a contiguous view.
void shape(const char* op, const char* arg, const TensorView& t, std::initializer_list<int64_t> dims);
void contiguous(const char* op, const char* arg, const TensorView& t);
// The activation operand of a matmul: present, 2-d, contiguous, int8 (W8A8) or float.
// Returns true for int8.
bool matmul_operand(const char* op, const char* arg, const TensorView& t);
}  // namespace check

}  // namespace qllm
