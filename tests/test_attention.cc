// flash_attention, reshape_and_cache, paged_attention, paged_prefill_attention, copy_blocks:
// against a naive double-precision softmax attention, ref vs SIMD bit for bit, paged ==
// contiguous exactly, int8 KV accuracy, and bad input.
//
// Tolerance against the naive oracle (derivation): each score is an f32 dot product of D terms
// summed in 8 lanes, so its error is <= (D/8 + 4) u sum_d |q_d k_d| scale (u = 2^-24, +1 for
// the pre-scaling of q). exp_qllm is ~1 u; a score error d shifts a softmax weight by a factor
// e^d ~ 1 + d, and the normalised output by at most 2 max d relative; the running sum l and
// each output element are f32 chains over Lk keys, <= Lk u relative each. Hence
//   |o - o*| <= (2 max_j ds_j + (2 Lk + 10) u) max_j |v_jd| + the output rounding.
// The s8 decode path (one query position over an int8 cache) also quantises the pre-scaled
// query per row to int8 (step a = max_d |q_d| scale / 127, error <= a / 2 per element, 0.51 a
// for the rounding of q * (127 / max)), so its score error grows by 0.51 a sum_d |k_jd|, plus
// 3 u of sum_d |q_d k_d| scale for the two scale products: q_int8 = true adds that to ds_j.
// Its P.V is integer too: each weight w_j = p_j v_scale_j is quantised to 7 bits within its
// block of 32 keys (error <= 0.51 wmax / 127, wmax the block's largest weight), and |v8| <= 127,
// so the output moves by <= 0.51 / 127 sum_j max_{i in j's block} (p_i vamax_i) / l, vamax_i =
// max_d |v_id| = 127 v_scale_i; the oracle takes the max over [j - 31, j + 31] (any block that
// holds j) and 0.52 for the rounding of the dequantised vamax.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "float_codec.h"
#include "test_util.h"

namespace qllm {
namespace {

using test::context;
using test::decode;
using test::encode;

constexpr double kU = 0x1p-24;

struct Oracle {
  std::vector<double> o, tol;
};

// q [Lq, Hq, D], k/v [Lk, Hkv, D] as f32 values; out rows [Lq, Hq, D].
Oracle naive(const float* q, int64_t Lq, int64_t Hq, const float* k, const float* v, int64_t Lk, int64_t Hkv, int64_t D,
             double scale, bool causal, int64_t window, DType odt, bool q_int8 = false) {
  Oracle r;
  r.o.assign(Lq * Hq * D, 0.0);
  r.tol.assign(Lq * Hq * D, 0.0);
  const int64_t g = Hq / Hkv;
  std::vector<double> s(Lk);
  for (int64_t i = 0; i < Lq; ++i)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kh = h / g, pos = i + Lk - Lq;
      const int64_t hi = causal ? std::clamp<int64_t>(pos + 1, 0, Lk) : Lk;
      const int64_t lo = window > 0 ? std::clamp<int64_t>(pos - window + 1, 0, Lk) : 0;
      if (lo >= hi) continue;
      double mx = -1e300, ds = 0, qamax = 0;
      for (int64_t d = 0; d < D; ++d) qamax = std::max(qamax, std::fabs(double(q[(i * Hq + h) * D + d]) * scale));
      for (int64_t j = lo; j < hi; ++j) {
        double acc = 0, mag = 0, kabs = 0;
        for (int64_t d = 0; d < D; ++d) {
          acc += double(q[(i * Hq + h) * D + d]) * k[(j * Hkv + kh) * D + d];
          mag += std::fabs(double(q[(i * Hq + h) * D + d]) * k[(j * Hkv + kh) * D + d]);
          kabs += std::fabs(double(k[(j * Hkv + kh) * D + d]));
        }
        s[j] = acc * scale;
        const double dq = q_int8 ? 0.51 * qamax / 127 * kabs + 3 * kU * mag * std::fabs(scale) : 0.0;
        ds = std::max(ds, (D / 8.0 + 4) * kU * mag * std::fabs(scale) + dq);
        mx = std::max(mx, s[j]);
      }
      double l = 0;
      for (int64_t j = lo; j < hi; ++j) l += std::exp(s[j] - mx);
      double pv_tol = 0;  // the s8 decode path's weight quantisation (header comment)
      if (q_int8) {
        std::vector<double> pa(Lk, 0.0);
        for (int64_t j = lo; j < hi; ++j) {
          double vamax = 0;
          for (int64_t d = 0; d < D; ++d) vamax = std::max(vamax, std::fabs(double(v[(j * Hkv + kh) * D + d])));
          pa[j] = std::exp(s[j] - mx) * vamax;
        }
        for (int64_t j = lo; j < hi; ++j) {
          double mj = 0;
          for (int64_t i = std::max(lo, j - 31); i < std::min(hi, j + 32); ++i) mj = std::max(mj, pa[i]);
          pv_tol += 0.52 / 127 * mj;
        }
        pv_tol /= l;
      }
      for (int64_t d = 0; d < D; ++d) {
        double o = 0, vmax = 0;
        for (int64_t j = lo; j < hi; ++j) {
          o += std::exp(s[j] - mx) * v[(j * Hkv + kh) * D + d];
          vmax = std::max(vmax, std::fabs(double(v[(j * Hkv + kh) * D + d])));
        }
        o /= l;
        r.o[(i * Hq + h) * D + d] = o;
        r.tol[(i * Hq + h) * D + d] =
            (2 * ds + (2 * (hi - lo) + 10) * kU) * vmax + pv_tol + test::out_eps(odt) * std::fabs(o) + test::out_abs(odt) + 1e-30;
      }
    }
  return r;
}

struct FlashCase {
  std::vector<int32_t> cu_q, cu_k;
  int64_t Hq, Hkv, D;
  bool causal;
  int64_t window;
};

// Runs flash_attention under every ISA, demands identical bits, checks the first against the oracle.
void check_flash(const FlashCase& c, DType qdt, DType kdt, DType odt) {
  const int64_t Tq = c.cu_q.back(), Tk = c.cu_k.back(), B = c.cu_q.size() - 1;
  const auto qb = encode(test::rand_f32(Tq * c.Hq * c.D, -1, 1), qdt);
  const auto kb = encode(test::rand_f32(Tk * c.Hkv * c.D, -1, 1), kdt);
  const auto vb = encode(test::rand_f32(Tk * c.Hkv * c.D, -1, 1), kdt);
  FlashAttentionArgs a;
  a.q = TensorView(qb.data(), qdt, {Tq, c.Hq, c.D});
  a.k = TensorView(kb.data(), kdt, {Tk, c.Hkv, c.D});
  a.v = TensorView(vb.data(), kdt, {Tk, c.Hkv, c.D});
  a.cu_seqlens_q = TensorView(c.cu_q.data(), DType::s32, {B + 1});
  a.cu_seqlens_k = TensorView(c.cu_k.data(), DType::s32, {B + 1});
  AttentionParams p;
  p.causal = c.causal;
  p.window = c.window;
  std::vector<std::vector<uint8_t>> outs;
  for (Isa isa : test::isas()) {
    std::vector<uint8_t> o(Tq * c.Hq * c.D * dtype_size(odt), 0xAB);
    flash_attention(context(isa), a, TensorView(o.data(), odt, {Tq, c.Hq, c.D}), p);
    outs.push_back(o);
  }
  for (size_t i = 1; i < outs.size(); ++i) ASSERT_EQ(outs[i], outs[0]) << "ref vs " << isa_name(test::isas()[i]);
  const auto q = decode(qb, qdt), k = decode(kb, kdt), v = decode(vb, kdt), o = decode(outs[0], odt);
  const double scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q0 = c.cu_q[b], Lq = c.cu_q[b + 1] - q0, k0 = c.cu_k[b], Lk = c.cu_k[b + 1] - k0;
    const Oracle want = naive(q.data() + q0 * c.Hq * c.D, Lq, c.Hq, k.data() + k0 * c.Hkv * c.D, v.data() + k0 * c.Hkv * c.D,
                              Lk, c.Hkv, c.D, scale, c.causal, c.window, odt);
    for (int64_t i = 0; i < Lq * c.Hq * c.D; ++i)
      ASSERT_NEAR(o[q0 * c.Hq * c.D + i], want.o[i], want.tol[i])
          << "seq " << b << " elem " << i << " D " << c.D << " Hq/Hkv " << c.Hq << "/" << c.Hkv << " causal " << c.causal
          << " window " << c.window << " " << dtype_name(qdt) << "/" << dtype_name(kdt);
  }
}

