// bench moe-layer: a whole MoE block (router, gating, dispatch with per-token quant, the fused
// W8A8 experts, shared expert, combine) at DeepSeek-V3 and Qwen3-30B-A3B shapes, for balanced
// and skewed routing, with every figure as a ratio to the limits measured in the same run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {

namespace {

struct Model {
  const char* name;
  MoeLayerConfig cfg;
};

// Random W8A8 experts in the fused operator's form, packed for this machine.
PackedExpertFFN random_ffn(int64_t G, int64_t h, int64_t inter, uint64_t seed, Isa isa) {
  std::vector<int8_t> w1(static_cast<size_t>(G * h * 2 * inter)), w2(static_cast<size_t>(G * h * inter));
  fill_random(w1.data(), w1.size(), seed);
  fill_random(w2.data(), w2.size(), seed + 1);
  // Scales that keep the SwiGLU input O(1) for full-range int8 activations (as bench moe-ffn).
  const float s1v = 1.0f / (64.0f * 64.0f * std::sqrt(static_cast<float>(h)));
  const std::vector<float> s1 = random_f32(G * 2 * inter, 0.5f * s1v, 1.5f * s1v, 3), s2 = random_f32(G * h, 1e-4f, 2e-4f, 4);
  return PackedExpertFFN::pack(TensorView(w1.data(), DType::s8, {G, h, 2 * inter}), TensorView(s1.data(), DType::f32, {G, 2 * inter}),
                               TensorView(w2.data(), DType::s8, {G, h, inter}), TensorView(s2.data(), DType::f32, {G, h}),
                               WeightUpPermute::none, "bench moe-layer", isa);
}

// The experts token t is sent to. Balanced: consecutive tokens take consecutive blocks of k
// experts (with grouped selection, block = group), so every expert gets T * k / E rows.
// Skewed: the even tokens all go to the same k "hot" experts, which then hold half of the
// token-expert pairs; the odd tokens spread evenly over the other experts. `shift` rotates the
// blocks, so successive calls can touch different experts.
std::vector<int64_t> route(const MoeLayerConfig& c, int64_t t, bool skewed, int64_t shift) {
  const int64_t E = c.num_experts, k = c.num_experts_per_tok;
  const int64_t blocks = E / k;
  int64_t block;
  if (!skewed) block = t % blocks;
  else block = t % 2 == 0 ? 0 : 1 + (t / 2) % (blocks - 1);
  block = (block + shift) % blocks;
  std::vector<int64_t> ids(k);
  for (int64_t j = 0; j < k; ++j) ids[j] = block * k + j;
  return ids;
}

// x rows whose first E values are the router logits (the router is the identity on those
// dimensions): the chosen experts get the largest logits, the others small random ones.
std::vector<float> make_x(const MoeLayerConfig& c, int64_t T, bool skewed, int64_t shift, std::vector<int64_t>* rows_per_expert) {
  const int64_t E = c.num_experts, h = c.hidden_size;
  std::vector<float> x = random_f32(T * h, -1.0f, 1.0f, 7);
  rows_per_expert->assign(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    float* r = x.data() + t * h;
    for (int64_t e = 0; e < E; ++e) r[e] = -1.0f + 0.5f * r[e];  // in [-1.5, -0.5]
    const std::vector<int64_t> ids = route(c, t, skewed, shift);
    for (size_t j = 0; j < ids.size(); ++j) {
      r[ids[j]] = 1.0f - 0.01f * static_cast<float>(j);
      ++(*rows_per_expert)[ids[j]];
    }
  }
  return x;
}

}  // namespace

