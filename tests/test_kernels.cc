// Kernel level: every AVX2 kernel against the scalar reference, bit for bit, on the same packed
// data, over tiny and odd sizes (k not a multiple of the SIMD width, partial panels, 1..7 rows).
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"
#include "ops/pack_panels.h"
#include "test_util.h"

namespace qllm {
namespace {

using kernels::KernelTable;

const KernelTable& ref() { return kernels::ref_table(); }

template <class T> bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<float> interesting_floats(size_t n) {
  auto v = test::rand_f32(n, -8.0f, 8.0f);
  const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 87.5f, -87.5f, 100.0f, -100.0f, 0.5f, -0.5f, 2.5f};
  for (size_t i = 0; i < n && i < 3 * sizeof(specials) / sizeof(float); i += 3) v[i] = specials[i / 3];
  return v;
}

TEST(Kernels, QuantizeRowMatchesRef) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (int64_t n : {1, 7, 8, 31, 32, 33, 100, 2048}) {
      for (bool smooth : {false, true}) {
        auto v = interesting_floats(n);
        auto s = test::rand_f32(n, 0.5f, 2.0f);
        std::vector<int8_t> q1(n), q2(n);
        const float s1 = ref().quantize_row(v.data(), smooth ? s.data() : nullptr, n, q1.data());
        const float s2 = fast_k.quantize_row(v.data(), smooth ? s.data() : nullptr, n, q2.data());
        ASSERT_EQ(f32_bits(s1), f32_bits(s2)) << n;
        ASSERT_TRUE(same_bits(q1, q2)) << n;
        // And against the formula of SPEC section 0 written out here.
        float amax = 0;
        for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(smooth ? v[i] * s[i] : v[i]));
        ASSERT_EQ(s1, amax / 127.0f);
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(q1[i], static_cast<int8_t>(std::nearbyint((smooth ? v[i] * s[i] : v[i]) * (127.0f / amax))));
      }
    }
    // All-zero row: q = 0, scale = 0.
    std::vector<float> z(37, 0.0f);
    std::vector<int8_t> q(37, 5);
    EXPECT_EQ(fast_k.quantize_row(z.data(), nullptr, 37, q.data()), 0.0f);
    for (int8_t x : q) EXPECT_EQ(x, 0);
    // Subnormal amax: 127 / amax overflows; zeros stay zero and the extreme maps to +-127.
    std::vector<float> t(9, 0.0f);
    t[4] = 1e-40f;
    for (const KernelTable* k : {&ref(), &fast_k}) {
      std::vector<int8_t> qq(9);
      k->quantize_row(t.data(), nullptr, 9, qq.data());
      for (int i = 0; i < 9; ++i) EXPECT_EQ(qq[i], i == 4 ? 127 : 0);
    }
  }
}

TEST(Kernels, SwigluRowMatchesRef) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (int64_t h : {1, 5, 8, 17, 64, 1000}) {
      for (bool left : {true, false}) {
        auto x = interesting_floats(2 * h);
        std::vector<float> y1(h), y2(h);
        ref().swiglu_row(x.data(), h, left, y1.data());
        fast_k.swiglu_row(x.data(), h, left, y2.data());
        ASSERT_TRUE(same_bits(y1, y2)) << h;
        for (int64_t j = 0; j < h; ++j) {
          const float a = left ? x[j] : x[h + j], b = left ? x[h + j] : x[j];
          const double want = b * (a / (1.0 + std::exp(-static_cast<double>(a))));
          ASSERT_NEAR(y1[j], want, 4e-7 * std::fabs(want) + 1e-30) << a << " " << b;
        }
      }
    }
  }
}

