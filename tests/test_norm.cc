// rms_norm / add_rms_norm / layer_norm / rope: against a double-precision oracle, ref vs SIMD
// bit for bit (the kernels sum in the same lane order), in place, and bad input.
#include <cmath>

#include "float_codec.h"
#include "test_util.h"

namespace qllm {
namespace {

using test::context;

using test::decode;
using test::encode;
using test::out_abs;
using test::out_eps;

const DType kFloats[] = {DType::f32, DType::f16, DType::bf16};

TEST(RmsNorm, MatchesOracleAndRefBitExact) {
  for (DType dt : kFloats)
    for (int64_t rows : {1, 3, 17})
      for (int64_t h : {1, 3, 17, 64, 100, 4096}) {
        auto xf = test::rand_f32(rows * h, -2, 2);
        if (rows == 3) std::fill(xf.begin() + h, xf.begin() + 2 * h, 0.0f);  // an all-zero row
        auto gf = test::rand_f32(h, 0.5f, 1.5f);
        const auto xb = encode(xf, dt), gb = encode(gf, dt);
        const auto xd = decode(xb, dt), gd = decode(gb, dt);
        const float eps = 1e-6f;
        std::vector<std::vector<uint8_t>> outs;
        for (Isa isa : test::isas()) {
          std::vector<uint8_t> y(xb.size());
          rms_norm(context(isa), TensorView(xb.data(), dt, {rows, h}), TensorView(gb.data(), dt, {h}), eps,
                   TensorView(y.data(), dt, {rows, h}));
          outs.push_back(y);
        }
        for (size_t i = 1; i < outs.size(); ++i) ASSERT_EQ(outs[i], outs[0]) << "ref vs " << isa_name(test::isas()[i]);
        // Tolerance: the f32 sum of h squares in 8 lanes errs by <= (h/8 + 3) u relative, which
        // enters the result halved through the rsqrt, plus ~4 u for sqrt/divide/two products,
        // plus the output rounding: |err| <= ((h/8 + 3)/2 + 4) 2^-24 |y| + out_eps |y|.
        const auto y = decode(outs[0], dt);
        for (int64_t r = 0; r < rows; ++r) {
          double ss = 0;
          for (int64_t i = 0; i < h; ++i) ss += static_cast<double>(xd[r * h + i]) * xd[r * h + i];
          const double inv = 1.0 / std::sqrt(ss / h + eps);
          for (int64_t i = 0; i < h; ++i) {
            const double want = xd[r * h + i] * inv * gd[i];
            const double tol = ((h / 8.0 + 3) / 2 + 4) * 0x1p-24 * std::fabs(want) + out_eps(dt) * std::fabs(want) + out_abs(dt) + 1e-30;
            ASSERT_NEAR(y[r * h + i], want, tol) << dtype_name(dt) << " rows " << rows << " h " << h;
          }
        }
      }
}

TEST(RmsNorm, InPlaceEqualsOutOfPlace) {
  const int64_t rows = 5, h = 37;
  auto x = test::rand_f32(rows * h), g = test::rand_f32(h);
  std::vector<float> y(rows * h);
  Context& c = test::default_context();
  rms_norm(c, TensorView(x.data(), DType::f32, {rows, h}), TensorView(g.data(), DType::f32, {h}), 1e-5f,
           TensorView(y.data(), DType::f32, {rows, h}));
  rms_norm(c, TensorView(x.data(), DType::f32, {rows, h}), TensorView(g.data(), DType::f32, {h}), 1e-5f,
           TensorView(x.data(), DType::f32, {rows, h}));
  EXPECT_EQ(x, y);
}

TEST(AddRmsNorm, UpdatesResidualThenNormalises) {
  for (DType dt : kFloats)
    for (int64_t h : {1, 19, 256}) {
      const int64_t rows = 3;
      auto xf = test::rand_f32(rows * h), rf = test::rand_f32(rows * h), gf = test::rand_f32(h, 0.5f, 1.5f);
      auto xb = encode(xf, dt), rb = encode(rf, dt), gb = encode(gf, dt);
      const auto xd = decode(xb, dt), rd = decode(rb, dt);
      std::vector<std::vector<uint8_t>> outs;
      for (Isa isa : test::isas()) {
        auto r = rb;
        auto y = xb;  // in place on x
        add_rms_norm(context(isa), TensorView(y.data(), dt, {rows, h}), TensorView(r.data(), dt, {rows, h}),
                     TensorView(gb.data(), dt, {h}), 1e-6f, TensorView(y.data(), dt, {rows, h}));
        // residual = round(residual + x) exactly as the dtype rounds.
        const auto rnew = decode(r, dt);
        for (int64_t i = 0; i < rows * h; ++i) ASSERT_EQ(rnew[i], decode(encode({rd[i] + xd[i]}, dt), dt)[0]);
        // y = rms_norm(new residual), bit-identical to the unfused call.
        std::vector<uint8_t> want(xb.size());
        rms_norm(context(isa), TensorView(r.data(), dt, {rows, h}), TensorView(gb.data(), dt, {h}), 1e-6f,
                 TensorView(want.data(), dt, {rows, h}));
        ASSERT_EQ(y, want);
        outs.push_back(y);
      }
      for (size_t i = 1; i < outs.size(); ++i) ASSERT_EQ(outs[i], outs[0]);
    }
}

TEST(LayerNorm, MatchesOracleAndRefBitExact) {
  for (DType dt : kFloats)
    for (bool with_beta : {false, true})
      for (int64_t h : {1, 3, 17, 128, 1000}) {
        const int64_t rows = 4;
        auto xf = test::rand_f32(rows * h, -3, 5);
        std::fill(xf.begin(), xf.begin() + h, 0.0f);
        auto gf = test::rand_f32(h, 0.5f, 1.5f), bf = test::rand_f32(h);
        const auto xb = encode(xf, dt), gb = encode(gf, dt), bb = encode(bf, dt);
        const auto xd = decode(xb, dt), gd = decode(gb, dt), bd = decode(bb, dt);
        const float eps = 1e-5f;
        std::vector<std::vector<uint8_t>> outs;
        for (Isa isa : test::isas()) {
          std::vector<uint8_t> y(xb.size());
          layer_norm(context(isa), TensorView(xb.data(), dt, {rows, h}), TensorView(gb.data(), dt, {h}),
                     with_beta ? TensorView(bb.data(), dt, {h}) : TensorView(), eps, TensorView(y.data(), dt, {rows, h}));
          outs.push_back(y);
        }
        for (size_t i = 1; i < outs.size(); ++i) ASSERT_EQ(outs[i], outs[0]);
        // Tolerance: mean and variance are 8-lane f32 sums ((h/8 + 3) u relative each, relative to
        // sum|x| and sum (x-mean)^2); the mean error shifts every centred value by ~(h/8+3) u max|x|,
        // so |err| <= (h/8 + 8) 2^-24 (|y| + max|x| r |g|) + out_eps (|y| + |beta|).
        const auto y = decode(outs[0], dt);
        for (int64_t r = 0; r < rows; ++r) {
          double mean = 0, var = 0, amax = 0;
          for (int64_t i = 0; i < h; ++i) mean += xd[r * h + i], amax = std::max(amax, std::fabs(double(xd[r * h + i])));
          mean /= h;
          for (int64_t i = 0; i < h; ++i) var += (xd[r * h + i] - mean) * (xd[r * h + i] - mean);
          const double inv = 1.0 / std::sqrt(var / h + eps);
          for (int64_t i = 0; i < h; ++i) {
            const double want = (xd[r * h + i] - mean) * inv * gd[i] + (with_beta ? bd[i] : 0.0);
            const double tol = (h / 8.0 + 8) * 0x1p-24 * (std::fabs(want) + amax * inv * std::fabs(gd[i])) +
                               out_eps(dt) * (std::fabs(want) + std::fabs(bd[i])) + out_abs(dt) + 1e-30;
            ASSERT_NEAR(y[r * h + i], want, tol) << dtype_name(dt) << " h " << h;
          }
        }
      }
}

TEST(Rope, NeoxAndGptjMatchOracle) {
  for (DType dt : kFloats)
    for (RopeStyle style : {RopeStyle::neox, RopeStyle::gptj})
      for (auto [D, rd] : {std::pair<int64_t, int64_t>{64, 0}, {128, 64}, {18, 6}, {8, 8}, {2, 2}, {40, 40}}) {
        const int64_t T = 5, Hq = 3, Hk = 1;
        auto qf = test::rand_f32(T * Hq * D), kf = test::rand_f32(T * Hk * D);
        const auto qb = encode(qf, dt), kb = encode(kf, dt);
        const auto qd = decode(qb, dt), kd = decode(kb, dt);
        std::vector<int32_t> pos = {0, 1, 7, 1000, 32767};
        RopeParams p;
        p.theta = 10000.0f;
        p.rotary_dim = rd;
        p.style = style;
        const int64_t r = rd ? rd : D;
        std::vector<std::vector<uint8_t>> outs;
        for (Isa isa : test::isas()) {
          auto q = qb, k = kb;
          rope(context(isa), TensorView(q.data(), dt, {T, Hq, D}), TensorView(k.data(), dt, {T, Hk, D}),
               TensorView(pos.data(), DType::s32, {T}), p);
          q.insert(q.end(), k.begin(), k.end());
          outs.push_back(q);
        }
        for (size_t i = 1; i < outs.size(); ++i) ASSERT_EQ(outs[i], outs[0]);
        auto all = decode(outs[0], dt);
        auto in = qd;
        in.insert(in.end(), kd.begin(), kd.end());
        // Tolerance: cos/sin are the double values rounded to f32 (1 u each), two products and a
        // sum (3 u): |err| <= 6 u (|a| + |b|) + the output rounding out_eps |y|.
        for (int64_t t = 0; t < T; ++t)
          for (int64_t h = 0; h < Hq + Hk; ++h) {
            const int64_t base = h < Hq ? (t * Hq + h) * D : T * Hq * D + (t * Hk + (h - Hq)) * D;
            for (int64_t i = 0; i < r / 2; ++i) {
              const int64_t ia = style == RopeStyle::neox ? i : 2 * i, ib = style == RopeStyle::neox ? i + r / 2 : 2 * i + 1;
              const double ang = pos[t] * std::pow(10000.0, -2.0 * i / r);
              const double a = in[base + ia], b = in[base + ib];
              const double wa = a * std::cos(ang) - b * std::sin(ang), wb = b * std::cos(ang) + a * std::sin(ang);
              const double tol = 6 * 0x1p-24 * (std::fabs(a) + std::fabs(b)) + out_eps(dt) * (std::fabs(wa) + std::fabs(wb)) + out_abs(dt);
              ASSERT_NEAR(all[base + ia], wa, tol);
              ASSERT_NEAR(all[base + ib], wb, tol);
            }
            for (int64_t i = r; i < D; ++i) ASSERT_EQ(all[base + i], in[base + i]);  // untouched
          }
      }
}

TEST(NormErrors, BadInputIsRejectedAndNothingWritten) {
  Context& c = test::default_context();
  std::vector<float> x(12, 1.0f), g(4, 1.0f), y(12, 7.0f), g3(3, 1.0f);
  const TensorView xv(x.data(), DType::f32, {3, 4}), yv(y.data(), DType::f32, {3, 4});
  test::expect_error([&] { rms_norm(c, xv, TensorView(g3.data(), DType::f32, {3}), 1e-6f, yv); },
                     {"rms_norm", "gamma", "[4]", "[3]"});
  test::expect_error([&] { rms_norm(c, xv, TensorView(g.data(), DType::f32, {4}), 1e-6f, TensorView(y.data(), DType::f32, {4, 3})); },
                     {"rms_norm", "y", "[3, 4]", "[4, 3]"});
  test::expect_error([&] { rms_norm(c, xv, TensorView(g.data(), DType::f32, {4}), -1.0f, yv); }, {"rms_norm", "eps"});
  test::expect_error([&] { rms_norm(c, TensorView(x.data(), DType::s32, {3, 4}), TensorView(g.data(), DType::f32, {4}), 1e-6f, yv); },
                     {"rms_norm", "x"});
  test::expect_error([&] { add_rms_norm(c, xv, TensorView(y.data(), DType::f32, {2, 4}), TensorView(g.data(), DType::f32, {4}), 1e-6f, yv); },
                     {"add_rms_norm", "residual", "[3, 4]", "[2, 4]"});
  test::expect_error([&] { layer_norm(c, xv, TensorView(g.data(), DType::f32, {4}), TensorView(g3.data(), DType::f32, {3}), 1e-6f, yv); },
                     {"layer_norm", "beta"});
  for (float v : y) ASSERT_EQ(v, 7.0f);
  std::vector<float> q(2 * 2 * 8, 1.0f), k(2 * 1 * 8, 1.0f);
  const auto q0 = q;
  std::vector<int32_t> pos = {0, -1}, pos_ok = {0, 1};
  const TensorView qv(q.data(), DType::f32, {2, 2, 8}), kv(k.data(), DType::f32, {2, 1, 8});
  test::expect_error([&] { rope(c, qv, kv, TensorView(pos.data(), DType::s32, {2}), {}); }, {"rope", "positions[1] = -1"});
  RopeParams odd;
  odd.rotary_dim = 5;
  test::expect_error([&] { rope(c, qv, kv, TensorView(pos_ok.data(), DType::s32, {2}), odd); }, {"rope", "rotary_dim", "5"});
  RopeParams big;
  big.rotary_dim = 10;
  test::expect_error([&] { rope(c, qv, kv, TensorView(pos_ok.data(), DType::s32, {2}), big); }, {"rope", "rotary_dim", "10"});
  std::vector<float> k4(2 * 1 * 4);
  test::expect_error([&] { rope(c, qv, TensorView(k4.data(), DType::f32, {2, 1, 4}), TensorView(pos_ok.data(), DType::s32, {2}), {}); },
                     {"rope", "k", "head size 4"});
  test::expect_error([&] { rope(c, qv, kv, TensorView(pos_ok.data(), DType::s32, {1}), {}); }, {"rope", "positions"});
  EXPECT_EQ(q, q0);
}

}  // namespace
}  // namespace qllm
