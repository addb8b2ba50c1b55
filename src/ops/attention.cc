// flash_attention, paged_attention, paged_prefill_attention, reshape_and_cache, copy_blocks
// (SPEC section 7). All three attention operators describe their sequences (query rows, key
// count, where the keys live) and run one driver: tasks of (sequence, KV head, block of query
// positions, key split) on the thread pool, each walking key tiles through the kernels of
// kernels/attention.h, then a merge of the key splits (flash-decoding) where there are several.
#include "qllm/ops/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/attention.h"
#include "kernels/kernels.h"
#include "kernels/ref/math.h"
#include "qllm/core/error.h"

namespace qllm {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t floats_aligned(int64_t n) { return static_cast<int64_t>(align_up(n * sizeof(float)) / sizeof(float)); }

// ---- argument checks -------------------------------------------------------------------------

int64_t index_at(const TensorView& t, int64_t i) {
  return t.dtype() == DType::s32 ? static_cast<int64_t>(t.data<int32_t>()[i]) : t.data<int64_t>()[i];
}

void check_index_vec(const char* op, const char* arg, const TensorView& t, int64_t n) {
  check::present(op, arg, t);
  if (t.dtype() != DType::s32 && t.dtype() != DType::s64)
    throw_invalid(op, arg, arg, " must be s32 or s64, got ", dtype_name(t.dtype()));
  if (n >= 0) check::shape(op, arg, t, {n});
  else {
    check::ndim(op, arg, t, 1);
    check::contiguous(op, arg, t);
  }
}

// cu_seqlens [B+1]: starts at 0, non-decreasing, ends at total.
void check_cu_seqlens(const char* op, const char* arg, const TensorView& cu, int64_t total, const char* total_name) {
  check_index_vec(op, arg, cu, -1);
  const int64_t n = cu.dim(0);
  if (n < 1) throw_invalid(op, arg, arg, " must have B + 1 >= 1 entries, got ", n);
  if (index_at(cu, 0) != 0) throw_invalid(op, arg, arg, "[0] = ", index_at(cu, 0), "; ", arg, " must start at 0");
  for (int64_t i = 1; i < n; ++i)
    if (index_at(cu, i) < index_at(cu, i - 1))
      throw_invalid(op, arg, arg, "[", i, "] = ", index_at(cu, i), " < ", arg, "[", i - 1, "] = ", index_at(cu, i - 1),
                    "; ", arg, " must be non-decreasing");
  if (index_at(cu, n - 1) != total)
    throw_invalid(op, arg, arg, "[", n - 1, "] = ", index_at(cu, n - 1), " but ", total_name, " = ", total, "; ", arg,
                  " must end at the token count");
}

void check_float3(const char* op, const char* arg, const TensorView& t) {
  check::present(op, arg, t);
  check::dtype_float(op, arg, t);
  check::ndim(op, arg, t, 3);
  check::contiguous(op, arg, t);
}

void check_heads(const char* op, int64_t Hq, int64_t Hkv) {
  if (Hkv < 1 || Hq < 1 || Hq % Hkv != 0)
    throw_invalid(op, "q", "the query heads (", Hq, ") must be a positive multiple of the KV heads (", Hkv, ")");
}

void check_params(const char* op, const AttentionParams& p) {
  if (!std::isfinite(p.scale)) throw_invalid(op, "scale", "scale must be finite, got ", p.scale);
  if (p.window < 0) throw_invalid(op, "window", "window must be >= 0 (0: none), got ", p.window);
}

struct CacheShape {
  int64_t num_blocks, block_size, Hkv, D;
  DType dt;
};

CacheShape check_cache(const char* op, const KvCache& c) {
  check::present(op, "key_cache", c.key_cache);
  check::present(op, "value_cache", c.value_cache);
  check::ndim(op, "key_cache", c.key_cache, 4);
  check::contiguous(op, "key_cache", c.key_cache);
  const DType dt = c.key_cache.dtype();
  if (!is_float(dt) && dt != DType::s8)
    throw_invalid(op, "key_cache", "key_cache must be f32, f16, bf16 or s8, got ", dtype_name(dt));
  if (c.value_cache.dtype() != dt)
    throw_invalid(op, "value_cache", "value_cache is ", dtype_name(c.value_cache.dtype()), " but key_cache is ", dtype_name(dt),
                  "; the two caches must have one dtype");
  const CacheShape s{c.key_cache.dim(0), c.key_cache.dim(1), c.key_cache.dim(2), c.key_cache.dim(3), dt};
  check::shape(op, "value_cache", c.value_cache, {s.num_blocks, s.block_size, s.Hkv, s.D});
  if (s.block_size < 1 || s.Hkv < 1 || s.D < 1)
    throw_invalid(op, "key_cache", "key_cache must have block_size, Hkv and D >= 1, got ", c.key_cache.shape_str());
  if (dt == DType::s8) {
    for (const auto& [t, name] : {std::pair<const TensorView&, const char*>{c.k_scale, "k_scale"}, {c.v_scale, "v_scale"}}) {
      if (!t.present()) throw_invalid(op, name, "an s8 cache needs ", name, " [num_blocks, block_size, Hkv] f32");
      check::dtype(op, name, t, DType::f32);
      check::shape(op, name, t, {s.num_blocks, s.block_size, s.Hkv});
    }
  } else if (c.k_scale.present() || c.v_scale.present()) {
    throw_invalid(op, c.k_scale.present() ? "k_scale" : "v_scale", "scales are only for s8 caches, but the cache is ",
                  dtype_name(dt));
  }
  return s;
}

// block_tables [B, max_blocks] s32, context_lens [B] s32; every entry a context reaches is a block.
void check_tables(const char* op, const TensorView& bt, const TensorView& cl, int64_t B, const CacheShape& cs) {
  check::present(op, "block_tables", bt);
  check::dtype(op, "block_tables", bt, DType::s32);
  check::ndim(op, "block_tables", bt, 2);
  check::shape(op, "block_tables", bt, {B, -1});
  check::present(op, "context_lens", cl);
  check::dtype(op, "context_lens", cl, DType::s32);
  check::shape(op, "context_lens", cl, {B});
  const int64_t maxb = bt.dim(1);
  const int32_t* t = bt.data<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = cl.data<int32_t>()[b];
    if (L < 0 || L > maxb * cs.block_size)
      throw_invalid(op, "context_lens", "context_lens[", b, "] = ", L, " is outside [0, max_blocks * block_size = ",
                    maxb * cs.block_size, "]");
    const int64_t used = (L + cs.block_size - 1) / cs.block_size;
    for (int64_t i = 0; i < used; ++i)
      if (t[b * maxb + i] < 0 || t[b * maxb + i] >= cs.num_blocks)
        throw_invalid(op, "block_tables", "block_tables[", b, "][", i, "] = ", t[b * maxb + i],
                      " is outside [0, num_blocks = ", cs.num_blocks, ")");
  }
}

