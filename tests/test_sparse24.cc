// 2:4 structured sparsity (SPEC section 6): prune/compress/decompress round trips, sparse24_matmul
// against the dense product of the decompressed weight (computed here in double / int64), every
// ISA against ref bit for bit on one packed weight, and the rejected inputs.
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/sparse24.h"
#include "qllm/core/arena.h"
#include "test_util.h"

namespace qllm {
namespace {

using test::context;
using test::expect_error;

// Random weight [n, k] of dtype dt as raw bytes, with whole zero rows and sparse groups mixed in
// (row 1 all zero when n > 1; every 5th group has one non-zero, every 7th none).
std::vector<uint8_t> make_weight(DType dt, int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> d(-2.0f, 2.0f);
  const int64_t es = dtype_size(dt);
  std::vector<uint8_t> w(static_cast<size_t>(n * k * es));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < k; ++c) {
      const int64_t grp = r * (k / 4) + c / 4;
      float v = d(g);
      if ((n > 1 && r == 1) || grp % 7 == 3 || (grp % 5 == 2 && c % 4 != 1)) v = 0.0f;
      const int64_t i = r * k + c;
      switch (dt) {
        case DType::f16: reinterpret_cast<uint16_t*>(w.data())[i] = f32_to_f16(v); break;
        case DType::bf16: reinterpret_cast<uint16_t*>(w.data())[i] = f32_to_bf16(v); break;
        case DType::s8: reinterpret_cast<int8_t*>(w.data())[i] = static_cast<int8_t>(std::lround(v * 63.5f)); break;
        default: reinterpret_cast<float*>(w.data())[i] = v; break;
      }
    }
  return w;
}

double elem(DType dt, const void* p, int64_t i) {
  switch (dt) {
    case DType::f16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::s8: return static_cast<const int8_t*>(p)[i];
    case DType::s32: return static_cast<const int32_t*>(p)[i];
    default: return static_cast<const float*>(p)[i];
  }
}

struct Compressed {
  std::vector<uint8_t> values, meta, dense;  // dense = decompress_24(values, meta)
};

Compressed prune(DType dt, int64_t n, int64_t k, const std::vector<uint8_t>& w) {
  Compressed c;
  const int64_t es = dtype_size(dt);
  c.values.resize(static_cast<size_t>(n * k / 2 * es));
  c.meta.resize(static_cast<size_t>(n * sparse24_meta_cols(k)));
  c.dense.resize(static_cast<size_t>(n * k * es));
  const TensorView vv(c.values.data(), dt, {n, k / 2}), mv(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
  prune_24(TensorView(w.data(), dt, {n, k}), vv, mv);
  decompress_24(vv, mv, TensorView(c.dense.data(), dt, {n, k}));
  return c;
}

// The op's packed form of a pruned weight [n, k] of dtype dt.
PackedSparse24 pack(const Compressed& c, DType dt, int64_t n, int64_t k) {
  return PackedSparse24::pack(TensorView(c.values.data(), dt, {n, k / 2}),
                              TensorView(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)}));
}

TEST(Sparse24, PruneKnownRow) {
  // Groups: keep |3|, |-5| at 1, 2; all zero -> (0, 1); one non-zero at 3 -> (0, 3); ties -> (0, 1).
  const std::vector<float> w = {0, 3, -5, 1, 0, 0, 0, 0, 0, 0, 0, 7, 1, -1, 1, -1};
  std::vector<float> vals(8);
  std::vector<uint8_t> meta(2);
  prune_24(TensorView(w.data(), DType::f32, {1, 16}), TensorView(vals.data(), DType::f32, {1, 8}),
           TensorView(meta.data(), DType::u8, {1, 2}));
  EXPECT_EQ(vals, (std::vector<float>{3, -5, 0, 0, 0, 7, 1, -1}));
  EXPECT_EQ(meta[0], 0x49);  // group 0: i0 = 1, i1 = 2 -> 0x9; group 1: (0, 1) -> 0x4
  EXPECT_EQ(meta[1], 0x4c);  // group 2: (0, 3) -> 0xc; group 3: (0, 1) -> 0x4
  // k % 8 == 4: the padding nibble is written as 0.
  std::vector<uint8_t> m1(1);
  prune_24(TensorView(w.data(), DType::f32, {1, 4}), TensorView(vals.data(), DType::f32, {1, 2}),
           TensorView(m1.data(), DType::u8, {1, 1}));
  EXPECT_EQ(m1[0], 0x09);
}

TEST(Sparse24, RoundTrips) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::s8})
    for (int64_t k : {4, 12, 100}) {
      const int64_t n = 7;
      const auto w = make_weight(dt, n, k, 11);
      const Compressed c = prune(dt, n, k, w);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t g = 0; g < k / 4; ++g) {
          int nz = 0;
          double kept_min = 1e30, dropped_max = 0;
          for (int i = 0; i < 4; ++i) {
            const int64_t e = r * k + 4 * g + i;
            const double d = elem(dt, c.dense.data(), e), o = elem(dt, w.data(), e);
            nz += d != 0.0;
            if (d != 0.0) {
              EXPECT_EQ(d, o);
              kept_min = std::min(kept_min, std::fabs(o));
            } else {
              dropped_max = std::max(dropped_max, std::fabs(o));
            }
          }
          EXPECT_LE(nz, 2);
          if (nz == 2) {
            EXPECT_LE(dropped_max, kept_min) << "row " << r << " group " << g;
          }
        }
      // The pruned weight is 2:4, so compress_24 accepts it and gives the same compressed form.
      std::vector<uint8_t> v2(c.values.size()), m2(c.meta.size());
      compress_24(TensorView(c.dense.data(), dt, {n, k}), TensorView(v2.data(), dt, {n, k / 2}),
                  TensorView(m2.data(), DType::u8, {n, sparse24_meta_cols(k)}));
      EXPECT_EQ(v2, c.values) << dtype_name(dt) << " k " << k;
      EXPECT_EQ(m2, c.meta) << dtype_name(dt) << " k " << k;
    }
}

