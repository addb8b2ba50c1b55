"""MoE routing operators and the whole MoE block against PyTorch.

The reference blocks follow the math of the Hugging Face modelling code (transformers'
DeepseekV3MoE, Qwen2MoeSparseMoeBlock, MixtralSparseMoeBlock), written here in float64 torch.
"""
import os
import sys

import numpy as np
import pytest
import torch

import qllm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import hf_moe  # noqa: E402  (the HF-style PyTorch MoE blocks, shared with the benchmark script)


def gate_torch(logits, k, scoring="softmax", bias=None, n_group=1, topk_group=1, renorm=False, scale=1.0):
    w, ids = hf_moe.gate(logits.double(), k, scoring, bias, n_group, topk_group, renorm, scale)
    return w.float(), ids.int()


def block_torch(cfg, w, x):
    return hf_moe.block(cfg, w, x.double())


CONFIGS = {
    "deepseek_v3": dict(hidden_size=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                        norm_topk_prob=True, scoring_func="sigmoid", routed_scaling_factor=2.5,
                        moe_intermediate_size=32, n_shared_experts=1),
    "qwen2_moe": dict(hidden_size=64, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False,
                      moe_intermediate_size=24, shared_expert_intermediate_size=48),
    "mixtral": dict(hidden_size=64, num_local_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                    intermediate_size=40),
}


def make_weights(cfg):
    h = cfg["hidden_size"]
    E = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    I = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    r = lambda *s: torch.randn(*s) / np.sqrt(s[-1])
    w = dict(router=r(E, h), gate_proj=r(E, I, h), up_proj=r(E, I, h), down_proj=r(E, h, I))
    if cfg.get("scoring_func") == "sigmoid":
        w["e_score_correction_bias"] = torch.rand(E) * 0.1
    Is = cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts", 0) * I
    if Is:
        w.update(shared_gate_proj=r(Is, h), shared_up_proj=r(Is, h), shared_down_proj=r(h, Is))
    if cfg.get("shared_expert_intermediate_size"):
        w["shared_expert_gate"] = r(1, h)
    return w


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("T", [1, 3, 17])
def test_moe_layer_matches_hf_block(name, T):
    cfg = CONFIGS[name]
    w = make_weights(cfg)
    x = torch.randn(T, cfg["hidden_size"])
    want = block_torch(cfg, w, x).numpy()
    f32 = qllm.MoeLayer(cfg, w, experts="float32")(x)
    # f32 accumulation over h + I <= 128 terms of O(1) values: errors of a few 1e-6.
    np.testing.assert_allclose(f32, want, rtol=1e-4, atol=1e-4)
    bf = qllm.MoeLayer(cfg, {k: v.bfloat16() if v.dim() > 1 else v for k, v in w.items()}, experts="bfloat16")(x)
    assert cosine(bf, want) > 0.999
    q = qllm.MoeLayer(cfg, w, experts="w8a8")
    y = q(x)
    # Four int8 roundings (x, w1, SwiGLU output, w2) of ~0.5-1% each, uncorrelated.
    assert cosine(y, want) > 0.999
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.05
    # bf16 in and out: the same block on the rounded input.
    xb = x.bfloat16()
    yb = torch.from_numpy(q(xb).view(np.int16)).view(torch.bfloat16).float().numpy()
    assert cosine(yb, q(xb.float())) > 0.9999


@pytest.mark.parametrize("scoring,n_group,topk_group,k,E,renorm", [
    ("softmax", 1, 1, 2, 8, True), ("softmax", 1, 1, 8, 128, True), ("softmax", 1, 1, 4, 60, False),
    ("sigmoid", 8, 4, 8, 64, True), ("sigmoid", 4, 1, 3, 12, False), ("softmax", 1, 1, 1, 1, False)])
def test_gating_matches_torch(scoring, n_group, topk_group, k, E, renorm):
    T = 33
    logits = torch.randn(T, E) * 3
    bias = torch.rand(E) * 0.1 if scoring == "sigmoid" else None
    w, ids = qllm.ops.moe_gating_topk(logits, k, scoring, bias, n_group, topk_group, renorm, 2.5)
    tw, tids = gate_torch(logits, k, scoring, bias, n_group, topk_group, renorm, 2.5)
    np.testing.assert_array_equal(ids, tids.numpy())
    np.testing.assert_allclose(w, tw.numpy(), rtol=2e-6, atol=1e-7)


def test_gating_ties_and_errors():
    w, ids = qllm.ops.moe_gating_topk(np.zeros((2, 6), np.float32), 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [0, 1, 2]])
    with pytest.raises(qllm.Error, match="top_k"):
        qllm.ops.moe_gating_topk(np.zeros((2, 6), np.float32), 7)
    with pytest.raises(qllm.Error, match="n_group"):
        qllm.ops.moe_gating_topk(np.zeros((2, 6), np.float32), 2, n_group=4)
    with pytest.raises(qllm.Error, match="topk_group"):
        qllm.ops.moe_gating_topk(np.zeros((2, 6), np.float32), 2, n_group=3, topk_group=4)
    with pytest.raises(qllm.Error, match="grouped selection"):
        qllm.ops.moe_gating_topk(np.zeros((2, 6), np.float32), 3, n_group=3, topk_group=1)


