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
