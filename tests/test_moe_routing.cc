// MoE routing (SPEC section 4) against independent oracles written here, every ISA against ref,
// and the bad inputs the issue lists.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "kernels/kernels.h"
#include "test_util.h"

namespace qllm::test {
namespace {

// ---- moe_gating_topk -------------------------------------------------------------------------

struct Gated {
  std::vector<float> w;
  std::vector<int32_t> ids;
};

Gated run_gating(Context& ctx, const std::vector<float>& logits, int64_t T, int64_t E, const MoeGatingParams& p,
                 const std::vector<float>* bias = nullptr) {
  Gated g{std::vector<float>(T * p.top_k, -1.0f), std::vector<int32_t>(T * p.top_k, -1)};
  MoeGatingArgs a;
  a.logits = TensorView(logits.data(), DType::f32, {T, E});
  if (bias) a.e_score_correction_bias = TensorView(bias->data(), DType::f32, {E});
  moe_gating_topk(ctx, a, TensorView(g.w.data(), DType::f32, {T, p.top_k}), TensorView(g.ids.data(), DType::s32, {T, p.top_k}), p);
  return g;
}

// The oracle: scores in double, groups by their best-two sum, then a stable sort by score
// (descending, lower id first on ties) of the allowed experts.
Gated oracle_gating(const std::vector<float>& logits, int64_t T, int64_t E, const MoeGatingParams& p,
                    const std::vector<float>* bias) {
  Gated g{std::vector<float>(T * p.top_k), std::vector<int32_t>(T * p.top_k)};
  for (int64_t t = 0; t < T; ++t) {
    const float* x = logits.data() + t * E;
    std::vector<double> s(E), c(E);
    if (p.scoring == ScoringFunc::softmax) {
      const double m = *std::max_element(x, x + E);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[e] = std::exp(double(x[e]) - m);
      for (auto& v : s) v /= sum;
    } else {
      for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-double(x[e])));
    }
    for (int64_t e = 0; e < E; ++e) c[e] = s[e] + (bias ? (*bias)[e] : 0.0);
    std::vector<bool> allowed(E, true);
    if (p.n_group > 1) {
      const int64_t per = E / p.n_group;
      std::vector<std::pair<double, int64_t>> gs;
      for (int64_t gi = 0; gi < p.n_group; ++gi) {
        std::vector<double> v(c.begin() + gi * per, c.begin() + (gi + 1) * per);
        std::sort(v.rbegin(), v.rend());
        gs.push_back({-(v[0] + (per > 1 ? v[1] : 0.0)), gi});
      }
      std::stable_sort(gs.begin(), gs.end(), [](auto& a, auto& b) { return a.first < b.first; });
      std::fill(allowed.begin(), allowed.end(), false);
      for (int64_t r = 0; r < p.topk_group; ++r)
        for (int64_t e = 0; e < per; ++e) allowed[gs[r].second * per + e] = true;
    }
    std::vector<int64_t> order;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e]) order.push_back(e);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return c[a] > c[b]; });
    double sum = 0;
    for (int64_t j = 0; j < p.top_k; ++j) sum += s[order[j]];
    for (int64_t j = 0; j < p.top_k; ++j) {
      g.ids[t * p.top_k + j] = static_cast<int32_t>(order[j]);
      double w = s[order[j]];
      if (p.renormalize) w /= sum;
      g.w[t * p.top_k + j] = static_cast<float>(w * p.routed_scaling_factor);
    }
  }
  return g;
}

