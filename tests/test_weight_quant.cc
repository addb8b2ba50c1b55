// weight_quant_matmul / quantize_weight / dequantize_weight (SPEC section 5): the reference
// against an independent double-precision matmul of the dequantised weight, every ISA against
// the reference (GEMM path bit for bit, matrix-vector path within a derived bound), odd shapes,
// both layouts, 8 and 4 bits, offsets, bias, output dtypes, bad input.
#include <cmath>
#include <cstring>

#include "test_util.h"

namespace qllm {
namespace {

float to_f(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
void from_f(DType dt, void* p, int64_t i, float v) {
  switch (dt) {
    case DType::f16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// A quantised weight made by quantize_weight from Gaussian-ish floats, with its dequantised
// form W' in [k, n] order (f32) for the independent check.
struct QW {
  int bits;
  int64_t k, n, gs, groups;
  bool transpose, sym;
  std::vector<uint8_t> q;
  std::vector<float> scale, offset, wdq;  // wdq: W'[kk * n + c]
  TensorView qv() const {
    const DType dt = bits == 8 ? DType::s8 : DType::s4x2;
    const int64_t d0 = transpose ? n : k, d1 = transpose ? k : n;
    return TensorView(q.data(), dt, {d0, bits == 8 ? d1 : d1 / 2});
  }
  TensorView sv() const {
    return gs ? TensorView(scale.data(), DType::f32, {groups, n}) : TensorView(scale.data(), DType::f32, {n});
  }
  TensorView ov() const {
    if (sym) return TensorView();
    return gs ? TensorView(offset.data(), DType::f32, {groups, n}) : TensorView(offset.data(), DType::f32, {n});
  }
};

QW make_qw(int bits, int64_t k, int64_t n, int64_t gs, bool transpose, bool sym, bool zero_col = true) {
  QW w{bits, k, n, gs, gs ? (k + gs - 1) / gs : 1, transpose, sym, {}, {}, {}, {}};
  auto src = test::rand_f32(k * n, -1.0f, 1.0f);
  // Column 0 all zero (if n > 1): the zero-scale group case.
  if (zero_col && n > 1)
    for (int64_t kk = 0; kk < k; ++kk) src[transpose ? kk : kk * n] = 0.0f;
  const int64_t d0 = transpose ? n : k, d1 = transpose ? k : n;
  w.q.assign(d0 * (bits == 8 ? d1 : d1 / 2), 0);
  w.scale.assign(w.groups * n, 0);
  if (!sym) w.offset.assign(w.groups * n, 0);
  QuantizeWeightParams p;
  p.bits = bits;
  p.group_size = gs;
  p.symmetric = sym;
  p.transpose_w = transpose;
  quantize_weight(TensorView(src.data(), DType::f32, {d0, d1}), w.qv(), w.sv(), w.ov(), p);
  std::vector<float> dq(k * n);
  dequantize_weight(w.qv(), w.sv(), w.ov(), TensorView(dq.data(), DType::f32, {d0, d1}), gs, transpose);
  w.wdq.resize(k * n);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t c = 0; c < n; ++c) w.wdq[kk * n + c] = dq[transpose ? c * k + kk : kk * n + c];
  return w;
}

struct Run {
  std::vector<uint8_t> x, bias, y;
  DType xdt, ydt;
};

std::vector<uint8_t> rand_float_bytes(DType dt, int64_t count, float lo, float hi) {
  auto f = test::rand_f32(count, lo, hi);
  std::vector<uint8_t> out(count * dtype_size(dt));
  for (int64_t i = 0; i < count; ++i) from_f(dt, out.data(), i, f[i]);
  return out;
}

void run_op(Context& ctx, const QW& w, const std::vector<uint8_t>& x, DType xdt, int64_t m, const std::vector<uint8_t>* bias,
            DType bdt, std::vector<uint8_t>& y, DType ydt, bool packed) {
  WeightQuantMatmulArgs a;
  a.x = TensorView(x.data(), xdt, {m, w.k});
  PackedQuantWeight pw;
  if (packed) {
    pw = PackedQuantWeight::pack(w.qv(), w.sv(), w.ov(), w.gs, w.transpose);
    a.packed_w = &pw;
  } else {
    a.w = w.qv();
    a.scale = w.sv();
    a.offset = w.ov();
  }
  if (bias) a.bias = TensorView(bias->data(), bdt, {w.n});
  WeightQuantMatmulParams p;
  p.transpose_w = w.transpose;
  p.group_size = w.gs;
  y.assign(m * w.n * dtype_size(ydt), 0xAB);
  weight_quant_matmul(ctx, a, TensorView(y.data(), ydt, {m, w.n}), p);
}

// One configuration through ref (checked against a double matmul of W') and every fast ISA.
void check(int bits, int64_t m, int64_t k, int64_t n, int64_t gs, bool transpose, bool sym, DType xdt, DType ydt,
           bool with_bias, bool zero_row = false, const std::vector<float>* x_given = nullptr) {
  SCOPED_TRACE(testing::Message() << "bits " << bits << " m " << m << " k " << k << " n " << n << " gs " << gs << " T "
                                  << transpose << " sym " << sym << " x " << dtype_name(xdt) << " y " << dtype_name(ydt)
                                  << " bias " << with_bias);
  const QW w = make_qw(bits, k, n, gs, transpose, sym);
  auto x = rand_float_bytes(xdt, m * k, -1.0f, 1.0f);
  if (x_given)
    for (int64_t i = 0; i < m * k; ++i) from_f(xdt, x.data(), i, (*x_given)[i]);
  if (zero_row && m > 1) std::memset(x.data() + (m / 2) * k * dtype_size(xdt), 0, k * dtype_size(xdt));
  auto bias = rand_float_bytes(DType::f32, n, -1.0f, 1.0f);
  std::vector<uint8_t> yref;
  run_op(test::context(Isa::ref), w, x, xdt, m, with_bias ? &bias : nullptr, DType::f32, yref, ydt, true);

  // Ref against the double-precision product: the ref sums k terms in f32 with one rounding
  // each (error <= k * 2^-24 * sum |x W'|), adds the bias (one more), then rounds to y's dtype
  // (half an ulp: 2^-24 f32, 2^-11 f16, 2^-8 bf16 relative).
  const double out_eps = ydt == DType::f32 ? 0x1p-24 : ydt == DType::f16 ? 0x1p-11 : 0x1p-8;
  std::vector<double> absum(m * n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      double acc = 0, ab = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double xv = to_f(xdt, x.data(), r * k + kk), wv = w.wdq[kk * n + c];
        acc += xv * wv;
        ab += std::fabs(xv * wv);
      }
      const double b = with_bias ? to_f(DType::f32, bias.data(), c) : 0.0;
      absum[r * n + c] = ab + std::fabs(b);
      const double want = acc + b;
      const double tol = (k + 2) * 0x1p-24 * absum[r * n + c] + out_eps * std::fabs(want) + 1e-30;
      ASSERT_NEAR(to_f(ydt, yref.data(), r * n + c), want, tol) << "ref at (" << r << ", " << c << ")";
    }

  for (Isa isa : test::fast_isas()) {
    for (bool packed : {true, false}) {
      std::vector<uint8_t> y;
      run_op(test::context(isa), w, x, xdt, m, with_bias ? &bias : nullptr, DType::f32, y, ydt, packed);
      if (m > 8) {
        // GEMM path: the same operations in the same order as the reference.
        ASSERT_EQ(std::memcmp(y.data(), yref.data(), y.size()), 0) << isa_name(isa) << " GEMM path differs from ref";
        continue;
      }
      // Matrix-vector path: per group it sums x' * stored values (|stored| <= |q| + bias_q)
      // then corrects by the group's x sums; each of the <= k + 3 * groups + 4 roundings is
      // bounded by 2^-24 times sum_k |x| (|q| + bias_q + |offset|) |scale| (and the ref's own by
      // k * 2^-24 * sum |x W'|), plus one ulp of y's dtype when the two f32 values round apart.
      const double bq = bits == 8 ? 128 : 8;
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) {
          double big = 0;
          for (int64_t kk = 0; kk < k; ++kk) {
            const int64_t g = gs ? kk / gs : 0;
            const double s = w.scale[g * n + c], o = sym ? 0 : std::fabs(w.offset[g * n + c]);
            const double wv = w.wdq[kk * n + c];
            const double qabs = s != 0 ? std::fabs(wv / s) + o : 0;
            big += std::fabs(to_f(xdt, x.data(), r * k + kk)) * (qabs + bq + o) * std::fabs(s);
          }
          const double ref = to_f(ydt, yref.data(), r * n + c);
          const double tol = (k + 3.0 * w.groups + 4) * 0x1p-24 * big + (k + 2) * 0x1p-24 * absum[r * n + c] +
                             2 * out_eps * std::fabs(ref) + 1e-30;
          ASSERT_NEAR(to_f(ydt, y.data(), r * n + c), ref, tol) << isa_name(isa) << " at (" << r << ", " << c << ")";
        }
    }
  }
}

TEST(WeightQuant, ShapeSweep) {
  for (int bits : {8, 4})
    for (bool transpose : {false, true})
      for (bool sym : {true, false}) {
        // per-channel, k not a multiple of the SIMD width / k-block
        for (int64_t m : {1, 3, 8, 9, 17}) check(bits, m, 38, 18, 0, transpose, sym, DType::f32, DType::f32, m % 2 == 1);
        // groups of 32 with a partial last group, odd n, m = 1 and 17
        check(bits, 1, 100, 34, 32, transpose, sym, DType::f32, DType::f32, true);
        check(bits, 17, 100, 34, 32, transpose, sym, DType::f32, DType::f32, false, true);
        // groups of 64 / 128, several panels
        check(bits, 4, 256, 40, 64, transpose, sym, DType::f32, DType::f32, false, true);
        check(bits, 13, 384, 50, 128, transpose, sym, DType::f32, DType::f32, true);
        // group size 96 (any multiple of 32) and k = group size
        check(bits, 2, 192, 16, 96, transpose, sym, DType::f32, DType::f32, false);
        check(bits, 7, 64, 2, 64, transpose, sym, DType::f32, DType::f32, true);
      }
}

TEST(WeightQuant, Dtypes) {
  for (DType xdt : {DType::f16, DType::bf16, DType::f32})
    for (DType ydt : {xdt, DType::f32})
      for (int64_t m : {1, 5, 12}) {
        check(4, m, 160, 24, 32, true, false, xdt, ydt, true);
        check(8, m, 70, 20, 0, false, true, xdt, ydt, true);
      }
}

TEST(WeightQuant, TinyShapes) {
  for (int bits : {8, 4}) {
    check(bits, 1, 2, 2, 0, false, true, DType::f32, DType::f32, false);
    check(bits, 1, 1 + (bits == 4 ? 1 : 0), 2, 0, true, false, DType::f32, DType::f32, true);
    check(bits, 2, 32, 2, 32, true, true, DType::f32, DType::f32, false);
  }
  check(8, 3, 1, 1, 0, false, true, DType::f32, DType::f32, true);
  check(8, 10, 1, 1, 0, true, false, DType::f32, DType::f32, false);
}

// The AVX-512 matrix-vector kernel picks per row and chunk of k (the group, or 128 k of longer
// groups) between exact integer digit products (x written as X * 2^u, X split into <= 4 signed
// bytes) and the float path; this drives every case of that choice through the same bound as
// the other tests (the integer path rounds less, so it must pass the float path's bound too):
// f16-exact rows (1-3 digits), powers of two (1 digit), full f32 significands spread over many
// exponents (float path), an all-zero first chunk, and a huge/tiny mix in one chunk, in rows
// of one call so one chunk mixes paths across rows.
TEST(WeightQuant, GemvChunkPaths) {
  for (int bits : {4, 8})
    for (int64_t gs : {int64_t{0}, int64_t{32}, int64_t{96}, int64_t{384}})
      for (int64_t m : {1, 2, 5}) {
        const int64_t k = gs == 384 ? 700 : 300;  // partial last group / chunk, k % 8 != 0 for 300
        std::vector<float> x(m * k);
        auto u = test::rand_f32(m * k, -1.0f, 1.0f);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t kk = 0; kk < k; ++kk) {
            float& v = x[r * k + kk];
            const float f = u[r * k + kk];
            switch ((r + (kk / 128)) % 5) {
              case 0: v = f16_to_f32(f32_to_f16(f * 3.0f)); break;                 // f16-exact
              case 1: v = std::ldexp(1.0f, static_cast<int>(kk % 9) - 4) * (f < 0 ? -1 : 1); break;  // 1 digit
              case 2: v = f * std::ldexp(1.0f, static_cast<int>(kk % 13) - 6); break;  // float path
              case 3: v = kk < 128 ? 0.0f : f; break;                               // zero chunk
              default: v = kk % 17 == 0 ? f * 1e20f : f * 1e-20f; break;            // float path
            }
          }
        check(bits, m, k, 20, gs, true, gs != 32, DType::f32, DType::f32, m != 2, false, &x);
      }
}

// The matrix-vector path splits x's preparation over the threads by (row, group range), with
// ranges that cross rows (gs 96: 11 groups, items of 10): the result must be bit-identical at
// any thread count, since each group's preparation depends on its own k only.
TEST(WeightQuant, GemvThreadCountIndependent) {
  for (Isa isa : test::fast_isas())
    for (int bits : {4, 8})
      for (int64_t gs : {int64_t{0}, int64_t{32}, int64_t{96}}) {
        SCOPED_TRACE(testing::Message() << isa_name(isa) << " bits " << bits << " gs " << gs);
        const int64_t m = 5, k = 1000, n = 40;
        const QW w = make_qw(bits, k, n, gs, true, gs != 32);
        const auto x = rand_float_bytes(DType::f32, m * k, -1.0f, 1.0f);
        std::vector<uint8_t> y1, y3;
        Context c1(ContextOptions{1, false, isa}), c3(ContextOptions{3, false, isa});
        run_op(c1, w, x, DType::f32, m, nullptr, DType::f32, y1, DType::f32, true);
        run_op(c3, w, x, DType::f32, m, nullptr, DType::f32, y3, DType::f32, true);
        EXPECT_EQ(0, std::memcmp(y1.data(), y3.data(), y1.size()));
      }
}

// The AVX2 4-bit matrix-vector kernel (vpmaddubsw digit products, x86/avx2/wq.cc) and the
// AVX-512 VNNI one share x's preparation (kernels/x86/wq_digits.h): at m = 1 and chunks of >= 64 k
// they take the same path per chunk (digits, float fallback, zero skip) and round in the same
// order, so their results must be bit-identical; x mixes every chunk kind (as GemvChunkPaths).
// (Groups of 32 take the AVX2 float path: covered by the bound of the other tests.)
TEST(WeightQuant, GemvAvx2MatchesVnniBits) {
  if (!isa_supported(Isa::avx512) || !isa_supported(Isa::avx2)) GTEST_SKIP() << "needs AVX-512 VNNI";
  for (int64_t gs : {int64_t{0}, int64_t{64}, int64_t{128}, int64_t{384}})
    for (bool sym : {true, false}) {
      SCOPED_TRACE(testing::Message() << "gs " << gs << " sym " << sym);
      const int64_t k = gs == 384 ? 1000 : 700, n = 40;
      const QW w = make_qw(4, k, n, gs, true, sym);
      std::vector<float> xs(k);
      auto u = test::rand_f32(k, -1.0f, 1.0f);
      for (int64_t kk = 0; kk < k; ++kk) {
        const float f = u[kk];
        switch ((kk / 128) % 4) {
          case 0: xs[kk] = f16_to_f32(f32_to_f16(f)); break;                        // 2-4 digits
          case 1: xs[kk] = f * std::ldexp(1.0f, static_cast<int>(kk % 13) - 6); break;  // float path
          case 2: xs[kk] = 0.0f; break;                                               // zero chunk
          default: xs[kk] = std::ldexp(1.0f, static_cast<int>(kk % 5)); break;        // 1 digit
        }
      }
      std::vector<uint8_t> x(k * 4);
      std::memcpy(x.data(), xs.data(), x.size());
      std::vector<uint8_t> y2, y5;
      run_op(test::context(Isa::avx2), w, x, DType::f32, 1, nullptr, DType::f32, y2, DType::f32, true);
      run_op(test::context(Isa::avx512), w, x, DType::f32, 1, nullptr, DType::f32, y5, DType::f32, true);
      EXPECT_EQ(0, std::memcmp(y2.data(), y5.data(), y2.size()));
    }
}

// The matrix-vector kernels stream several panels at once (AVX-512: 4 panels at m = 1, 2 at
// m = 2; AVX2: 4 panels at m = 1, interleaved chunk by chunk; from each thread's run of 4
// panels): a column's result must not depend on which panels
// streamed beside it. Columns 0-47 of an n = 149 call (10 panels: groups of 4, 4, 2, the last
// panel partial) must equal, bit for bit, the n = 48 call on the same columns (3 panels: 2 + 1),
// every chunk kind of x included (digits, float path, zero chunk), and both must pass the
// ref bound.
TEST(WeightQuant, GemvPanelStreamsIndependent) {
  for (Isa isa : test::fast_isas())
    for (int bits : {4, 8})
      for (int64_t gs : {int64_t{0}, int64_t{32}, int64_t{128}})
        for (int64_t m : {1, 2}) {
          SCOPED_TRACE(testing::Message() << isa_name(isa) << " bits " << bits << " gs " << gs << " m " << m);
          const int64_t k = 520, n = 149, ns = 48;
          const QW w = make_qw(bits, k, n, gs, true, gs != 32);
          QW ws = w;  // columns [0, ns) of w
          ws.n = ns;
          const int64_t rb = bits == 8 ? k : k / 2;
          ws.q.assign(w.q.begin(), w.q.begin() + ns * rb);
          ws.scale.assign(w.groups * ns, 0.0f);
          if (!w.sym) ws.offset.assign(w.groups * ns, 0.0f);
          for (int64_t g = 0; g < w.groups; ++g)
            for (int64_t c = 0; c < ns; ++c) {
              ws.scale[g * ns + c] = w.scale[g * n + c];
              if (!w.sym) ws.offset[g * ns + c] = w.offset[g * n + c];
            }
          std::vector<float> xs(m * k);
          auto u = test::rand_f32(m * k, -1.0f, 1.0f);
          for (int64_t r = 0; r < m; ++r)
            for (int64_t kk = 0; kk < k; ++kk) {
              const float f = u[r * k + kk];
              switch ((r + kk / 128) % 4) {
                case 0: xs[r * k + kk] = f16_to_f32(f32_to_f16(f)); break;                          // digits
                case 1: xs[r * k + kk] = f * std::ldexp(1.0f, static_cast<int>(kk % 13) - 6); break;  // float path
                case 2: xs[r * k + kk] = 0.0f; break;                                                 // zero chunk
                default: xs[r * k + kk] = std::ldexp(1.0f, static_cast<int>(kk % 5)); break;          // 1 digit
              }
            }
          std::vector<uint8_t> x(m * k * 4);
          std::memcpy(x.data(), xs.data(), x.size());
          std::vector<uint8_t> yf, yn;
          Context c(ContextOptions{2, false, isa});
          run_op(c, w, x, DType::f32, m, nullptr, DType::f32, yf, DType::f32, true);
          run_op(c, ws, x, DType::f32, m, nullptr, DType::f32, yn, DType::f32, true);
          for (int64_t r = 0; r < m; ++r)
            EXPECT_EQ(0, std::memcmp(yf.data() + r * n * 4, yn.data() + r * ns * 4, ns * 4)) << "row " << r;
          check(bits, m, k, n, gs, true, gs != 32, DType::f32, DType::f32, false, false, &xs);
        }
}

// A real model size (Mixtral/DeepSeek hidden 7168) on a slice of columns, decode and prefill.
TEST(WeightQuant, ModelSize) {
  check(4, 1, 7168, 48, 128, true, true, DType::bf16, DType::bf16, false);
  check(8, 4, 7168, 32, 0, true, true, DType::f16, DType::f32, false);
  check(4, 20, 7168, 32, 32, false, false, DType::f32, DType::f32, true);
}

// quantize_weight: the SPEC formulas on hand-checked values.
TEST(WeightQuant, QuantizeFormulas) {
  // One column, k = 4 (per-channel). Symmetric 8-bit: amax 2 -> scale 2/127, q = rint(v * 63.5).
  const std::vector<float> w = {2.0f, -1.0f, 0.5f, 0.0f};
  std::vector<int8_t> q(4);
  float scale = 0, offset = 0;
  QuantizeWeightParams p;
  quantize_weight(TensorView(w.data(), DType::f32, {4, 1}), TensorView(q.data(), DType::s8, {4, 1}),
                  TensorView(&scale, DType::f32, {1}), TensorView(), p);
  EXPECT_EQ(scale, 2.0f / 127.0f);
  EXPECT_EQ(q, (std::vector<int8_t>{127, -64, 32, 0}));  // -63.5 and 31.75 round half to even / nearest
  // Asymmetric 4-bit over the same column (as [n, k] = [1, 4]): lo -1, hi 2, scale 3/15,
  // inv = 5, z = rint(1 * 5) = 5, q_u = rint(v * 5) + 5.
  std::vector<uint8_t> q4(2);
  p.bits = 4;
  p.symmetric = false;
  p.transpose_w = true;
  quantize_weight(TensorView(w.data(), DType::f32, {1, 4}), TensorView(q4.data(), DType::s4x2, {1, 2}),
                  TensorView(&scale, DType::f32, {1}), TensorView(&offset, DType::f32, {1}), p);
  EXPECT_EQ(scale, 3.0f / 15.0f);
  EXPECT_EQ(offset, 8.0f - 5.0f);
  // q_u: 2*5+5 = 15, -1*5+5 = 0, rint(2.5) = 2 -> 7, 0 -> 5; stored q = q_u - 8.
  auto nib = [&](int i) { const int v = (q4[i / 2] >> (4 * (i % 2))) & 0xF; return v >= 8 ? v - 16 : v; };
  EXPECT_EQ(nib(0), 7);
  EXPECT_EQ(nib(1), -8);
  EXPECT_EQ(nib(2), -1);
  EXPECT_EQ(nib(3), -3);
  // Dequantised: (q + offset) * scale = (q_u - z) * scale.
  std::vector<float> dq(4);
  dequantize_weight(TensorView(q4.data(), DType::s4x2, {1, 2}), TensorView(&scale, DType::f32, {1}),
                    TensorView(&offset, DType::f32, {1}), TensorView(dq.data(), DType::f32, {1, 4}), 0, true);
  EXPECT_EQ(dq[0], 10.0f * (3.0f / 15.0f));
  EXPECT_EQ(dq[1], -5.0f * (3.0f / 15.0f));
  EXPECT_EQ(dq[3], 0.0f);
}

// Round trip: |W' - w| <= scale / 2 (+ rounding of the products) for every mode.
TEST(WeightQuant, QuantizeRoundTrip) {
  for (int bits : {8, 4})
    for (bool sym : {true, false})
      for (int64_t gs : {0, 32, 64}) {
        const int64_t k = 96, n = 10;
        auto src = test::rand_f32(k * n, -3.0f, 1.0f);
        const int64_t G = gs ? (k + gs - 1) / gs : 1;
        std::vector<uint8_t> q(k * n);
        std::vector<float> sc(G * n), off(G * n), dq(k * n);
        QuantizeWeightParams p{bits, gs, sym, false};
        const DType qdt = bits == 8 ? DType::s8 : DType::s4x2;
        const TensorView qv(q.data(), qdt, {k, bits == 8 ? n : n / 2});
        const TensorView sv = gs ? TensorView(sc.data(), DType::f32, {G, n}) : TensorView(sc.data(), DType::f32, {n});
        const TensorView ov = sym ? TensorView() : (gs ? TensorView(off.data(), DType::f32, {G, n}) : TensorView(off.data(), DType::f32, {n}));
        quantize_weight(TensorView(src.data(), DType::f32, {k, n}), qv, sv, ov, p);
        dequantize_weight(qv, sv, ov, TensorView(dq.data(), DType::f32, {k, n}), gs, false);
        for (int64_t kk = 0; kk < k; ++kk)
          for (int64_t c = 0; c < n; ++c) {
            const float s = sc[(gs ? kk / gs : 0) * n + c];
            EXPECT_LE(std::fabs(dq[kk * n + c] - src[kk * n + c]), 0.5f * s * (1 + 1e-5f) + 1e-7f)
                << "bits " << bits << " sym " << sym << " gs " << gs;
          }
      }
}

TEST(WeightQuant, BadInput) {
  Context& ctx = test::default_context();
  const int64_t m = 2, k = 64, n = 8;
  std::vector<float> x(m * k, 1.0f), sc(2 * n, 1.0f), sc1(n, 1.0f), bias(n);
  std::vector<int8_t> w(k * n);
  std::vector<float> y(m * n, 7.0f);
  const TensorView yv(y.data(), DType::f32, {m, n});
  auto call = [&](TensorView wv, TensorView s, TensorView o, int64_t gs, bool tr, TensorView xv, TensorView out) {
    WeightQuantMatmulArgs a;
    a.x = xv;
    a.w = wv;
    a.scale = s;
    a.offset = o;
    WeightQuantMatmulParams p;
    p.group_size = gs;
    p.transpose_w = tr;
    weight_quant_matmul(ctx, a, out, p);
  };
  const TensorView xv(x.data(), DType::f32, {m, k});
  const TensorView wv(w.data(), DType::s8, {k, n});
  const TensorView s2(sc.data(), DType::f32, {2, n}), s1(sc1.data(), DType::f32, {n});
  test::expect_error([&] { call(wv, s2, {}, 48, false, xv, yv); }, {"weight_quant_matmul", "group_size", "multiple of 32", "48"});
  test::expect_error([&] { call(wv, s2, {}, 96, false, xv, yv); }, {"group_size", "96", "larger than k = 64"});
  test::expect_error([&] { call(wv, s2, {}, -32, false, xv, yv); }, {"group_size", "-32"});
  test::expect_error([&] { call(wv, s1, {}, 32, false, xv, yv); }, {"scale", "[2, 8]", "group_size = 32", "[8]"});
  test::expect_error([&] { call(wv, s2, {}, 0, false, xv, yv); }, {"scale", "per-channel", "[2, 8]"});
  test::expect_error([&] { call(wv, s2, s1, 32, false, xv, yv); }, {"offset", "[2, 8]"});
  std::vector<int32_t> so(2 * n);
  test::expect_error([&] { call(wv, TensorView(so.data(), DType::s32, {2, n}), {}, 32, false, xv, yv); }, {"scale", "float32", "int32"});
  // s4x2 with an odd packed dimension: [n, k/2] with odd k, and [k, n/2] whose scale says n odd.
  std::vector<float> x7(m * 7);
  test::expect_error([&] { call(TensorView(w.data(), DType::s4x2, {n, 4}), s1, {}, 0, true, TensorView(x7.data(), DType::f32, {m, 7}),
                                TensorView(y.data(), DType::f32, {m, n})); },
                     {"s4x2", "k = 7", "odd"});
  std::vector<float> sc7(7, 1.0f);
  test::expect_error([&] { call(TensorView(w.data(), DType::s4x2, {k, 4}), TensorView(sc7.data(), DType::f32, {7}), {}, 0, false, xv,
                                TensorView(y.data(), DType::f32, {m, 7})); },
                     {"scale", "odd", "s4x2"});
  // k mismatch, wrong dtypes, wrong y.
  test::expect_error([&] { call(TensorView(w.data(), DType::s8, {k / 2, n}), s1, {}, 0, false, xv, yv); }, {"w", "32", "k = 64"});
  test::expect_error([&] { call(TensorView(x.data(), DType::f32, {k, n}), s1, {}, 0, false, xv, yv); }, {"w", "int8", "float32"});
  std::vector<int8_t> xi(m * k);
  test::expect_error([&] { call(wv, s1, {}, 0, false, TensorView(xi.data(), DType::s8, {m, k}), yv); }, {"x", "float"});
  std::vector<uint16_t> ybf(m * n);
  test::expect_error([&] { call(wv, s1, {}, 0, false, xv, TensorView(ybf.data(), DType::bf16, {m, n})); }, {"y", "float32", "bfloat16"});
  test::expect_error([&] { call(wv, s1, {}, 0, false, xv, TensorView(y.data(), DType::f32, {m, n - 1})); }, {"y"});
  {
    WeightQuantMatmulArgs a;
    a.x = xv;
    a.w = wv;
    a.scale = s1;
    a.bias = TensorView(bias.data(), DType::f32, {n - 1});
    test::expect_error([&] { weight_quant_matmul(ctx, a, yv); }, {"bias"});
    const PackedQuantWeight pw = PackedQuantWeight::pack(wv, s1, {}, 0, false);
    a.bias = {};
    a.packed_w = &pw;
    test::expect_error([&] { weight_quant_matmul(ctx, a, yv); }, {"either w", "packed_w"});
  }
  // Nothing was written by any rejected call.
  for (float v : y) ASSERT_EQ(v, 7.0f);

  // quantize_weight
  std::vector<float> wf(k * 7);
  std::vector<uint8_t> q(k * 7);
  QuantizeWeightParams qp;
  qp.bits = 4;
  test::expect_error([&] { quantize_weight(TensorView(wf.data(), DType::f32, {k, 7}), TensorView(q.data(), DType::s4x2, {k, 3}),
                                           TensorView(sc7.data(), DType::f32, {7}), {}, qp); },
                     {"quantize_weight", "odd", "7"});
  qp.bits = 5;
  test::expect_error([&] { quantize_weight(TensorView(wf.data(), DType::f32, {k, 7}), TensorView(q.data(), DType::s8, {k, 7}),
                                           TensorView(sc7.data(), DType::f32, {7}), {}, qp); },
                     {"bits", "5"});
  qp.bits = 8;
  qp.group_size = 40;
  test::expect_error([&] { quantize_weight(TensorView(wf.data(), DType::f32, {k, 7}), TensorView(q.data(), DType::s8, {k, 7}),
                                           TensorView(sc7.data(), DType::f32, {7}), {}, qp); },
                     {"group_size", "40"});
  qp.group_size = 0;
  qp.symmetric = false;
  test::expect_error([&] { quantize_weight(TensorView(wf.data(), DType::f32, {k, 7}), TensorView(q.data(), DType::s8, {k, 7}),
                                           TensorView(sc7.data(), DType::f32, {7}), {}, qp); },
                     {"offset"});
  test::expect_error([&] { dequantize_weight(wv, s2, {}, TensorView(wf.data(), DType::f32, {k, n}), 0, false); }, {"dequantize_weight", "scale"});
}

// Non-finite activations and weights are not checked (SPEC section 0) but must not crash.
TEST(WeightQuant, NonFiniteDoesNotCrash) {
  for (Isa isa : test::isas()) {
    const QW w = make_qw(4, 64, 16, 32, false, true);
    std::vector<float> x(9 * 64, std::nanf(""));
    std::vector<float> y(9 * 16);
    WeightQuantMatmulArgs a;
    a.x = TensorView(x.data(), DType::f32, {9, 64});
    a.w = w.qv();
    a.scale = w.sv();
    WeightQuantMatmulParams p;
    p.group_size = 32;
    for (int64_t m : {1, 9}) {
      a.x = TensorView(x.data(), DType::f32, {m, 64});
      weight_quant_matmul(test::context(isa), a, TensorView(y.data(), DType::f32, {m, 16}), p);
    }
    std::vector<float> wf(64 * 16, std::nanf(""));
    std::vector<uint8_t> q(64 * 8);
    std::vector<float> sc(2 * 16);
    QuantizeWeightParams qp{4, 32, true, false};
    quantize_weight(TensorView(wf.data(), DType::f32, {64, 16}), TensorView(q.data(), DType::s4x2, {64, 8}),
                    TensorView(sc.data(), DType::f32, {2, 16}), {}, qp);
  }
}

}  // namespace
}  // namespace qllm