// ---- the driver ------------------------------------------------------------------------------

struct Seq {
  int64_t q0 = 0, Lq = 0, Lk = 0;
  int64_t kv0 = 0;                  // contiguous keys: first token
  const int32_t* table = nullptr;   // paged keys: this sequence's block table row
  int64_t nsplit = 1;
  int64_t part_off = 0;             // floats into the split partials
};

struct Task {
  int64_t b, h0, h1, p0, p1, split, k0, k1;
};

// Everything the driver needs about one call.
struct Problem {
  const char* op;
  TensorView q, out;
  int64_t B, Hq, Hkv, D;
  float scale;
  bool causal;
  int64_t window;
  // keys/values
  const void* k;
  const void* v;
  const float* ks = nullptr;
  const float* vs = nullptr;
  DType kdt;
  bool paged;
  int64_t block_size = 0, block_stride = 0;  // paged only
  // per sequence: fills a Seq (q0, Lq, Lk, kv0 / table)
  const TensorView* cu_q = nullptr;  // null: one query per sequence (decode)
  const TensorView* cu_k = nullptr;  // contiguous keys
  const TensorView* block_tables = nullptr;
  const TensorView* context_lens = nullptr;

  int64_t g() const { return Hq / Hkv; }
  int64_t Dp() const { return (D + 7) / 8 * 8; }  // the kernels' 8-lane chunks; padding is zero
  // Keys per tile: K + V tiles of 2 * Tk * Dp f32 = 32 KB (L1) for D = 128.
  int64_t Tk() const { return std::clamp<int64_t>(4096 / Dp() / 8 * 8, 16, 128); }
  // Query positions per prefill task: ~256 rows (positions x head group) share each K/V tile
  // load. load_kv converts every tile once per task, so the row block sets how often a head's
  // K/V are converted: 64 rows spent ~9% of a D = 64 task in load_kv, 128 rows ~5% (2 threads,
  // f16, 4096 keys: 14.9 -> 14.4 ms per 16 tasks' worth of work; D = 128 27.4 -> 26.3 ms).
  // Session 8: once attend got faster (AVX2 12-chain kernels) the L3-fed load_kv was ~10-19%
  // of a 128-row D = 64 task (1-thread driver); 256 rows halve that (docs/design.md). The
  // 512-query benchmark still has 8 x 8 = 64 tasks for 2 threads.
  int64_t Mq() const { return std::max<int64_t>(1, 256 / g()); }
  int64_t R() const { return Mq() * g(); }
  // Sequences of at most this many queries are done by all-heads tasks (below); it stays at
  // ~64 rows per head, since such a task holds the state of every KV head's rows at once.
  int64_t Mq_all() const { return std::max<int64_t>(1, 64 / g()); }

