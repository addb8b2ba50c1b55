// bench moe-ffn: the fused int8 expert FFN at DeepSeek-V3 expert shapes, against qllm's own
// unfused chain on the same data, with every figure as a ratio to the limits measured here.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {

namespace {

struct Shape { int64_t G, k1, n1, n2; };

}  // namespace

int bench_moe_ffn(const Options& o) {
  const Shape sh = o.quick ? Shape{4, 256, 512, 256} : Shape{8, 7168, 4096, 7168};  // DeepSeek-V3 expert
  const int64_t k2 = sh.n1 / 2;
  std::vector<int64_t> rows_list = o.quick ? std::vector<int64_t>{1, 16} : std::vector<int64_t>{1, 4, 16, 64, 256, 512};
  if (!o.rows.empty()) rows_list = o.rows;
  for (int64_t r : rows_list)
    if (r < 1 || r > 4096) throw_invalid("bench moe-ffn", "rows", "--rows values must be in [1, 4096], got ", r);
  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  Reporter rep(o);
  rep.row(peak_row(peak));

  // Weights: random full-range int8, scales that keep activations O(1). Packed once for the
  // fused operator and once (plain panels) for the unfused chain.
  std::vector<int8_t> w1 = random_s8(sh.G * sh.k1 * sh.n1, 1), w2 = random_s8(sh.G * sh.n2 * k2, 2);
  const float s1v = 1.0f / (64.0f * 64.0f * std::sqrt(static_cast<float>(sh.k1)));
  std::vector<float> s1 = random_f32(sh.G * sh.n1, 0.5f * s1v, 1.5f * s1v, 3), s2 = random_f32(sh.G * sh.n2, 1e-4f, 2e-4f, 4);
  const TensorView w1v(w1.data(), DType::s8, {sh.G, sh.k1, sh.n1}), w2v(w2.data(), DType::s8, {sh.G, sh.n2, k2});
  const PackedExpertFFN fused = PackedExpertFFN::pack(w1v, TensorView(s1.data(), DType::f32, {sh.G, sh.n1}), w2v,
                                                      TensorView(s2.data(), DType::f32, {sh.G, sh.n2}), WeightUpPermute::none);
  const PackedWeight pw1 = PackedWeight::pack(w1v, false), pw2 = PackedWeight::pack(w2v, true);
  w1 = {};
  w2 = {};
  w1.shrink_to_fit();
  w2.shrink_to_fit();

  const int64_t max_m = sh.G * rows_list.back();
  const std::vector<int8_t> x1 = random_s8(max_m * sh.k1, 5);
  const std::vector<float> pts = random_f32(max_m, 0.5f, 1.5f, 6);
  std::vector<uint16_t> out(max_m * sh.n2);
  std::vector<float> h(max_m * sh.n1);
  std::vector<int8_t> q(max_m * k2);
  std::vector<float> qs(max_m);
  std::vector<uint16_t> out_chain(max_m * sh.n2);
  Context ctx1(ContextOptions{1, true, Isa::ref});

  for (int64_t rpe : rows_list) {
    const int64_t m = sh.G * rpe;
    std::vector<int64_t> gl(sh.G);
    for (int64_t g = 0; g < sh.G; ++g) gl[g] = (g + 1) * rpe;
    MoeFfnArgs a;
    a.x1 = TensorView(x1.data(), DType::s8, {m, sh.k1});
    a.per_token_scale1 = TensorView(pts.data(), DType::f32, {m});
    a.group_list = TensorView(gl.data(), DType::s64, {sh.G});
    a.packed = &fused;
    const MoeFfnParams p;  // f16 out, cumsum
    const TensorView ov(out.data(), DType::f16, {m, sh.n2});
    auto fused_call = [&](Context& c) { gmm_deq_swiglu_quant_gmm_deq(c, a, ov, p); };
    // Memory-bound cases: the DRAM bandwidth available right now (see measure_dram).
    const bool memory_bound = rpe <= 4;
    const double dram_now = memory_bound ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;

    // The unfused chain of qllm's own operators on the same data and weights.
    GroupedMatmulArgs g1;
    g1.x = a.x1;
    g1.packed_w = &pw1;
    g1.group_list = a.group_list;
    g1.scale = TensorView(s1.data(), DType::f32, {sh.G, sh.n1});
    g1.per_token_scale = a.per_token_scale1;
    GroupedMatmulArgs g2;
    g2.x = TensorView(q.data(), DType::s8, {m, k2});
    g2.packed_w = &pw2;
    g2.group_list = a.group_list;
    g2.scale = TensorView(s2.data(), DType::f32, {sh.G, sh.n2});
    g2.per_token_scale = TensorView(qs.data(), DType::f32, {m});
    GroupedMatmulParams p1, p2;
    p2.out_dtype = DType::f16;
    auto chain_call = [&] {
      grouped_matmul(ctx, g1, TensorView(h.data(), DType::f32, {m, sh.n1}), p1);
      swiglu_quant(ctx, TensorView(h.data(), DType::f32, {m, sh.n1}), TensorView(q.data(), DType::s8, {m, k2}),
                   TensorView(qs.data(), DType::f32, {m}));
      grouped_matmul(ctx, g2, TensorView(out_chain.data(), DType::f16, {m, sh.n2}), p2);
    };
    // Fused and chain alternate call by call, so the ratio compares them under the same DRAM.
    double t_fused = 0, t_chain = 0;
    if (o.no_peers) {
      t_fused = median_seconds(o, [&] { fused_call(ctx); });
    } else {
      const std::vector<double> t = median_seconds_paired(o, {[&] { fused_call(ctx); }, chain_call});
      t_fused = t[0];
      t_chain = t[1];
    }

    const double ops = 2.0 * m * (sh.k1 * sh.n1 + k2 * sh.n2);
    const double wbytes = static_cast<double>(sh.G) * fused.group_bytes();
    nlohmann::ordered_json j;
    j["bench"] = "moe-ffn";
    j["case"] = {{"experts", sh.G}, {"rows_per_expert", rpe}, {"k1", sh.k1}, {"n1", sh.n1}, {"k2", k2}, {"n2", sh.n2},
                 {"threads", ctx.threads()}, {"isa", isa_name(ctx.isa())}};
    j["median_ms"] = t_fused * 1e3;
    j["gops"] = ops / t_fused / 1e9;
    j["int8_peak_ratio"] = ops / t_fused / 1e9 / peak.int8_gops;
    // The ceiling of the loop this ISA's kernel runs: the exact s16 loop (avx2) or VNNI (avx512).
    const double kernel_peak = ctx.isa() == Isa::avx512 ? peak.int8_vnni_gops : peak.int8_exact_gops;
    j["kernel_peak_ratio"] = ops / t_fused / 1e9 / kernel_peak;
    j["weight_gbps"] = wbytes / t_fused / 1e9;
    j["dram_gbps"] = dram_now;
    j["dram_ratio"] = wbytes / t_fused / 1e9 / dram_now;
    if (!o.no_peers) {
      j["unfused_ms"] = t_chain * 1e3;
      j["speedup_vs_unfused"] = t_chain / t_fused;
    }
    if (rpe == rows_list.back() && ctx.threads() > 1 && !o.no_peers) {
      const double t1 = median_seconds(o, [&] { fused_call(ctx1); });
      j["one_thread_ms"] = t1 * 1e3;
      j["speedup_vs_1thread"] = t1 / t_fused;
    }
    rep.row(j);
  }
  return 0;
}

}  // namespace qllm::bench