TEST(FlashAttention, VarlenCausalGqaWindowMatchNaive) {
  // Sequences: one query, an empty key set, Lk < Lq (causal rows that see nothing -> zeros),
  // several tiles, and a prefill longer than one task.
  const std::vector<int32_t> cu_q = {0, 1, 4, 7, 24, 24, 100}, cu_k = {0, 5, 5, 7, 60, 63, 250};
  for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{1, 1}, {4, 1}, {4, 2}, {6, 3}, {8, 8}})
    for (int64_t D : {3, 8, 17, 64})
      for (bool causal : {false, true})
        for (int64_t window : {0, 5}) check_flash({cu_q, cu_k, Hq, Hkv, D, causal, window}, DType::f32, DType::f32, DType::f32);
}

TEST(FlashAttention, Dtypes) {
  const std::vector<int32_t> cu_q = {0, 3, 40}, cu_k = {0, 70, 110};
  for (DType qdt : {DType::f32, DType::f16, DType::bf16})
    for (DType kdt : {DType::f16, DType::bf16})
      for (DType odt : {DType::f32, DType::f16, DType::bf16}) check_flash({cu_q, cu_k, 8, 2, 128, true, 0}, qdt, kdt, odt);
}

TEST(FlashAttention, RealSizeLongDecodeSplit) {
  // Head size 128, 32/8 heads, 1 query over 2500 keys: the decode path with 3 key splits (ranges
  // of >= 1024 keys) + merge.
  check_flash({{0, 1}, {0, 2500}, 32, 8, 128, true, 0}, DType::f16, DType::f16, DType::f32);
  check_flash({{0, 2, 5}, {0, 700, 1900}, 8, 2, 64, true, 300}, DType::f32, DType::f32, DType::f32);
}

// ---- the paged cache -------------------------------------------------------------------------

struct Cache {
  int64_t nb, bs, Hkv, D;
  DType dt;
  std::vector<uint8_t> k, v;
  std::vector<float> ks, vs;
  Cache(int64_t nb_, int64_t bs_, int64_t Hkv_, int64_t D_, DType dt_)
      : nb(nb_), bs(bs_), Hkv(Hkv_), D(D_), dt(dt_), k(nb_ * bs_ * Hkv_ * D_ * dtype_size(dt_)), v(k.size()),
        ks(dt_ == DType::s8 ? nb_ * bs_ * Hkv_ : 0), vs(ks.size()) {}
  KvCache view() {
    const bool s8 = dt == DType::s8;
    return KvCache::of(k.data(), v.data(), dt, nb, bs, Hkv, D, s8 ? ks.data() : nullptr, s8 ? vs.data() : nullptr);
  }
  // The value the cache holds for (slot, head, d), dequantised.
  float at(bool key, int64_t slot, int64_t h, int64_t d) const {
    const int64_t cell = slot * Hkv + h;
    const auto& b = key ? k : v;
    switch (dt) {
      case DType::s8: return static_cast<float>(reinterpret_cast<const int8_t*>(b.data())[cell * D + d]) * (key ? ks : vs)[cell];
      case DType::f32: return reinterpret_cast<const float*>(b.data())[cell * D + d];
      case DType::f16: return f16_to_f32(reinterpret_cast<const uint16_t*>(b.data())[cell * D + d]);
      default: return bf16_to_f32(reinterpret_cast<const uint16_t*>(b.data())[cell * D + d]);
    }
  }
};