  Seq seq(int64_t b) const {
    Seq s;
    if (cu_q) {
      s.q0 = index_at(*cu_q, b);
      s.Lq = index_at(*cu_q, b + 1) - s.q0;
    } else {
      s.q0 = b;
      s.Lq = 1;
    }
    if (cu_k) {
      s.kv0 = index_at(*cu_k, b);
      s.Lk = index_at(*cu_k, b + 1) - s.kv0;
    } else {
      s.Lk = context_lens->data<int32_t>()[b];
      s.table = block_tables->data<int32_t>() + b * block_tables->dim(1);
    }
    return s;
  }

  // A sequence whose queries fit one task (decode, short chunks) is done by tasks that cover all
  // KV heads of a key range: tile by tile, every head's rows of the same tokens are read, so the
  // cache (token-major: [block, token, head, D]) streams sequentially from DRAM instead of in
  // 2 KB strides. Flash-decoding: its keys are split into ranges, merged at the end, so that up
  // to ~16 tasks exist (both cores stream KV even for one sequence). Ranges hold >= 1024 keys
  // (and two from 513 keys on, so that both cores work): every task reads its first tile
  // without a prefetch ahead of it and converts / quantises all its rows' queries, and 512-key
  // ranges made one sequence 5-17% slower at 2k-8k keys with an int8 cache (avx512; f16 and
  // avx2 -3% to +7%; in-process A/B, 2 threads, docs/design.md session 8). Fixed by the
  // shapes, not the thread count, so results do not depend on it.
  bool all_heads(const Seq& s) const { return s.Lq <= Mq_all(); }
  int64_t nsplit(const Seq& s) const {
    if (!all_heads(s) || s.Lk <= 512) return 1;
    const int64_t most = std::max<int64_t>((s.Lk + 1023) / 1024, 2);
    return std::clamp<int64_t>((16 + B - 1) / B, 1, most);
  }
  // Heads whose state one task holds (the scratch is sized for it).
  int64_t heads_per_task() const {
    for (int64_t b = 0; b < B; ++b)
      if (all_heads(seq(b))) return Hkv;
    return 1;
  }

  kernels::KvSource source(const Seq& s, int64_t h) const {
    kernels::KvSource src;
    const int64_t es = dtype_size(kdt);
    src.dtype = kdt;
    src.token_stride = Hkv * D;
    src.tokens = s.Lk;
    if (paged) {
      src.k = static_cast<const uint8_t*>(k) + h * D * es;
      src.v = static_cast<const uint8_t*>(v) + h * D * es;
      if (ks) {
        src.k_scale = ks + h;
        src.v_scale = vs + h;
      }
      src.block_size = block_size;
      src.block_stride = block_stride;
      src.scale_token_stride = Hkv;
      src.scale_block_stride = block_size * Hkv;
      src.block_table = s.table;
    } else {
      src.k = static_cast<const uint8_t*>(k) + (s.kv0 * Hkv + h) * D * es;
      src.v = static_cast<const uint8_t*>(v) + (s.kv0 * Hkv + h) * D * es;
      src.block_size = int64_t{1} << 40;  // one "block" holds every token
      src.block_stride = 0;
    }
    return src;
  }
};

struct PlanSizes {
  int64_t tasks = 0, partial_floats = 0;
};

// Counts (tasks == nullptr) or fills the tasks and sequence table.
PlanSizes plan(const Problem& P, Seq* seqs, Task* tasks) {
  PlanSizes z;
  const int64_t Mq = P.Mq(), Tk = P.Tk(), g = P.g(), Dp = P.Dp();
  for (int64_t b = 0; b < P.B; ++b) {
    Seq s = P.seq(b);
    s.nsplit = P.nsplit(s);
    s.part_off = z.partial_floats;
    if (s.nsplit > 1) z.partial_floats += P.Hkv * s.nsplit * s.Lq * g * (Dp + 2);
    if (seqs) seqs[b] = s;
    // Split boundaries on tile multiples, so each split walks whole tiles.
    const int64_t chunk = s.nsplit > 1 ? ((s.Lk + s.nsplit - 1) / s.nsplit + Tk - 1) / Tk * Tk : s.Lk;
    const int64_t hstep = P.all_heads(s) ? P.Hkv : 1;
    for (int64_t h = 0; h < P.Hkv; h += hstep)
      for (int64_t p0 = 0; p0 < s.Lq; p0 += Mq)
        for (int64_t sp = 0; sp < s.nsplit; ++sp) {
          if (tasks)
            tasks[z.tasks] = Task{b, h, h + hstep, p0, std::min(p0 + Mq, s.Lq), sp, std::min(sp * chunk, s.Lk),
                                  s.nsplit > 1 ? std::min((sp + 1) * chunk, s.Lk) : s.Lk};
          ++z.tasks;
        }
  }
  return z;
}