// Checks y (m x n, dtype odt) of the float path against double sums over the decompressed weight.
// Tolerance: each output is a sum of k/2 products accumulated in f32 with one rounding per FMA
// plus the 3 adds of the lane reduction, so |error| <= (k/2 + 4) * 2^-24 * sum|w x| (first-order
// bound, gamma_n); an f16/bf16 output adds half an ulp of the result (2^-11 / 2^-8 relative, and
// for f16 at least half its subnormal spacing, 2^-25, since small outputs round to subnormals).
void check_float(DType wdt, DType xdt, DType odt, int64_t m, int64_t k, int64_t n, const Compressed& c,
                 const std::vector<uint8_t>& x, const std::vector<uint8_t>& y) {
  const double out_eps = odt == DType::f16 ? std::ldexp(1.0, -11) : odt == DType::bf16 ? std::ldexp(1.0, -8) : 0.0;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t col = 0; col < n; ++col) {
      double s = 0, sa = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        const double t = elem(wdt, c.dense.data(), col * k + kk) * elem(xdt, x.data(), r * k + kk);
        s += t;
        sa += std::fabs(t);
      }
      const double out_abs = odt == DType::f16 ? std::ldexp(1.0, -25) : 0.0;
      const double tol = (k / 2 + 4) * std::ldexp(1.0, -24) * sa + out_eps * std::fabs(s) + out_abs + 1e-30;
      ASSERT_NEAR(elem(odt, y.data(), r * n + col), s, tol)
          << dtype_name(wdt) << " x " << dtype_name(xdt) << " -> " << dtype_name(odt) << " m " << m << " k " << k << " n " << n
          << " at " << r << "," << col;
    }
}

// The exact s32 product x [m, k] s8 times w [n, k] s8 (bytes as stored), in int64 per sum.
std::vector<int32_t> exact_s8_product(const std::vector<uint8_t>& w, const std::vector<uint8_t>& x, int64_t m, int64_t n,
                                      int64_t k) {
  const int8_t* xs = reinterpret_cast<const int8_t*>(x.data());
  const int8_t* ws = reinterpret_cast<const int8_t*>(w.data());
  std::vector<int32_t> out(m * n);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t col = 0; col < n; ++col) {
      int64_t sum = 0;
      for (int64_t kk = 0; kk < k; ++kk) sum += static_cast<int64_t>(ws[col * k + kk]) * xs[r * k + kk];
      out[r * n + col] = static_cast<int32_t>(sum);
    }
  return out;
}

std::vector<uint8_t> make_x(DType dt, int64_t m, int64_t k, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint8_t> x(static_cast<size_t>(m * k * dtype_size(dt)));
  if (dt == DType::s8) {
    std::uniform_int_distribution<int> d(-128, 127);
    for (auto& b : x) b = static_cast<uint8_t>(d(g));
    return x;
  }
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (int64_t i = 0; i < m * k; ++i) {
    const float v = d(g);
    if (dt == DType::f16) reinterpret_cast<uint16_t*>(x.data())[i] = f32_to_f16(v);
    else if (dt == DType::bf16) reinterpret_cast<uint16_t*>(x.data())[i] = f32_to_bf16(v);
    else reinterpret_cast<float*>(x.data())[i] = v;
  }
  return x;
}

