// bench attention: paged prefill and decode attention over an f16 or int8 KV cache, at the
// shapes of the issue (32 query / 8 KV heads, head size 128 and 64), with every figure as a
// ratio to the limits measured in the same run: prefill against the f32 FMA peak (the kernel
// computes in f32), decode against DRAM bandwidth over the KV bytes it must read.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "bench_common.h"
#include "qllm/qllm.h"

namespace qllm::bench {

namespace {

struct Case {
  const char* mode;  // prefill | decode
  int64_t batch, queries, context, D;
  DType kv;
  int64_t block_size;
};

// A paged cache holding `batch` sequences of `context` tokens (blocks of `bs` tokens in shuffled
// order, as a pool's free list hands them out after some churn), filled through
// reshape_and_cache from Gaussian keys/values.
//
// The block size decides how far decode can stream: a block holds bs * Hkv * D elements of K
// (and as many of V) in one place, and every block starts a new DRAM stream at a random
// address. At 16 tokens an int8 D 128 or f16 D 64 block is 16 KiB, and a plain read of 16 KiB
// blocks in random order gets ~0.6 of the sequential DRAM rate on this machine (8 KiB: ~0.55;
// 64 KiB: ~0.93; docs/design.md, "Paged decode and the block size"). The default, 128 tokens,
// is the block size of Ascend's paged attention (CANN requires it with prefix caching and
// chunked prefill) and of vLLM's CPU backend with its optimised (IPEX) attention; 16 is the
// vLLM GPU default and can be measured with --block-size 16.
struct BenchCache {
  int64_t nb, bs = 128, Hkv, D;
  DType dt;
  // K and V pools (and the s8 scales) come from aligned_malloc, as a serving engine's KV pool
  // would: huge pages for large pools (docs/design.md decision 11), so decode streams them
  // without a TLB miss every 4 KiB. A serving pool holds every sequence's KV and is far larger
  // than aligned_malloc's 8 MiB huge-page threshold, so small bench pools are allocated at
  // least that large (pool_buffer) instead of running on 4 KiB pages (~9% slower at 4 MiB).
  detail::AlignedBuffer k, v, ksb, vsb;
  float* ks = nullptr;
  float* vs = nullptr;
  std::vector<int32_t> tables, lens;
  int64_t maxb;
  KvCache view() {
    const bool s8 = dt == DType::s8;
    return KvCache::of(k.get(), v.get(), dt, nb, bs, Hkv, D, s8 ? ks : nullptr, s8 ? vs : nullptr);
  }
  size_t scale_bytes() const { return dt == DType::s8 ? static_cast<size_t>(nb * bs * Hkv) * sizeof(float) : 0; }
  static uint8_t* pool_buffer(size_t bytes) { return static_cast<uint8_t*>(aligned_malloc(std::max(bytes, size_t{8} << 20))); }
  void allocate() {
    k.reset(pool_buffer(pool_bytes()));
    v.reset(pool_buffer(pool_bytes()));
    if (dt == DType::s8) {
      ksb.reset(pool_buffer(scale_bytes()));
      vsb.reset(pool_buffer(scale_bytes()));
      ks = reinterpret_cast<float*>(ksb.get());
      vs = reinterpret_cast<float*>(vsb.get());
    }
  }
  // Bytes attention must read for one token of one sequence (K and V of every KV head + scales).
  double token_bytes() const { return 2.0 * Hkv * (D * dtype_size(dt) + (dt == DType::s8 ? 4 : 0)); }
  size_t pool_bytes() const { return static_cast<size_t>(nb * bs * Hkv * D * dtype_size(dt)); }
  // Another cache with the same contents and block tables in its own memory.
  BenchCache clone() const {
    BenchCache c;
    c.nb = nb;
    c.bs = bs;
    c.Hkv = Hkv;
    c.D = D;
    c.dt = dt;
    c.maxb = maxb;
    c.allocate();
    std::memcpy(c.k.get(), k.get(), pool_bytes());
    std::memcpy(c.v.get(), v.get(), pool_bytes());
    if (dt == DType::s8) {
      std::memcpy(c.ks, ks, scale_bytes());
      std::memcpy(c.vs, vs, scale_bytes());
    }
    c.tables = tables;
    c.lens = lens;
    return c;
  }
};

BenchCache make_cache(Context& ctx, int64_t batch, int64_t context, int64_t Hkv, int64_t D, DType dt, int64_t bs, uint32_t seed) {
  BenchCache c;
  c.bs = bs;
  c.Hkv = Hkv;
  c.D = D;
  c.dt = dt;
  c.maxb = (context + c.bs - 1) / c.bs;
  c.nb = batch * c.maxb;
  c.allocate();
  std::vector<int32_t> perm(c.nb);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 g(seed);
  std::shuffle(perm.begin(), perm.end(), g);
  c.tables.assign(perm.begin(), perm.end());
  c.lens.assign(batch, static_cast<int32_t>(context));
  // Fill one block-table chunk of tokens at a time (bounded staging memory).
  const int64_t chunk = 4096;
  std::vector<float> kf(chunk * Hkv * D), vf(kf.size());
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& x : kf) x = nd(g);
  for (auto& x : vf) x = nd(g);
  std::vector<int32_t> slots(chunk);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t0 = 0; t0 < context; t0 += chunk) {
      const int64_t n = std::min(chunk, context - t0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = t0 + i;
        slots[i] = static_cast<int32_t>(c.tables[b * c.maxb + j / c.bs] * c.bs + j % c.bs);
      }
      std::rotate(kf.begin(), kf.begin() + Hkv * D * 7, kf.end());  // vary the data between chunks
      reshape_and_cache(ctx, TensorView(kf.data(), DType::f32, {n, Hkv, D}), TensorView(vf.data(), DType::f32, {n, Hkv, D}),
                        c.view(), TensorView(slots.data(), DType::s32, {n}));
    }
  return c;
}

}  // namespace

