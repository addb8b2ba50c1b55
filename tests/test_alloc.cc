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