TEST(MoeGating, MatchesOracleAndIsasAgree) {
  struct Case { int64_t T, E, k, n_group, topk_group; ScoringFunc f; bool renorm, bias; float scale; };
  const Case cases[] = {
      {1, 1, 1, 1, 1, ScoringFunc::softmax, false, false, 1.0f},
      {3, 7, 2, 1, 1, ScoringFunc::softmax, true, false, 1.0f},    // Mixtral-like, odd E
      {17, 33, 4, 1, 1, ScoringFunc::softmax, false, false, 1.0f}, // Qwen2-MoE (no renormalise)
      {17, 64, 8, 8, 4, ScoringFunc::sigmoid, true, true, 2.5f},   // DeepSeek-V3 routing
      {5, 256, 8, 8, 4, ScoringFunc::sigmoid, true, true, 2.5f},   // DeepSeek-V3 sizes
      {9, 128, 8, 1, 1, ScoringFunc::softmax, true, false, 1.0f},  // Qwen3-30B-A3B
      {4, 12, 3, 6, 2, ScoringFunc::sigmoid, false, false, 1.0f},  // groups of 2
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " E=" + std::to_string(c.E) + " k=" + std::to_string(c.k));
    const auto logits = rand_f32(c.T * c.E, -4.0f, 4.0f);
    const auto bias = rand_f32(c.E, -0.1f, 0.1f);
    MoeGatingParams p;
    p.top_k = c.k; p.scoring = c.f; p.n_group = c.n_group; p.topk_group = c.topk_group;
    p.renormalize = c.renorm; p.routed_scaling_factor = c.scale;
    const auto* b = c.bias ? &bias : nullptr;
    const Gated ref = run_gating(context(Isa::ref), logits, c.T, c.E, p, b);
    const Gated want = oracle_gating(logits, c.T, c.E, p, b);
    EXPECT_EQ(ref.ids, want.ids);
    // f32 scores against a double oracle: exp to ~2 ulp, a sum over E values, one division.
    for (size_t i = 0; i < want.w.size(); ++i) EXPECT_NEAR(ref.w[i], want.w[i], 1e-6 * c.scale + 4e-7 * std::abs(want.w[i]));
    for (Isa isa : fast_isas()) {
      const Gated got = run_gating(context(isa), logits, c.T, c.E, p, b);
      EXPECT_EQ(got.ids, ref.ids) << isa_name(isa);
      EXPECT_EQ(0, std::memcmp(got.w.data(), ref.w.data(), got.w.size() * sizeof(float))) << isa_name(isa);
    }
  }
}

TEST(MoeGating, TiesGoToTheLowerExpertAndGroup) {
  MoeGatingParams p;
  p.top_k = 3;
  const std::vector<float> flat(10, 0.5f);
  const Gated g = run_gating(default_context(), flat, 1, 10, p);
  EXPECT_EQ(g.ids, (std::vector<int32_t>{0, 1, 2}));
  for (float w : g.w) EXPECT_FLOAT_EQ(w, 0.1f);
  // Groups 1 and 3 tie for best; 2 kept groups: 1 and 3 (ids 2,3 and 6,7), lower first.
  std::vector<float> lg = {0, 0, 3, 3, 1, 1, 3, 3};
  p.top_k = 4; p.n_group = 4; p.topk_group = 2; p.scoring = ScoringFunc::sigmoid;
  const Gated h = run_gating(default_context(), lg, 1, 8, p);
  EXPECT_EQ(h.ids, (std::vector<int32_t>{2, 3, 6, 7}));
}

TEST(MoeGating, RejectsBadArguments) {
  Context& ctx = default_context();
  const auto logits = rand_f32(2 * 8);
  std::vector<float> w(2 * 9);
  std::vector<int32_t> ids(2 * 9);
  auto run = [&](MoeGatingParams p) {
    MoeGatingArgs a;
    a.logits = TensorView(logits.data(), DType::f32, {2, 8});
    moe_gating_topk(ctx, a, TensorView(w.data(), DType::f32, {2, p.top_k}), TensorView(ids.data(), DType::s32, {2, p.top_k}), p);
  };
  MoeGatingParams p;
  p.top_k = 9;
  expect_error([&] { run(p); }, {"moe_gating_topk", "top_k", "9"});
  p.top_k = 0;
  expect_error([&] { run(p); }, {"top_k"});
  p.top_k = 2; p.n_group = 3;
  expect_error([&] { run(p); }, {"n_group", "does not divide"});
  p.n_group = 4; p.topk_group = 5;
  expect_error([&] { run(p); }, {"topk_group"});
  p.topk_group = 1; p.top_k = 3;  // one group of 2 experts allowed
  expect_error([&] { run(p); }, {"top_k", "grouped selection"});
  MoeGatingArgs a;
  a.logits = TensorView(logits.data(), DType::f32, {2, 8});
  const std::vector<float> bias(7);
  a.e_score_correction_bias = TensorView(bias.data(), DType::f32, {7});
  p = MoeGatingParams{};
  expect_error([&] { moe_gating_topk(ctx, a, TensorView(w.data(), DType::f32, {2, 1}), TensorView(ids.data(), DType::s32, {2, 1}), p); },
               {"e_score_correction_bias"});
}

// ---- moe_init_routing ------------------------------------------------------------------------