// SPEC section 0 quantisation of one row (the formula, written independently of the kernels).
float quantize_spec(const float* x, int64_t n, int8_t* q) {
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] * inv), -127.0f, 127.0f));
  return amax / 127.0f;
}

TEST(ReshapeAndCache, WritesSlotsExactlyAndSkipsNegative) {
  for (DType cdt : {DType::f32, DType::f16, DType::bf16, DType::s8})
    for (DType idt : {DType::f32, DType::bf16}) {
      const int64_t T = 7, Hkv = 2, D = 19, nb = 4, bs = 3;
      const auto kf = test::rand_f32(T * Hkv * D), vf = test::rand_f32(T * Hkv * D);
      auto kb = encode(kf, idt), vb = encode(vf, idt);
      std::fill(kb.begin(), kb.begin() + Hkv * D * dtype_size(idt), 0);  // an all-zero token: scale 0
      const auto kd = decode(kb, idt), vd = decode(vb, idt);
      std::vector<int32_t> slots = {11, 0, -1, 5, 3, -7, 6};
      for (Isa isa : test::isas()) {
        Cache c(nb, bs, Hkv, D, cdt);
        std::fill(c.k.begin(), c.k.end(), 0x5A);
        const auto before = c.k;
        reshape_and_cache(context(isa), TensorView(kb.data(), idt, {T, Hkv, D}), TensorView(vb.data(), idt, {T, Hkv, D}), c.view(),
                          TensorView(slots.data(), DType::s32, {T}));
        for (int64_t t = 0; t < T; ++t)
          for (int64_t h = 0; h < Hkv; ++h) {
            if (slots[t] < 0) continue;
            for (int kvi = 0; kvi < 2; ++kvi) {
              const float* src = (kvi == 0 ? kd : vd).data() + (t * Hkv + h) * D;
              if (cdt == DType::s8) {
                int8_t want[32];
                const float sc = quantize_spec(src, D, want);
                const int64_t cell = slots[t] * Hkv + h;
                ASSERT_EQ((kvi == 0 ? c.ks : c.vs)[cell], sc);
                ASSERT_EQ(0, std::memcmp(want, (kvi == 0 ? c.k : c.v).data() + cell * D, D));
              } else {
                for (int64_t d = 0; d < D; ++d)
                  ASSERT_EQ(c.at(kvi == 0, slots[t], h, d), decode(encode({src[d]}, cdt), cdt)[0]);
              }
            }
          }
        // Slots nobody wrote (1, 2, 4, 7..10) are untouched.
        for (int64_t slot : {1, 2, 4, 7, 8, 9, 10}) {
          const int64_t bytes = Hkv * D * dtype_size(cdt);
          ASSERT_EQ(0, std::memcmp(c.k.data() + slot * bytes, before.data() + slot * bytes, bytes));
        }
      }
    }
}

struct PagedSetup {
  Cache cache;
  std::vector<int32_t> tables, lens;
  int64_t maxb;
  std::vector<float> kc, vc;  // contiguous keys [sum lens, Hkv, D] as the cache holds them
  std::vector<int32_t> cu_k;
  // paged_attention's arguments for one decode query row per sequence (q [B, Hq, D] f32).
  PagedAttentionArgs decode_args(const std::vector<float>& q, int64_t Hq, int64_t D) {
    const int64_t B = lens.size();
    PagedAttentionArgs a;
    a.q = TensorView(q.data(), DType::f32, {B, Hq, D});
    a.cache = cache.view();
    a.block_tables = TensorView(tables.data(), DType::s32, {B, maxb});
    a.context_lens = TensorView(lens.data(), DType::s32, {B});
    return a;
  }
};

// B sequences with the given context lengths, blocks scattered in a shuffled order; the cache is
// filled through reshape_and_cache from random f32 keys/values.
PagedSetup make_paged(const std::vector<int32_t>& lens, int64_t bs, int64_t Hkv, int64_t D, DType cdt, float kv_lo = -1,
                      float kv_hi = 1) {
  const int64_t B = lens.size();
  int64_t maxb = 1, total_blocks = 0;
  for (int32_t L : lens) {
    maxb = std::max<int64_t>(maxb, (L + bs - 1) / bs + 1);
    total_blocks += (L + bs - 1) / bs;
  }
  PagedSetup s{Cache(total_blocks + 3, bs, Hkv, D, cdt), std::vector<int32_t>(B * maxb, -1), lens, maxb, {}, {}, {0}};
  std::vector<int32_t> perm(total_blocks + 3);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), test::rng());
  int64_t next = 0, T = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < (lens[b] + bs - 1) / bs; ++i) s.tables[b * maxb + i] = perm[next++];
    T += lens[b];
    s.cu_k.push_back(static_cast<int32_t>(T));
  }
  const auto kf = test::rand_f32(T * Hkv * D, kv_lo, kv_hi), vf = test::rand_f32(T * Hkv * D, kv_lo, kv_hi);
  std::vector<int32_t> slots(T);
  for (int64_t b = 0, t = 0; b < B; ++b)
    for (int64_t j = 0; j < lens[b]; ++j, ++t) slots[t] = s.tables[b * maxb + j / bs] * bs + j % bs;
  reshape_and_cache(test::default_context(), TensorView(kf.data(), DType::f32, {T, Hkv, D}),
                    TensorView(vf.data(), DType::f32, {T, Hkv, D}), s.cache.view(), TensorView(slots.data(), DType::s32, {T}));
  s.kc.resize(T * Hkv * D);
  s.vc.resize(T * Hkv * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) {
        s.kc[(t * Hkv + h) * D + d] = s.cache.at(true, slots[t], h, d);
        s.vc[(t * Hkv + h) * D + d] = s.cache.at(false, slots[t], h, d);
      }
  return s;
}

