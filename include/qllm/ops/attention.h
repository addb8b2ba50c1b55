// Attention and the paged KV cache (SPEC section 7).
//
// All attention operators share one tiled kernel (FlashAttention-style online softmax over key
// tiles; extra memory O(rows x tile), never O(Lq x Lk)). Scores, softmax and the weighted sum
// are computed in f32 whatever the input dtypes; the output is rounded once to out's dtype.
// Query head h reads KV head h / (Hq / Hkv) (GQA; MQA is Hkv = 1). Causal masking aligns the
// ends of a sequence: query i of Lq sees keys j <= i + (Lk - Lq). A query that sees no key
// (an empty context, or a causal query with nothing before it) gets an output of zeros.
//
// Index arguments (cu_seqlens, slot_mapping, block_tables, context_lens) are fully validated
// before any work starts; rejected input raises qllm::Error and writes nothing.
#pragma once

#include <cstdint>

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"

namespace qllm {

struct AttentionParams {
  float scale = 0.0f;   // softmax scale; 0 means 1 / sqrt(D)
  bool causal = false;  // flash_attention only (paged decode is a single last query; prefill is causal)
  // Sliding window: a query at (aligned) position p sees only keys j > p - window (itself and the
  // window - 1 keys before it when causal). 0: no window.
  int64_t window = 0;
};

// ---- flash_attention: variable-length sequences packed back to back --------------------------
// q [Tq, Hq, D], k/v [Tk, Hkv, D] (f32/f16/bf16; k and v of one dtype), cu_seqlens_q/k [B+1]
// s32 or s64 (start at 0, non-decreasing, end at Tq / Tk). out [Tq, Hq, D] f32/f16/bf16.
struct FlashAttentionArgs {
  TensorView q, k, v;
  TensorView cu_seqlens_q, cu_seqlens_k;
};
void flash_attention(Context& ctx, const FlashAttentionArgs& args, const TensorView& out,
                     const AttentionParams& params = {}, Workspace* ws = nullptr);
size_t flash_attention_workspace_size(Context& ctx, const FlashAttentionArgs& args, const AttentionParams& params = {});

// ---- the paged KV cache ----------------------------------------------------------------------
// key_cache, value_cache [num_blocks, block_size, Hkv, D], both f32, f16, bf16 or s8. s8 caches
// carry k_scale, v_scale [num_blocks, block_size, Hkv] f32: one symmetric scale per token and
// head (SPEC section 0: q = rint(x * 127 / amax), scale = amax / 127), written by
// reshape_and_cache; attention dequantises tile by tile inside the kernel.
struct KvCache {
  TensorView key_cache, value_cache;
  TensorView k_scale, v_scale;  // s8 caches only

  // Views of contiguous caches in SPEC section 7's layout: key / value [num_blocks, block_size,
  // Hkv, D] of `dtype`; for s8, k_scale / v_scale [num_blocks, block_size, Hkv] f32.
  static KvCache of(const void* key, const void* value, DType dtype, int64_t num_blocks, int64_t block_size,
                    int64_t Hkv, int64_t D, const float* k_scale = nullptr, const float* v_scale = nullptr) {
    KvCache c;
    c.key_cache = TensorView(key, dtype, {num_blocks, block_size, Hkv, D});
    c.value_cache = TensorView(value, dtype, {num_blocks, block_size, Hkv, D});
    if (k_scale) c.k_scale = TensorView(k_scale, DType::f32, {num_blocks, block_size, Hkv});
    if (v_scale) c.v_scale = TensorView(v_scale, DType::f32, {num_blocks, block_size, Hkv});
    return c;
  }
};

// Writes token i of key/value [T, Hkv, D] (f32/f16/bf16) to slot slot_mapping[i] (s32 or s64):
// block slot / block_size, offset slot % block_size. Negative slots are skipped (padding);
// slots >= num_blocks * block_size and repeated slots are rejected.
void reshape_and_cache(Context& ctx, const TensorView& key, const TensorView& value, const KvCache& cache,
                       const TensorView& slot_mapping, Workspace* ws = nullptr);
size_t reshape_and_cache_workspace_size(const TensorView& key, int threads);

// Copies whole blocks (K, V and scales): block_pairs [n, 2] s32 of (src, dst), used for the
// copy-on-write of a shared block (engine/kv_block_allocator.h). A dst may not be any pair's src.
void copy_blocks(Context& ctx, const KvCache& cache, const TensorView& block_pairs);

// ---- paged_attention (decode: one new query per sequence) ------------------------------------
// q [B, Hq, D] f32/f16/bf16; block_tables [B, max_blocks] s32; context_lens [B] s32 in
// [0, max_blocks * block_size]. Sequence b attends to its first context_lens[b] cached tokens
// (token j in block block_tables[b][j / block_size]; the entries for those tokens must be in
// [0, num_blocks), entries past them are not read). out [B, Hq, D]. params.causal is ignored;
// params.window applies. Long contexts are split across threads (flash-decoding) and merged.
struct PagedAttentionArgs {
  TensorView q;
  KvCache cache;
  TensorView block_tables, context_lens;
};
void paged_attention(Context& ctx, const PagedAttentionArgs& args, const TensorView& out,
                     const AttentionParams& params = {}, Workspace* ws = nullptr);
size_t paged_attention_workspace_size(Context& ctx, const PagedAttentionArgs& args, const AttentionParams& params = {});

// ---- paged_prefill_attention (chunked prefill / prefix cache) ---------------------------------
// q [Tq, Hq, D] holds the new tokens of B sequences packed back to back (cu_seqlens_q [B+1]).
// Their keys and values must already be in the cache (reshape_and_cache), so sequence b's keys
// are its first context_lens[b] cached tokens: the cached prefix followed by the Lq_b new ones
// (context_lens[b] >= Lq_b). Attention is causal with the ends aligned: new token i sees keys
// j <= context_lens[b] - Lq_b + i. params.causal is ignored (always causal); window applies.
struct PagedPrefillArgs {
  TensorView q, cu_seqlens_q;
  KvCache cache;
  TensorView block_tables, context_lens;
};
void paged_prefill_attention(Context& ctx, const PagedPrefillArgs& args, const TensorView& out,
                             const AttentionParams& params = {}, Workspace* ws = nullptr);
size_t paged_prefill_attention_workspace_size(Context& ctx, const PagedPrefillArgs& args,
                                              const AttentionParams& params = {});

}  // namespace qllm