TEST(MoeInitRouting, StableSortGatherAndQuant) {
  for (auto [T, h, k, E] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{0, 8, 2, 4}, {1, 7, 1, 1}, {3, 33, 2, 5},
                            {17, 100, 8, 64}, {64, 64, 8, 16}}) {
    SCOPED_TRACE("T=" + std::to_string(T) + " h=" + std::to_string(h) + " k=" + std::to_string(k));
    const int64_t R = T * k;
    auto x = rand_f32(T * h, -3.0f, 3.0f);
    if (T > 2) std::fill(x.begin() + h, x.begin() + 2 * h, 0.0f);  // an all-zero row
    std::vector<int32_t> ids(R);
    std::uniform_int_distribution<int> d(0, static_cast<int>(E) - 1);
    for (auto& v : ids) v = d(rng());
    // Oracle: stable sort of pair ids by expert.
    std::vector<int64_t> order(R);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    for (bool quant : {false, true}) {
      std::vector<Isa> all = {Isa::ref};
      for (Isa i : fast_isas()) all.push_back(i);
      std::vector<int8_t> q_ref;
      for (Isa isa : all) {
        std::vector<float> ex(R * h);
        std::vector<int8_t> exq(R * h);
        std::vector<int32_t> idx(R, -1), src(R, -1);
        std::vector<int64_t> cnt(E, -1), cum(E, -1);
        std::vector<float> es(R, -1.0f);
        MoeInitRoutingOutputs o;
        o.expanded_x = quant ? TensorView(exq.data(), DType::s8, {R, h}) : TensorView(ex.data(), DType::f32, {R, h});
        o.expanded_row_idx = TensorView(idx.data(), DType::s32, {R});
        o.expert_count = TensorView(cnt.data(), DType::s64, {E});
        o.expert_cumsum = TensorView(cum.data(), DType::s64, {E});
        o.source_token = TensorView(src.data(), DType::s32, {R});
        if (quant) o.expanded_scale = TensorView(es.data(), DType::f32, {R});
        moe_init_routing(context(isa), TensorView(x.data(), DType::f32, {T, h}), TensorView(ids.data(), DType::s32, {T, k}), E, o, quant);
        int64_t run = 0;
        for (int64_t e = 0; e < E; ++e) {
          EXPECT_EQ(cnt[e], std::count(ids.begin(), ids.end(), e));
          run += cnt[e];
          EXPECT_EQ(cum[e], run);
        }
        for (int64_t i = 0; i < R; ++i) {
          EXPECT_EQ(src[i], order[i] / k);
          EXPECT_EQ(idx[order[i]], i);
        }
        if (!quant) {
          for (int64_t i = 0; i < R; ++i) EXPECT_EQ(0, std::memcmp(&ex[i * h], &x[(order[i] / k) * h], h * sizeof(float)));
        } else {
          // Each row is SPEC section 0's quantisation of its source token, bit for bit across ISAs.
          for (int64_t i = 0; i < R; ++i) {
            const float* v = &x[(order[i] / k) * h];
            float amax = 0;
            for (int64_t c = 0; c < h; ++c) amax = std::max(amax, std::abs(v[c]));
            EXPECT_EQ(es[i], amax / 127.0f);
            for (int64_t c = 0; c < h; ++c)
              EXPECT_EQ(exq[i * h + c], amax == 0 ? 0 : static_cast<int8_t>(std::nearbyint(v[c] * (127.0f / amax))));
          }
          if (isa == Isa::ref) q_ref = exq;
          else EXPECT_EQ(exq, q_ref);
        }
      }
    }
  }
}

TEST(MoeInitRouting, RejectsExpertIdsOutOfRange) {
  const auto x = rand_f32(2 * 4);
  std::vector<float> ex(4 * 4);
  std::vector<int32_t> idx(4);
  MoeInitRoutingOutputs o;
  o.expanded_x = TensorView(ex.data(), DType::f32, {4, 4});
  o.expanded_row_idx = TensorView(idx.data(), DType::s32, {4});
  for (int32_t bad : {-1, 3}) {
    std::vector<int32_t> ids = {0, 1, bad, 2};
    expect_error([&] { moe_init_routing(default_context(), TensorView(x.data(), DType::f32, {2, 4}), TensorView(ids.data(), DType::s32, {2, 2}), 3, o); },
                 {"moe_init_routing", "expert_ids[2]", std::to_string(bad).c_str(), "[0, 3)"});
  }
  EXPECT_EQ(idx, std::vector<int32_t>(4, 0));  // nothing written
  std::vector<int32_t> ids = {0, 1, 2, 2};
  expect_error([&] { moe_init_routing(default_context(), TensorView(x.data(), DType::f32, {2, 4}), TensorView(ids.data(), DType::s32, {2, 2}), 3, o, true); },
               {"expanded_x"});
}