// flash_attention over the gathered (dequantised, f32) keys: the paged operators must equal it
// bit for bit (same tiles, same splits, same arithmetic; only the addresses differ).
std::vector<float> flash_on_gathered(Context& ctx, const PagedSetup& s, const std::vector<float>& q,
                                     const std::vector<int32_t>& cu_q, int64_t Hq, int64_t window) {
  const int64_t Tq = cu_q.back(), T = s.cu_k.back(), B = cu_q.size() - 1, Hkv = s.cache.Hkv, D = s.cache.D;
  FlashAttentionArgs a;
  a.q = TensorView(q.data(), DType::f32, {Tq, Hq, D});
  a.k = TensorView(s.kc.data(), DType::f32, {T, Hkv, D});
  a.v = TensorView(s.vc.data(), DType::f32, {T, Hkv, D});
  a.cu_seqlens_q = TensorView(cu_q.data(), DType::s32, {B + 1});
  a.cu_seqlens_k = TensorView(s.cu_k.data(), DType::s32, {B + 1});
  AttentionParams p;
  p.causal = true;
  p.window = window;
  std::vector<float> o(Tq * Hq * D);
  flash_attention(ctx, a, TensorView(o.data(), DType::f32, {Tq, Hq, D}), p);
  return o;
}

TEST(PagedAttention, DecodeEqualsFlashOnGatheredKeysAllCacheDtypes) {
  const int64_t Hq = 8, Hkv = 2;
  for (DType cdt : {DType::f32, DType::f16, DType::bf16, DType::s8})
    for (int64_t bs : {16, 5})
      for (int64_t D : {64, 20})
        for (int64_t window : {0, 40}) {
          const std::vector<int32_t> lens = {0, 1, 17, 300, 1100};
          PagedSetup s = make_paged(lens, bs, Hkv, D, cdt);
          const int64_t B = lens.size();
          const auto q = test::rand_f32(B * Hq * D);
          std::vector<int32_t> cu_q(B + 1);
          std::iota(cu_q.begin(), cu_q.end(), 0);
          PagedAttentionArgs a = s.decode_args(q, Hq, D);
          AttentionParams p;
          p.window = window;
          std::vector<float> first;
          for (Isa isa : test::isas()) {
            std::vector<float> o(B * Hq * D, 123.0f);
            paged_attention(context(isa), a, TensorView(o.data(), DType::f32, {B, Hq, D}), p);
            // Float caches: bit-identical to flash (the decode kernel does load_kv + attend's
            // arithmetic). s8: the decode path's integer q.k (query quantised per row) differs
            // from flash on the dequantised keys; both are checked against the oracle below with
            // tolerances derived in the header comment instead.
            if (cdt != DType::s8) {
              ASSERT_EQ(o, flash_on_gathered(context(isa), s, q, cu_q, Hq, window)) << isa_name(isa) << " " << dtype_name(cdt);
            }
            if (first.empty()) first = o;
            ASSERT_EQ(o, first) << "ref vs " << isa_name(isa);
          }
          for (int64_t i = 0; i < Hq * D; ++i) ASSERT_EQ(first[i], 0.0f);  // context 0 gives zeros
          // And against the oracle on the values the cache holds.
          for (int64_t b = 0; b < B; ++b) {
            const Oracle want = naive(q.data() + b * Hq * D, 1, Hq, s.kc.data() + s.cu_k[b] * Hkv * D,
                                      s.vc.data() + s.cu_k[b] * Hkv * D, lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true,
                                      window, DType::f32, cdt == DType::s8);
            for (int64_t i = 0; i < Hq * D; ++i) ASSERT_NEAR(first[b * Hq * D + i], want.o[i], want.tol[i]);
          }
          if (cdt == DType::s8) {  // flash on the gathered keys, against the oracle (f32 tolerance)
            const auto fl = flash_on_gathered(test::default_context(), s, q, cu_q, Hq, window);
            for (int64_t b = 0; b < B; ++b) {
              const Oracle want = naive(q.data() + b * Hq * D, 1, Hq, s.kc.data() + s.cu_k[b] * Hkv * D,
                                        s.vc.data() + s.cu_k[b] * Hkv * D, lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true,
                                        window, DType::f32);
              for (int64_t i = 0; i < Hq * D; ++i) ASSERT_NEAR(fl[b * Hq * D + i], want.o[i], want.tol[i]);
            }
          }
        }
}

// paged_attention (f32 out) on every ISA: each equal to flash on the gathered keys and to the
// first ISA's (ref's) output bit for bit; that output is left in first.
void float_decode_all_isas(PagedSetup& s, const std::vector<float>& q, int64_t Hq, int64_t D, std::vector<float>& first) {
  const int64_t B = s.lens.size();
  std::vector<int32_t> cu_q(B + 1);
  std::iota(cu_q.begin(), cu_q.end(), 0);
  PagedAttentionArgs a = s.decode_args(q, Hq, D);
  first.clear();
  for (Isa isa : test::isas()) {
    std::vector<float> o(B * Hq * D, 123.0f);
    paged_attention(context(isa), a, TensorView(o.data(), DType::f32, {B, Hq, D}));
    ASSERT_EQ(o, flash_on_gathered(context(isa), s, q, cu_q, Hq, 0)) << isa_name(isa) << " Hq " << Hq << " D " << D;
    if (first.empty()) first = o;
    ASSERT_EQ(o, first) << "ref vs " << isa_name(isa) << " Hq " << Hq << " D " << D;
  }
}

TEST(PagedAttention, FloatDecodeOddGroupsAllIsasIdentical) {
  // The float decode kernel's row groups of R = 1, 2, 3 (GQA groups g = 3, 5, 6, 7: a group of 4
  // plus the rest) in the interleaved softmax and the P.V passes, head sizes with zmm / ymm /
  // tail passes (D = 40: 32 + 8; D = 100: 64 + 32 + 4 tail; D = 64), and the split merge
  // (1100 keys: two splits). Every ISA bit for bit, and equal to flash on the gathered keys.
  for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{6, 2}, {5, 1}, {12, 2}, {14, 2}})
    for (int64_t D : {40, 100, 64}) {
      const std::vector<int32_t> lens = {1, 77, 1100};
      PagedSetup s = make_paged(lens, 16, Hkv, D, DType::f16);
      const int64_t B = lens.size();
      const auto q = test::rand_f32(B * Hq * D);
      std::vector<float> first;
      ASSERT_NO_FATAL_FAILURE(float_decode_all_isas(s, q, Hq, D, first));
      for (int64_t b = 0; b < B; ++b) {
        const Oracle want = naive(q.data() + b * Hq * D, 1, Hq, s.kc.data() + s.cu_k[b] * Hkv * D, s.vc.data() + s.cu_k[b] * Hkv * D,
                                  lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true, 0, DType::f32);
        for (int64_t i = 0; i < Hq * D; ++i) ASSERT_NEAR(first[b * Hq * D + i], want.o[i], want.tol[i]);
      }
    }
}