TEST(Kernels, ConversionsMatchRef) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (int64_t n : {1, 7, 8, 9, 33}) {
      auto x = interesting_floats(n);
      x[0] = NAN;
      for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
        std::vector<uint8_t> o1(n * 4), o2(n * 4);
        ref().from_f32(x.data(), n, dt, o1.data());
        fast_k.from_f32(x.data(), n, dt, o2.data());
        ASSERT_TRUE(same_bits(o1, o2)) << dtype_name(dt) << " n=" << n;
        std::vector<float> b1(n), b2(n);
        ref().to_f32(o1.data(), dt, n, b1.data());
        fast_k.to_f32(o1.data(), dt, n, b2.data());
        ASSERT_TRUE(same_bits(b1, b2));
      }
      auto s8 = test::rand_s8(n);
      // Each table's activation form, checked against its definition.
      for (const KernelTable* kt : {&ref(), &fast_k}) {
        std::vector<uint8_t> a(kt->int8_a_bytes(n));
        kt->int8_prepare_a(s8.data(), n, a.data());
        for (int64_t i = 0; i < static_cast<int64_t>(a.size()) / (kt->int8_layout == Int8Layout::pairs ? 2 : 1); ++i) {
          if (kt->int8_layout == Int8Layout::pairs) {
            int16_t v;
            std::memcpy(&v, a.data() + 2 * i, 2);
            ASSERT_EQ(v, i < n ? s8[i] : 0);
          } else {
            ASSERT_EQ(a[i], i < n ? static_cast<uint8_t>(s8[i] + 128) : 128);
          }
        }
      }
    }
  }
}

TEST(Kernels, DequantRowMatchesRef) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (int64_t n : {1, 8, 13, 64}) {
      std::vector<int32_t> acc(n);
      for (auto& a : acc) a = static_cast<int32_t>(test::rng()()) >> 8;
      auto s = test::rand_f32(n, 0.0f, 1e-3f);
      for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
        std::vector<uint8_t> o1(n * 4), o2(n * 4);
        ref().dequant_row(acc.data(), n, s.data(), 0.37f, dt, o1.data());
        fast_k.dequant_row(acc.data(), n, s.data(), 0.37f, dt, o2.data());
        ASSERT_TRUE(same_bits(o1, o2)) << n;
      }
    }
  }
}

struct GemmCase { int64_t rows, k, n; };
const GemmCase kGemmCases[] = {{1, 1, 1}, {1, 7, 16}, {3, 33, 17}, {6, 64, 32}, {7, 100, 40},
                               {13, 31, 5}, {17, 256, 48}, {2, 2049, 16}, {25, 40, 33}, {12, 64, 16}};

// Packs w [k, n] for `layout` (with column sums) and prepares x [rows, k] for `kt`.
struct Int8Operands {
  std::vector<uint8_t> packed;
  std::vector<int32_t> colsum;
  std::vector<uint8_t> a;
  int64_t abytes = 0;
  kernels::Int8Panels b;
};
Int8Operands int8_operands(const KernelTable& kt, Int8Layout layout, const std::vector<int8_t>& x,
                           const std::vector<int8_t>& w, int64_t rows, int64_t k, int64_t n) {
  Int8Operands o;
  const int64_t panels = (n + 15) / 16, gs = int8_group(layout);
  o.packed.resize(detail::panel_group_bytes(DType::s8, k, n, layout));
  o.colsum.resize(panels * 16);
  detail::pack_panels(w.data(), DType::s8, k, n, false, nullptr, n, o.packed.data(), layout, o.colsum.data());
  o.abytes = kt.int8_a_bytes(k);
  o.a.resize(rows * o.abytes + 1);
  for (int64_t r = 0; r < rows; ++r) kt.int8_prepare_a(x.data() + r * k, k, o.a.data() + r * o.abytes);
  o.b = {reinterpret_cast<int8_t*>(o.packed.data()), k, (k + gs - 1) / gs, n, layout, o.colsum.data()};
  return o;
}