// ---- grouped_matmul_with_routing -------------------------------------------------------------

struct Routed {
  int64_t T, k, E, K, N;
  std::vector<int64_t> cum;
  std::vector<int32_t> index;  // expert order -> token
};

Routed make_routing(int64_t T, int64_t k, int64_t E, int64_t K, int64_t N, bool skewed) {
  Routed r{T, k, E, K, N, std::vector<int64_t>(E), {}};
  std::vector<std::vector<int32_t>> per(E);
  std::uniform_int_distribution<int> d(0, static_cast<int>(E) - 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) per[skewed && j == 0 ? 0 : d(rng())].push_back(static_cast<int32_t>(t));
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    run += static_cast<int64_t>(per[e].size());
    r.cum[e] = run;
    r.index.insert(r.index.end(), per[e].begin(), per[e].end());
  }
  return r;
}

int64_t expert_of(const Routed& r, int64_t i) {
  return std::upper_bound(r.cum.begin(), r.cum.end(), i) - r.cum.begin();
}

TEST(GroupedMatmulWithRouting, Int8UpAndDownExact) {
  for (auto [T, k, E, K, N, skew] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>{1, 1, 1, 7, 5, false},
                                    {3, 2, 4, 33, 17, false}, {17, 8, 16, 100, 40, true}, {40, 2, 3, 64, 300, true},
                                    {5, 4, 8, 16, 16, false}}) {
    SCOPED_TRACE("T=" + std::to_string(T) + " k=" + std::to_string(k) + " K=" + std::to_string(K) + " N=" + std::to_string(N));
    const Routed r = make_routing(T, k, E, K, N, skew);
    const int64_t R = T * k;
    const auto w = rand_s8(E * N * K);  // [E, n, k]
    const auto nscale = rand_f32(E * N, 0.001f, 0.02f);
    for (RoutingDirection dir : {RoutingDirection::up, RoutingDirection::down}) {
      const bool up = dir == RoutingDirection::up;
      const int64_t arows = up ? T : R, orows = up ? R : T;
      const auto ac = rand_s8(arows * K);
      const auto mscale = rand_f32(arows, 0.01f, 0.1f);
      // Oracle: exact s32 products, SPEC's scale order, DOWN summed in f32 in row order.
      std::vector<float> want(orows * N, 0.0f);
      for (int64_t i = 0; i < R; ++i) {
        const int64_t e = expert_of(r, i), src = up ? r.index[i] : i, dst = up ? i : r.index[i];
        for (int64_t c = 0; c < N; ++c) {
          int64_t acc = 0;
          for (int64_t kk = 0; kk < K; ++kk) acc += int64_t(ac[src * K + kk]) * w[(e * N + c) * K + kk];
          const float v = (static_cast<float>(acc) * mscale[src]) * nscale[e * N + c];
          want[dst * N + c] = up ? v : want[dst * N + c] + v;
        }
      }
      for (Isa isa : isas()) {
        for (DType odt : {DType::f16, DType::bf16, DType::f32}) {
          std::vector<uint8_t> out(orows * N * dtype_size(odt), 0xAB);
          GmmRoutingArgs a;
          a.ac = TensorView(ac.data(), DType::s8, {arows, K});
          a.weight = TensorView(w.data(), DType::s8, {E, N, K});
          a.expert_cumsum = TensorView(r.cum.data(), DType::s64, {E});
          a.expert_index = TensorView(r.index.data(), DType::s32, {R});
          a.nscale = TensorView(nscale.data(), DType::f32, {E, N});
          a.mscale = TensorView(mscale.data(), DType::f32, {arows});
          GmmRoutingParams p;
          p.direction = dir; p.top_k = k; p.out_dtype = odt;
          grouped_matmul_with_routing(context(isa), a, TensorView(out.data(), odt, {orows, N}), p);
          std::vector<float> got(orows * N);
          kernels::ref_table().to_f32(out.data(), odt, orows * N, got.data());
          std::vector<float> w32(want.size());
          std::vector<uint8_t> tmp(want.size() * dtype_size(odt));
          kernels::ref_table().from_f32(want.data(), static_cast<int64_t>(want.size()), odt, tmp.data());
          kernels::ref_table().to_f32(tmp.data(), odt, static_cast<int64_t>(want.size()), w32.data());
          ASSERT_EQ(0, std::memcmp(got.data(), w32.data(), got.size() * sizeof(float)))
              << isa_name(isa) << " " << (up ? "up " : "down ") << dtype_name(odt);
        }
      }
    }
  }
}