TEST(PagedAttention, FloatDecodeRowGroupsOf4AllIsasIdentical) {
  // The AVX2 float decode's path for row groups of 4 (key-major scores of 3 / 2 / 1 keys per
  // pass, the key-pair softmax with an odd last key, P.V in sub-blocks of 16 keys with passes of
  // 3 / 2 / 1 chunks and the tail chunk): GQA 4 (32 / 8 heads, the real model) and 8 (two groups
  // per head), head sizes 128 (Tk 32: 3 + 3 + 3 + 3 + 2 + 2 chunks), 96 and 36 (4 chunks + a
  // tail of 4), tiles of 1-64 keys over 16- and 128-token blocks, all float cache dtypes. Every
  // ISA bit for bit, and equal to flash on the gathered keys (the same arithmetic).
  for (DType cdt : {DType::f32, DType::f16, DType::bf16})
    for (auto [Hq, Hkv, D] : {std::tuple<int64_t, int64_t, int64_t>{32, 8, 128}, {16, 2, 96}, {8, 1, 36}})
      for (int64_t bs : {16, 128}) {
        const std::vector<int32_t> lens = {1, 2, 3, 33, 95, 300};
        PagedSetup s = make_paged(lens, bs, Hkv, D, cdt);
        const auto q = test::rand_f32(lens.size() * Hq * D);
        std::vector<float> first;
        SCOPED_TRACE(dtype_name(cdt));
        ASSERT_NO_FATAL_FAILURE(float_decode_all_isas(s, q, Hq, D, first));
      }
}

TEST(PagedPrefill, EqualsFlashOnGatheredKeys) {
  const int64_t Hq = 4, Hkv = 1, D = 32;
  for (DType cdt : {DType::f16, DType::s8}) {
    // New tokens per sequence (cached prefix = lens - new): a fresh prompt, a chunk after a prefix,
    // a single token, none.
    const std::vector<int32_t> lens = {37, 90, 12, 8};
    const std::vector<int32_t> cu_q = {0, 37, 37 + 50, 37 + 50 + 1, 37 + 50 + 1};
    PagedSetup s = make_paged(lens, 8, Hkv, D, cdt);
    const int64_t Tq = cu_q.back(), B = lens.size();
    const auto q = test::rand_f32(Tq * Hq * D);
    PagedPrefillArgs a;
    a.q = TensorView(q.data(), DType::f32, {Tq, Hq, D});
    a.cu_seqlens_q = TensorView(cu_q.data(), DType::s32, {B + 1});
    a.cache = s.cache.view();
    a.block_tables = TensorView(s.tables.data(), DType::s32, {B, s.maxb});
    a.context_lens = TensorView(s.lens.data(), DType::s32, {B});
    std::vector<float> first;
    for (Isa isa : test::isas()) {
      std::vector<float> o(Tq * Hq * D);
      paged_prefill_attention(context(isa), a, TensorView(o.data(), DType::f32, {Tq, Hq, D}));
      // Bit-identical to flash, except for s8 sequences with a single new token: they take the
      // decode path's integer q.k (checked against the oracle below with its derived tolerance).
      const auto fl = flash_on_gathered(context(isa), s, q, cu_q, Hq, 0);
      for (int64_t b = 0; b < B; ++b)
        if (cdt != DType::s8 || cu_q[b + 1] - cu_q[b] != 1) {
          for (int64_t i = cu_q[b] * Hq * D; i < cu_q[b + 1] * Hq * D; ++i) ASSERT_EQ(o[i], fl[i]) << b << " " << i;
        }
      if (first.empty()) first = o;
      ASSERT_EQ(o, first);
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t Lq = cu_q[b + 1] - cu_q[b];
      const Oracle want = naive(q.data() + cu_q[b] * Hq * D, Lq, Hq, s.kc.data() + s.cu_k[b] * Hkv * D,
                                s.vc.data() + s.cu_k[b] * Hkv * D, lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true, 0,
                                DType::f32, cdt == DType::s8 && Lq == 1);
      for (int64_t i = 0; i < Lq * Hq * D; ++i) ASSERT_NEAR(first[cu_q[b] * Hq * D + i], want.o[i], want.tol[i]);
    }
  }
}

