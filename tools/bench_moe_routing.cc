// bench moe-routing: the MoE routing operators on their own (SPEC section 4), at DeepSeek-V3 and
// Qwen3-30B-A3B shapes: moe_init_routing (dispatch with per-token int8 quant), the routed W8A8
// matmuls grouped_matmul_with_routing UP (gather by token) and DOWN (scatter-add per token), and
// moe_finalize_routing (the weighted combine). Each figure is a ratio to the limits measured in
// the same run; the routed matmuls are also timed against the unrouted way of doing the same
// (gather rows, then grouped_matmul; grouped_matmul, then combine), in alternation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {

namespace {

struct RoutingModel {
  const char* name;
  int64_t E, h, I, k;  // routed experts, hidden, expert intermediate, top-k
};

// Balanced routing: token t goes to the block of k consecutive experts (t + shift) mod (E / k),
// so every touched expert gets the same rows. Calls of small T rotate `shift`, so successive
// calls meet other experts' weights cold, as decode steps of a real model do.
std::vector<int32_t> routed_ids(const RoutingModel& md, int64_t T, int64_t shift) {
  std::vector<int32_t> ids(T * md.k);
  const int64_t blocks = md.E / md.k;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < md.k; ++j) ids[t * md.k + j] = static_cast<int32_t>(((t + shift) % blocks) * md.k + j);
  return ids;
}

// One routing of T tokens, as moe_init_routing lays it out (the inputs every timed op reads).
struct Routing {
  std::vector<int32_t> ids, row_idx, source;
  std::vector<int64_t> cumsum;
  std::vector<int8_t> xq;       // expanded, quantised tokens [T*k, h] (the unrouted UP's input)
  std::vector<float> xq_scale;  // [T*k]
  int64_t touched = 0;
};

}  // namespace