TEST(GroupedMatmulWithRouting, FloatUpAndDown) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16}) {
    const int64_t T = 17, k = 2, E = 5, K = 37, N = 70, R = T * k;
    const Routed r = make_routing(T, k, E, K, N, true);
    const auto w32 = rand_f32(E * K * N);  // [E, k, n] (transpose_b = false here)
    const auto a32 = rand_f32(R * K);
    std::vector<uint16_t> w16(w32.size()), a16(a32.size());
    kernels::ref_table().from_f32(w32.data(), static_cast<int64_t>(w32.size()), dt == DType::f32 ? DType::f16 : dt, w16.data());
    kernels::ref_table().from_f32(a32.data(), static_cast<int64_t>(a32.size()), dt == DType::f32 ? DType::f16 : dt, a16.data());
    const void* wp = dt == DType::f32 ? static_cast<const void*>(w32.data()) : w16.data();
    const void* ap = dt == DType::f32 ? static_cast<const void*>(a32.data()) : a16.data();
    std::vector<float> wf(w32.size()), af(a32.size());
    kernels::ref_table().to_f32(wp, dt, static_cast<int64_t>(wf.size()), wf.data());
    kernels::ref_table().to_f32(ap, dt, static_cast<int64_t>(af.size()), af.data());
    for (RoutingDirection dir : {RoutingDirection::up, RoutingDirection::down}) {
      const bool up = dir == RoutingDirection::up;
      const int64_t arows = up ? T : R, orows = up ? R : T;
      std::vector<double> want(orows * N, 0.0), mag(orows * N, 0.0);
      for (int64_t i = 0; i < R; ++i) {
        const int64_t e = expert_of(r, i), src = up ? r.index[i] : i, dst = up ? i : r.index[i];
        for (int64_t c = 0; c < N; ++c)
          for (int64_t kk = 0; kk < K; ++kk) {
            const double v = double(af[src * K + kk]) * wf[(e * K + kk) * N + c];
            want[dst * N + c] += v;
            mag[dst * N + c] += std::abs(v);
          }
      }
      for (Isa isa : isas()) {
        std::vector<float> out(orows * N, 123.0f);
        GmmRoutingArgs a;
        a.ac = TensorView(ap, dt, {arows, K});
        a.weight = TensorView(wp, dt, {E, K, N});
        a.expert_cumsum = TensorView(r.cum.data(), DType::s64, {E});
        a.expert_index = TensorView(r.index.data(), DType::s32, {R});
        GmmRoutingParams p;
        p.direction = dir; p.top_k = k; p.out_dtype = DType::f32; p.transpose_b = false;
        grouped_matmul_with_routing(context(isa), a, TensorView(out.data(), DType::f32, {orows, N}), p);
        // f32 accumulation over K products (and up to k rows for DOWN): each partial sum rounds
        // once, so |err| <= (K + k) * 2^-24 * sum|products|.
        for (size_t i = 0; i < out.size(); ++i)
          ASSERT_NEAR(out[i], want[i], (K + k) * std::ldexp(1.0, -24) * mag[i] + 1e-30) << isa_name(isa) << " " << i;
      }
    }
  }
}

TEST(GroupedMatmulWithRouting, RejectsBadIndices) {
  const int64_t T = 3, k = 2, E = 2, K = 8, N = 16, R = T * k;
  const auto ac = rand_s8(T * K), w = rand_s8(E * N * K);
  const auto ns = rand_f32(E * N), ms = rand_f32(T);
  std::vector<uint16_t> out(R * N, 7);
  auto run = [&](std::vector<int64_t> cum, std::vector<int32_t> index) {
    GmmRoutingArgs a;
    a.ac = TensorView(ac.data(), DType::s8, {T, K});
    a.weight = TensorView(w.data(), DType::s8, {E, N, K});
    a.expert_cumsum = TensorView(cum.data(), DType::s64, {E});
    a.expert_index = TensorView(index.data(), DType::s32, {static_cast<int64_t>(index.size())});
    a.nscale = TensorView(ns.data(), DType::f32, {E, N});
    a.mscale = TensorView(ms.data(), DType::f32, {T});
    GmmRoutingParams p;
    p.top_k = k;
    grouped_matmul_with_routing(default_context(), a, TensorView(out.data(), DType::f16, {R, N}), p);
  };
  expect_error([&] { run({3, 6}, {0, 1, 2, 0, 1, 3}); }, {"grouped_matmul_with_routing", "expert_index[5] = 3", "[0, 3)"});
  expect_error([&] { run({3, 6}, {0, 1, 2, 0, -1, 2}); }, {"expert_index[4] = -1"});
  expect_error([&] { run({3, 5}, {0, 1, 2, 0, 1, 2}); }, {"expert_cumsum", "end at", "6"});
  expect_error([&] { run({4, 3}, {0, 1, 2, 0, 1, 2}); }, {"expert_cumsum[1] = 3 < expert_cumsum[0] = 4"});
  expect_error([&] { run({3, 6}, {0, 1, 2, 0, 1}); }, {"expert_index"});
  EXPECT_EQ(out, std::vector<uint16_t>(R * N, 7));
}

