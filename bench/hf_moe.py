"""PyTorch MoE blocks that follow the math of the Hugging Face modelling code (transformers'
DeepseekV3MoE, Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock): the
reference the tests compare qllm.MoeLayer with, and the eager peer of bench/torch_moe_layer.py.

Config dicts use the Hugging Face keys; weights use the checkpoint layouts
(router [E, h], gate_proj / up_proj [E, I, h], down_proj [E, h, I], shared_* [Is, h] / [h, Is],
shared_expert_gate [1, h]).
"""
import torch
import torch.nn.functional as F


def num_experts(cfg):
    return cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")


def gate(logits, k, scoring="softmax", bias=None, n_group=1, topk_group=1, renorm=False, scale=1.0):
    """Routing: (weights, ids), best first, ties to the lower id. Grouped selection keeps the
    topk_group groups with the best sum of their two best (bias-corrected) scores and masks the
    others with -inf (SPEC section 4: top-k inside the kept groups)."""
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    choice = scores + bias.to(scores.dtype) if bias is not None else scores.clone()
    T, E = choice.shape
    if n_group > 1:
        g = choice.view(T, n_group, E // n_group)
        gs = g.topk(min(2, E // n_group), dim=-1).values.sum(-1)
        order = torch.sort(-gs, dim=-1, stable=True).indices[:, :topk_group]
        mask = torch.zeros(T, n_group, dtype=torch.bool).scatter_(1, order, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.sort(-choice, dim=-1, stable=True).indices[:, :k]
    w = scores.gather(1, ids)
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale, ids


def expert(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def block(cfg, w, x):
    """The MoE block's forward in x's dtype (float64 for a reference, float32 for the peer)."""
    dt = x.dtype
    logits = x @ w["router"].to(dt).T
    tw, ids = gate(logits, cfg["num_experts_per_tok"], cfg.get("scoring_func", "softmax"), w.get("e_score_correction_bias"),
                   cfg.get("n_group", 1), cfg.get("topk_group", 1), cfg.get("norm_topk_prob", False),
                   cfg.get("routed_scaling_factor", 1.0))
    out = torch.zeros_like(x)
    for e in range(num_experts(cfg)):  # the HF loop over experts
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        y = expert(x[tok], w["gate_proj"][e].to(dt), w["up_proj"][e].to(dt), w["down_proj"][e].to(dt))
        out.index_add_(0, tok, y * tw[tok, slot, None].to(dt))
    if "shared_gate_proj" in w:
        s = expert(x, w["shared_gate_proj"].to(dt), w["shared_up_proj"].to(dt), w["shared_down_proj"].to(dt))
        if "shared_expert_gate" in w:
            s = torch.sigmoid(x @ w["shared_expert_gate"].to(dt).T) * s
        out = out + s
    return out