// Per-thread scratch of one task, in floats (each piece 64-byte aligned).
struct ThreadLayout {
  int64_t q, acc, s, kt, vt, m, l, lo, hi, q16, qs, q8, total, rows_per_head;
  explicit ThreadLayout(const Problem& P) {
    // Rows of one task: a prefill block (R) or, for all-heads tasks, every KV head's rows of
    // a sequence of <= Mq_all queries (head h's state at row h * rows_per_head).
    const int64_t H = P.heads_per_task(), Dp = P.Dp(), Tk = P.Tk(), Dq = kernels::decode_q16_width(P.D);
    rows_per_head = H > 1 ? P.Mq_all() * P.g() : P.R();
    const int64_t R = std::max(P.R(), H * rows_per_head);
    int64_t off = 0;
    auto take = [&](int64_t n) { const int64_t o = off; off += floats_aligned(n); return o; };
    q = take(R * Dp);
    acc = take(R * Dp);
    s = take(R * Tk);  // attend pads score rows to 8 keys: Tk is a multiple of 8
    kt = take(Tk * Dp);
    vt = take(Tk * Dp);
    m = take(R);
    l = take(R);
    lo = take(2 * R);  // int64
    hi = take(2 * R);
    // s8 decode path: the quantised query rows (int16) and their scales, and one int8 row.
    const bool s8 = P.kdt == DType::s8;
    q16 = take(s8 ? R * Dq / 2 : 0);
    qs = take(s8 ? R : 0);
    q8 = take(s8 ? R * kernels::decode_q8_width(P.D) / 4 : 0);
    total = off;
  }
};

size_t workspace_bytes(const Problem& P, int threads) {
  const PlanSizes z = plan(P, nullptr, nullptr);
  WorkspacePlan w;
  w.add<Seq>(P.B);
  w.add<Task>(z.tasks);
  w.add<float>(z.partial_floats);
  w.add<float>(static_cast<size_t>(threads) * ThreadLayout(P).total);
  return w.bytes();
}