// The s8 decode over an int8 cache with block size bs, every ISA bit for bit and the oracle
// (derived tolerance). Key 0 of each head scores `sink` (q.k0 * scale) above ~0.
void int8_decode_check(const std::vector<int32_t>& lens, int64_t bs, int64_t Hq, int64_t Hkv, int64_t D, double sink) {
  const int64_t B = lens.size();
  const auto q = test::rand_f32(B * Hq * D);
  PagedSetup s = make_paged(lens, bs, Hkv, D, DType::f32);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* qr = q.data() + (b * Hq + h * (Hq / Hkv)) * D;
      double n2 = 0;
      for (int64_t d = 0; d < D; ++d) n2 += double(qr[d]) * qr[d];
      for (int64_t d = 0; d < D; ++d) s.kc[(s.cu_k[b] * Hkv + h) * D + d] = float(qr[d] * sink * std::sqrt(double(D)) / n2);
    }
  const int64_t T = s.cu_k.back();
  Cache c8(s.cache.nb, bs, Hkv, D, DType::s8);
  std::vector<int32_t> slots(T);
  for (int64_t b = 0, t = 0; b < B; ++b)
    for (int64_t j = 0; j < lens[b]; ++j, ++t) slots[t] = s.tables[b * s.maxb + j / bs] * bs + j % bs;
  reshape_and_cache(test::default_context(), TensorView(s.kc.data(), DType::f32, {T, Hkv, D}),
                    TensorView(s.vc.data(), DType::f32, {T, Hkv, D}), c8.view(), TensorView(slots.data(), DType::s32, {T}));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) {
        s.kc[(t * Hkv + h) * D + d] = c8.at(true, slots[t], h, d);
        s.vc[(t * Hkv + h) * D + d] = c8.at(false, slots[t], h, d);
      }
  PagedAttentionArgs a;
  a.q = TensorView(q.data(), DType::f32, {B, Hq, D});
  a.cache = c8.view();
  a.block_tables = TensorView(s.tables.data(), DType::s32, {B, s.maxb});
  a.context_lens = TensorView(s.lens.data(), DType::s32, {B});
  std::vector<float> first;
  for (Isa isa : test::isas()) {
    std::vector<float> o(B * Hq * D, 123.0f);
    paged_attention(context(isa), a, TensorView(o.data(), DType::f32, {B, Hq, D}));
    if (first.empty()) first = o;
    ASSERT_EQ(o, first) << "ref vs " << isa_name(isa) << " D " << D << " Hq/Hkv " << Hq << "/" << Hkv << " bs " << bs << " sink " << sink;
  }
  for (int64_t b = 0; b < B; ++b) {
    const Oracle want = naive(q.data() + b * Hq * D, 1, Hq, s.kc.data() + s.cu_k[b] * Hkv * D, s.vc.data() + s.cu_k[b] * Hkv * D,
                              lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true, 0, DType::f32, true);
    for (int64_t i = 0; i < Hq * D; ++i)
      ASSERT_NEAR(first[b * Hq * D + i], want.o[i], want.tol[i]) << "D " << D << " len " << lens[b] << " sink " << sink;
  }
}

TEST(PagedAttention, Int8DecodeOddShapesAllIsasIdentical) {
  // The s8 decode kernels (integer q.k and block-quantised integer P.V): every ISA bit for bit,
  // and the oracle with the derived tolerance, over head sizes 128 / 64 / 20 (a partial 32-dim
  // chunk), GQA groups 1, 3 and 8, and contexts around the 32-key weight blocks and the tiles
  // (1, 17, 31, 32, 33, 65, 130, 700: the last one split). Key 0 of each head is made to
  // dominate (score ~ +4: an attention sink), so the other weights of its block quantise coarsely.
  for (int64_t D : {128, 64, 20})
    for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{2, 2}, {6, 2}, {16, 2}})
      int8_decode_check({1, 17, 31, 32, 33, 65, 130, 700}, 16, Hq, Hkv, D, 4.0);
}

TEST(PagedAttention, Int8DecodeManyKvHeadsAllIsasIdentical) {
  // The s8 decode tiles with 8 and 10 KV heads per task (the AVX2 tile transposes the k / v
  // scales of 8 heads at a time in registers and takes the last 2 heads one by one), GQA groups
  // 4 and 2, head sizes 128 / 64 (the unrolled 16-dim steps), 48 (steps without a tail) and 100
  // (a 4-byte tail), block sizes 5 (tiles cutting blocks at odd offsets) and 128, contexts 1,
  // 33 (odd tile tails: a padding key in the last key pair), 301 and 1100 (key splits + merge).
  // Every ISA bit for bit, and the oracle with the tolerance derived for the s8 decode path.
  const std::vector<int32_t> lens = {1, 33, 301, 1100};
  for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{32, 8}, {20, 10}})
    for (int64_t D : {128, 64, 48, 100})
      for (int64_t bs : {5, 128}) {
        if (bs == 5 && (D == 64 || Hkv == 10)) continue;  // keep the test short: bs 5 once per head size
        PagedSetup s = make_paged(lens, bs, Hkv, D, DType::s8);
        const int64_t B = lens.size();
        const auto q = test::rand_f32(B * Hq * D);
        PagedAttentionArgs a = s.decode_args(q, Hq, D);
        std::vector<float> first;
        for (Isa isa : test::isas()) {
          std::vector<float> o(B * Hq * D, 123.0f);
          paged_attention(context(isa), a, TensorView(o.data(), DType::f32, {B, Hq, D}));
          if (first.empty()) first = o;
          ASSERT_EQ(o, first) << "ref vs " << isa_name(isa) << " D " << D << " Hq/Hkv " << Hq << "/" << Hkv << " bs " << bs;
        }
        for (int64_t b = 0; b < B; ++b) {
          const Oracle want = naive(q.data() + b * Hq * D, 1, Hq, s.kc.data() + s.cu_k[b] * Hkv * D, s.vc.data() + s.cu_k[b] * Hkv * D,
                                    lens[b], Hkv, D, 1.0f / std::sqrt(float(D)), true, 0, DType::f32, true);
          for (int64_t i = 0; i < Hq * D; ++i)
            ASSERT_NEAR(first[b * Hq * D + i], want.o[i], want.tol[i]) << "D " << D << " Hq/Hkv " << Hq << "/" << Hkv << " len " << lens[b];
        }
      }
}

