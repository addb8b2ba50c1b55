// "No heap allocation on hot paths": a warmed-up call of each packed-weight operator performs
// zero heap allocations (global operator new is counted while the probe is armed).
#include <atomic>
#include <cstdlib>
#include <new>

#include "test_util.h"

namespace {
std::atomic<bool> g_armed{false};
std::atomic<int64_t> g_allocs{0};
}  // namespace

void* operator new(size_t n) {
  if (g_armed.load(std::memory_order_relaxed)) g_allocs.fetch_add(1);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace qllm {
namespace {

template <class F>
int64_t allocations_of(F&& f) {
  f();  // warm-up: the context arena grows here
  g_allocs = 0;
  g_armed = true;
  f();
  g_armed = false;
  return g_allocs.load();
}

TEST(HotPath, NoHeapAllocations) {
  for (Isa isa : test::isas()) {
    Context& ctx = test::context(isa);
    const int64_t m = 24, k1 = 64, n1 = 256, n2 = 32, G = 2;
    auto x1 = test::rand_s8(m * k1), w1 = test::rand_s8(G * k1 * n1), w2 = test::rand_s8(G * n2 * n1 / 2);
    auto s1 = test::rand_f32(G * n1), s2 = test::rand_f32(G * n2), pts = test::rand_f32(m);
    std::vector<int64_t> gl = {10, 24};
    const PackedExpertFFN pk = PackedExpertFFN::pack(
        TensorView(w1.data(), DType::s8, {G, k1, n1}), TensorView(s1.data(), DType::f32, {G, n1}),
        TensorView(w2.data(), DType::s8, {G, n2, n1 / 2}), TensorView(s2.data(), DType::f32, {G, n2}), WeightUpPermute::n256,
        "PackedExpertFFN", isa);
    MoeFfnArgs a;
    a.x1 = TensorView(x1.data(), DType::s8, {m, k1});
    a.per_token_scale1 = TensorView(pts.data(), DType::f32, {m});
    a.group_list = TensorView(gl.data(), DType::s64, {G});
    a.packed = &pk;
    MoeFfnParams p;
    std::vector<uint16_t> out(m * n2);
    EXPECT_EQ(allocations_of([&] { gmm_deq_swiglu_quant_gmm_deq(ctx, a, TensorView(out.data(), DType::f16, {m, n2}), p); }), 0);

    const PackedWeight pw = PackedWeight::pack(TensorView(w1.data(), DType::s8, {G, k1, n1}), false, isa);
    GroupedMatmulArgs ga;
    ga.x = a.x1;
    ga.packed_w = &pw;
    ga.group_list = a.group_list;
    std::vector<int32_t> y(m * n1);
    GroupedMatmulParams gp;
    gp.out_dtype = DType::s32;
    EXPECT_EQ(allocations_of([&] { grouped_matmul(ctx, ga, TensorView(y.data(), DType::s32, {m, n1}), gp); }), 0);

    std::vector<float> h(m * n1);
    std::vector<int8_t> q(m * n1 / 2);
    std::vector<float> s(m);
    EXPECT_EQ(allocations_of([&] {
      swiglu_quant(ctx, TensorView(h.data(), DType::f32, {m, n1}), TensorView(q.data(), DType::s8, {m, n1 / 2}), TensorView(s.data(), DType::f32, {m}));
    }), 0);
  }
}

// The whole MoE block (router, gating, routing with quant, fused experts, shared expert, combine).
TEST(HotPath, MoeLayerNoHeapAllocations) {
  for (Isa isa : test::isas()) {
    Context& ctx = test::context(isa);
    MoeLayerConfig c;
    c.hidden_size = 32; c.num_experts = 8; c.num_experts_per_tok = 2; c.moe_intermediate_size = 16;
    c.n_group = 2; c.topk_group = 1; c.scoring_func = ScoringFunc::sigmoid; c.norm_topk_prob = true; c.n_shared_experts = 1;
    const int64_t E = 8, h = 32, I = 16, T = 13;
    auto r = test::rand_f32(E * h), g = test::rand_f32(E * I * h), u = test::rand_f32(E * I * h), d = test::rand_f32(E * h * I);
    auto sg = test::rand_f32(I * h), su = test::rand_f32(I * h), sd = test::rand_f32(h * I), x = test::rand_f32(T * h);
    MoeLayerHfWeights w;
    w.router = TensorView(r.data(), DType::f32, {E, h});
    w.gate_proj = TensorView(g.data(), DType::f32, {E, I, h});
    w.up_proj = TensorView(u.data(), DType::f32, {E, I, h});
    w.down_proj = TensorView(d.data(), DType::f32, {E, h, I});
    w.shared_gate_proj = TensorView(sg.data(), DType::f32, {I, h});
    w.shared_up_proj = TensorView(su.data(), DType::f32, {I, h});
    w.shared_down_proj = TensorView(sd.data(), DType::f32, {h, I});
    for (MoeExperts fmt : {MoeExperts::w8a8, MoeExperts::bf16}) {
      const MoeLayer L = MoeLayer::from_hf(c, w, fmt, isa);
      std::vector<float> out(T * h);
      EXPECT_EQ(allocations_of([&] {
        L.forward(ctx, TensorView(x.data(), DType::f32, {T, h}), TensorView(out.data(), DType::f32, {T, h}));
      }), 0) << isa_name(isa);
    }
  }
}

TEST(HotPath, WeightQuantNoHeapAllocations) {
  for (Isa isa : test::isas()) {
    Context& ctx = test::context(isa);
    const int64_t k = 256, n = 48;
    auto q = test::rand_s8(n * k / 2);
    auto sc = test::rand_f32(2 * n, 0.01f, 0.02f);
    const PackedQuantWeight pw = PackedQuantWeight::pack(TensorView(q.data(), DType::s4x2, {n, k / 2}),
                                                         TensorView(sc.data(), DType::f32, {2, n}), TensorView(), 128, true);
    for (int64_t m : {1, 20}) {  // matrix-vector and GEMM paths
      auto x = test::rand_f32(m * k);
      std::vector<float> y(m * n);
      WeightQuantMatmulArgs a;
      a.x = TensorView(x.data(), DType::f32, {m, k});
      a.packed_w = &pw;
      EXPECT_EQ(allocations_of([&] { weight_quant_matmul(ctx, a, TensorView(y.data(), DType::f32, {m, n})); }), 0);
    }
  }
}

}  // namespace
}  // namespace qllm

namespace qllm {
namespace {

// sparse24_matmul on a packed weight: the warmed-up call allocates nothing (float and W8A8).
TEST(HotPath, Sparse24NoHeapAllocations) {
  for (Isa isa : test::isas()) {
    Context& ctx = test::context(isa);
    const int64_t m = 7, k = 96, n = 40;
    std::vector<float> w = test::rand_f32(n * k), vals(n * k / 2), x = test::rand_f32(m * k), y(m * n);
    std::vector<uint8_t> meta(n * sparse24_meta_cols(k));
    const TensorView vv(vals.data(), DType::f32, {n, k / 2}), mv(meta.data(), DType::u8, {n, sparse24_meta_cols(k)});
    prune_24(TensorView(w.data(), DType::f32, {n, k}), vv, mv);
    const PackedSparse24 pk = PackedSparse24::pack(vv, mv);
    Sparse24MatmulArgs a;
    a.x = TensorView(x.data(), DType::f32, {m, k});
    a.packed = &pk;
    EXPECT_EQ(allocations_of([&] { sparse24_matmul(ctx, a, TensorView(y.data(), DType::f32, {m, n})); }), 0);
    std::vector<int8_t> w8 = test::rand_s8(n * k), v8(n * k / 2), x8 = test::rand_s8(m * k);
    prune_24(TensorView(w8.data(), DType::s8, {n, k}), TensorView(v8.data(), DType::s8, {n, k / 2}), mv);
    const PackedSparse24 pk8 = PackedSparse24::pack(TensorView(v8.data(), DType::s8, {n, k / 2}), mv);
    std::vector<float> scale = test::rand_f32(n);
    a.x = TensorView(x8.data(), DType::s8, {m, k});
    a.packed = &pk8;
    a.scale = TensorView(scale.data(), DType::f32, {n});
    EXPECT_EQ(allocations_of([&] { sparse24_matmul(ctx, a, TensorView(y.data(), DType::f32, {m, n}), {DType::f32}); }), 0);
  }
}

}  // namespace
}  // namespace qllm

// Attention and norms: warmed-up calls allocate nothing either.
namespace qllm {
namespace {
TEST(HotPath, AttentionAndNormsNoHeapAllocations) {
  for (Isa isa : test::isas()) {
    Context& ctx = test::context(isa);
    const int64_t nb = 8, bs = 16, Hkv = 2, Hq = 8, D = 64, B = 2;
    std::vector<int8_t> kc(nb * bs * Hkv * D), vc(kc.size());
    std::vector<float> ks(nb * bs * Hkv, 0.01f), vs(ks.size(), 0.01f);
    const KvCache c = KvCache::of(kc.data(), vc.data(), DType::s8, nb, bs, Hkv, D, ks.data(), vs.data());
    std::vector<int32_t> table = {0, 1, 2, 3, 4, 5, 6, 7}, lens = {60, 17};
    auto q = test::rand_f32(B * Hq * D);
    std::vector<float> o(q.size());
    PagedAttentionArgs a;
    a.q = TensorView(q.data(), DType::f32, {B, Hq, D});
    a.cache = c;
    a.block_tables = TensorView(table.data(), DType::s32, {B, 4});
    a.context_lens = TensorView(lens.data(), DType::s32, {B});
    EXPECT_EQ(allocations_of([&] { paged_attention(ctx, a, TensorView(o.data(), DType::f32, {B, Hq, D})); }), 0);
    auto kv = test::rand_f32(B * Hkv * D);
    std::vector<int32_t> slots = {3, 70};
    EXPECT_EQ(allocations_of([&] {
                reshape_and_cache(ctx, TensorView(kv.data(), DType::f32, {B, Hkv, D}), TensorView(kv.data(), DType::f32, {B, Hkv, D}),
                                  c, TensorView(slots.data(), DType::s32, {B}));
              }), 0);
    auto g = test::rand_f32(D);
    EXPECT_EQ(allocations_of([&] {
                rms_norm(ctx, TensorView(q.data(), DType::f32, {B * Hq, D}), TensorView(g.data(), DType::f32, {D}), 1e-6f,
                         TensorView(o.data(), DType::f32, {B * Hq, D}));
              }), 0);
  }
}
}  // namespace
}  // namespace qllm