void run(Context& ctx, const Problem& P, Workspace* ws_in) {
  const int threads = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(workspace_bytes(P, threads));
  const PlanSizes z = plan(P, nullptr, nullptr);
  Seq* seqs = ws.alloc<Seq>(P.B, P.op);
  Task* tasks = ws.alloc<Task>(z.tasks, P.op);
  plan(P, seqs, tasks);
  float* part = ws.alloc<float>(z.partial_floats, P.op);
  const ThreadLayout TL(P);
  float* scratch = ws.alloc<float>(static_cast<size_t>(threads) * TL.total, P.op);

  const kernels::KernelTable& kt = ctx.kernels();
  const kernels::AttnKernels& ak = kernels::attn_kernels(ctx.isa());
  const int64_t g = P.g(), D = P.D, Dp = P.Dp(), Tk = P.Tk(), Hq = P.Hq;
  const float scale = P.scale;
  const DType qdt = P.q.dtype(), odt = P.out.dtype();
  const int64_t qes = dtype_size(qdt), oes = dtype_size(odt);

  ctx.pool().parallel_for(z.tasks, 1, [&](int64_t t0, int64_t t1, int tid) {
    float* base = scratch + tid * TL.total;
    float* q = base + TL.q;
    float* acc = base + TL.acc;
    float* s = base + TL.s;
    float* ktile = base + TL.kt;
    float* vtile = base + TL.vt;
    float* m = base + TL.m;
    float* l = base + TL.l;
    int64_t* lo = reinterpret_cast<int64_t*>(base + TL.lo);
    int64_t* hi = reinterpret_cast<int64_t*>(base + TL.hi);
    int16_t* q16 = reinterpret_cast<int16_t*>(base + TL.q16);
    float* qs = base + TL.qs;
    int8_t* q8 = reinterpret_cast<int8_t*>(base + TL.q8);
    const int64_t Dq = kernels::decode_q16_width(D), Dq8 = kernels::decode_q8_width(D);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& T = tasks[ti];
      const Seq& S = seqs[T.b];
      const int64_t rows = (T.p1 - T.p0) * g;
      // State of head h0 + i starts at row i * RH. Packed (RH = this task's rows, at most
      // TL.rows_per_head, for which the scratch is sized): at the full stride a decode task's
      // q / acc rows of the 8 KV heads sat 16-32 KB apart, all in the same few L1 sets.
      const int64_t RH = rows;
      int64_t kmin = S.Lk, kmax = 0;
      for (int64_t h = T.h0; h < T.h1; ++h)
        for (int64_t pi = T.p0; pi < T.p1; ++pi) {
          const int64_t pos = pi + S.Lk - S.Lq;  // the aligned position of this query
          const int64_t h_end = P.causal ? std::clamp<int64_t>(pos + 1, 0, S.Lk) : S.Lk;
          const int64_t l_beg = P.window > 0 ? std::clamp<int64_t>(pos - P.window + 1, 0, S.Lk) : 0;
          for (int64_t hh = 0; hh < g; ++hh) {
            const int64_t r = (h - T.h0) * RH + (pi - T.p0) * g + hh;
            lo[r] = l_beg;
            hi[r] = h_end;
            const uint8_t* src = P.q.data<uint8_t>() + ((S.q0 + pi) * Hq + h * g + hh) * D * qes;
            kt.to_f32(src, qdt, D, q + r * Dp);
            for (int64_t d = 0; d < D; ++d) q[r * Dp + d] = q[r * Dp + d] * scale;
            for (int64_t d = D; d < Dp; ++d) q[r * Dp + d] = 0.0f;
            m[r] = kNegInf;
            l[r] = 0.0f;
            std::memset(acc + r * Dp, 0, Dp * sizeof(float));
          }
          if (l_beg < h_end) {
            kmin = std::min(kmin, l_beg);
            kmax = std::max(kmax, h_end);
          }
        }
      const int64_t k0 = std::max(T.k0, kmin), k1 = std::min(T.k1, kmax);
      // One query position (decode, or a one-token chunk): every row of the task sees every key
      // of [k0, k1), and the decode kernel reads K/V straight from the cache rows. It computes
      // what load_kv + attend compute (bit for bit for float caches; s8 caches take the integer
      // q.k path with the query quantised per row here).
      const bool dec = T.p1 - T.p0 == 1;
      if (dec && P.kdt == DType::s8)
        for (int64_t h = T.h0; h < T.h1; ++h)
          for (int64_t r = (h - T.h0) * RH; r < (h - T.h0) * RH + rows; ++r) {
            int8_t* q8r = q8 + r * Dq8;
            qs[r] = kt.quantize_row(q + r * Dp, nullptr, D, q8r);
            for (int64_t d = D; d < Dq8; ++d) q8r[d] = 0;
            for (int64_t d = 0; d < Dq; ++d) q16[r * Dq + d] = d < D ? q8r[d] : 0;
          }
      for (int64_t j = k0; j < k1; j += Tk) {
        const int64_t n = std::min(Tk, k1 - j);
        if (dec) {  // all the task's heads at once (token-major reads)
          ak.decode(q, q16, q8, qs, rows, T.h1 - T.h0, RH, D, Dp, P.source(S, T.h0), j, n, Tk, s, ktile, m, l, acc);
          continue;
        }
        for (int64_t h = T.h0; h < T.h1; ++h) {
          const int64_t r0 = (h - T.h0) * RH;
          ak.load_kv(P.source(S, h), j, n, D, Dp, ktile, vtile);
          ak.attend(q + r0 * Dp, rows, Dp, ktile, vtile, n, j, lo + r0, hi + r0, s, m + r0, l + r0, acc + r0 * Dp);
        }
      }
      for (int64_t h = T.h0; h < T.h1; ++h) {
        const int64_t r0 = (h - T.h0) * RH;
        if (S.nsplit == 1) {
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t pi = T.p0 + r / g, hq = h * g + r % g;
            float* o = acc + (r0 + r) * Dp;
            const float lr = l[r0 + r];
            for (int64_t d = 0; d < D; ++d) o[d] = lr > 0.0f ? o[d] / lr : 0.0f;
            kt.from_f32(o, D, odt, P.out.mutable_data<uint8_t>() + ((S.q0 + pi) * Hq + hq) * D * oes);
          }
        } else {
          // Partial state of this split: [h][split][row] x (m, l, acc[Dp]).
          for (int64_t r = 0; r < rows; ++r) {
            float* dst = part + S.part_off + ((h * S.nsplit + T.split) * S.Lq * g + r) * (Dp + 2);
            dst[0] = m[r0 + r];
            dst[1] = l[r0 + r];
            std::memcpy(dst + 2, acc + (r0 + r) * Dp, Dp * sizeof(float));
          }
        }
      }
    }
  });

  // Merge the key splits: o = sum_s acc_s w_s / sum_s l_s w_s with w_s = exp(m_s - max m).
  // AttnKernels::merge per row: in split order, element-wise, the same bits for every ISA.
  if (z.partial_floats == 0) return;
  ctx.pool().parallel_for(P.B * P.Hkv, 1, [&](int64_t i0, int64_t i1, int tid) {
    float* o = scratch + tid * TL.total + TL.q;  // a free row of this thread's scratch
    for (int64_t i = i0; i < i1; ++i) {
      const Seq& S = seqs[i / P.Hkv];
      const int64_t h = i % P.Hkv;
      if (S.nsplit == 1) continue;
      for (int64_t r = 0; r < S.Lq * g; ++r) {
        ak.merge(part + S.part_off + (h * S.nsplit * S.Lq * g + r) * (Dp + 2), S.nsplit, S.Lq * g * (Dp + 2), D, o);
        const int64_t pi = r / g, hq = h * g + r % g;
        kt.from_f32(o, D, odt, P.out.mutable_data<uint8_t>() + ((S.q0 + pi) * Hq + hq) * D * oes);
      }
    }
  });
}