TEST(PagedAttention, Int8KvAccuracyVsF32) {
  // Gaussian q/k/v, head size 128, 32/8 heads, 2048 keys: the int8 cache's output vs the f32
  // cache's (same inputs). Target of the issue: cosine similarity >= 0.999.
  const int64_t Hq = 32, Hkv = 8, D = 128, L = 2048;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> kf(L * Hkv * D), vf(L * Hkv * D), q(Hq * D);
  for (auto* vec : {&kf, &vf, &q})
    for (auto& x : *vec) x = nd(test::rng());
  std::vector<int32_t> slots(L), table(L / 16), lens = {static_cast<int32_t>(L)};
  std::iota(slots.begin(), slots.end(), 0);
  std::iota(table.begin(), table.end(), 0);
  std::vector<float> outs[2];
  int i = 0;
  for (DType cdt : {DType::f32, DType::s8}) {
    Cache c(L / 16, 16, Hkv, D, cdt);
    Context& ctx = test::default_context();
    reshape_and_cache(ctx, TensorView(kf.data(), DType::f32, {L, Hkv, D}), TensorView(vf.data(), DType::f32, {L, Hkv, D}), c.view(),
                      TensorView(slots.data(), DType::s32, {L}));
    PagedAttentionArgs a;
    a.q = TensorView(q.data(), DType::f32, {1, Hq, D});
    a.cache = c.view();
    a.block_tables = TensorView(table.data(), DType::s32, {1, L / 16});
    a.context_lens = TensorView(lens.data(), DType::s32, {1});
    outs[i].resize(Hq * D);
    paged_attention(ctx, a, TensorView(outs[i].data(), DType::f32, {1, Hq, D}));
    ++i;
  }
  double dot = 0, n0 = 0, n1 = 0, maxerr = 0;
  for (int64_t j = 0; j < Hq * D; ++j) {
    dot += double(outs[0][j]) * outs[1][j];
    n0 += double(outs[0][j]) * outs[0][j];
    n1 += double(outs[1][j]) * outs[1][j];
    maxerr = std::max(maxerr, std::fabs(double(outs[0][j]) - outs[1][j]));
  }
  const double cosine = dot / std::sqrt(n0 * n1);
  std::printf("[ int8 KV ] cosine %.6f, max abs error %.4g (output rms %.4g)\n", cosine, maxerr, std::sqrt(n0 / (Hq * D)));
  EXPECT_GE(cosine, 0.999);
}

TEST(CopyBlocks, CopiesKvAndScales) {
  Cache c(4, 2, 1, 8, DType::s8);
  for (size_t i = 0; i < c.k.size(); ++i) c.k[i] = static_cast<uint8_t>(i), c.v[i] = static_cast<uint8_t>(3 * i);
  for (size_t i = 0; i < c.ks.size(); ++i) c.ks[i] = float(i), c.vs[i] = float(-i);
  std::vector<int32_t> pairs = {1, 3, 0, 2};
  copy_blocks(test::default_context(), c.view(), TensorView(pairs.data(), DType::s32, {2, 2}));
  for (int64_t i = 0; i < 16; ++i) {
    ASSERT_EQ(c.k[3 * 16 + i], c.k[1 * 16 + i]);
    ASSERT_EQ(c.v[2 * 16 + i], c.v[i]);
  }
  ASSERT_EQ(c.ks[6], 2.0f);
  ASSERT_EQ(c.vs[4], -0.0f);
  std::vector<int32_t> bad = {1, 4}, chain = {0, 1, 1, 2};
  test::expect_error([&] { copy_blocks(test::default_context(), c.view(), TensorView(bad.data(), DType::s32, {1, 2})); },
                     {"copy_blocks", "block_pairs[0][1] = 4", "[0, num_blocks = 4)"});
  test::expect_error([&] { copy_blocks(test::default_context(), c.view(), TensorView(chain.data(), DType::s32, {2, 2})); },
                     {"copy_blocks", "destination"});
}