// ---- moe_finalize_routing --------------------------------------------------------------------

TEST(MoeFinalizeRouting, WeightedSumWithBiasAndSkip) {
  const int64_t T = 17, k = 3, h = 45, E = 6, R = T * k + 5;
  const auto rows = rand_f32(R * h), weights = rand_f32(T * k, 0.0f, 1.0f), bias = rand_f32(E * h), skip = rand_f32(T * h);
  std::vector<int32_t> idx(T * k), ids(T * k);
  std::vector<int32_t> perm(R);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng());
  for (int64_t i = 0; i < T * k; ++i) {
    idx[i] = perm[i];
    ids[i] = static_cast<int32_t>(i % E);
  }
  // The definition, in f32 in the same order (so equal bit for bit).
  std::vector<float> want(T * h);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < h; ++c) {
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float v = rows[idx[t * k + j] * h + c] + bias[ids[t * k + j] * h + c];
        const float p = weights[t * k + j] * v;
        acc = acc + p;
      }
      want[t * h + c] = skip[t * h + c] + acc;
    }
  for (Isa isa : isas()) {
    std::vector<float> out(T * h);
    MoeFinalizeArgs a;
    a.rows = TensorView(rows.data(), DType::f32, {R, h});
    a.weights = TensorView(weights.data(), DType::f32, {T, k});
    a.expanded_row_idx = TensorView(idx.data(), DType::s32, {T * k});
    a.bias = TensorView(bias.data(), DType::f32, {E, h});
    a.expert_ids = TensorView(ids.data(), DType::s32, {T, k});
    a.skip = TensorView(skip.data(), DType::f32, {T, h});
    moe_finalize_routing(context(isa), a, TensorView(out.data(), DType::f32, {T, h}));
    EXPECT_EQ(0, std::memcmp(out.data(), want.data(), out.size() * sizeof(float))) << isa_name(isa);
    idx[4] = static_cast<int32_t>(R);
    expect_error([&] { moe_finalize_routing(context(isa), a, TensorView(out.data(), DType::f32, {T, h})); },
                 {"moe_finalize_routing", "expanded_row_idx[4]"});
    idx[4] = perm[4];
    ids[2] = static_cast<int32_t>(E);
    expect_error([&] { moe_finalize_routing(context(isa), a, TensorView(out.data(), DType::f32, {T, h})); },
                 {"expert_ids[2]"});
    ids[2] = 2;
  }
}


// ---- MoeLayer --------------------------------------------------------------------------------

struct HfBlock {
  MoeLayerConfig cfg;
  std::vector<float> router, bias, gate, up, down, sgate, sup, sdown, sg;
};

HfBlock make_block(const std::string& kind) {
  HfBlock b;
  MoeLayerConfig& c = b.cfg;
  c.hidden_size = 40;
  c.moe_intermediate_size = 24;
  if (kind == "deepseek") {
    c.num_experts = 16; c.num_experts_per_tok = 4; c.n_group = 4; c.topk_group = 2; c.norm_topk_prob = true;
    c.scoring_func = ScoringFunc::sigmoid; c.routed_scaling_factor = 2.5f; c.n_shared_experts = 1;
  } else if (kind == "qwen2") {
    c.num_experts = 12; c.num_experts_per_tok = 3; c.shared_expert_intermediate_size = 56;
  } else {  // mixtral
    c.num_experts = 8; c.num_experts_per_tok = 2; c.norm_topk_prob = true;
  }
  const int64_t E = c.num_experts, h = c.hidden_size, I = c.moe_intermediate_size, Is = c.shared_intermediate();
  const float sh = 1.0f / std::sqrt(float(h)), si = 1.0f / std::sqrt(float(I));
  b.router = rand_f32(E * h, -sh, sh);
  if (kind == "deepseek") b.bias = rand_f32(E, -0.05f, 0.05f);
  b.gate = rand_f32(E * I * h, -sh, sh);
  b.up = rand_f32(E * I * h, -sh, sh);
  b.down = rand_f32(E * h * I, -si, si);
  if (Is > 0) {
    b.sgate = rand_f32(Is * h, -sh, sh);
    b.sup = rand_f32(Is * h, -sh, sh);
    b.sdown = rand_f32(h * Is, -1.0f / std::sqrt(float(Is)), 1.0f / std::sqrt(float(Is)));
  }
  if (c.shared_gated()) b.sg = rand_f32(h, -sh, sh);
  return b;
}