// ---- per-operator problem setup --------------------------------------------------------------

Problem flash_problem(const FlashAttentionArgs& a, const TensorView& out, const AttentionParams& p) {
  constexpr const char* op = "flash_attention";
  check_float3(op, "q", a.q);
  check_float3(op, "k", a.k);
  check_float3(op, "v", a.v);
  const int64_t Tq = a.q.dim(0), Hq = a.q.dim(1), D = a.q.dim(2);
  const int64_t Tk = a.k.dim(0), Hkv = a.k.dim(1);
  if (a.k.dim(2) != D) throw_invalid(op, "k", "k has head size ", a.k.dim(2), " but q has ", D, "; they must match");
  if (a.v.dim(2) != D)
    throw_invalid(op, "v", "v has head size ", a.v.dim(2), " but q/k have ", D,
                  "; a value head size different from the key head size is not supported");
  check::shape(op, "v", a.v, {Tk, Hkv, D});
  if (a.v.dtype() != a.k.dtype())
    throw_invalid(op, "v", "v is ", dtype_name(a.v.dtype()), " but k is ", dtype_name(a.k.dtype()), "; k and v must have one dtype");
  if (D < 1) throw_invalid(op, "q", "head size must be >= 1, got ", D);
  check_heads(op, Hq, Hkv);
  check_params(op, p);
  check_cu_seqlens(op, "cu_seqlens_q", a.cu_seqlens_q, Tq, "Tq");
  check_cu_seqlens(op, "cu_seqlens_k", a.cu_seqlens_k, Tk, "Tk");
  if (a.cu_seqlens_k.dim(0) != a.cu_seqlens_q.dim(0))
    throw_invalid(op, "cu_seqlens_k", "cu_seqlens_k has ", a.cu_seqlens_k.dim(0), " entries but cu_seqlens_q has ",
                  a.cu_seqlens_q.dim(0), "; both must be [B + 1]");
  check::present(op, "out", out);
  check::dtype_float(op, "out", out);
  check::shape(op, "out", out, {Tq, Hq, D});
  Problem P;
  P.op = op;
  P.q = a.q;
  P.out = out;
  P.B = a.cu_seqlens_q.dim(0) - 1;
  P.Hq = Hq;
  P.Hkv = Hkv;
  P.D = D;
  P.scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(D));
  P.causal = p.causal;
  P.window = p.window;
  P.k = a.k.raw();
  P.v = a.v.raw();
  P.kdt = a.k.dtype();
  P.paged = false;
  P.cu_q = &a.cu_seqlens_q;
  P.cu_k = &a.cu_seqlens_k;
  return P;
}

