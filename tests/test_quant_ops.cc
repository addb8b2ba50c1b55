// dynamic_quant, swiglu, swiglu_quant, dequant at the operator level.
#include <cmath>

#include "kernels/ref/math.h"
#include "test_util.h"

namespace qllm {
namespace {

// SPEC section 0, written out independently of the kernels.
void spec_quant(const float* v, int64_t n, int8_t* q, float* scale) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  *scale = amax / 127.0f;
  for (int64_t i = 0; i < n; ++i) q[i] = amax == 0 ? 0 : static_cast<int8_t>(std::nearbyint(v[i] * (127.0f / amax)));
}

TEST(DynamicQuant, MatchesSpecWithAndWithoutSmoothing) {
  for (Isa isa : test::isas()) {
    for (int64_t rows : {1, 3, 17}) {
      for (int64_t h : {1, 31, 100}) {
        auto x = test::rand_f32(rows * h, -3, 3);
        for (int64_t i = 0; i < h; ++i) x[i] = 0;  // row 0 all zero
        auto smooth = test::rand_f32(2 * h, 0.5, 1.5);
        std::vector<int64_t> gidx = {rows / 2, rows - 1};  // last row: no smoothing
        for (int mode = 0; mode < 3; ++mode) {
          DynamicQuantArgs a;
          a.x = TensorView(x.data(), DType::f32, {rows, h});
          if (mode == 1) a.smooth_scales = TensorView(smooth.data(), DType::f32, {h});
          if (mode == 2) {
            a.smooth_scales = TensorView(smooth.data(), DType::f32, {2, h});
            a.group_index = TensorView(gidx.data(), DType::s64, {2});
          }
          std::vector<int8_t> q(rows * h);
          std::vector<float> s(rows);
          dynamic_quant(test::context(isa), a, TensorView(q.data(), DType::s8, {rows, h}), TensorView(s.data(), DType::f32, {rows}));
          for (int64_t r = 0; r < rows; ++r) {
            std::vector<float> v(x.begin() + r * h, x.begin() + (r + 1) * h);
            const float* sm = mode == 1 ? smooth.data() : mode == 2 ? (r < gidx[0] ? smooth.data() : r < gidx[1] ? smooth.data() + h : nullptr) : nullptr;
            if (sm) for (int64_t i = 0; i < h; ++i) v[i] *= sm[i];
            std::vector<int8_t> wq(h);
            float ws;
            spec_quant(v.data(), h, wq.data(), &ws);
            ASSERT_EQ(s[r], ws);
            for (int64_t i = 0; i < h; ++i) ASSERT_EQ(q[r * h + i], wq[i]) << isa_name(isa) << " mode " << mode;
          }
          EXPECT_EQ(s[0], 0.0f);
        }
      }
    }
  }
}

TEST(DynamicQuant, HalfInputs) {
  const int64_t rows = 3, h = 40;
  auto xf = test::rand_f32(rows * h);
  std::vector<uint16_t> xh(rows * h);
  for (size_t i = 0; i < xh.size(); ++i) { xh[i] = f32_to_bf16(xf[i]); xf[i] = bf16_to_f32(xh[i]); }
  std::vector<int8_t> q(rows * h), wq(h);
  std::vector<float> s(rows);
  DynamicQuantArgs a;
  a.x = TensorView(xh.data(), DType::bf16, {rows, h});
  dynamic_quant(test::default_context(), a, TensorView(q.data(), DType::s8, {rows, h}), TensorView(s.data(), DType::f32, {rows}));
  for (int64_t r = 0; r < rows; ++r) {
    float ws;
    spec_quant(xf.data() + r * h, h, wq.data(), &ws);
    EXPECT_EQ(s[r], ws);
    for (int64_t i = 0; i < h; ++i) EXPECT_EQ(q[r * h + i], wq[i]);
  }
}

TEST(Swiglu, MatchesDefinitionBothSides) {
  for (Isa isa : test::isas()) {
    for (int64_t h : {1, 9, 64}) {
      const int64_t rows = 3;
      auto x = test::rand_f32(rows * 2 * h, -6, 6);
      for (bool left : {true, false}) {
        std::vector<float> y(rows * h);
        swiglu(test::context(isa), TensorView(x.data(), DType::f32, {rows, 2 * h}), TensorView(y.data(), DType::f32, {rows, h}), left);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < h; ++j) {
            const float a = x[r * 2 * h + (left ? j : h + j)], b = x[r * 2 * h + (left ? h + j : j)];
            // exp_qllm is within 2 ulp of exp; the division and product add 1 ulp each.
            ASSERT_NEAR(y[r * h + j], b * test::silu_ref(a), 6e-7 * std::fabs(b * test::silu_ref(a)) + 1e-30);
          }
      }
    }
  }
}

