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
    KvCache c;
    c.key_cache = TensorView(kc.data(), DType::s8, {nb, bs, Hkv, D});
    c.value_cache = TensorView(vc.data(), DType::s8, {nb, bs, Hkv, D});
    c.k_scale = TensorView(ks.data(), DType::f32, {nb, bs, Hkv});
    c.v_scale = TensorView(vs.data(), DType::f32, {nb, bs, Hkv});
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