int bench_moe_layer(const Options& o) {
  std::vector<Model> models;
  {
    // DeepSeek-V3: hidden 7168, expert intermediate 2048, top-8 of 8 groups (4 kept), sigmoid,
    // 1 shared expert; 64 routed experts instead of 256 (the per-token work is the same and the
    // weights fit this machine's memory and time).
    MoeLayerConfig d;
    d.hidden_size = o.quick ? 256 : 7168;
    d.num_experts = o.quick ? 16 : 64;
    d.num_experts_per_tok = 8;
    d.n_group = o.quick ? 2 : 8;
    d.topk_group = o.quick ? 1 : 4;
    d.norm_topk_prob = true;
    d.scoring_func = ScoringFunc::sigmoid;
    d.routed_scaling_factor = 2.5f;
    d.moe_intermediate_size = o.quick ? 128 : 2048;
    d.n_shared_experts = 1;
    models.push_back({"deepseek-v3", d});
    // Qwen3-30B-A3B: hidden 2048, 128 experts of intermediate 768, top-8, softmax, renormalised.
    MoeLayerConfig q;
    q.hidden_size = o.quick ? 256 : 2048;
    q.num_experts = o.quick ? 16 : 128;
    q.num_experts_per_tok = 8;
    q.norm_topk_prob = true;
    q.moe_intermediate_size = o.quick ? 96 : 768;
    models.push_back({"qwen3-30b-a3b", q});
  }
  std::vector<int64_t> tokens = o.quick ? std::vector<int64_t>{1, 8} : std::vector<int64_t>{1, 8, 64, 512};
  if (!o.tokens.empty()) tokens = o.tokens;
  for (int64_t t : tokens)
    if (t < 1 || t > 8192) throw_invalid("bench moe-layer", "tokens", "--tokens values must be in [1, 8192], got ", t);

  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  Context ctx1(ContextOptions{1, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  Reporter rep(o);
  rep.row(peak_row(peak));

  for (const Model& md : models) {
    const MoeLayerConfig& c = md.cfg;
    const int64_t E = c.num_experts, h = c.hidden_size, I = c.moe_intermediate_size, k = c.num_experts_per_tok;
    const int64_t Is = c.shared_intermediate();
    std::vector<float> router(E * h, 0.0f);
    for (int64_t e = 0; e < E; ++e) router[e * h + e] = 1.0f;  // logits = x[:, :E]
    std::optional<PackedExpertFFN> shared;
    if (Is > 0) shared.emplace(random_ffn(1, h, Is, 11, ctx.isa()));
    const MoeLayer L = MoeLayer::from_packed(c, TensorView(router.data(), DType::f32, {E, h}), TensorView(),
                                             random_ffn(E, h, I, 1, ctx.isa()), std::move(shared), TensorView(), ctx.isa());
    router = {};
    router.shrink_to_fit();
    const int64_t Tmax = *std::max_element(tokens.begin(), tokens.end());
    std::vector<float> out(Tmax * h);
    // Bound the arena once, so no case pays for growing it.
    Workspace ws(L.workspace_size(Tmax, ctx.threads()));

    for (int64_t T : tokens) {
      double balanced_tps = 0;
      for (bool skewed : {false, true}) {
        // Decode steps of a real model meet their experts' weights cold (every other layer ran
        // in between), so small-T calls rotate over inputs that route to different experts;
        // otherwise a small expert set (Qwen3: 8 x 4.7 MB) would be served from L3.
        const int64_t blocks = E / k;
        const int64_t variants = T * k < E ? std::min<int64_t>(blocks, 16) : 1;
        std::vector<int64_t> rpe;
        std::vector<std::vector<float>> xs;
        for (int64_t v = 0; v < variants; ++v) xs.push_back(make_x(c, T, skewed, v * blocks / variants, &rpe));
        const TensorView ov(out.data(), DType::f32, {T, h});
        int64_t call_no = 0;
        auto call = [&](Context& cx) {
          ws.reset();
          L.forward(cx, TensorView(xs[call_no++ % variants].data(), DType::f32, {T, h}), ov, &ws);
        };
        // Memory-bound cases: the DRAM bandwidth available right now, measured before and after
        // the case; the higher of the two is the ceiling (the host's bandwidth drifts).
        const bool memory_bound = T <= 8;
        double dram_now = memory_bound ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;
        const double t = median_seconds(o, [&] { call(ctx); });
        if (memory_bound) dram_now = std::max(dram_now, measure_dram(ctx.threads(), o.quick ? 1 : 3));
        int64_t touched = 0;
        for (int64_t r : rpe) touched += r > 0;
        // What the layer must read: the touched experts, the shared expert, the router, and x / out.
        const double bytes = static_cast<double>(touched) * L.expert_bytes() + L.shared_bytes() + L.router_bytes() +
                             2.0 * T * h * sizeof(float);
        const double ops = 2.0 * T * (k * 3.0 * h * I + 3.0 * h * Is + static_cast<double>(h) * E);
        const double tps = T / t;
        nlohmann::ordered_json j;
        j["bench"] = "moe-layer";
        j["case"] = {{"model", md.name}, {"tokens", T}, {"routing", skewed ? "skewed" : "balanced"}, {"experts", E},
                     {"top_k", k}, {"hidden", h}, {"intermediate", I}, {"shared_intermediate", Is},
                     {"experts_touched", touched}, {"threads", ctx.threads()}, {"isa", isa_name(ctx.isa())}};
        j["median_ms"] = t * 1e3;
        j["tokens_per_s"] = tps;
        j["gops"] = ops / t / 1e9;
        j["int8_peak_ratio"] = ops / t / 1e9 / peak.int8_gops;
        const double kernel_peak = ctx.isa() == Isa::avx512 ? peak.int8_vnni_gops : peak.int8_exact_gops;
        j["kernel_peak_ratio"] = ops / t / 1e9 / kernel_peak;
        j["read_gbps"] = bytes / t / 1e9;
        j["dram_gbps"] = dram_now;
        j["dram_ratio"] = bytes / t / 1e9 / dram_now;
        if (!skewed) balanced_tps = tps;
        else j["skew_ratio"] = tps / balanced_tps;
        if (!skewed && T == tokens.back() && ctx.threads() > 1 && !o.no_peers) {
          const double t1 = median_seconds(o, [&] { call(ctx1); });
          j["one_thread_ms"] = t1 * 1e3;
          j["speedup_vs_1thread"] = t1 / t;
        }
        rep.row(j);
      }
    }
  }
  return 0;
}

}  // namespace qllm::bench