int bench_attention(const Options& o) {
  const int64_t Hq = 32, Hkv = 8;
  std::vector<Case> cases;
  const std::vector<int64_t> Ds = o.quick ? std::vector<int64_t>{64} : std::vector<int64_t>{128, 64};
  // Decode contexts: the 1k / 4k / 16k, or any listed with --tokens (e.g. a context
  // whose KV fits in L2, to time the kernel without the memory hierarchy).
  const std::vector<int64_t> decode_contexts = o.tokens.empty() ? std::vector<int64_t>{1024, 4096, 16384} : o.tokens;
  const std::vector<int64_t> block_sizes = o.block_sizes.empty() ? std::vector<int64_t>{128} : o.block_sizes;
  for (int64_t bs : block_sizes)
    for (DType kv : {DType::f16, DType::s8})
      for (int64_t D : Ds) {
        if (o.quick) {
          cases.push_back({"prefill", 1, 64, 256, D, kv, bs});
          cases.push_back({"decode", 2, 1, 1024, D, kv, bs});
          continue;
        }
        cases.push_back({"prefill", 1, 512, 4096, D, kv, bs});  // a 512-token chunk after 3584 cached tokens
        cases.push_back({"prefill", 1, 2048, 2048, D, kv, bs});  // a 2048-token prompt, causal
        for (int64_t batch : {1, 8})
          for (int64_t context : decode_contexts) cases.push_back({"decode", batch, 1, context, D, kv, bs});
      }

  if (!o.mode.empty())
    cases.erase(std::remove_if(cases.begin(), cases.end(), [&](const Case& c) { return o.mode != c.mode; }), cases.end());
  // --formats f16,int8 picks KV dtypes, --tokens picks contexts (for tuning one case at a time).
  cases.erase(std::remove_if(cases.begin(), cases.end(),
                             [&](const Case& c) {
                               const bool ctx_ok = o.tokens.empty() || std::find(o.tokens.begin(), o.tokens.end(), c.context) != o.tokens.end();
                               return !o.wants_format(c.kv == DType::s8 ? "int8" : "f16") || !ctx_ok;
                             }),
              cases.end());
  Context ctx(ContextOptions{o.threads, true, Isa::ref});
  Context ctx1(ContextOptions{1, true, Isa::ref});
  const Peak peak = measure_peak(ctx.threads(), o.quick ? 0.05 : 0.3);
  Reporter rep(o);
  {
    nlohmann::ordered_json j;
    j["bench"] = "peak";
    j["case"] = {{"threads", peak.threads}};
    j["fma_gflops"] = peak.fma_gflops;
    j["dram_gbps"] = peak.dram_gbps;
    j["threads"] = peak.threads;
    rep.row(j);
  }
  // Median decode time of the f16 case with the same (batch, context, D, block size), for int8's speedup.
  std::vector<std::pair<std::tuple<int64_t, int64_t, int64_t, int64_t>, double>> f16_decode;

  uint32_t seed = 1;
  for (const Case& c : cases) {
    BenchCache cache = make_cache(ctx, c.batch, c.context, Hkv, c.D, c.kv, c.block_size, seed++);
    const bool decode = std::string(c.mode) == "decode";
    // Decode must read the KV from DRAM, as in serving, where the other layers' KV and weights
    // pass through the 32 MiB L3 between two steps of one layer: like the matmul benchmarks'
    // weights, each timed call reads the next of enough copies (>= 128 MiB in all). A 4k-token
    // int8 cache is 8 MiB and would otherwise stay in L3 between repetitions.
    std::vector<BenchCache> copies;
    if (decode && !o.quick && !std::getenv("QLLM_BENCH_HOT"))
      for (int i = 1; i < copies_for(2.0 * cache.pool_bytes()); ++i) copies.push_back(cache.clone());
    const int64_t Tq = c.batch * c.queries;
    std::vector<float> qf(Tq * Hq * c.D);
    std::mt19937 g(seed++);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& x : qf) x = nd(g);
    std::vector<uint16_t> q(qf.size()), out(qf.size());
    for (size_t i = 0; i < qf.size(); ++i) q[i] = f32_to_f16(qf[i]);
    const TensorView qv(q.data(), DType::f16, {Tq, Hq, c.D}), ov(out.data(), DType::f16, {Tq, Hq, c.D});
    std::vector<int32_t> cu_q(c.batch + 1);
    for (int64_t b = 0; b <= c.batch; ++b) cu_q[b] = static_cast<int32_t>(b * c.queries);
    PagedAttentionArgs pa;
    pa.q = qv;
    pa.cache = cache.view();
    pa.block_tables = TensorView(cache.tables.data(), DType::s32, {c.batch, cache.maxb});
    pa.context_lens = TensorView(cache.lens.data(), DType::s32, {c.batch});
    PagedPrefillArgs pp;
    pp.q = qv;
    pp.cu_seqlens_q = TensorView(cu_q.data(), DType::s32, {c.batch + 1});
    pp.cache = pa.cache;
    pp.block_tables = pa.block_tables;
    pp.context_lens = pa.context_lens;
    size_t it = 0;
    auto call = [&](Context& cx) {
      if (decode) {
        const size_t i = it++ % (copies.size() + 1);
        pa.cache = i == 0 ? cache.view() : copies[i - 1].view();
        paged_attention(cx, pa, ov);
      } else {
        paged_prefill_attention(cx, pp, ov);
      }
    };
    const size_t ws_bytes = decode ? paged_attention_workspace_size(ctx, pa) : paged_prefill_attention_workspace_size(ctx, pp);
    const double dram_now = decode ? measure_dram(ctx.threads(), o.quick ? 1 : 3) : peak.dram_gbps;
    const double t = median_seconds(o, [&] { call(ctx); });

    nlohmann::ordered_json j;
    j["bench"] = "attention";
    j["case"] = {{"mode", c.mode},         {"kv_dtype", c.kv == DType::s8 ? "int8" : "f16"},
                 {"batch", c.batch},       {"queries", c.queries},
                 {"context", c.context},   {"head_size", c.D},
                 {"q_heads", Hq},          {"kv_heads", Hkv},
                 {"block_size", c.block_size},
                 {"threads", ctx.threads()}, {"isa", isa_name(ctx.isa())}};
    j["median_ms"] = t * 1e3;
    // Flops of the visible (query, key) pairs only: QK^T and PV, 2 flops per multiply-add each.
    double pairs = 0;
    for (int64_t i = 0; i < c.queries; ++i) pairs += static_cast<double>(c.context - c.queries + i + 1);
    const double flops = 4.0 * c.D * Hq * pairs * c.batch;
    j["gflops"] = flops / t / 1e9;
    j["fma_peak_ratio"] = flops / t / 1e9 / peak.fma_gflops;
    const double kv_bytes = cache.token_bytes() * c.context * c.batch;
    j["kv_gbps"] = kv_bytes / t / 1e9;
    // A fixed set of keys in every row (null where a figure does not apply), so the table lines up.
    j["dram_gbps"] = decode ? nlohmann::ordered_json(dram_now) : nlohmann::ordered_json();
    j["dram_ratio"] = decode ? nlohmann::ordered_json(kv_bytes / t / 1e9 / dram_now) : nlohmann::ordered_json();
    // Against the streaming rate of the very K and V pools it reads (see measure_stream).
    double stream_now = 0;
    if (decode) {
      std::vector<StreamSpan> spans = {{cache.k.get(), cache.pool_bytes()}, {cache.v.get(), cache.pool_bytes()}};
      for (const BenchCache& cc : copies) {
        spans.push_back({cc.k.get(), cc.pool_bytes()});
        spans.push_back({cc.v.get(), cc.pool_bytes()});
      }
      stream_now = measure_stream(ctx.threads(), spans, o.quick ? 1 : 3);
    }
    j["stream_gbps"] = decode ? nlohmann::ordered_json(stream_now) : nlohmann::ordered_json();
    j["stream_ratio"] = decode ? nlohmann::ordered_json(kv_bytes / t / 1e9 / stream_now) : nlohmann::ordered_json();
    j["speedup_vs_f16_kv"] = nullptr;
    if (decode) {
      const auto key = std::make_tuple(c.batch, c.context, c.D, c.block_size);
      if (c.kv == DType::f16) f16_decode.push_back({key, t});
      for (const auto& [k2, tf] : f16_decode)
        if (c.kv == DType::s8 && k2 == key) j["speedup_vs_f16_kv"] = tf / t;
    }
    j["workspace_bytes"] = ws_bytes;  // the peak extra memory of one call (no other allocation)
    j["one_thread_ms"] = nullptr;
    j["speedup_vs_1thread"] = nullptr;
    if (!o.no_peers && ctx.threads() > 1 && (!decode || c.context == 4096)) {
      const double t1 = median_seconds(o, [&] { call(ctx1); });
      j["one_thread_ms"] = t1 * 1e3;
      j["speedup_vs_1thread"] = t1 / t;
    }
    rep.row(j);
  }
  return 0;
}

}  // namespace qllm::bench