MoeLayer build(const HfBlock& b, MoeExperts fmt, Isa isa) {
  const MoeLayerConfig& c = b.cfg;
  const int64_t E = c.num_experts, h = c.hidden_size, I = c.moe_intermediate_size, Is = c.shared_intermediate();
  MoeLayerHfWeights w;
  w.router = TensorView(b.router.data(), DType::f32, {E, h});
  if (!b.bias.empty()) w.e_score_correction_bias = TensorView(b.bias.data(), DType::f32, {E});
  w.gate_proj = TensorView(b.gate.data(), DType::f32, {E, I, h});
  w.up_proj = TensorView(b.up.data(), DType::f32, {E, I, h});
  w.down_proj = TensorView(b.down.data(), DType::f32, {E, h, I});
  if (Is > 0) {
    w.shared_gate_proj = TensorView(b.sgate.data(), DType::f32, {Is, h});
    w.shared_up_proj = TensorView(b.sup.data(), DType::f32, {Is, h});
    w.shared_down_proj = TensorView(b.sdown.data(), DType::f32, {h, Is});
  }
  if (!b.sg.empty()) w.shared_expert_gate = TensorView(b.sg.data(), DType::f32, {1, h});
  return MoeLayer::from_hf(c, w, fmt, isa);
}

// The Hugging Face block's math in double (routing by the gating oracle above).
std::vector<double> oracle_block(const HfBlock& b, const std::vector<float>& x, int64_t T) {
  const MoeLayerConfig& c = b.cfg;
  const int64_t E = c.num_experts, h = c.hidden_size, I = c.moe_intermediate_size, Is = c.shared_intermediate(), k = c.num_experts_per_tok;
  std::vector<float> logits(T * E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (int64_t d = 0; d < h; ++d) s += double(x[t * h + d]) * b.router[e * h + d];
      logits[t * E + e] = static_cast<float>(s);
    }
  MoeGatingParams p;
  p.top_k = k; p.scoring = c.scoring_func; p.n_group = c.n_group; p.topk_group = c.topk_group;
  p.renormalize = c.norm_topk_prob; p.routed_scaling_factor = c.routed_scaling_factor;
  const Gated g = oracle_gating(logits, T, E, p, b.bias.empty() ? nullptr : &b.bias);
  auto ffn = [&](const float* gw, const float* uw, const float* dw, int64_t inter, const float* xv, double* y, double wt) {
    std::vector<double> a(inter);
    for (int64_t i = 0; i < inter; ++i) {
      double gs = 0, us = 0;
      for (int64_t d = 0; d < h; ++d) {
        gs += double(gw[i * h + d]) * xv[d];
        us += double(uw[i * h + d]) * xv[d];
      }
      a[i] = gs / (1.0 + std::exp(-gs)) * us;
    }
    for (int64_t d = 0; d < h; ++d) {
      double s = 0;
      for (int64_t i = 0; i < inter; ++i) s += double(dw[d * inter + i]) * a[i];
      y[d] += wt * s;
    }
  };
  std::vector<double> out(T * h, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = g.ids[t * k + j];
      ffn(&b.gate[e * I * h], &b.up[e * I * h], &b.down[e * h * I], I, &x[t * h], &out[t * h], g.w[t * k + j]);
    }
    if (Is > 0) {
      double wt = 1.0;
      if (c.shared_gated()) {
        double s = 0;
        for (int64_t d = 0; d < h; ++d) s += double(b.sg[d]) * x[t * h + d];
        wt = 1.0 / (1.0 + std::exp(-s));
      }
      ffn(b.sgate.data(), b.sup.data(), b.sdown.data(), Is, &x[t * h], &out[t * h], wt);
    }
  }
  return out;
}

