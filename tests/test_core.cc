// core: dtype conversions, tensor views, workspace, thread pool, ISA selection.
#include <atomic>
#include <cmath>
#include <cstdlib>

#include "kernels/kernels.h"
#include "kernels/ref/math.h"
#include "test_util.h"

namespace qllm {
namespace {

// Independent f16 rounding oracle: the f16 grid near |v| computed in double.
uint16_t f16_oracle(float f) {
  if (std::isnan(f)) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;  // 65504 + half an ulp rounds to inf
  // Spacing of the f16 grid at a: 2^(e - 10) for normals, 2^-24 for subnormals.
  int e = a > 0 ? static_cast<int>(std::floor(std::log2(a))) : -25;
  if (e < -14) e = -14;
  const double ulp = std::ldexp(1.0, e - 10);
  const double q = a / ulp;
  double r = std::floor(q);
  const double frac = q - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) == 1.0)) r += 1.0;
  const double v = r * ulp;
  // Encode v (exactly representable) by searching the bit pattern through the exact decoder.
  uint16_t lo = 0, hi = 0x7c00;
  while (lo < hi) {  // f16_to_f32 is monotonic on non-negative patterns
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    if (static_cast<double>(f16_to_f32(mid)) < v) lo = mid + 1; else hi = mid;
  }
  return sign | lo;
}

TEST(Dtype, F16RoundTripAllPatterns) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t x = static_cast<uint16_t>(h);
    const float f = f16_to_f32(x);
    if (std::isnan(f)) { EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))); continue; }
    ASSERT_EQ(f32_to_f16(f), x) << "pattern " << h;
  }
}