Problem paged_problem(const char* op, const TensorView& q, const TensorView* cu_q, const KvCache& cache,
                      const TensorView& bt, const TensorView& cl, const TensorView& out, const AttentionParams& p) {
  check_float3(op, "q", q);
  const CacheShape cs = check_cache(op, cache);
  const int64_t Tq = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  if (D != cs.D) throw_invalid(op, "q", "q has head size ", D, " but the cache has ", cs.D, "; they must match");
  check_heads(op, Hq, cs.Hkv);
  check_params(op, p);
  int64_t B = Tq;
  if (cu_q) {
    check_cu_seqlens(op, "cu_seqlens_q", *cu_q, Tq, "Tq");
    B = cu_q->dim(0) - 1;
  }
  check_tables(op, bt, cl, B, cs);
  if (cu_q)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t Lq = index_at(*cu_q, b + 1) - index_at(*cu_q, b);
      if (cl.data<int32_t>()[b] < Lq)
        throw_invalid(op, "context_lens", "context_lens[", b, "] = ", cl.data<int32_t>()[b], " < the ", Lq,
                      " new tokens of sequence ", b, "; context_lens counts the cached prefix plus the new tokens, which must be"
                      " in the cache already");
    }
  check::present(op, "out", out);
  check::dtype_float(op, "out", out);
  check::shape(op, "out", out, {Tq, Hq, D});
  Problem P;
  P.op = op;
  P.q = q;
  P.out = out;
  P.B = B;
  P.Hq = Hq;
  P.Hkv = cs.Hkv;
  P.D = D;
  P.scale = p.scale != 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(D));
  P.causal = true;  // decode: the one query is the last position, so causal == all keys
  P.window = p.window;
  P.k = cache.key_cache.raw();
  P.v = cache.value_cache.raw();
  if (cs.dt == DType::s8) {
    P.ks = cache.k_scale.data<float>();
    P.vs = cache.v_scale.data<float>();
  }
  P.kdt = cs.dt;
  P.paged = true;
  P.block_size = cs.block_size;
  P.block_stride = cs.block_size * cs.Hkv * cs.D;
  P.cu_q = cu_q;
  P.block_tables = &bt;
  P.context_lens = &cl;
  return P;
}

}  // namespace

// ---- public operators ------------------------------------------------------------------------

size_t flash_attention_workspace_size(Context& ctx, const FlashAttentionArgs& a, const AttentionParams& p) {
  TensorView dummy(nullptr, DType::f32, {a.q.present() ? a.q.dim(0) : 0, a.q.present() ? a.q.dim(1) : 0,
                                         a.q.present() ? a.q.dim(2) : 0});
  return workspace_bytes(flash_problem(a, dummy, p), ctx.threads());
}

void flash_attention(Context& ctx, const FlashAttentionArgs& a, const TensorView& out, const AttentionParams& p, Workspace* ws) {
  run(ctx, flash_problem(a, out, p), ws);
}

size_t paged_attention_workspace_size(Context& ctx, const PagedAttentionArgs& a, const AttentionParams& p) {
  TensorView dummy(nullptr, DType::f32, {a.q.present() ? a.q.dim(0) : 0, a.q.present() ? a.q.dim(1) : 0,
                                         a.q.present() ? a.q.dim(2) : 0});
  return workspace_bytes(paged_problem("paged_attention", a.q, nullptr, a.cache, a.block_tables, a.context_lens, dummy, p),
                         ctx.threads());
}

void paged_attention(Context& ctx, const PagedAttentionArgs& a, const TensorView& out, const AttentionParams& p, Workspace* ws) {
  run(ctx, paged_problem("paged_attention", a.q, nullptr, a.cache, a.block_tables, a.context_lens, out, p), ws);
}

size_t paged_prefill_attention_workspace_size(Context& ctx, const PagedPrefillArgs& a, const AttentionParams& p) {
  TensorView dummy(nullptr, DType::f32, {a.q.present() ? a.q.dim(0) : 0, a.q.present() ? a.q.dim(1) : 0,
                                         a.q.present() ? a.q.dim(2) : 0});
  return workspace_bytes(
      paged_problem("paged_prefill_attention", a.q, &a.cu_seqlens_q, a.cache, a.block_tables, a.context_lens, dummy, p),
      ctx.threads());
}

void paged_prefill_attention(Context& ctx, const PagedPrefillArgs& a, const TensorView& out, const AttentionParams& p,
                             Workspace* ws) {
  run(ctx, paged_problem("paged_prefill_attention", a.q, &a.cu_seqlens_q, a.cache, a.block_tables, a.context_lens, out, p),
      ws);
}

size_t reshape_and_cache_workspace_size(const TensorView& key, int threads) {
  const int64_t T = key.present() ? key.dim(0) : 0, D = key.present() && key.ndim() == 3 ? key.dim(2) : 0;
  WorkspacePlan w;
  w.add<int64_t>(T);                                               // sorted slots (duplicate check)
  w.add<float>(static_cast<size_t>(threads) * floats_aligned(D));  // one f32 row per thread
  return w.bytes();
}