TEST(Sparse24, FloatMatmulSweep) {
  Context& ctx = test::default_context();
  for (DType wdt : {DType::f32, DType::f16, DType::bf16})
    for (int64_t k : {4, 12, 100})
      for (int64_t n : {1, 5, 34})
        for (int64_t m : {1, 3, 17}) {
          const DType xdt = m == 3 ? DType::bf16 : (m == 17 ? DType::f16 : DType::f32);
          const DType odt = n == 5 ? DType::f16 : (n == 1 ? DType::bf16 : DType::f32);
          const Compressed c = prune(wdt, n, k, make_weight(wdt, n, k, static_cast<uint32_t>(k * 131 + n)));
          const auto x = make_x(xdt, m, k, static_cast<uint32_t>(m));
          std::vector<uint8_t> y(static_cast<size_t>(m * n * 4), 0xee);
          Sparse24MatmulArgs a;
          a.x = TensorView(x.data(), xdt, {m, k});
          a.values = TensorView(c.values.data(), wdt, {n, k / 2});
          a.meta = TensorView(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
          sparse24_matmul(ctx, a, TensorView(y.data(), odt, {m, n}), {odt});
          check_float(wdt, xdt, odt, m, k, n, c, x, y);
        }
}

TEST(Sparse24, Int8MatmulSweep) {
  Context& ctx = test::default_context();
  for (int64_t k : {4, 12, 100})
    for (int64_t n : {1, 5, 34})
      for (int64_t m : {1, 3, 17}) {
        const Compressed c = prune(DType::s8, n, k, make_weight(DType::s8, n, k, static_cast<uint32_t>(k + n)));
        const auto x = make_x(DType::s8, m, k, static_cast<uint32_t>(m * 7));
        // The extremes: -128 x -128 products in the first row.
        for (int64_t kk = 0; kk < k; ++kk) reinterpret_cast<int8_t*>(const_cast<uint8_t*>(x.data()))[kk] = -128;
        Sparse24MatmulArgs a;
        a.x = TensorView(x.data(), DType::s8, {m, k});
        a.values = TensorView(c.values.data(), DType::s8, {n, k / 2});
        a.meta = TensorView(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
        std::vector<int32_t> acc(m * n);
        sparse24_matmul(ctx, a, TensorView(acc.data(), DType::s32, {m, n}), {DType::s32});
        std::vector<int64_t> want(m * n);
        for (int64_t r = 0; r < m; ++r)
          for (int64_t col = 0; col < n; ++col) {
            int64_t s = 0;
            for (int64_t kk = 0; kk < k; ++kk)
              s += static_cast<int64_t>(reinterpret_cast<const int8_t*>(c.dense.data())[col * k + kk]) *
                   reinterpret_cast<const int8_t*>(x.data())[r * k + kk];
            want[r * n + col] = s;
            ASSERT_EQ(acc[r * n + col], s) << "m " << m << " k " << k << " n " << n;
          }
        // Dequantised outputs: SPEC section 1's formula, bit for bit.
        const auto scale = test::rand_f32(n, 0.001f, 0.01f), pts = test::rand_f32(m, 0.5f, 2.0f);
        a.scale = TensorView(scale.data(), DType::f32, {n});
        for (DType odt : {DType::f32, DType::f16, DType::bf16})
          for (bool with_pts : {false, true}) {
            a.per_token_scale = with_pts ? TensorView(pts.data(), DType::f32, {m}) : TensorView();
            std::vector<uint8_t> y(m * n * 4);
            sparse24_matmul(ctx, a, TensorView(y.data(), odt, {m, n}), {odt});
            for (int64_t i = 0; i < m * n; ++i) {
              const float f = (static_cast<float>(want[i]) * scale[i % n]) * (with_pts ? pts[i / n] : 1.0f);
              const double expect = odt == DType::f16 ? f16_to_f32(f32_to_f16(f)) : odt == DType::bf16 ? bf16_to_f32(f32_to_bf16(f)) : f;
              ASSERT_EQ(elem(odt, y.data(), i), expect) << dtype_name(odt) << " i " << i;
            }
          }
      }
}

// The large-m float path (rows kernel, ops/sparse24.cc: m >= 32) on both sides of its switch
// (m = 31 | 32, 33, 65 = a second, partial 64-row panel, 130), n across the 128-channel work
// block and not a multiple of the 8-channel super-panel, k not a multiple of 16; x row 2 all zero
// (its outputs must be exactly 0), weight channel 1 all zero. Each output is one FMA chain over
// the k/2 kept terms, inside check_float's (k/2 + 4) * 2^-24 bound; every ISA gives ref's bits.
TEST(Sparse24, FloatRowsPathSweep) {
  for (DType wdt : {DType::f32, DType::f16, DType::bf16})
    for (int64_t k : {4, 12, 100})
      for (int64_t n : {5, 34, 130})
        for (int64_t m : {31, 32, 33, 65, 130}) {
          if (m == 130 && n != 130) continue;
          const DType xdt = m == 33 ? DType::bf16 : (m == 65 ? DType::f16 : DType::f32);
          // f16/bf16 outputs also at n = 130 (full vectors of the converter, not only its tail).
          const DType odt = n == 5 ? DType::f16 : (n == 130 ? (m == 130 ? DType::bf16 : DType::f16) : DType::f32);
          const Compressed c = prune(wdt, n, k, make_weight(wdt, n, k, static_cast<uint32_t>(k * 17 + n)));
          auto x = make_x(xdt, m, k, static_cast<uint32_t>(m + 3));
          std::memset(x.data() + 2 * k * dtype_size(xdt), 0, static_cast<size_t>(k * dtype_size(xdt)));
          const PackedSparse24 pk = pack(c, wdt, n, k);
          Sparse24MatmulArgs a;
          a.x = TensorView(x.data(), xdt, {m, k});
          a.packed = &pk;
          std::vector<uint8_t> want(static_cast<size_t>(m * n * 4), 0xee), got(want.size(), 0xee);
          sparse24_matmul(context(Isa::ref), a, TensorView(want.data(), odt, {m, n}), {odt});
          check_float(wdt, xdt, odt, m, k, n, c, x, want);
          for (int64_t col = 0; col < n; ++col) ASSERT_EQ(elem(odt, want.data(), 2 * n + col), 0.0) << "zero row, col " << col;
          for (Isa isa : test::fast_isas()) {
            std::fill(got.begin(), got.end(), 0xee);
            sparse24_matmul(context(isa), a, TensorView(got.data(), odt, {m, n}), {odt});
            ASSERT_EQ(got, want) << isa_name(isa) << " " << dtype_name(wdt) << " m " << m << " k " << k << " n " << n;
          }
        }
}

// The large-m s8 path (rows kernel, ops/sparse24.cc: m >= 40) on both sides of its switch
// (m = 39 | 40, 41, 65 = a second, partial 64-row panel, 130 = three panels), k not a multiple of
// the 8-group chunk (k = 100: chunks of 8, 8, 8, 1 groups, crossing a 16-group block), n not a
// multiple of the 32-channel super-panel, and n = 530 across the 512-channel work item. Full s8
// range: x row 0 all -128, the kept weights of channel 0 all -128 and of channel 2 all 127; x
// row 2 all zero (outputs exactly 0) and weight channel 1 all zero. Integer sums are exact: every
// ISA must give the int64 dense product bit for bit, and the dequantised outputs SPEC section 1's
// formula on it.
TEST(Sparse24, Int8RowsPathSweep) {
  struct Case { int64_t k, n; };
  std::vector<Case> cases;
  for (int64_t k : {4, 12, 100})
    for (int64_t n : {5, 34, 130}) cases.push_back({k, n});
  cases.push_back({12, 530});
  for (const Case cs : cases)
    for (int64_t m : {39, 40, 41, 65, 130}) {
      const int64_t k = cs.k, n = cs.n;
      if (m == 130 && n != 130) continue;
      Compressed c = prune(DType::s8, n, k, make_weight(DType::s8, n, k, static_cast<uint32_t>(k * 29 + n)));
      for (int64_t i = 0; i < k / 2; ++i) {
        reinterpret_cast<int8_t*>(c.values.data())[i] = -128;
        if (n > 2) reinterpret_cast<int8_t*>(c.values.data())[2 * (k / 2) + i] = 127;
      }
      const TensorView vv(c.values.data(), DType::s8, {n, k / 2}), mv(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
      decompress_24(vv, mv, TensorView(c.dense.data(), DType::s8, {n, k}));
      auto x = make_x(DType::s8, m, k, static_cast<uint32_t>(m * 5 + k));
      std::memset(x.data(), 0x80, static_cast<size_t>(k));
      std::memset(x.data() + 2 * k, 0, static_cast<size_t>(k));
      const int8_t* xs = reinterpret_cast<const int8_t*>(x.data());
      const int8_t* ws = reinterpret_cast<const int8_t*>(c.dense.data());
      std::vector<int64_t> want(m * n);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t col = 0; col < n; ++col) {
          int64_t s = 0;
          for (int64_t kk = 0; kk < k; ++kk) s += static_cast<int64_t>(ws[col * k + kk]) * xs[r * k + kk];
          want[r * n + col] = s;
        }
      const PackedSparse24 pk = PackedSparse24::pack(vv, mv);
      const auto scale = test::rand_f32(n, 0.001f, 0.01f), pts = test::rand_f32(m, 0.5f, 2.0f);
      for (Isa isa : test::isas()) {
        Sparse24MatmulArgs a;
        a.x = TensorView(x.data(), DType::s8, {m, k});
        if (isa == Isa::ref) {
          a.values = vv;  // unpacked weight: packed in the call's workspace
          a.meta = mv;
        } else {
          a.packed = &pk;
        }
        std::vector<int32_t> acc(m * n, 0x7eadbeef);
        sparse24_matmul(context(isa), a, TensorView(acc.data(), DType::s32, {m, n}), {DType::s32});
        for (int64_t i = 0; i < m * n; ++i)
          ASSERT_EQ(acc[i], want[i]) << isa_name(isa) << " m " << m << " k " << k << " n " << n << " at " << i / n << ","
                                     << i % n;
        a.scale = TensorView(scale.data(), DType::f32, {n});
        a.per_token_scale = TensorView(pts.data(), DType::f32, {m});
        const DType odt = n == 5 ? DType::bf16 : n == 34 ? DType::f16 : DType::f32;
        std::vector<uint8_t> y(m * n * 4, 0xee);
        sparse24_matmul(context(isa), a, TensorView(y.data(), odt, {m, n}), {odt});
        for (int64_t i = 0; i < m * n; ++i) {
          const float f = (static_cast<float>(want[i]) * scale[i % n]) * pts[i / n];
          const double expect = odt == DType::f16 ? f16_to_f32(f32_to_f16(f)) : odt == DType::bf16 ? bf16_to_f32(f32_to_bf16(f)) : f;
          ASSERT_EQ(elem(odt, y.data(), i), expect) << isa_name(isa) << " " << dtype_name(odt) << " m " << m << " i " << i;
        }
      }
    }
}

// Every ISA gives ref's bits, on the real model depth (k = 7168) and odd shapes, from one packed
// weight reused across contexts (the packed layout is the same for every ISA).
TEST(Sparse24, IsasAgreeBitwise) {
  struct Case { int64_t m, k, n; };
  for (const Case cs : {Case{1, 7168, 66}, Case{17, 7168, 34}, Case{3, 100, 17}, Case{12, 1040, 40},
                        Case{70, 7168, 20}})
    for (DType wdt : {DType::f32, DType::f16, DType::bf16, DType::s8}) {
      const DType xdt = wdt == DType::s8 ? DType::s8 : DType::f32;
      const Compressed c = prune(wdt, cs.n, cs.k, make_weight(wdt, cs.n, cs.k, 5));
      const PackedSparse24 pk = pack(c, wdt, cs.n, cs.k);
      const auto x = make_x(xdt, cs.m, cs.k, 9);
      Sparse24MatmulArgs a;
      a.x = TensorView(x.data(), xdt, {cs.m, cs.k});
      a.packed = &pk;
      const DType odt = wdt == DType::s8 ? DType::s32 : DType::f32;
      std::vector<uint8_t> want(cs.m * cs.n * 4), got(cs.m * cs.n * 4);
      sparse24_matmul(context(Isa::ref), a, TensorView(want.data(), odt, {cs.m, cs.n}), {odt});
      if (wdt == DType::f16 && cs.k == 7168) check_float(wdt, xdt, odt, cs.m, cs.k, cs.n, c, x, want);
      for (Isa isa : test::fast_isas()) {
        sparse24_matmul(context(isa), a, TensorView(got.data(), odt, {cs.m, cs.n}), {odt});
        EXPECT_EQ(got, want) << isa_name(isa) << " " << dtype_name(wdt) << " m " << cs.m << " k " << cs.k;
      }
    }
}

// The s8 path's schedules at the real depth k = 7168: m = 130 runs the rows kernel (three 64-row
// panels, the last of 2 rows), m = 39 and 1 the tiled kernel on x-pair tables (super-panels of 32
// channels, n = 70: two full, one of 6, a super-panel pair and a single one per work item); every
// ISA must give the exact s64 dot products.
TEST(Sparse24, Int8SlabsAndPanelsExact) {
  const int64_t m = 130, k = 7168, n = 70;
  const Compressed c = prune(DType::s8, n, k, make_weight(DType::s8, n, k, 3));
  auto x = make_x(DType::s8, m, k, 4);
  for (int64_t kk = 0; kk < k; ++kk) reinterpret_cast<int8_t*>(x.data())[(m - 1) * k + kk] = -128;
  const PackedSparse24 pk = pack(c, DType::s8, n, k);
  const std::vector<int32_t> want = exact_s8_product(c.dense, x, m, n, k);
  Sparse24MatmulArgs a;
  a.x = TensorView(x.data(), DType::s8, {m, k});
  a.packed = &pk;
  for (Isa isa : test::isas())
    for (int64_t rows : {m, int64_t{39}, int64_t{1}}) {
      std::vector<int32_t> got(rows * n, 0x7eadbeef);
      a.x = TensorView(x.data() + (m - rows) * k, DType::s8, {rows, k});
      sparse24_matmul(context(isa), a, TensorView(got.data(), DType::s32, {rows, n}), {DType::s32});
      EXPECT_TRUE(std::equal(got.begin(), got.end(), want.begin() + (m - rows) * n)) << isa_name(isa) << " m " << rows;
    }
}

// The float packed layout (version 2, docs/operators.md): super-panels of 4 channel pairs, one
// stream each; per step of 16 along k, each pair's 16 values then each pair's u32 of positions.
// n = 10 gives a second super-panel with one real pair; k = 20 pads to 32 (two steps).
TEST(Sparse24, PackedFloatLayout) {
  static_assert(PackedSparse24::kFloatLayoutVersion == 2 && PackedSparse24::kFloatPanelChannels == 8);
  const int64_t n = 10, k = 20;
  std::vector<float> vals(n * k / 2);
  for (size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i + 1);
  std::vector<uint8_t> meta(n * sparse24_meta_cols(k));
  for (int64_t r = 0; r < n; ++r) {
    meta[r * 3 + 0] = 0x9c;  // group 0: (0, 3) -> 0xc; group 1: (1, 2) -> 0x9
    meta[r * 3 + 1] = 0xe8;  // group 2: (0, 2) -> 0x8; group 3: (2, 3) -> 0xe
    meta[r * 3 + 2] = 0x0d;  // group 4: (1, 3) -> 0xd; padding nibble 0
  }
  const PackedSparse24 pk = PackedSparse24::pack(TensorView(vals.data(), DType::f32, {n, k / 2}),
                                                 TensorView(meta.data(), DType::u8, {n, 3}));
  ASSERT_EQ(pk.panels(), 2);
  ASSERT_EQ(pk.kblocks(), 4);
  const int64_t vbytes = 4 * 16 * 4, step = vbytes + 4 * 4;
  ASSERT_EQ(pk.panel_bytes(), 2 * step);
  ASSERT_EQ(pk.bytes(), static_cast<size_t>(2 * 2 * step));
  auto f = [&](int64_t off) { float v; std::memcpy(&v, pk.data() + off, 4); return v; };
  auto u16 = [&](int64_t off) { return static_cast<int>(pk.data()[off] | (pk.data()[off + 1] << 8)); };
  // Super-panel 0, step 0, pair 1 (channels 2, 3), block 0: A.g0 A.g0 B.g0 B.g0 | A.g1 A.g1 B.g1 B.g1.
  const int64_t base = 16 * 4;
  const std::vector<float> want = {vals[20], vals[21], vals[30], vals[31], vals[22], vals[23], vals[32], vals[33]};
  for (int l = 0; l < 8; ++l) EXPECT_EQ(f(base + 4 * l), want[l]) << l;
  // Block 1 of the same pair: groups 2, 3 of channels 2 and 3.
  EXPECT_EQ(f(base + 32), vals[24]);
  EXPECT_EQ(f(base + 32 + 8), vals[34]);
  // Pair 1's positions: block 0 then block 1, A's byte low, B's high.
  EXPECT_EQ(u16(vbytes + 4), 0x9c9c);
  EXPECT_EQ(u16(vbytes + 4 + 2), 0xe8e8);
  // Step 1, block 2 holds group 4 and a padding group (positions (0, 1), zero values).
  EXPECT_EQ(u16(step + vbytes + 4), 0x4d4d);
  EXPECT_EQ(f(step + base + 16), 0.0f);
  EXPECT_EQ(f(step + base), vals[28]);
  // Super-panel 1: pair 0 is channels 8, 9; pair 1 is padding (zero values, positions (0, 1)).
  EXPECT_EQ(f(2 * step + 0), vals[8 * 10]);
  EXPECT_EQ(f(2 * step + 64), 0.0f);
  EXPECT_EQ(u16(2 * step + vbytes + 4), 0x4444);
}

TEST(Sparse24, RejectsBadInput) {
  Context& ctx = test::default_context();
  const int64_t n = 4, k = 16;
  std::vector<float> w(n * k, 1.0f), vals(n * k / 2, 1.0f), dense(n * k);
  std::vector<uint8_t> meta(n * 2, 0x44);
  const TensorView vv(vals.data(), DType::f32, {n, k / 2}), mv(meta.data(), DType::u8, {n, 2});
  // k not a multiple of 4.
  expect_error([&] { prune_24(TensorView(w.data(), DType::f32, {2, 6}), TensorView(vals.data(), DType::f32, {2, 3}),
                              TensorView(meta.data(), DType::u8, {2, 1})); },
               {"prune_24", "w", "k = 6", "multiple of 4"});
  expect_error([&] { decompress_24(TensorView(vals.data(), DType::f32, {2, 3}), TensorView(meta.data(), DType::u8, {2, 1}),
                                   TensorView(dense.data(), DType::f32, {2, 6})); },
               {"decompress_24", "values", "k = 6", "multiple of 4"});
  // Not 2:4: names the row and the group; nothing written.
  std::vector<float> w3(n * k, 0.0f);
  w3[1 * k + 8] = w3[1 * k + 9] = w3[1 * k + 11] = 1.0f;
  std::vector<uint8_t> mcopy = meta;
  expect_error([&] { compress_24(TensorView(w3.data(), DType::f32, {n, k}), vv, mv); },
               {"compress_24", "w[row 1, group 2]", "3 non-zeros"});
  EXPECT_EQ(meta, mcopy);
  // Positions not increasing, and a non-zero padding nibble.
  std::vector<uint8_t> bad = meta;
  bad[2 * 2 + 1] = 0x64;  // row 2, group 3 (high nibble): i0 = 2, i1 = 1
  expect_error([&] { decompress_24(vv, TensorView(bad.data(), DType::u8, {n, 2}), TensorView(dense.data(), DType::f32, {n, k})); },
               {"decompress_24", "meta[row 2, group 3]", "i0 = 2, i1 = 1", "i0 < i1"});
  bad[2 * 2 + 1] = 0x54;  // i0 = i1 = 1
  expect_error([&] { PackedSparse24::pack(vv, TensorView(bad.data(), DType::u8, {n, 2})); },
               {"PackedSparse24", "meta[row 2, group 3]", "i0 = 1, i1 = 1"});
  std::vector<uint8_t> pad = {0x44, 0x44, 0x44};  // k = 12: one byte and a half per row
  std::vector<float> v12(6, 1.0f), d12(12);
  expect_error([&] { decompress_24(TensorView(v12.data(), DType::f32, {1, 6}), TensorView(pad.data(), DType::u8, {1, 2}),
                                   TensorView(d12.data(), DType::f32, {1, 12})); },
               {"decompress_24", "meta", "padding"});
  // Shapes and dtypes.
  expect_error([&] { decompress_24(vv, TensorView(meta.data(), DType::u8, {n, 3}), TensorView(dense.data(), DType::f32, {n, k})); },
               {"decompress_24", "meta"});
  expect_error([&] { prune_24(TensorView(w.data(), DType::f32, {n, k}), TensorView(vals.data(), DType::f16, {n, k / 2}), mv); },
               {"prune_24", "values"});
  expect_error([&] { prune_24(TensorView(w.data(), DType::s32, {n, k}), vv, mv); }, {"prune_24", "w", "int32"});

  // sparse24_matmul: nothing written to y on rejection.
  const int64_t m = 3;
  std::vector<float> x(m * k, 1.0f), y(m * n, -7.0f);
  std::vector<int8_t> x8(m * k, 1), v8(n * k / 2, 1);
  const TensorView yv(y.data(), DType::f32, {m, n});
  Sparse24MatmulArgs a;
  a.x = TensorView(x.data(), DType::f32, {m, k});
  a.values = vv;
  a.meta = TensorView(bad.data(), DType::u8, {n, 2});
  expect_error([&] { sparse24_matmul(ctx, a, yv); }, {"sparse24_matmul", "meta[row 2, group 3]"});
  a.meta = mv;
  a.x = TensorView(x.data(), DType::f32, {m, 12});
  expect_error([&] { sparse24_matmul(ctx, a, yv); }, {"sparse24_matmul", "x", "k = 12", "k = 16"});
  a.x = TensorView(x8.data(), DType::s8, {m, k});
  expect_error([&] { sparse24_matmul(ctx, a, TensorView(y.data(), DType::s32, {m, n}), {DType::s32}); },
               {"sparse24_matmul", "int8 x needs int8 values"});
  a.values = TensorView(v8.data(), DType::s8, {n, k / 2});
  expect_error([&] { sparse24_matmul(ctx, a, yv, {DType::f32}); }, {"sparse24_matmul", "scale"});
  std::vector<float> sc(n + 1, 1.0f);
  a.scale = TensorView(sc.data(), DType::f32, {n + 1});
  expect_error([&] { sparse24_matmul(ctx, a, yv, {DType::f32}); }, {"sparse24_matmul", "scale"});
  a.scale = TensorView(sc.data(), DType::f32, {n});
  a.per_token_scale = TensorView(sc.data(), DType::f32, {m + 1});
  expect_error([&] { sparse24_matmul(ctx, a, yv, {DType::f32}); }, {"sparse24_matmul", "per_token_scale"});
  a.per_token_scale = TensorView();
  expect_error([&] { sparse24_matmul(ctx, a, TensorView(y.data(), DType::s32, {m, n}), {DType::s32}); },
               {"sparse24_matmul", "scale", "int32"});
  a.scale = TensorView();
  expect_error([&] { sparse24_matmul(ctx, a, TensorView(y.data(), DType::s32, {m, n - 1}), {DType::s32}); },
               {"sparse24_matmul", "y"});
  a.x = TensorView(x.data(), DType::f32, {m, k});
  a.values = vv;
  expect_error([&] { sparse24_matmul(ctx, a, yv, {DType::s32}); }, {"sparse24_matmul", "out_dtype"});
  const PackedSparse24 pk = PackedSparse24::pack(vv, mv);
  a.packed = &pk;
  expect_error([&] { sparse24_matmul(ctx, a, yv); }, {"sparse24_matmul", "either values/meta or packed"});
  for (float v : y) EXPECT_EQ(v, -7.0f);
}


// The s8 rows kernels themselves (kernels/sparse24.h: avx2 and, where AVX-512 VBMI is present, the
// avx512 vpermb + vpdpbusd kernel) against ref::s24_s8_rows on one 64-row panel: rows 1-4, 13,
// 14, 17, 31, 32 (the avx512 kernel's register-decode path: every chunk width 1-8 of its 8-row
// chunks), 33, 40, 64 (its tiles of 8 rows, cut partway), k = 4, 12 (less than one 64-deep
// block), 260 (a 4-block chunk plus one partial block) and 7172 (the real depth plus one odd group:
// a partial last chunk and block, and several of the AVX2 kernel's 128-group table ranges),
// n = 100 (super-panels of 32: the last one 4 real channels) and a super-panel range that starts
// at 1 (3 super-panels: a full and a partial block of the AVX2 kernel's 2-super-panel blocks). x row 2 is all zero, row 0 all -128 and the kept weights of
// channel 32 all -128 (full s8 range against the +128 bias of the avx512 kernel); rows past `rows`
// must come out 0. Integer sums: the bits must be equal.
TEST(Sparse24, Int8RowsKernelsMatchRef) {
  const int64_t n = 100;
  for (int64_t k : {4, 12, 260, 7172}) {
    Compressed c = prune(DType::s8, n, k, make_weight(DType::s8, n, k, static_cast<uint32_t>(k + 11)));
    for (int64_t i = 0; i < k / 2; ++i) reinterpret_cast<int8_t*>(c.values.data())[32 * (k / 2) + i] = -128;
    decompress_24(TensorView(c.values.data(), DType::s8, {n, k / 2}), TensorView(c.meta.data(), DType::u8, {n, sparse24_meta_cols(k)}),
                  TensorView(c.dense.data(), DType::s8, {n, k}));
    const PackedSparse24 pk = pack(c, DType::s8, n, k);
    const kernels::S24S8Panels panels{pk.data(), pk.kblocks(), pk.panel_bytes()};
    auto x = make_x(DType::s8, kernels::kRowPanel, k, static_cast<uint32_t>(k * 3));
    std::memset(x.data(), 0x80, static_cast<size_t>(k));
    std::memset(x.data() + 2 * k, 0, static_cast<size_t>(k));
    const int8_t* xs = reinterpret_cast<const int8_t*>(x.data());
    const int64_t sp0 = 1, sp1 = pk.panels(), words = (sp1 - sp0) * kernels::kS8Channels * kernels::kRowPanel;
    std::vector<int32_t> want(words);
    std::unique_ptr<void, void (*)(void*)> acc(aligned_malloc(words * 4), aligned_free);
    std::unique_ptr<void, void (*)(void*)> scratch(aligned_malloc(kernels::kS8RowsScratchBytes), aligned_free);
    for (int64_t rows : {1, 2, 3, 4, 13, 14, 17, 31, 32, 33, 40, 64}) {
      kernels::ref::s24_s8_rows(xs, k, rows, k, panels, sp0, sp1, want.data(), nullptr);
      for (Isa isa : test::fast_isas()) {
        int32_t* got = static_cast<int32_t*>(acc.get());
        std::fill(got, got + words, 0x7eadbeef);
        const kernels::Sparse24Kernels& sk = kernels::sparse24_kernels(isa);
        sk.s8_rows(xs, k, rows, k, panels, sp0, sp1, got, scratch.get());
        // want is channel-major (acc[c][64]); a row-major kernel writes [super-panel][64][32].
        for (int64_t i = 0; i < words; ++i) {
          const int64_t c = i / kernels::kRowPanel, r = i % kernels::kRowPanel;
          const int64_t gi = sk.s8_rows_row_major ? (c / 32) * 32 * kernels::kRowPanel + r * 32 + c % 32 : i;
          ASSERT_EQ(got[gi], want[i]) << isa_name(isa) << " k " << k << " rows " << rows << " channel "
                                      << sp0 * kernels::kS8Channels + c << " row " << r;
        }
      }
      // ref itself against the int64 dense product (spot check: channels 32..37 of every row).
      const int8_t* ws = reinterpret_cast<const int8_t*>(c.dense.data());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t col = 32; col < 38; ++col) {
          int64_t sum = 0;
          for (int64_t kk = 0; kk < k; ++kk) sum += static_cast<int64_t>(ws[col * k + kk]) * xs[r * k + kk];
          ASSERT_EQ(want[(col - sp0 * kernels::kS8Channels) * kernels::kRowPanel + r], sum) << "k " << k << " row " << r;
        }
    }
  }
}


// The op's s8 schedules around the rows-kernel switches (kernels/sparse24.h s8_rows_min_m: 40
// for ref / avx2, 1 for the avx512 vpermb kernel, whose register-decode path ends at 32 rows):
// m = 1, 3, 5, 6, 17, 32 | 33, 39 | 40, 65 (a second, 1-row panel), k = 12 and 7172 (odd group count), n = 70; s32 out against the int64 dense
// product, every ISA.
TEST(Sparse24, Int8SwitchPointsExact) {
  const int64_t n = 70;
  for (int64_t k : {12, 7172}) {
    const Compressed c = prune(DType::s8, n, k, make_weight(DType::s8, n, k, static_cast<uint32_t>(k + 5)));
    const PackedSparse24 pk = pack(c, DType::s8, n, k);
    for (int64_t m : {1, 3, 5, 6, 17, 32, 33, 39, 40, 65}) {
      auto x = make_x(DType::s8, m, k, static_cast<uint32_t>(m * 13 + k));
      if (m > 2) std::memset(x.data() + 2 * k, 0, static_cast<size_t>(k));
      const std::vector<int32_t> want = exact_s8_product(c.dense, x, m, n, k);
      Sparse24MatmulArgs a;
      a.x = TensorView(x.data(), DType::s8, {m, k});
      a.packed = &pk;
      for (Isa isa : test::isas()) {
        std::vector<int32_t> got(m * n, 0x7eadbeef);
        sparse24_matmul(context(isa), a, TensorView(got.data(), DType::s32, {m, n}), {DType::s32});
        EXPECT_TRUE(got == want) << isa_name(isa) << " m " << m << " k " << k;
      }
    }
  }
}


// The rows kernels' output transposition (Sparse24Kernels::rows_out; the AVX2 version moves 8 x 8
// tiles) against ref's scalar epilogue on every ISA: rows 1, 7, 9, 64 (partial 8-row tiles), 1, 5,
// 13, 32, 70 channels (partial 8-channel tiles), s32 acc with values past 2^24 (int -> f32 rounds)
// and both signs, f32 acc with values that round differently to f16 and bf16, every output dtype,
// with and without per-row scales. Same arithmetic and order, so the bits must be equal.
TEST(Sparse24, RowsOutMatchesRef) {
  std::mt19937 g(17);
  const int64_t maxc = 72, ld = 75;
  std::vector<int32_t> ai(maxc * kernels::kRowPanel);
  std::vector<float> af(maxc * kernels::kRowPanel);
  std::uniform_int_distribution<int32_t> di(-(1 << 28), 1 << 28);
  std::uniform_real_distribution<float> df(-70000.0f, 70000.0f);
  for (auto& v : ai) v = di(g);
  for (auto& v : af) v = df(g);
  const auto scale = test::rand_f32(maxc, 0.001f, 0.01f), pts = test::rand_f32(kernels::kRowPanel, 0.5f, 2.0f);
  for (int64_t rows : {1, 7, 9, 64})
    for (int64_t nc : {1, 5, 13, 32, 70})
      for (bool s32 : {true, false})
        for (DType odt : {DType::s32, DType::f32, DType::f16, DType::bf16})
          for (bool with_pts : {true, false}) {
            if (odt == DType::s32 && (!s32 || with_pts)) continue;
            const int64_t es = dtype_size(odt);
            std::vector<uint8_t> want(rows * ld * es, 0xee), got(rows * ld * es, 0xee);
            const void* acc = s32 ? static_cast<const void*>(ai.data()) : static_cast<const void*>(af.data());
            const float* sc = s32 && odt != DType::s32 ? scale.data() : nullptr;
            const float* p = with_pts ? pts.data() : nullptr;
            kernels::ref::s24_rows_out(acc, s32, rows, nc, sc, p, odt, want.data(), ld);
            for (Isa isa : test::fast_isas()) {
              std::fill(got.begin(), got.end(), 0xee);
              kernels::sparse24_kernels(isa).rows_out(acc, s32, rows, nc, sc, p, odt, got.data(), ld);
              ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size()), 0)
                  << isa_name(isa) << " rows " << rows << " channels " << nc << " s32 " << s32 << " " << dtype_name(odt)
                  << " pts " << with_pts;
            }
          }
}

}  // namespace
}  // namespace qllm
