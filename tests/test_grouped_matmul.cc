// grouped_matmul: both paths, both layouts, both group-list types, odd shapes, bad input.
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "test_util.h"

namespace qllm {
namespace {

struct Groups { std::vector<int64_t> cumsum, count; int64_t total; };

Groups make_groups(const std::vector<int64_t>& counts) {
  Groups g;
  int64_t s = 0;
  for (int64_t c : counts) { s += c; g.cumsum.push_back(s); g.count.push_back(c); }
  g.total = s;
  return g;
}

// s8 path against an int64 triple loop; float outputs against the SPEC formula.
void check_int8(Isa isa, int64_t m, int64_t k, int64_t n, const std::vector<int64_t>& counts,
                bool transpose, GroupListType glt, DType out_dtype, bool packed) {
  const int64_t G = counts.size();
  const Groups grp = make_groups(counts);
  auto x = test::rand_s8(m * k);
  auto w = test::rand_s8(G * k * n);
  auto scale = test::rand_f32(G * n, 1e-4f, 1e-3f);
  auto pts = test::rand_f32(m, 0.5f, 2.0f);
  const auto& gl = glt == GroupListType::cumsum ? grp.cumsum : grp.count;
  GroupedMatmulArgs a;
  a.x = TensorView(x.data(), DType::s8, {m, k});
  a.w = transpose ? TensorView(w.data(), DType::s8, {G, n, k}) : TensorView(w.data(), DType::s8, {G, k, n});
  a.group_list = TensorView(gl.data(), DType::s64, {G});
  if (out_dtype != DType::s32) {
    a.scale = TensorView(scale.data(), DType::f32, {G, n});
    a.per_token_scale = TensorView(pts.data(), DType::f32, {m});
  }
  GroupedMatmulParams p;
  p.group_list_type = glt;
  p.transpose_w = transpose;
  p.out_dtype = out_dtype;
  PackedWeight pw;
  if (packed) {
    pw = PackedWeight::pack(a.w, transpose, isa);
    a.w = TensorView();
    a.packed_w = &pw;
  }
  std::vector<uint8_t> y(m * n * 4, 0xcd);
  grouped_matmul(test::context(isa), a, TensorView(y.data(), out_dtype, {m, n}), p);
  int64_t g = 0;
  for (int64_t r = 0; r < m; ++r) {
    while (g < G && r >= grp.cumsum[g]) ++g;
    for (int64_t c = 0; c < n; ++c) {
      int64_t acc = 0;
      if (r < grp.total)
        for (int64_t kk = 0; kk < k; ++kk)
          acc += int64_t{x[r * k + kk]} * w[g * k * n + (transpose ? c * k + kk : kk * n + c)];
      const int64_t i = r * n + c;
      if (out_dtype == DType::s32) {
        ASSERT_EQ(reinterpret_cast<int32_t*>(y.data())[i], r < grp.total ? acc : 0) << r << "," << c;
        continue;
      }
      const float want = r < grp.total ? (static_cast<float>(acc) * scale[g * n + c]) * pts[r] : 0.0f;
      float got;
      if (out_dtype == DType::f32) got = reinterpret_cast<float*>(y.data())[i];
      else if (out_dtype == DType::f16) { got = f16_to_f32(reinterpret_cast<uint16_t*>(y.data())[i]); ASSERT_EQ(reinterpret_cast<uint16_t*>(y.data())[i], f32_to_f16(want)); }
      else { got = bf16_to_f32(reinterpret_cast<uint16_t*>(y.data())[i]); ASSERT_EQ(reinterpret_cast<uint16_t*>(y.data())[i], f32_to_bf16(want)); }
      if (out_dtype == DType::f32) {
        ASSERT_EQ(got, want) << r << "," << c;
      }
    }
  }
}

TEST(GroupedMatmul, Int8Sweep) {
  for (Isa isa : test::isas()) {
    SCOPED_TRACE(isa_name(isa));
    check_int8(isa, 1, 1, 1, {1}, false, GroupListType::cumsum, DType::s32, false);
    check_int8(isa, 3, 100, 17, {1, 0, 2}, true, GroupListType::count, DType::s32, true);
    check_int8(isa, 17, 33, 40, {5, 0, 7, 3}, false, GroupListType::cumsum, DType::f32, true);
    check_int8(isa, 17, 64, 48, {0, 17}, true, GroupListType::cumsum, DType::f16, false);
    check_int8(isa, 20, 31, 5, {4, 6}, false, GroupListType::count, DType::bf16, true);   // total < m
    check_int8(isa, 0, 8, 16, {0}, false, GroupListType::cumsum, DType::f32, false);       // m = 0
    check_int8(isa, 255, 256, 96, {100, 0, 155}, true, GroupListType::cumsum, DType::f32, true);
  }
}

void check_float(Isa isa, DType dt, int64_t m, int64_t k, int64_t n, const std::vector<int64_t>& counts,
                 bool transpose, bool with_bias, DType out_dtype) {
  const int64_t G = counts.size();
  const Groups grp = make_groups(counts);
  auto xf = test::rand_f32(m * k), wf = test::rand_f32(G * k * n), bias = test::rand_f32(G * n);
  // Round inputs to the dtype so the float64 oracle sees the same values.
  std::vector<uint8_t> x(m * k * 4), w(G * k * n * 4);
  const auto& kt = test::context(Isa::ref).kernels();
  kt.from_f32(xf.data(), m * k, dt, x.data());
  kt.from_f32(wf.data(), G * k * n, dt, w.data());
  kt.to_f32(x.data(), dt, m * k, xf.data());
  kt.to_f32(w.data(), dt, G * k * n, wf.data());
  GroupedMatmulArgs a;
  a.x = TensorView(x.data(), dt, {m, k});
  a.w = transpose ? TensorView(w.data(), dt, {G, n, k}) : TensorView(w.data(), dt, {G, k, n});
  a.group_list = TensorView(grp.cumsum.data(), DType::s64, {G});
  if (with_bias) a.bias = TensorView(bias.data(), DType::f32, {G, n});
  GroupedMatmulParams p;
  p.transpose_w = transpose;
  p.out_dtype = out_dtype;
  std::vector<uint8_t> y(m * n * 4);
  grouped_matmul(test::context(isa), a, TensorView(y.data(), out_dtype, {m, n}), p);
  std::vector<float> yf(m * n);
  kt.to_f32(y.data(), out_dtype, m * n, yf.data());
  // Tolerance: f32 accumulation of k products of |x|,|w| <= 1 has error <= k * eps32 * sum|x w|
  // (sum|x w| <= k), plus the output rounding of half an ulp of the output dtype.
  const double eps_out = out_dtype == DType::f32 ? 0x1p-24 : out_dtype == DType::f16 ? 0x1p-11 : 0x1p-8;
  int64_t g = 0;
  for (int64_t r = 0; r < m; ++r) {
    while (g < G && r >= grp.cumsum[g]) ++g;
    for (int64_t c = 0; c < n; ++c) {
      double want = 0, mag = 0;
      if (r < grp.total) {
        for (int64_t kk = 0; kk < k; ++kk) {
          const double t = double(xf[r * k + kk]) * wf[g * k * n + (transpose ? c * k + kk : kk * n + c)];
          want += t;
          mag += std::fabs(t);
        }
        if (with_bias) { want += bias[g * n + c]; mag += std::fabs(bias[g * n + c]); }
      }
      const double tol = k * 0x1p-24 * mag + eps_out * std::fabs(want) + 1e-30;
      ASSERT_NEAR(yf[r * n + c], want, tol) << r << "," << c;
    }
  }
}

TEST(GroupedMatmul, FloatSweep) {
  for (Isa isa : test::isas()) {
    SCOPED_TRACE(isa_name(isa));
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
      check_float(isa, dt, 1, 1, 1, {1}, false, false, DType::f32);
      check_float(isa, dt, 3, 37, 17, {1, 0, 2}, true, true, dt);
      check_float(isa, dt, 17, 64, 33, {5, 0, 7}, false, true, DType::f32);  // total < m
    }
  }
}

TEST(GroupedMatmul, IsasAgreeBitwise) {
  const int64_t m = 29, k = 77, n = 50, G = 3;
  std::vector<int64_t> gl = {10, 10, 29};
  auto x = test::rand_s8(m * k), w = test::rand_s8(G * n * k);
  auto scale = test::rand_f32(G * n), pts = test::rand_f32(m);
  GroupedMatmulArgs a;
  a.x = TensorView(x.data(), DType::s8, {m, k});
  a.w = TensorView(w.data(), DType::s8, {G, n, k});
  a.group_list = TensorView(gl.data(), DType::s64, {G});
  a.scale = TensorView(scale.data(), DType::f32, {G, n});
  a.per_token_scale = TensorView(pts.data(), DType::f32, {m});
  GroupedMatmulParams p;
  p.transpose_w = true;
  p.out_dtype = DType::f16;
  std::vector<uint16_t> y1(m * n), y2(m * n);
  grouped_matmul(test::context(Isa::ref), a, TensorView(y1.data(), DType::f16, {m, n}), p);
  for (Isa isa : test::fast_isas()) {
    grouped_matmul(test::context(isa), a, TensorView(y2.data(), DType::f16, {m, n}), p);
    EXPECT_EQ(y1, y2) << isa_name(isa);
  }
}

TEST(GroupedMatmul, RejectsBadInput) {
  Context& ctx = test::default_context();
  const int64_t m = 8, k = 16, n = 16, G = 2;
  std::vector<int8_t> x(m * k, 1), w(G * k * n, 1);
  std::vector<float> scale(G * n, 1.0f), pts(m, 1.0f), xf(m * k);
  std::vector<int64_t> gl = {4, 8};
  std::vector<int32_t> y(m * n, 77);
  auto base = [&] {
    GroupedMatmulArgs a;
    a.x = TensorView(x.data(), DType::s8, {m, k});
    a.w = TensorView(w.data(), DType::s8, {G, k, n});
    a.group_list = TensorView(gl.data(), DType::s64, {G});
    return a;
  };
  GroupedMatmulParams p;
  p.out_dtype = DType::s32;
  const TensorView yv(y.data(), DType::s32, {m, n});
  auto run = [&](GroupedMatmulArgs a, GroupedMatmulParams pp = {}) { grouped_matmul(ctx, a, yv, pp); };
  p.out_dtype = DType::s32;
  auto with_gl = [&](std::vector<int64_t> v, GroupListType t, std::initializer_list<const char*> frags) {
    GroupedMatmulArgs a = base();
    a.group_list = TensorView(v.data(), DType::s64, {static_cast<int64_t>(v.size())});
    GroupedMatmulParams pp = p;
    pp.group_list_type = t;
    test::expect_error([&] { run(a, pp); }, frags);
  };
  with_gl({5, 3}, GroupListType::cumsum, {"grouped_matmul: ", "group_list[1] = 3 < group_list[0] = 5", "non-decreasing"});
  with_gl({4, 9}, GroupListType::cumsum, {"group_list total 9", "exceeds m = 8"});
  with_gl({-1, 4}, GroupListType::count, {"group_list[0] = -1 is negative"});
  with_gl({5, 4}, GroupListType::count, {"sum past m = 8"});
  with_gl({8}, GroupListType::cumsum, {"group_list must have 2 entries"});
  {
    GroupedMatmulArgs a = base();
    std::vector<int32_t> gl32 = {4, 8};
    a.group_list = TensorView(gl32.data(), DType::s32, {G});
    test::expect_error([&] { run(a, p); }, {"group_list must be int64, got int32"});
  }
  {
    GroupedMatmulArgs a = base();
    a.x = TensorView(xf.data(), DType::f32, {m, k});
    test::expect_error([&] { run(a, p); }, {"w must have x's dtype float32, got int8"});
  }
  {
    GroupedMatmulArgs a = base();
    a.x = TensorView(x.data(), DType::s8, {m, k - 1});
    test::expect_error([&] { run(a, p); }, {"does not match x's k = 15"});
  }
  {
    GroupedMatmulArgs a = base();
    a.w = TensorView();
    test::expect_error([&] { run(a, p); }, {"w is required"});
  }
  {
    GroupedMatmulArgs a = base();
    GroupedMatmulParams pp;
    pp.out_dtype = DType::f16;
    std::vector<uint16_t> yh(m * n);
    test::expect_error([&] { grouped_matmul(ctx, a, TensorView(yh.data(), DType::f16, {m, n}), pp); }, {"scale is required"});
    a.scale = TensorView(scale.data(), DType::f32, {G, n - 1});
    test::expect_error([&] { grouped_matmul(ctx, a, TensorView(yh.data(), DType::f16, {m, n}), pp); }, {"scale must have shape [2, 16], got [2, 15]"});
  }
  {
    GroupedMatmulArgs a = base();
    test::expect_error([&] { grouped_matmul(ctx, a, TensorView(y.data(), DType::s32, {m, n + 1}), p); }, {"y must have shape [8, 16]"});
  }
  // Nothing was written by any rejected call.
  for (int32_t v : y) ASSERT_EQ(v, 77);
}

}  // namespace
}  // namespace qllm