TEST(MoeLayerTest, MatchesTheHfBlockMath) {
  for (const char* kind : {"deepseek", "qwen2", "mixtral"}) {
    SCOPED_TRACE(kind);
    const HfBlock b = make_block(kind);
    for (int64_t T : {1, 3, 17}) {
      const int64_t h = b.cfg.hidden_size;
      const auto x = rand_f32(T * h, -2.0f, 2.0f);
      const std::vector<double> want = oracle_block(b, x, T);
      double ref_norm = 0;
      for (double v : want) ref_norm += v * v;
      ref_norm = std::sqrt(ref_norm / want.size());
      for (Isa isa : isas()) {
        for (MoeExperts fmt : {MoeExperts::f32, MoeExperts::bf16, MoeExperts::w8a8}) {
          const MoeLayer L = build(b, fmt, isa);
          std::vector<float> out(T * h);
          L.forward(context(isa), TensorView(x.data(), DType::f32, {T, h}), TensorView(out.data(), DType::f32, {T, h}));
          double err = 0, dot = 0, n1 = 0, n2 = 0;
          for (size_t i = 0; i < out.size(); ++i) {
            err = std::max(err, std::abs(out[i] - want[i]));
            dot += out[i] * want[i]; n1 += double(out[i]) * out[i]; n2 += want[i] * want[i];
          }
          const double cosine = dot / std::sqrt(n1 * n2);
          if (fmt == MoeExperts::f32) {
            // f32 sums over h + I <= 100 terms: a few ulp of the largest partial sums.
            EXPECT_LT(err, 2e-5 * (1 + ref_norm)) << isa_name(isa);
          } else {
            // bf16 weights and activations (8-bit mantissa, ~0.4% per rounding) or four int8
            // roundings (x, w1, h, w2: ~0.5-1% each): direction kept to cosine 0.999.
            EXPECT_GT(cosine, 0.999) << isa_name(isa) << " " << static_cast<int>(fmt) << " T=" << T;
          }
        }
      }
    }
  }
}

TEST(MoeLayerTest, W8A8IsBitExactAcrossIsasAndBf16Io) {
  const HfBlock b = make_block("deepseek");
  const int64_t T = 9, h = b.cfg.hidden_size;
  const auto x = rand_f32(T * h, -2.0f, 2.0f);
  std::vector<float> ref_out;
  for (Isa isa : isas()) {
    const MoeLayer L = build(b, MoeExperts::w8a8, isa);
    std::vector<float> out(T * h);
    L.forward(context(isa), TensorView(x.data(), DType::f32, {T, h}), TensorView(out.data(), DType::f32, {T, h}));
    if (ref_out.empty()) ref_out = out;
    // The router is an f32 GEMM whose summation order differs per ISA (FMA), so logits may
    // differ in the last bit; everything after routing is exact, so the outputs agree closely.
    for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], ref_out[i], 1e-5 * (1 + std::abs(ref_out[i]))) << isa_name(isa);
    std::vector<uint16_t> xb(T * h), ob(T * h);
    kernels::ref_table().from_f32(x.data(), T * h, DType::bf16, xb.data());
    L.forward(context(isa), TensorView(xb.data(), DType::bf16, {T, h}), TensorView(ob.data(), DType::bf16, {T, h}));
    std::vector<float> of(T * h);
    kernels::ref_table().to_f32(ob.data(), DType::bf16, T * h, of.data());
    double dot = 0, n1 = 0, n2 = 0;
    for (int64_t i = 0; i < T * h; ++i) { dot += of[i] * out[i]; n1 += of[i] * of[i]; n2 += out[i] * out[i]; }
    EXPECT_GT(dot / std::sqrt(n1 * n2), 0.999);
  }
}

TEST(MoeLayerTest, RejectsBadConfigAndInput) {
  HfBlock b = make_block("mixtral");
  b.cfg.num_experts_per_tok = 9;
  expect_error([&] { build(b, MoeExperts::f32, Isa::ref); }, {"MoeLayer", "num_experts_per_tok"});
  b.cfg.num_experts_per_tok = 2;
  b.cfg.n_group = 3;
  expect_error([&] { build(b, MoeExperts::f32, Isa::ref); }, {"n_group"});
  b.cfg.n_group = 1;
  b.cfg.topk_group = 2;
  expect_error([&] { build(b, MoeExperts::f32, Isa::ref); }, {"topk_group"});
  b.cfg.topk_group = 1;
  const MoeLayer L = build(b, MoeExperts::f32, default_context().isa());
  std::vector<float> x(3 * 41), out(3 * 41);
  expect_error([&] { L.forward(default_context(), TensorView(x.data(), DType::f32, {3, 41}), TensorView(out.data(), DType::f32, {3, 41})); },
               {"MoeLayer", "x", "hidden_size = 40"});
}

}  // namespace
}  // namespace qllm::test