int bench_moe_routing(const Options& o) {
  // DeepSeek-V3 with 64 of its 256 routed experts (the per-token work is the same, the weights
  // fit this machine), and Qwen3-30B-A3B.
  const std::vector<RoutingModel> models =
      o.quick ? std::vector<RoutingModel>{{"deepseek-v3", 16, 256, 128, 8}}
              : std::vector<RoutingModel>{{"deepseek-v3", 64, 7168, 2048, 8}, {"qwen3-30b-a3b", 128, 2048, 768, 8}};
  std::vector<int64_t> tokens = o.quick ? std::vector<int64_t>{1, 8} : std::vector<int64_t>{1, 64, 512};
  if (!o.tokens.empty()) tokens = o.tokens;
  for (int64_t t : tokens)
    if (t < 1 || t > 8192) throw_invalid("bench moe-routing", "tokens", "--tokens values must be in [1, 8192], got ", t);
  const int64_t Tmax = *std::max_element(tokens.begin(), tokens.end());

  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  const double kernel_peak = ctx.isa() == Isa::avx512 ? peak.int8_vnni_gops : peak.int8_exact_gops;
  Reporter rep(o);
  rep.row(peak_row(peak));

  for (const RoutingModel& md : models) {
    const int64_t E = md.E, h = md.h, I = md.I, k = md.k, n_up = 2 * I;
    // W8A8 expert weights in checkpoint layout [E, n, k], packed once for this machine.
    PackedWeight w_up, w_down;
    {
      std::vector<int8_t> raw(static_cast<size_t>(E * n_up * h));
      fill_random(raw.data(), raw.size(), 1);
      w_up = PackedWeight::pack(TensorView(raw.data(), DType::s8, {E, n_up, h}), true, ctx.isa());
      raw.assign(static_cast<size_t>(E * h * I), 0);
      fill_random(raw.data(), raw.size(), 2);
      w_down = PackedWeight::pack(TensorView(raw.data(), DType::s8, {E, h, I}), true, ctx.isa());
    }
    const std::vector<float> s_up = random_f32(E * n_up, 1e-4f, 2e-4f, 3), s_down = random_f32(E * h, 1e-4f, 2e-4f, 4);
    const double up_bytes_per_expert = static_cast<double>(n_up) * h + n_up * 4.0;
    const double down_bytes_per_expert = static_cast<double>(h) * I + h * 4.0;

    // Buffers for the largest T, shared by every case of this model.
    const std::vector<float> x = random_f32(Tmax * h, -1.0f, 1.0f, 5);
    std::vector<uint16_t> xb(Tmax * h);
    for (size_t i = 0; i < xb.size(); ++i) xb[i] = f32_to_bf16(x[i]);
    const std::vector<int8_t> xs8 = random_s8(Tmax * h, 6);
    const std::vector<float> tok_scale = random_f32(Tmax, 0.5f, 1.5f, 7);
    const std::vector<int8_t> hs8 = random_s8(Tmax * k * I, 8);     // DOWN's input rows
    const std::vector<float> h_scale = random_f32(Tmax * k, 0.5f, 1.5f, 9);
    std::vector<float> route_w(Tmax * k, 1.0f);  // combine weights 1: DOWN's unrouted twin
    std::vector<int8_t> ex(Tmax * k * h);
    std::vector<float> ex_scale(Tmax * k), rows32(Tmax * k * h);
    std::vector<int32_t> ex_idx(Tmax * k);
    std::vector<uint16_t> up_out(Tmax * k * n_up), up_out2(Tmax * k * n_up), down_out(Tmax * h), down_out2(Tmax * h);

    for (int64_t T : tokens) {
      const int64_t R = T * k;
      // Small T rotates over routings that touch different experts (see routed_ids).
      const int64_t blocks = E / k;
      const int64_t variants = R < E ? std::min<int64_t>(blocks, 16) : 1;
      std::vector<Routing> rs(variants);
      for (int64_t v = 0; v < variants; ++v) {
        Routing& r = rs[v];
        r.ids = routed_ids(md, T, v * blocks / variants);
        r.row_idx.resize(R);
        r.source.resize(R);
        r.cumsum.resize(E);
        r.xq.resize(R * h);
        r.xq_scale.resize(R);
        MoeInitRoutingOutputs io;
        io.expanded_x = TensorView(r.xq.data(), DType::s8, {R, h});
        io.expanded_row_idx = TensorView(r.row_idx.data(), DType::s32, {R});
        io.expert_cumsum = TensorView(r.cumsum.data(), DType::s64, {E});
        io.source_token = TensorView(r.source.data(), DType::s32, {R});
        io.expanded_scale = TensorView(r.xq_scale.data(), DType::f32, {R});
        moe_init_routing(ctx, TensorView(x.data(), DType::f32, {T, h}), TensorView(r.ids.data(), DType::s32, {T, k}), E, io, true);
        for (int64_t e = 0; e < E; ++e) r.touched += r.cumsum[e] > (e ? r.cumsum[e - 1] : 0);
      }
      // Memory-bound cases: the DRAM bandwidth available right now.
      const double dram_now = T <= 8 ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;
      auto base_case = [&](const char* op) {
        nlohmann::ordered_json j;
        j["bench"] = "moe-routing";
        j["case"] = {{"op", op}, {"model", md.name}, {"tokens", T}, {"experts", E}, {"top_k", k}, {"hidden", h},
                     {"intermediate", I}, {"experts_touched", rs[0].touched}, {"threads", ctx.threads()},
                     {"isa", isa_name(ctx.isa())}};
        return j;
      };
      // A pass over memory (init / finalize): bytes moved over the time, and over DRAM bandwidth.
      auto memory_row = [&](const char* op, double t, double bytes) {
        nlohmann::ordered_json j = base_case(op);
        j["median_ms"] = t * 1e3;
        j["gbps"] = bytes / t / 1e9;
        j["dram_gbps"] = dram_now;
        j["dram_ratio"] = bytes / t / 1e9 / dram_now;
        rep.row(j);
      };
      int64_t call_no = 0;

      // 1. moe_init_routing: bf16 tokens -> expert-ordered s8 rows + scales (+ index arrays).
      {
        MoeInitRoutingOutputs io;
        io.expanded_x = TensorView(ex.data(), DType::s8, {R, h});
        io.expanded_row_idx = TensorView(ex_idx.data(), DType::s32, {R});
        io.expanded_scale = TensorView(ex_scale.data(), DType::f32, {R});
        const double t = median_seconds(o, [&] {
          const Routing& r = rs[call_no++ % variants];
          moe_init_routing(ctx, TensorView(xb.data(), DType::bf16, {T, h}), TensorView(r.ids.data(), DType::s32, {T, k}), E, io, true);
        });
        // Read: the tokens (once from memory; the k copies of a row hit cache) and the ids;
        // written: the rows, their scales and the row index.
        memory_row("init_routing", t, 2.0 * T * h + 4.0 * R + R * (h + 4.0) + 4.0 * R);
      }

      // 2./3. The routed matmuls, against their unrouted twins on the same data and weights.
      for (const RoutingDirection dir : {RoutingDirection::up, RoutingDirection::down}) {
        const bool up = dir == RoutingDirection::up;
        GmmRoutingParams p;
        p.direction = dir;
        p.top_k = k;
        p.out_dtype = DType::bf16;
        auto routed = [&] {
          const Routing& r = rs[call_no++ % variants];
          GmmRoutingArgs a;
          a.ac = up ? TensorView(xs8.data(), DType::s8, {T, h}) : TensorView(hs8.data(), DType::s8, {R, I});
          a.packed = up ? &w_up : &w_down;
          a.expert_cumsum = TensorView(r.cumsum.data(), DType::s64, {E});
          a.expert_index = TensorView(r.source.data(), DType::s32, {R});
          a.nscale = up ? TensorView(s_up.data(), DType::f32, {E, n_up}) : TensorView(s_down.data(), DType::f32, {E, h});
          a.mscale = up ? TensorView(tok_scale.data(), DType::f32, {T}) : TensorView(h_scale.data(), DType::f32, {R});
          const TensorView out = up ? TensorView(up_out.data(), DType::bf16, {R, n_up}) : TensorView(down_out.data(), DType::bf16, {T, h});
          grouped_matmul_with_routing(ctx, a, out, p);
        };
        // Unrouted UP: the rows already gathered (and quantised) by moe_init_routing, then
        // grouped_matmul; its gather is timed as part of it. Unrouted DOWN: grouped_matmul to
        // f32 rows, then moe_finalize_routing with weights 1 (the same sums).
        auto unrouted = [&] {
          const Routing& r = rs[call_no++ % variants];
          GroupedMatmulParams gp;
          GroupedMatmulArgs g;
          g.group_list = TensorView(r.cumsum.data(), DType::s64, {E});
          if (up) {
            MoeInitRoutingOutputs io;
            io.expanded_x = TensorView(ex.data(), DType::s8, {R, h});
            io.expanded_row_idx = TensorView(ex_idx.data(), DType::s32, {R});
            moe_init_routing(ctx, TensorView(xs8.data(), DType::s8, {T, h}), TensorView(r.ids.data(), DType::s32, {T, k}), E, io);
            for (int64_t i = 0; i < R; ++i) ex_scale[i] = tok_scale[r.source[i]];
            g.x = TensorView(ex.data(), DType::s8, {R, h});
            g.packed_w = &w_up;
            g.scale = TensorView(s_up.data(), DType::f32, {E, n_up});
            g.per_token_scale = TensorView(ex_scale.data(), DType::f32, {R});
            gp.out_dtype = DType::bf16;
            grouped_matmul(ctx, g, TensorView(up_out2.data(), DType::bf16, {R, n_up}), gp);
          } else {
            g.x = TensorView(hs8.data(), DType::s8, {R, I});
            g.packed_w = &w_down;
            g.scale = TensorView(s_down.data(), DType::f32, {E, h});
            g.per_token_scale = TensorView(h_scale.data(), DType::f32, {R});
            gp.out_dtype = DType::f32;
            grouped_matmul(ctx, g, TensorView(rows32.data(), DType::f32, {R, h}), gp);
            MoeFinalizeArgs f;
            f.rows = TensorView(rows32.data(), DType::f32, {R, h});
            f.weights = TensorView(route_w.data(), DType::f32, {T, k});
            f.expanded_row_idx = TensorView(r.row_idx.data(), DType::s32, {R});
            moe_finalize_routing(ctx, f, TensorView(down_out2.data(), DType::bf16, {T, h}));
          }
        };
        double t = 0, t_un = 0;
        if (o.no_peers) {
          t = median_seconds(o, routed);
        } else {
          const std::vector<double> ts = median_seconds_paired(o, {routed, unrouted});
          t = ts[0];
          t_un = ts[1];
        }
        const double ops = 2.0 * R * (up ? static_cast<double>(n_up) * h : static_cast<double>(h) * I);
        const double wbytes = rs[0].touched * (up ? up_bytes_per_expert : down_bytes_per_expert);
        nlohmann::ordered_json j = base_case(up ? "gmm_routing_up" : "gmm_routing_down");
        j["median_ms"] = t * 1e3;
        j["gops"] = ops / t / 1e9;
        j["int8_peak_ratio"] = ops / t / 1e9 / peak.int8_gops;
        j["kernel_peak_ratio"] = ops / t / 1e9 / kernel_peak;
        j["weight_gbps"] = wbytes / t / 1e9;
        j["dram_gbps"] = dram_now;
        j["dram_ratio"] = wbytes / t / 1e9 / dram_now;
        if (!o.no_peers) {
          j["unrouted_ms"] = t_un * 1e3;
          j["speedup_vs_unrouted"] = t_un / t;
        }
        rep.row(j);
      }

      // 4. moe_finalize_routing: f32 expert rows -> bf16 tokens, weighted, plus a bf16 skip.
      {
        MoeFinalizeArgs f;
        f.rows = TensorView(rows32.data(), DType::f32, {R, h});
        f.weights = TensorView(route_w.data(), DType::f32, {T, k});
        f.skip = TensorView(xb.data(), DType::bf16, {T, h});
        const double t = median_seconds(o, [&] {
          const Routing& r = rs[call_no++ % variants];
          f.expanded_row_idx = TensorView(r.row_idx.data(), DType::s32, {R});
          moe_finalize_routing(ctx, f, TensorView(down_out.data(), DType::bf16, {T, h}));
        });
        // rows, skip, out, weights + index
        memory_row("finalize_routing", t, 4.0 * R * h + 2.0 * T * h + 2.0 * T * h + 8.0 * R);
      }
    }
  }
  return 0;
}

}  // namespace qllm::bench
