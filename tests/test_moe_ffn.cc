// The fused expert FFN: against SPEC section 3 written out here from the raw (permuted) weights,
// against the unfused operator chain, across ISAs, and on bad input.
#include <cmath>
#include <cstring>

#include "kernels/ref/math.h"
#include "test_util.h"

namespace qllm {
namespace {

struct Ffn {
  int64_t m, k1, n1, n2, G, T;  // T = 0: no permutation
  std::vector<int64_t> counts;  // per group; sum <= m
  std::vector<int8_t> x1, w1, w2;
  std::vector<float> s1, s2, pts;
  std::vector<int64_t> cumsum;
  int64_t k2() const { return n1 / 2; }
  int64_t total() const { return cumsum.empty() ? 0 : cumsum.back(); }
};

Ffn make(int64_t m, int64_t k1, int64_t n1, int64_t n2, std::vector<int64_t> counts, int64_t T) {
  Ffn f{m, k1, n1, n2, static_cast<int64_t>(counts.size()), T, counts, {}, {}, {}, {}, {}, {}, {}};
  f.x1 = test::rand_s8(m * k1);
  f.w1 = test::rand_s8(f.G * k1 * n1);
  f.w2 = test::rand_s8(f.G * n2 * f.k2());
  // Scales sized so h stays O(1): |acc1| ~ 128 * 128 * sqrt(k1) / 2.
  f.s1 = test::rand_f32(f.G * n1, 0.5f / (8192.0f * std::sqrt(float(k1))), 2.0f / (8192.0f * std::sqrt(float(k1))));
  f.s2 = test::rand_f32(f.G * n2, 1e-4f, 1e-3f);
  f.pts = test::rand_f32(m, 0.5f, 2.0f);
  if (m > 2) for (int64_t i = 0; i < k1; ++i) f.x1[2 * k1 + i] = 0;  // an all-zero row
  int64_t s = 0;
  for (int64_t c : counts) f.cumsum.push_back(s += c);
  return f;
}

// SPEC section 3 step by step, float32, from the weights as given.
std::vector<float> spec_ffn(const Ffn& f) {
  const int64_t k2 = f.k2();
  std::vector<float> out(f.m * f.n2, 0.0f);
  std::vector<float> h(f.n1), y(k2);
  std::vector<int8_t> q(k2);
  auto col = [&](int64_t half, int64_t j) {
    if (!f.T) return half * k2 + j;
    return (j / (f.T / 2)) * f.T + half * (f.T / 2) + j % (f.T / 2);
  };
  int64_t g = 0;
  for (int64_t r = 0; r < f.total(); ++r) {
    while (r >= f.cumsum[g]) ++g;
    for (int64_t p = 0; p < f.n1; ++p) {
      int64_t acc = 0;
      for (int64_t k = 0; k < f.k1; ++k) acc += int64_t{f.x1[r * f.k1 + k]} * f.w1[(g * f.k1 + k) * f.n1 + p];
      h[p] = (static_cast<float>(acc) * f.s1[g * f.n1 + p]) * f.pts[r];
    }
    float amax = 0;
    for (int64_t j = 0; j < k2; ++j) {
      y[j] = h[col(1, j)] * kernels::silu_qllm(h[col(0, j)]);
      amax = std::max(amax, std::fabs(y[j]));
    }
    const float s2r = amax / 127.0f;
    for (int64_t j = 0; j < k2; ++j) q[j] = amax == 0 ? 0 : static_cast<int8_t>(std::nearbyint(y[j] * (127.0f / amax)));
    for (int64_t c = 0; c < f.n2; ++c) {
      int64_t acc = 0;
      for (int64_t j = 0; j < k2; ++j) acc += int64_t{q[j]} * f.w2[(g * f.n2 + c) * k2 + j];
      out[r * f.n2 + c] = (static_cast<float>(acc) * f.s2[g * f.n2 + c]) * s2r;
    }
  }
  return out;
}

MoeFfnArgs args_of(const Ffn& f) {
  MoeFfnArgs a;
  a.x1 = TensorView(f.x1.data(), DType::s8, {f.m, f.k1});
  a.per_token_scale1 = TensorView(f.pts.data(), DType::f32, {f.m});
  a.group_list = TensorView(f.cumsum.data(), DType::s64, {f.G});
  a.weight1 = TensorView(f.w1.data(), DType::s8, {f.G, f.k1, f.n1});
  a.scale1 = TensorView(f.s1.data(), DType::f32, {f.G, f.n1});
  a.weight2 = TensorView(f.w2.data(), DType::s8, {f.G, f.n2, f.k2()});
  a.scale2 = TensorView(f.s2.data(), DType::f32, {f.G, f.n2});
  return a;
}

WeightUpPermute perm_of(int64_t T) {
  return T == 128 ? WeightUpPermute::n128 : T == 256 ? WeightUpPermute::n256 : WeightUpPermute::none;
}

std::vector<uint8_t> run_fused(Isa isa, const Ffn& f, DType out_dtype, bool packed) {
  MoeFfnArgs a = args_of(f);
  MoeFfnParams p;
  p.weight_up_permute = perm_of(f.T);
  p.out_dtype = out_dtype;
  PackedExpertFFN pk;
  if (packed) {
    pk = PackedExpertFFN::pack(a.weight1, a.scale1, a.weight2, a.scale2, p.weight_up_permute, "PackedExpertFFN", isa);
    a.weight1 = a.scale1 = a.weight2 = a.scale2 = TensorView();
    a.packed = &pk;
  }
  std::vector<uint8_t> out(f.m * f.n2 * 4 + 1, 0xee);
  gmm_deq_swiglu_quant_gmm_deq(test::context(isa), a, TensorView(out.data(), out_dtype, {f.m, f.n2}), p);
  return out;
}

void expect_matches_spec(const Ffn& f, const std::string& what) {
  const std::vector<float> want = spec_ffn(f);
  for (Isa isa : test::isas()) {
    for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
      const auto out = run_fused(isa, f, dt, dt != DType::bf16);
      for (int64_t i = 0; i < f.m * f.n2; ++i) {
        bool same;
        if (dt == DType::f32) same = f32_bits(reinterpret_cast<const float*>(out.data())[i]) == f32_bits(want[i]);
        else if (dt == DType::f16) same = reinterpret_cast<const uint16_t*>(out.data())[i] == f32_to_f16(want[i]);
        else same = reinterpret_cast<const uint16_t*>(out.data())[i] == f32_to_bf16(want[i]);
        ASSERT_TRUE(same) << what << " isa " << isa_name(isa) << " dtype " << dtype_name(dt) << " at " << i
                          << " want " << want[i];
      }
    }
  }
}

TEST(MoeFfn, MatchesSpecSweep) {
  expect_matches_spec(make(1, 100, 256, 40, {1}, 256), "m=1 N256");
  expect_matches_spec(make(3, 7, 128, 17, {1, 0, 2}, 128), "m=3 N128 empty group");
  expect_matches_spec(make(17, 100, 384, 33, {5, 0, 7}, 128), "m=17 n1=3T total<m");
  expect_matches_spec(make(17, 64, 768, 16, {2, 3, 0, 1, 0, 4, 0, 0, 1, 1, 0, 0, 2, 0, 1, 2}, 256), "G=16 n1=3T");
  expect_matches_spec(make(0, 32, 128, 8, {0}, 128), "m=0");
  expect_matches_spec(make(9, 33, 6, 5, {4, 5}, 0), "NONE tiny n1");
  expect_matches_spec(make(255, 100, 256, 64, {100, 0, 150}, 256), "m=255");
}

TEST(MoeFfn, RealModelSizes) {
  // DeepSeek-V3 expert (hidden 7168, expert intermediate 2048, N256 layout) and a Mixtral /
  // Qwen-MoE expert (hidden 4096, intermediate 14336); a few rows keep the oracle cheap.
  expect_matches_spec(make(3, 7168, 4096, 7168, {1, 2}, 256), "DeepSeek-V3");
  expect_matches_spec(make(2, 4096, 28672, 4096, {2}, 0), "Mixtral");
}

TEST(MoeFfn, ExtremeValues) {
  Ffn f = make(6, 64, 128, 16, {6}, 128);
  for (int64_t i = 0; i < f.m * f.k1; ++i) f.x1[i] = (i % 3 == 0) ? -128 : 127;
  for (size_t i = 0; i < f.w1.size(); ++i) f.w1[i] = (i % 5 == 0) ? 127 : -128;
  for (size_t i = 0; i < f.w2.size(); ++i) f.w2[i] = (i % 2) ? 127 : -128;
  expect_matches_spec(f, "extremes");
}

TEST(MoeFfn, EqualsUnfusedChain) {
  // grouped_matmul (s8 -> f32) -> swiglu_quant -> grouped_matmul (s8 -> f16), natural layout.
  for (Isa isa : test::isas()) {
    Ffn f = make(40, 96, 256, 48, {10, 0, 25}, 0);
    Context& ctx = test::context(isa);
    const int64_t m = f.m, k2 = f.k2();
    std::vector<float> h(m * f.n1);
    GroupedMatmulArgs a1;
    a1.x = TensorView(f.x1.data(), DType::s8, {m, f.k1});
    a1.w = TensorView(f.w1.data(), DType::s8, {f.G, f.k1, f.n1});
    a1.group_list = TensorView(f.cumsum.data(), DType::s64, {f.G});
    a1.scale = TensorView(f.s1.data(), DType::f32, {f.G, f.n1});
    a1.per_token_scale = TensorView(f.pts.data(), DType::f32, {m});
    grouped_matmul(ctx, a1, TensorView(h.data(), DType::f32, {m, f.n1}));
    std::vector<int8_t> q(m * k2);
    std::vector<float> s(m);
    swiglu_quant(ctx, TensorView(h.data(), DType::f32, {m, f.n1}), TensorView(q.data(), DType::s8, {m, k2}), TensorView(s.data(), DType::f32, {m}));
    GroupedMatmulArgs a2;
    a2.x = TensorView(q.data(), DType::s8, {m, k2});
    a2.w = TensorView(f.w2.data(), DType::s8, {f.G, f.n2, k2});
    a2.group_list = a1.group_list;
    a2.scale = TensorView(f.s2.data(), DType::f32, {f.G, f.n2});
    a2.per_token_scale = TensorView(s.data(), DType::f32, {m});
    GroupedMatmulParams p2;
    p2.transpose_w = true;
    p2.out_dtype = DType::f16;
    std::vector<uint16_t> chain(m * f.n2);
    grouped_matmul(ctx, a2, TensorView(chain.data(), DType::f16, {m, f.n2}), p2);
    const auto fused = run_fused(isa, f, DType::f16, true);
    EXPECT_EQ(std::memcmp(fused.data(), chain.data(), chain.size() * 2), 0) << isa_name(isa);
  }
}

TEST(MoeFfn, SingleExpertForm) {
  Ffn f = make(5, 50, 256, 24, {5}, 256);
  const auto want = run_fused(Isa::ref, f, DType::f32, true);
  for (Isa isa : test::isas()) {
    MoeFfnArgs a;
    a.x1 = TensorView(f.x1.data(), DType::s8, {f.m, f.k1});
    a.per_token_scale1 = TensorView(f.pts.data(), DType::f32, {f.m});
    a.weight1 = TensorView(f.w1.data(), DType::s8, {f.k1, f.n1});
    a.scale1 = TensorView(f.s1.data(), DType::f32, {f.n1});
    a.weight2 = TensorView(f.w2.data(), DType::s8, {f.n2, f.k2()});
    a.scale2 = TensorView(f.s2.data(), DType::f32, {f.n2});
    MoeFfnParams p;
    p.weight_up_permute = WeightUpPermute::n256;
    p.out_dtype = DType::f32;
    std::vector<float> out(f.m * f.n2);
    mm_deq_swiglu_quant_mm_deq(test::context(isa), a, TensorView(out.data(), DType::f32, {f.m, f.n2}), p);
    EXPECT_EQ(std::memcmp(out.data(), want.data(), out.size() * 4), 0);
  }
}

TEST(MoeFfn, PermuteWeightUpHelper) {
  for (int64_t T : {128, 256}) {
    Ffn nat = make(7, 20, 2 * T, 16, {3, 4}, 0);
    Ffn per = nat;
    per.T = T;
    permute_weight_up(TensorView(nat.w1.data(), DType::s8, {nat.G, nat.k1, nat.n1}), TensorView(nat.s1.data(), DType::f32, {nat.G, nat.n1}), T,
                      TensorView(per.w1.data(), DType::s8, {nat.G, nat.k1, nat.n1}), TensorView(per.s1.data(), DType::f32, {nat.G, nat.n1}));
    // Permuted column p = b*T + h*(T/2) + j holds natural h*(n1/2) + b*(T/2) + j.
    const int64_t b = 1, hh = 1, j = 5, half = nat.n1 / 2;
    EXPECT_EQ(per.w1[b * T + hh * (T / 2) + j], nat.w1[hh * half + b * (T / 2) + j]);
    EXPECT_EQ(per.s1[b * T + j], nat.s1[b * (T / 2) + j]);
    // The fused op gives identical bits for natural weights with NONE and permuted with N<T>.
    EXPECT_EQ(run_fused(Isa::ref, nat, DType::f16, true), run_fused(Isa::ref, per, DType::f16, true));
  }
  std::vector<int8_t> w(4 * 200);
  test::expect_error([&] { permute_weight_up(TensorView(w.data(), DType::s8, {4, 200}), TensorView(), 128, TensorView(w.data(), DType::s8, {4, 200}), TensorView()); },
                     {"permute_weight_up: ", "n1 = 200 must be a multiple of T = 128"});
  test::expect_error([&] { permute_weight_up(TensorView(w.data(), DType::s8, {4, 200}), TensorView(), 100, TensorView(w.data(), DType::s8, {4, 200}), TensorView()); },
                     {"T must be 128 or 256"});
}

TEST(MoeFfn, RejectsWeightsPackedForAnotherLayout) {
  if (!isa_supported(Isa::avx512)) GTEST_SKIP() << "needs a CPU with both int8 layouts' ISAs";
  Ffn f = make(4, 32, 128, 16, {4}, 0);
  MoeFfnArgs a = args_of(f);
  const PackedExpertFFN quads = PackedExpertFFN::pack(a.weight1, a.scale1, a.weight2, a.scale2, WeightUpPermute::none,
                                                      "PackedExpertFFN", Isa::avx512);
  a.weight1 = a.scale1 = a.weight2 = a.scale2 = TensorView();
  a.packed = &quads;
  std::vector<uint16_t> out(f.m * f.n2, 0x1234);
  test::expect_error([&] { gmm_deq_swiglu_quant_gmm_deq(test::context(Isa::avx2), a, TensorView(out.data(), DType::f16, {f.m, f.n2})); },
                     {"gmm_deq_swiglu_quant_gmm_deq: ", "quads layout", "avx2 reads pairs"});
  for (uint16_t v : out) ASSERT_EQ(v, 0x1234);
  // ref reads either layout, with identical results.
  std::vector<uint16_t> o_ref(f.m * f.n2), o_vnni(f.m * f.n2);
  gmm_deq_swiglu_quant_gmm_deq(test::context(Isa::ref), a, TensorView(o_ref.data(), DType::f16, {f.m, f.n2}));
  gmm_deq_swiglu_quant_gmm_deq(test::context(Isa::avx512), a, TensorView(o_vnni.data(), DType::f16, {f.m, f.n2}));
  EXPECT_EQ(o_ref, o_vnni);
}

TEST(MoeFfn, RejectsBadInput) {
  Ffn f = make(8, 32, 256, 16, {4, 4}, 256);
  Context& ctx = test::default_context();
  std::vector<uint16_t> out(f.m * f.n2, 0x1234);
  const TensorView ov(out.data(), DType::f16, {f.m, f.n2});
  MoeFfnParams p;
  p.weight_up_permute = WeightUpPermute::n256;
  auto expect = [&](MoeFfnArgs a, std::initializer_list<const char*> frags, MoeFfnParams pp) {
    test::expect_error([&] { gmm_deq_swiglu_quant_gmm_deq(ctx, a, ov, pp); }, frags);
  };
  const char* op = "gmm_deq_swiglu_quant_gmm_deq: ";
  std::vector<float> x1f(f.m * f.k1);
  {
    MoeFfnArgs a = args_of(f);
    a.x1 = TensorView(x1f.data(), DType::f32, {f.m, f.k1});
    expect(a, {op, "x1 must be int8, got float32"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.scale1 = TensorView(f.s1.data(), DType::f32, {f.G, f.n1 - 1});
    expect(a, {op, "scale1 must have shape [2, 256], got [2, 255]"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.weight1 = TensorView(f.w1.data(), DType::s8, {f.G, f.k1 + 1, f.n1 / 2});
    expect(a, {op, "weight1 must be [G, k1, n1] with k1 = 32"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.weight1 = TensorView(f.w1.data(), DType::s8, {f.G, f.k1, 255});
    MoeFfnParams pn;
    pn.weight_up_permute = WeightUpPermute::none;
    expect(a, {"n1 = weight1.shape[-1] must be even"}, pn);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.weight1 = TensorView(f.w1.data(), DType::s8, {f.G * 2, f.k1, 128});
    a.scale1 = TensorView(f.s1.data(), DType::f32, {f.G * 2, 128});
    MoeFfnParams p2;
    p2.weight_up_permute = WeightUpPermute::n256;
    expect(a, {"n1 = 128 must be a multiple of the permute block T = 256"}, p2);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.weight2 = TensorView(f.w2.data(), DType::s8, {f.G, f.n2 * 2, f.k2() / 2});
    expect(a, {"weight2 must be [G, n2, k2] = [2, n2, 128]"}, p);
  }
  auto with_gl = [&](std::vector<int64_t> gl, GroupListType t, std::initializer_list<const char*> frags) {
    MoeFfnArgs a = args_of(f);
    a.group_list = TensorView(gl.data(), DType::s64, {static_cast<int64_t>(gl.size())});
    MoeFfnParams pp = p;
    pp.group_list_type = t;
    expect(a, frags, pp);
  };
  with_gl({6, 4}, GroupListType::cumsum, {op, "group_list[1] = 4 < group_list[0] = 6"});
  with_gl({4, 9}, GroupListType::cumsum, {"exceeds m = 8"});
  with_gl({-2, 4}, GroupListType::count, {"group_list[0] = -2 is negative"});
  with_gl({8}, GroupListType::cumsum, {"group_list must have 2 entries"});
  {
    MoeFfnArgs a = args_of(f);
    a.group_list = TensorView();
    expect(a, {"group_list is required"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.scale2 = TensorView();
    expect(a, {"scale2 is required"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    a.per_token_scale1 = TensorView(f.pts.data(), DType::f32, {f.m - 1});
    expect(a, {"per_token_scale1 must have shape [8], got [7]"}, p);
  }
  {
    MoeFfnArgs a = args_of(f);
    MoeFfnParams pp = p;
    pp.out_dtype = DType::s8;
    expect(a, {"out_dtype must be float16, bfloat16 or float32, got int8"}, pp);
  }
  {
    MoeFfnArgs a = args_of(f);
    test::expect_error([&] { gmm_deq_swiglu_quant_gmm_deq(ctx, a, TensorView(out.data(), DType::f32, {f.m, f.n2 / 2}), p); },
                       {"out must be float16, got float32"});
  }
  for (uint16_t v : out) ASSERT_EQ(v, 0x1234);
}

}  // namespace
}  // namespace qllm