TEST(SwigluQuant, EqualsSwigluThenQuant) {
  for (Isa isa : test::isas()) {
    const int64_t rows = 17, h = 45;
    auto x = test::rand_f32(rows * 2 * h, -4, 4);
    for (int64_t i = 0; i < 2 * h; ++i) x[5 * 2 * h + i] = 0;  // an all-zero row
    std::vector<float> y(rows * h), s(rows), s2(rows);
    std::vector<int8_t> q(rows * h), q2(rows * h);
    Context& ctx = test::context(isa);
    swiglu(ctx, TensorView(x.data(), DType::f32, {rows, 2 * h}), TensorView(y.data(), DType::f32, {rows, h}));
    DynamicQuantArgs a;
    a.x = TensorView(y.data(), DType::f32, {rows, h});
    dynamic_quant(ctx, a, TensorView(q.data(), DType::s8, {rows, h}), TensorView(s.data(), DType::f32, {rows}));
    swiglu_quant(ctx, TensorView(x.data(), DType::f32, {rows, 2 * h}), TensorView(q2.data(), DType::s8, {rows, h}), TensorView(s2.data(), DType::f32, {rows}));
    EXPECT_EQ(q, q2);
    EXPECT_EQ(s, s2);
    EXPECT_EQ(s[5], 0.0f);
  }
}

TEST(Dequant, MatchesFormula) {
  for (Isa isa : test::isas()) {
    const int64_t rows = 5, n = 19;
    std::vector<int32_t> acc(rows * n);
    for (auto& v : acc) v = static_cast<int32_t>(test::rng()() % 2000001) - 1000000;
    auto sc = test::rand_f32(n, 1e-5f, 1e-3f), pts = test::rand_f32(rows, 0.1f, 2.0f);
    std::vector<uint16_t> y(rows * n);
    dequant(test::context(isa), TensorView(acc.data(), DType::s32, {rows, n}), TensorView(sc.data(), DType::f32, {n}),
            TensorView(pts.data(), DType::f32, {rows}), TensorView(y.data(), DType::f16, {rows, n}));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c)
        ASSERT_EQ(y[r * n + c], f32_to_f16((static_cast<float>(acc[r * n + c]) * sc[c]) * pts[r]));
  }
}

TEST(QuantOps, RejectBadInput) {
  Context& ctx = test::default_context();
  std::vector<float> x(6 * 8);
  std::vector<int8_t> q(6 * 4, 9);
  std::vector<float> s(6, 9.0f);
  test::expect_error([&] { swiglu_quant(ctx, TensorView(x.data(), DType::f32, {6, 7}), TensorView(q.data(), DType::s8, {6, 3}), TensorView(s.data(), DType::f32, {6})); },
                     {"swiglu_quant: ", "x's last dimension must be even (2h), got 7"});
  test::expect_error([&] { swiglu_quant(ctx, TensorView(x.data(), DType::f32, {6, 8}), TensorView(q.data(), DType::s8, {6, 3}), TensorView(s.data(), DType::f32, {6})); },
                     {"q must have shape [6, 4], got [6, 3]"});
  test::expect_error([&] { swiglu_quant(ctx, TensorView(q.data(), DType::s8, {6, 4}), TensorView(q.data(), DType::s8, {6, 2}), TensorView(s.data(), DType::f32, {6})); },
                     {"x must be float32, float16 or bfloat16, got int8"});
  DynamicQuantArgs a;
  a.x = TensorView(x.data(), DType::f32, {6, 8});
  std::vector<float> sm(16, 1.0f);
  std::vector<int64_t> gi = {4, 2};
  a.smooth_scales = TensorView(sm.data(), DType::f32, {2, 8});
  a.group_index = TensorView(gi.data(), DType::s64, {2});
  std::vector<int8_t> q8(48, 9);
  test::expect_error([&] { dynamic_quant(ctx, a, TensorView(q8.data(), DType::s8, {6, 8}), TensorView(s.data(), DType::f32, {6})); },
                     {"dynamic_quant: ", "group_index[1] = 2 < group_index[0] = 4"});
  gi = {4, 7};
  test::expect_error([&] { dynamic_quant(ctx, a, TensorView(q8.data(), DType::s8, {6, 8}), TensorView(s.data(), DType::f32, {6})); },
                     {"group_index[1] = 7 is outside [0, rows = 6]"});
  a.group_index = TensorView();
  test::expect_error([&] { dynamic_quant(ctx, a, TensorView(q8.data(), DType::s8, {6, 8}), TensorView(s.data(), DType::f32, {6})); },
                     {"group_index is required"});
  for (int8_t v : q) ASSERT_EQ(v, 9);
  for (int8_t v : q8) ASSERT_EQ(v, 9);
  for (float v : s) ASSERT_EQ(v, 9.0f);
}

}  // namespace
}  // namespace qllm