TEST(AttentionErrors, BadInputIsRejectedAndNothingWritten) {
  Context& ctx = test::default_context();
  const int64_t D = 8;
  std::vector<float> q(4 * 4 * D, 1.0f), k(6 * 2 * D, 1.0f), v(6 * 2 * D, 1.0f), o(4 * 4 * D, 9.0f);
  std::vector<int32_t> cq = {0, 1, 4}, ck = {0, 2, 6};
  auto args = [&]() {
    FlashAttentionArgs a;
    a.q = TensorView(q.data(), DType::f32, {4, 4, D});
    a.k = TensorView(k.data(), DType::f32, {6, 2, D});
    a.v = TensorView(v.data(), DType::f32, {6, 2, D});
    a.cu_seqlens_q = TensorView(cq.data(), DType::s32, {3});
    a.cu_seqlens_k = TensorView(ck.data(), DType::s32, {3});
    return a;
  };
  const TensorView ov(o.data(), DType::f32, {4, 4, D});
  {
    auto a = args();
    a.q = TensorView(q.data(), DType::f32, {4, 3, D});
    test::expect_error([&] { flash_attention(ctx, a, TensorView(o.data(), DType::f32, {4, 3, D})); },
                       {"flash_attention", "query heads (3)", "KV heads (2)"});
  }
  {
    auto a = args();
    a.v = TensorView(v.data(), DType::f32, {6, 2, 4});
    test::expect_error([&] { flash_attention(ctx, a, ov); }, {"flash_attention", "v", "head size 4", "not supported"});
    a = args();
    a.k = TensorView(k.data(), DType::f32, {6, 4, 4});
    test::expect_error([&] { flash_attention(ctx, a, ov); }, {"flash_attention", "k", "head size 4"});
  }
  for (auto [bad, frag] : {std::pair<std::vector<int32_t>, const char*>{{1, 1, 4}, "must start at 0"},
                           {{0, 3, 2}, "non-decreasing"},
                           {{0, 1, 3}, "must end at the token count"}}) {
    auto a = args();
    std::vector<int32_t> c = bad;
    a.cu_seqlens_q = TensorView(c.data(), DType::s32, {3});
    test::expect_error([&] { flash_attention(ctx, a, ov); }, {"flash_attention", "cu_seqlens_q", frag});
    a = args();
    a.cu_seqlens_k = TensorView(c.data(), DType::s32, {3});
    test::expect_error([&] { flash_attention(ctx, a, ov); }, {"flash_attention", "cu_seqlens_k"});
  }
  {
    auto a = args();
    std::vector<int32_t> c2 = {0, 6};
    a.cu_seqlens_k = TensorView(c2.data(), DType::s32, {2});
    test::expect_error([&] { flash_attention(ctx, a, ov); }, {"flash_attention", "cu_seqlens_k", "[B + 1]"});
  }
  for (float x : o) ASSERT_EQ(x, 9.0f);

  // Paged: cache 3 blocks x 4 tokens, 2 KV heads.
  Cache c(3, 4, 2, D, DType::f16);
  std::vector<float> kt(2 * 2 * D, 0.5f);
  std::vector<int32_t> slots = {0, 12};
  test::expect_error([&] { reshape_and_cache(ctx, TensorView(kt.data(), DType::f32, {2, 2, D}), TensorView(kt.data(), DType::f32, {2, 2, D}),
                                             c.view(), TensorView(slots.data(), DType::s32, {2})); },
                     {"reshape_and_cache", "slot_mapping[1] = 12", "12 slots"});
  std::vector<int32_t> dup = {5, 5};
  test::expect_error([&] { reshape_and_cache(ctx, TensorView(kt.data(), DType::f32, {2, 2, D}), TensorView(kt.data(), DType::f32, {2, 2, D}),
                                             c.view(), TensorView(dup.data(), DType::s32, {2})); },
                     {"reshape_and_cache", "slot 5 appears more than once"});
  for (uint8_t x : c.k) ASSERT_EQ(x, 0);
  Cache mixed(3, 4, 2, D, DType::f16);
  KvCache mv = mixed.view();
  std::vector<float> vf32(3 * 4 * 2 * D);
  mv.value_cache = TensorView(vf32.data(), DType::f32, {3, 4, 2, D});
  test::expect_error([&] { reshape_and_cache(ctx, TensorView(kt.data(), DType::f32, {2, 2, D}), TensorView(kt.data(), DType::f32, {2, 2, D}),
                                             mv, TensorView(slots.data(), DType::s32, {2})); },
                     {"reshape_and_cache", "value_cache is float32", "key_cache is float16"});
  Cache s8(3, 4, 2, D, DType::s8);
  KvCache s8v = s8.view();
  s8v.v_scale = TensorView();
  test::expect_error([&] { reshape_and_cache(ctx, TensorView(kt.data(), DType::f32, {2, 2, D}), TensorView(kt.data(), DType::f32, {2, 2, D}),
                                             s8v, TensorView(slots.data(), DType::s32, {1})); },
                     {"reshape_and_cache", "v_scale"});

  std::vector<float> qd(2 * 4 * D, 1.0f), od(2 * 4 * D, 9.0f);
  std::vector<int32_t> table = {0, 1, 2, 3}, lens = {5, 5};
  PagedAttentionArgs pa;
  pa.q = TensorView(qd.data(), DType::f32, {2, 4, D});
  pa.cache = c.view();
  pa.block_tables = TensorView(table.data(), DType::s32, {2, 2});
  pa.context_lens = TensorView(lens.data(), DType::s32, {2});
  const TensorView odv(od.data(), DType::f32, {2, 4, D});
  test::expect_error([&] { paged_attention(ctx, pa, odv); }, {"paged_attention", "block_tables[1][1] = 3", "num_blocks = 3"});
  lens = {9, 1};
  test::expect_error([&] { paged_attention(ctx, pa, odv); }, {"paged_attention", "context_lens[0] = 9", "8"});
  lens = {-1, 1};
  test::expect_error([&] { paged_attention(ctx, pa, odv); }, {"paged_attention", "context_lens[0] = -1"});
  lens = {5, 4};
  table = {0, 1, -1, 2};
  test::expect_error([&] { paged_attention(ctx, pa, odv); }, {"paged_attention", "block_tables[1][0] = -1"});
  table = {0, 1, 2, -1};  // padding past a context is not read: accepted
  pa.q = TensorView(qd.data(), DType::f32, {2, 3, D});
  test::expect_error([&] { paged_attention(ctx, pa, TensorView(od.data(), DType::f32, {2, 3, D})); },
                     {"paged_attention", "query heads (3)"});
  std::vector<float> q16(2 * 4 * 16);
  pa.q = TensorView(q16.data(), DType::f32, {2, 4, 16});
  test::expect_error([&] { paged_attention(ctx, pa, TensorView(q16.data(), DType::f32, {2, 4, 16})); },
                     {"paged_attention", "head size 16", "cache has 8"});
  pa.q = TensorView(qd.data(), DType::f32, {2, 4, D});
  pa.cache.value_cache = TensorView(vf32.data(), DType::f32, {3, 4, 2, D});
  test::expect_error([&] { paged_attention(ctx, pa, odv); }, {"paged_attention", "one dtype"});
  for (float x : od) ASSERT_EQ(x, 9.0f);
  pa.cache = c.view();
  paged_attention(ctx, pa, odv);  // the valid call works

  PagedPrefillArgs pp;
  std::vector<int32_t> cu = {0, 1, 2}, short_lens = {0, 4};
  pp.q = pa.q;
  pp.cu_seqlens_q = TensorView(cu.data(), DType::s32, {3});
  pp.cache = c.view();
  pp.block_tables = pa.block_tables;
  pp.context_lens = TensorView(short_lens.data(), DType::s32, {2});
  test::expect_error([&] { paged_prefill_attention(ctx, pp, odv); }, {"paged_prefill_attention", "context_lens[0] = 0", "new tokens"});
}

TEST(PagedAttention, Int8DecodeWideHeadsFarKeysAllIsasIdentical) {
  // The avx512 s8 decode's paths for D % 64 == 0 beyond the odd-shapes test: head sizes 192 / 256
  // (3 and 4 64-dim chunks, 16-key tiles) at block sizes 16 and 128, and a sink 120 above the
  // other scores at D 64 / 128, so their probabilities underflow: exp_qllm's clamp (2^-126
  // scales), and 32-key weight blocks that no row uses (skipped by every ISA's P.V).
  int8_decode_check({1, 16, 17, 40, 300}, 16, 8, 2, 256, 4.0);
  int8_decode_check({33, 200}, 128, 4, 1, 192, 4.0);
  int8_decode_check({100, 700}, 16, 8, 2, 64, 120.0);
  int8_decode_check({100, 300}, 128, 8, 2, 128, 120.0);
}

}  // namespace
}  // namespace qllm