@pytest.mark.parametrize("quantize", [False, True])
def test_init_routing_matches_torch(quantize):
    T, k, E, h = 17, 4, 9, 37
    x = torch.randn(T, h)
    x[3] = 0
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    ex, idx, cnt, cum, src, scale = qllm.ops.moe_init_routing(x, ids, E, quantize=quantize)
    order = torch.sort(ids.flatten().long(), stable=True).indices
    np.testing.assert_array_equal(src, (order // k).numpy())
    np.testing.assert_array_equal(idx[order.numpy()], np.arange(T * k))
    np.testing.assert_array_equal(cnt, torch.bincount(ids.flatten().long(), minlength=E).numpy())
    np.testing.assert_array_equal(cum, np.cumsum(cnt))
    rows = x[order // k]
    if not quantize:
        np.testing.assert_array_equal(ex, rows.numpy())
    else:
        amax = rows.abs().amax(-1)
        q = torch.where(amax[:, None] > 0, torch.round(rows * (127.0 / amax[:, None])), torch.zeros_like(rows))
        np.testing.assert_array_equal(ex, q.to(torch.int8).numpy())
        np.testing.assert_array_equal(scale, (amax / 127).numpy())
    with pytest.raises(qllm.Error, match=r"expert_ids\[\d+\] = 9"):
        qllm.ops.moe_init_routing(x, torch.full((T, k), 9, dtype=torch.int32), E)


def routing(T, k, E):
    ids = torch.randint(0, E, (T, k))
    order = torch.sort(ids.flatten(), stable=True).indices
    cum = torch.cumsum(torch.bincount(ids.flatten(), minlength=E), 0)
    return order, cum, (order // k).int()


@pytest.mark.parametrize("direction", ["up", "down"])
def test_gmm_with_routing_int8_exact(direction):
    T, k, E, K, N = 13, 3, 5, 70, 40
    order, cum, index = routing(T, k, E)
    rows = T if direction == "up" else T * k
    ac = torch.randint(-128, 128, (rows, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (E, N, K), dtype=torch.int8)
    ns, ms = torch.rand(E, N) * 0.01, torch.rand(rows) * 0.1
    out = qllm.ops.grouped_matmul_with_routing(ac, w, cum, index, direction, k, True, ns, ms, "float32")
    expert = torch.searchsorted(cum, torch.arange(T * k), right=True)
    want = torch.zeros(T * k if direction == "up" else T, N)
    for i in range(T * k):
        e = expert[i]
        src = index[i] if direction == "up" else i
        acc = (ac[src].long() @ w[e].long().T).float()  # exact in int64, then SPEC's f32 scale order
        v = (acc * ms[src]) * ns[e]
        if direction == "up":
            want[i] = v
        else:
            want[index[i]] += v
    np.testing.assert_array_equal(out, want.numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gmm_with_routing_float_and_finalize(dtype):
    T, k, E, K, N = 11, 2, 4, 48, 33
    order, cum, index = routing(T, k, E)
    x = torch.randn(T, K).to(dtype)
    w = torch.randn(E, N, K).to(dtype)
    up = qllm.ops.grouped_matmul_with_routing(x, w, cum, index, "up", k, out_dtype="float32")
    expert = torch.searchsorted(cum, torch.arange(T * k), right=True)
    want = torch.stack([x[index[i]].double() @ w[expert[i]].double().T for i in range(T * k)])
    # f32 accumulation over K = 48 products of O(1) inputs.
    np.testing.assert_allclose(up, want.numpy(), rtol=1e-5, atol=1e-4)
    down = qllm.ops.grouped_matmul_with_routing(up.astype(np.float32), torch.randn(E, 7, N), cum, index, "down", k)
    assert down.shape == (T, 7)
    # combine: finalize the UP rows back per token with routing weights and a skip
    weights = torch.rand(T, k)
    pos = torch.empty(T * k, dtype=torch.int32)
    pos[order] = torch.arange(T * k, dtype=torch.int32)
    skip = torch.randn(T, N)
    out = qllm.ops.moe_finalize_routing(up, weights, pos, skip=skip)
    ref = skip.double() + (weights.double()[:, :, None] * torch.from_numpy(up).double()[pos.long()].view(T, k, N)).sum(1)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(qllm.Error, match="expert_index"):
        bad = index.clone()
        bad[0] = T
        qllm.ops.grouped_matmul_with_routing(x, w, cum, bad, "up", k)
    with pytest.raises(qllm.Error, match="expert_cumsum"):
        qllm.ops.grouped_matmul_with_routing(x, w, cum - 1, index, "up", k)
