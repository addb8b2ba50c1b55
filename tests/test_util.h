// Shared helpers for the C++ tests: random data, views, ISA contexts.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "qllm/qllm.h"

namespace qllm::test {

inline std::mt19937& rng() {
  static std::mt19937 g(1234);
  return g;
}

// Uniform int8 in [lo, hi], including the extremes -128 and 127 by default.
inline std::vector<int8_t> rand_s8(size_t n, int lo = -128, int hi = 127) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int8_t> v(n);
  for (auto& x : v) x = static_cast<int8_t>(d(rng()));
  return v;
}

inline std::vector<float> rand_f32(size_t n, float lo = -1.0f, float hi = 1.0f) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

template <class T>
TensorView view(const std::vector<T>& v, DType dt, std::initializer_list<int64_t> shape) {
  return TensorView(v.data(), dt, shape);
}

// One context per ISA the CPU supports, 2 threads each (exercises the parallel paths).
inline std::vector<Isa> isas() { return supported_isas(); }
// The supported ISAs other than ref: each is compared with ref bit for bit.
inline std::vector<Isa> fast_isas() {
  std::vector<Isa> v;
  for (Isa i : supported_isas())
    if (i != Isa::ref) v.push_back(i);
  return v;
}
inline Context& context(Isa isa) {
  static std::map<Isa, std::unique_ptr<Context>> contexts;
  auto& c = contexts[isa];
  if (!c) c = std::make_unique<Context>(ContextOptions{2, false, isa});
  return *c;
}
// The context QLLM_ISA selects (ctest runs the suite once per ISA).
inline Context& default_context() {
  static Context c(ContextOptions{2, true, Isa::ref});
  return c;
}

// Expects `f` to throw qllm::Error whose message contains every fragment.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* frag : fragments) EXPECT_NE(msg.find(frag), std::string::npos) << "message: " << msg << "\nmissing: " << frag;
    return;
  }
  ADD_FAILURE() << "expected qllm::Error";
}

inline float silu_ref(float a) { return a / (1.0f + std::exp(-a)); }

}  // namespace qllm::test
