// MoeLayer: a whole Mixture-of-Experts block in one call (DeepSeek-V3, Qwen2/3-MoE, Mixtral).
//
//   logits = x @ router^T (f32)  ->  moe_gating_topk  ->  moe_init_routing (+ per-token int8 quant)
//   -> experts: the fused W8A8 FFN (gmm_deq_swiglu_quant_gmm_deq), or float grouped matmuls
//   -> shared expert (DeepSeek: added; Qwen2-MoE: times sigmoid(x @ shared_expert_gate^T))
//   -> moe_finalize_routing: out[t] = shared[t] + sum_j w[t, j] * expert_out[t, j]
//
// The configuration mirrors the Hugging Face config fields of those models. Weights are
// converted and packed once (from_hf / from_packed); the packed experts are the only copy kept.
#pragma once

#include <memory>
#include <optional>

#include "qllm/core/context.h"
#include "qllm/core/tensor.h"
#include "qllm/ops/moe_routing.h"
#include "qllm/ops/packed.h"

namespace qllm {

struct MoeLayerConfig {
  int64_t hidden_size = 0;
  int64_t num_experts = 0;            // n_routed_experts (DeepSeek), num_experts (Qwen), num_local_experts (Mixtral)
  int64_t num_experts_per_tok = 1;
  int64_t n_group = 1;                // DeepSeek-V3 grouped selection (1: off)
  int64_t topk_group = 1;
  bool norm_topk_prob = false;
  ScoringFunc scoring_func = ScoringFunc::softmax;
  float routed_scaling_factor = 1.0f;
  int64_t moe_intermediate_size = 0;  // intermediate_size for Mixtral
  int64_t n_shared_experts = 0;       // DeepSeek: one shared FFN of n_shared_experts * moe_intermediate_size
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE: shared FFN with a sigmoid gate

  int64_t shared_intermediate() const {
    return shared_expert_intermediate_size > 0 ? shared_expert_intermediate_size : n_shared_experts * moe_intermediate_size;
  }
  bool shared_gated() const { return shared_expert_intermediate_size > 0; }
  // Throws qllm::Error (op "MoeLayer", argument = the field) when inconsistent.
  void validate() const;
};

enum class MoeExperts { w8a8, f32, bf16 };
MoeExperts parse_moe_experts(const char* name, const char* op);  // "w8a8" | "float32" | "bfloat16"

// Weights in the Hugging Face checkpoint layout (float32 or bfloat16).
struct MoeLayerHfWeights {
  TensorView router;                   // gate.weight [E, h]
  TensorView e_score_correction_bias;  // [E] f32, optional (DeepSeek-V3)
  TensorView gate_proj, up_proj;       // [E, I, h]  (Mixtral: w1, w3)
  TensorView down_proj;                // [E, h, I]  (Mixtral: w2)
  TensorView shared_gate_proj, shared_up_proj;  // [Is, h], when the config has a shared expert
  TensorView shared_down_proj;                   // [h, Is]
  TensorView shared_expert_gate;                 // [1, h], Qwen2-MoE
};

class MoeLayer {
 public:
  // Converts and packs HF weights for `isa`: W8A8 quantises every expert weight per output
  // channel (symmetric, SPEC section 0 formula over the input dimension); f32 / bf16 keep the
  // expert weights in that dtype. The router always runs in f32 (as the HF models do).
  static MoeLayer from_hf(const MoeLayerConfig& cfg, const MoeLayerHfWeights& w, MoeExperts experts,
                          Isa isa = default_isa());
  // W8A8 experts already in the fused operator's packed form (e.g. converted offline). The
  // router is [E, h] f32/bf16; shared_gate [1, h] for Qwen2-MoE-style configs.
  static MoeLayer from_packed(const MoeLayerConfig& cfg, const TensorView& router, const TensorView& e_score_correction_bias,
                              PackedExpertFFN experts, std::optional<PackedExpertFFN> shared,
                              const TensorView& shared_expert_gate, Isa isa = default_isa());

  const MoeLayerConfig& config() const { return cfg_; }
  MoeExperts experts_format() const { return format_; }
  // Bytes of all packed weights (router, experts, shared expert).
  size_t weight_bytes() const;
  // Bytes one routed expert's weights take (what a token that reaches it makes the layer read).
  size_t expert_bytes() const;
  size_t shared_bytes() const;
  size_t router_bytes() const;

  // x, out: [T, hidden] f32 or bf16 (out's dtype may differ from x's).
  size_t workspace_size(int64_t T, int threads) const;
  void forward(Context& ctx, const TensorView& x, const TensorView& out, Workspace* ws = nullptr) const;

 private:
  MoeLayer() = default;
  MoeLayerConfig cfg_;
  MoeExperts format_ = MoeExperts::w8a8;
  // Router (and the Qwen2 shared-expert gate as one extra column): [1, h, E(+1)] f32 panels.
  std::shared_ptr<const PackedWeight> router_;
  std::vector<float> bias_;  // e_score_correction_bias, empty if none
  std::shared_ptr<const PackedExpertFFN> q_experts_, q_shared_;
  // Float experts: gate|up as one [E, h -> 2I] weight, down [E, I -> h].
  std::shared_ptr<const PackedWeight> f_gate_up_, f_down_, f_shared_gate_up_, f_shared_down_;
};

}  // namespace qllm