void reshape_and_cache(Context& ctx, const TensorView& key, const TensorView& value, const KvCache& cache,
                       const TensorView& slot_mapping, Workspace* ws_in) {
  constexpr const char* op = "reshape_and_cache";
  const CacheShape cs = check_cache(op, cache);
  check_float3(op, "key", key);
  check_float3(op, "value", value);
  const int64_t T = key.dim(0);
  check::shape(op, "key", key, {T, cs.Hkv, cs.D});
  check::shape(op, "value", value, {T, cs.Hkv, cs.D});
  check_index_vec(op, "slot_mapping", slot_mapping, T);
  const int64_t nslots = cs.num_blocks * cs.block_size;
  for (int64_t i = 0; i < T; ++i)
    if (index_at(slot_mapping, i) >= nslots)
      throw_invalid(op, "slot_mapping", "slot_mapping[", i, "] = ", index_at(slot_mapping, i),
                    " is beyond the cache (num_blocks * block_size = ", nslots, " slots)");
  const int threads = ctx.threads();
  Workspace& ws = ws_in ? *ws_in : ctx.workspace(reshape_and_cache_workspace_size(key, threads));
  int64_t* sorted = ws.alloc<int64_t>(T, op);
  for (int64_t i = 0; i < T; ++i) sorted[i] = index_at(slot_mapping, i);
  std::sort(sorted, sorted + T);  // in place: no allocation
  for (int64_t i = 1; i < T; ++i)
    if (sorted[i] >= 0 && sorted[i] == sorted[i - 1])
      throw_invalid(op, "slot_mapping", "slot ", sorted[i], " appears more than once in slot_mapping; each token needs its own slot");
  const int64_t D = cs.D, rs = floats_aligned(D);
  float* scratch = ws.alloc<float>(static_cast<size_t>(threads) * rs, op);
  const kernels::KernelTable& kt = ctx.kernels();
  const int64_t ces = dtype_size(cs.dt);
  ctx.pool().parallel_for(T * cs.Hkv, 16, [&](int64_t i0, int64_t i1, int tid) {
    float* row = scratch + tid * rs;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / cs.Hkv, h = i % cs.Hkv;
      const int64_t slot = index_at(slot_mapping, t);
      if (slot < 0) continue;
      const int64_t cell = slot * cs.Hkv + h;  // (block, offset, head) flattened
      for (int kvi = 0; kvi < 2; ++kvi) {
        const TensorView& src = kvi == 0 ? key : value;
        const TensorView& dst = kvi == 0 ? cache.key_cache : cache.value_cache;
        const uint8_t* sp = src.data<uint8_t>() + (t * cs.Hkv + h) * D * dtype_size(src.dtype());
        uint8_t* dp = dst.mutable_data<uint8_t>() + cell * D * ces;
        kt.to_f32(sp, src.dtype(), D, row);
        if (cs.dt == DType::s8) {
          const TensorView& sc = kvi == 0 ? cache.k_scale : cache.v_scale;
          sc.mutable_data<float>()[cell] = kt.quantize_row(row, nullptr, D, reinterpret_cast<int8_t*>(dp));
        } else {
          kt.from_f32(row, D, cs.dt, dp);
        }
      }
    }
  });
}

void copy_blocks(Context& ctx, const KvCache& cache, const TensorView& pairs) {
  constexpr const char* op = "copy_blocks";
  const CacheShape cs = check_cache(op, cache);
  check::present(op, "block_pairs", pairs);
  check::dtype(op, "block_pairs", pairs, DType::s32);
  check::shape(op, "block_pairs", pairs, {-1, 2});
  const int64_t n = pairs.dim(0);
  const int32_t* p = pairs.data<int32_t>();
  for (int64_t i = 0; i < 2 * n; ++i)
    if (p[i] < 0 || p[i] >= cs.num_blocks)
      throw_invalid(op, "block_pairs", "block_pairs[", i / 2, "][", i % 2, "] = ", p[i], " is outside [0, num_blocks = ",
                    cs.num_blocks, ")");
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (p[2 * i + 1] == p[2 * j])
        throw_invalid(op, "block_pairs", "block ", p[2 * i + 1], " is the destination of pair ", i, " and the source of pair ", j,
                      "; a destination may not also be copied from");
  const int64_t per = cs.block_size * cs.Hkv;
  const int64_t bytes = per * cs.D * dtype_size(cs.dt);
  ctx.pool().parallel_for(n, 1, [&](int64_t i0, int64_t i1, int) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = p[2 * i], d = p[2 * i + 1];
      std::memcpy(cache.key_cache.mutable_data<uint8_t>() + d * bytes, cache.key_cache.data<uint8_t>() + s * bytes, bytes);
      std::memcpy(cache.value_cache.mutable_data<uint8_t>() + d * bytes, cache.value_cache.data<uint8_t>() + s * bytes, bytes);
      if (cs.dt == DType::s8) {
        std::memcpy(cache.k_scale.mutable_data<float>() + d * per, cache.k_scale.data<float>() + s * per, per * sizeof(float));
        std::memcpy(cache.v_scale.mutable_data<float>() + d * per, cache.v_scale.data<float>() + s * per, per * sizeof(float));
      }
    }
  });
}

}  // namespace qllm