TEST(Dtype, F16RoundsToNearestEven) {
  std::mt19937 g(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {
    // Random bit patterns in the f16 range and just outside it, and exact midpoints.
    float f = bits_f32(bits(g) % 0x47900000u | (bits(g) & 0x80000000u));
    ASSERT_EQ(f32_to_f16(f), f16_oracle(f)) << f;
    const uint16_t h = static_cast<uint16_t>(bits(g) % 0x7bffu);
    const float mid = static_cast<float>((static_cast<double>(f16_to_f32(h)) + f16_to_f32(h + 1)) / 2);
    ASSERT_EQ(f32_to_f16(mid), f16_oracle(mid)) << mid;
  }
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(f32_to_f16(5.96046448e-8f), 0x0001);   // smallest subnormal
  EXPECT_EQ(f32_to_f16(2.98023224e-8f), 0x0000);   // exactly half of it: ties to even (0)
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

TEST(Dtype, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(bits_f32(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(f32_to_bf16(bits_f32(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(f32_to_bf16(bits_f32(0x3f808001u)), 0x3f81);
  EXPECT_EQ(f32_to_bf16(bits_f32(0x7f7fffffu)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
  std::mt19937 g(3);
  for (int i = 0; i < 100000; ++i) {
    const uint32_t b = g() & 0x7f7fffffu;
    if ((b & 0xffff0000u) == 0x7f7f0000u) continue;  // upper neighbour would be inf
    const float f = bits_f32(b);
    const double d = f;
    const float r = bf16_to_f32(f32_to_bf16(f));
    // The result is one of the two neighbours and no farther than the other.
    const float lo = bits_f32(f32_bits(f) & 0xffff0000u), hi = bits_f32((f32_bits(f) & 0xffff0000u) + 0x10000u);
    ASSERT_TRUE(r == lo || r == hi);
    ASSERT_LE(std::fabs(r - d), std::fabs((r == lo ? hi : lo) - d));
  }
}

TEST(Dtype, Parse) {
  EXPECT_EQ(parse_dtype("float16", "op", "out_dtype"), DType::f16);
  EXPECT_EQ(parse_dtype("bf16", "op", "out_dtype"), DType::bf16);
  test::expect_error([] { parse_dtype("float8", "op", "out_dtype"); }, {"op: ", "out_dtype", "float8"});
}

TEST(Tensor, ShapesAndChecks) {
  std::vector<float> d(12);
  TensorView t(d.data(), DType::f32, {3, 4});
  EXPECT_EQ(t.numel(), 12);
  EXPECT_TRUE(t.contiguous());
  EXPECT_EQ(t.shape_str(), "[3, 4]");
  const int64_t shape[2] = {3, 2}, strides[2] = {4, 1};
  TensorView s(d.data(), DType::f32, shape, 2, strides);
  EXPECT_FALSE(s.contiguous());
  test::expect_error([&] { check::shape("op", "x", t, {3, 5}); }, {"x must have shape [3, 5], got [3, 4]"});
  test::expect_error([&] { check::dtype("op", "x", t, DType::s8); }, {"x must be int8, got float32"});
  test::expect_error([&] { check::contiguous("op", "x", s); }, {"x must be contiguous"});
  test::expect_error([&] { check::present("op", "bias", TensorView()); }, {"bias is required"});
}

TEST(Workspace, AlignedBumpAndReset) {
  Workspace ws(1024);
  auto* a = ws.alloc<uint8_t>(3);
  auto* b = ws.alloc<float>(5);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u);
  EXPECT_EQ(ws.used(), 128u);
  ws.reset();
  EXPECT_EQ(ws.alloc<uint8_t>(1), a);
  EXPECT_THROW(ws.alloc<uint8_t>(2000), Error);
  WorkspacePlan plan;
  plan.add<uint8_t>(3);
  plan.add<float>(5);
  EXPECT_EQ(plan.bytes(), 128u);
  EXPECT_FALSE(ws.reserve(512));
  EXPECT_TRUE(ws.reserve(4096));
}

TEST(ThreadPool, CoversEveryIndexOnce) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 7, 1000}) {
      for (int64_t grain : {1, 3, 64}) {
        std::vector<std::atomic<int>> hits(n);
        pool.parallel_for(n, grain, [&](int64_t b, int64_t e, int tid) {
          EXPECT_GE(tid, 0);
          EXPECT_LT(tid, threads);
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1);
      }
    }
  }
}

TEST(ThreadPool, ManyShortLoops) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  for (int it = 0; it < 2000; ++it)
    pool.parallel_for(4, 1, [&](int64_t b, int64_t e, int) { sum += e - b; });
  EXPECT_EQ(sum.load(), 8000);
}

TEST(ThreadPool, RejectsBadEnv) {
  setenv("QLLM_NUM_THREADS", "zero", 1);
  test::expect_error([] { ThreadPool p; }, {"QLLM_NUM_THREADS", "zero"});
  setenv("QLLM_NUM_THREADS", "2", 1);
}

TEST(Cpu, IsaSelection) {
  EXPECT_TRUE(isa_supported(Isa::ref));
  EXPECT_EQ(parse_isa("avx2"), Isa::avx2);
  test::expect_error([] { parse_isa("avx9"); }, {"QLLM_ISA", "avx9"});
  const char* env = std::getenv("QLLM_ISA");
  if (env) {
    EXPECT_EQ(test::default_context().isa(), parse_isa(env));
  }
  for (Isa isa : supported_isas()) {
    Context c(ContextOptions{1, false, isa});
    EXPECT_EQ(c.kernels().isa, isa);
  }
}

TEST(Math, ExpMatchesLibm) {
  // exp_qllm is within 2 ulp of the correctly rounded exp over the range SwiGLU uses.
  for (float x = -87.0f; x <= 88.0f; x += 0.0137f) {
    const double want = std::exp(static_cast<double>(x));
    const double got = kernels::exp_qllm(x);
    ASSERT_LE(std::fabs(got - want), 2.0 * std::ldexp(1.0, std::ilogb(want) - 23)) << x;
  }
  EXPECT_EQ(kernels::silu_qllm(0.0f), 0.0f);
  EXPECT_LT(std::fabs(kernels::silu_qllm(-100.0f)), 1e-30f);  // exp clamps at 88: no inf/NaN
  EXPECT_EQ(kernels::silu_qllm(100.0f), 100.0f);
}

}  // namespace
}  // namespace qllm