TEST(Kernels, Int8GemmMatchesRefAllEpilogues) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (const auto& c : kGemmCases) {
      const int64_t panels = (c.n + 15) / 16;
      auto x = test::rand_s8(c.rows * c.k);
      auto w = test::rand_s8(c.k * c.n);
      // Both kernels read the same packed weights, in the fast kernel's layout.
      const Int8Operands fo = int8_operands(fast_k, fast_k.int8_layout, x, w, c.rows, c.k, c.n);
      const Int8Operands ro = int8_operands(ref(), fast_k.int8_layout, x, w, c.rows, c.k, c.n);
      auto cs = test::rand_f32(panels * 16, 0.001f, 0.01f);
      auto rs = test::rand_f32(c.rows, 0.5f, 2.0f);
      for (kernels::Epi kind : {kernels::Epi::s32, kernels::Epi::dequant, kernels::Epi::swiglu}) {
        for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
          if (kind != kernels::Epi::dequant && dt != DType::f32) continue;
          kernels::Int8Epilogue ep;
          ep.kind = kind;
          ep.col_scale = cs.data();
          ep.row_scale = rs.data();
          ep.out_dtype = kind == kernels::Epi::s32 ? DType::s32 : dt;
          ep.out_cols = kind == kernels::Epi::swiglu ? panels * 8 : c.n;
          ep.ldo = ep.out_cols;
          std::vector<uint8_t> o1(c.rows * ep.ldo * 4, 0xab), o2(c.rows * ep.ldo * 4, 0xab);
          ep.out = o1.data();
          ref().int8_gemm(ro.a.data(), ro.abytes, c.rows, ro.b, 0, panels, ep);
          ep.out = o2.data();
          fast_k.int8_gemm(fo.a.data(), fo.abytes, c.rows, fo.b, 0, panels, ep);
          ASSERT_TRUE(same_bits(o1, o2)) << c.rows << "x" << c.k << "x" << c.n << " epi " << int(kind);
          if (kind == kernels::Epi::s32) {
            // Exact against a plain triple loop on the unpacked data.
            const int32_t* o = reinterpret_cast<const int32_t*>(o1.data());
            for (int64_t r = 0; r < c.rows; ++r)
              for (int64_t j = 0; j < c.n; ++j) {
                int64_t want = 0;
                for (int64_t kk = 0; kk < c.k; ++kk) want += int64_t{x[r * c.k + kk]} * w[kk * c.n + j];
                ASSERT_EQ(o[r * c.n + j], want);
              }
          }
        }
      }
    }
  }
}

TEST(Kernels, Int8GemmExtremesAreExact) {
  // -128 x -128 in every product: the case that breaks vpmaddubsw and the sign trick, and the
  // largest u8 x s8 sums of the VNNI path's x + 128 offset.
  for (Isa isa : supported_isas()) {
    const KernelTable& kt = kernels::table(isa);
    for (int8_t xv : {int8_t{-128}, int8_t{127}}) {
      const int64_t k = 7168, n = 16, rows = 2;
      std::vector<int8_t> x(rows * k, xv), w(k * n, -128);
      const Int8Operands o = int8_operands(kt, kt.int8_layout, x, w, rows, k, n);
      std::vector<int32_t> out(rows * n);
      kernels::Int8Epilogue ep;
      ep.out = out.data();
      ep.ldo = n;
      ep.out_cols = n;
      kt.int8_gemm(o.a.data(), o.abytes, rows, o.b, 0, 1, ep);
      for (int32_t v : out) ASSERT_EQ(v, int32_t{xv} * -128 * 7168) << isa_name(isa);
    }
  }
}

TEST(Kernels, FloatGemmMatchesRef) {
  for (Isa isa : test::fast_isas()) {
    SCOPED_TRACE(isa_name(isa));
    const KernelTable& fast_k = kernels::table(isa);
    for (const auto& c : kGemmCases) {
      for (DType wdt : {DType::f32, DType::f16, DType::bf16}) {
        auto wf = test::rand_f32(c.k * c.n);
        std::vector<uint8_t> w(c.k * c.n * 4);
        ref().from_f32(wf.data(), c.k * c.n, wdt, w.data());
        std::vector<uint8_t> packed(detail::panel_group_bytes(wdt, c.k, c.n));
        detail::pack_panels(w.data(), wdt, c.k, c.n, true, nullptr, c.n, packed.data());  // as [n, k]
        auto a = test::rand_f32(c.rows * c.k);
        auto bias = test::rand_f32(c.n);
        const kernels::FloatPanels b{packed.data(), wdt, c.k, c.n};
        for (DType odt : {DType::f32, DType::bf16}) {
          kernels::FloatEpilogue ep;
          ep.bias = bias.data();
          ep.out_dtype = odt;
          ep.ldo = c.n;
          std::vector<uint8_t> o1(c.rows * c.n * 4), o2(c.rows * c.n * 4);
          ep.out = o1.data();
          ref().float_gemm(a.data(), c.k, c.rows, b, 0, b.panels(), ep);
          ep.out = o2.data();
          fast_k.float_gemm(a.data(), c.k, c.rows, b, 0, b.panels(), ep);
          ASSERT_TRUE(same_bits(o1, o2)) << c.rows << "x" << c.k << "x" << c.n;
        }
      }
    }
  }
}

}  // namespace
}  // namespace qllm
