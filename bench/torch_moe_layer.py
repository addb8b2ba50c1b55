#!/usr/bin/env python3
"""A whole MoE block: qllm.MoeLayer (W8A8 experts) against the PyTorch fp32 eager block that
follows the Hugging Face modelling code (bench/hf_moe.py), same weights, same inputs, one run.

Shapes: DeepSeek-V3 (hidden 7168, expert intermediate 2048, top-8 of 8 groups / 4 kept, sigmoid,
1 shared expert) with --deepseek-experts routed experts (default 16: fp32 weights for 256 experts
would need 45 GB; the per-token work is the same, and fewer experts give the fp32 peer larger,
more efficient matmuls), and Qwen3-30B-A3B (hidden 2048, 128 experts, intermediate 768, top-8).
Balanced routing (random router weights). Machine limits from `build/qllm bench peak --json`.

    PYTHONPATH=build/python /usr/bin/python3 bench/torch_moe_layer.py [--tokens 1,8,64,512] [--json]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "build", "python"))
sys.path.insert(0, HERE)
import hf_moe  # noqa: E402
import qllm  # noqa: E402
from benchutil import machine_peak, median_ms  # noqa: E402


def weights(cfg, gen):
    h, E = cfg["hidden_size"], hf_moe.num_experts(cfg)
    I = cfg["moe_intermediate_size"]
    r = lambda *s: torch.randn(*s, generator=gen) / np.sqrt(s[-1])
    w = dict(router=r(E, h), gate_proj=r(E, I, h), up_proj=r(E, I, h), down_proj=r(E, h, I))
    Is = cfg.get("n_shared_experts", 0) * I
    if Is:
        w.update(shared_gate_proj=r(Is, h), shared_up_proj=r(Is, h), shared_down_proj=r(h, Is))
    if cfg.get("scoring_func") == "sigmoid":
        w["e_score_correction_bias"] = torch.rand(E, generator=gen) * 0.01
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--deepseek-experts", type=int, default=16)
    ap.add_argument("--models", default="deepseek-v3,qwen3-30b-a3b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    threads = qllm.info()["threads"]
    torch.set_num_threads(threads)
    peak = machine_peak(threads)
    models = {
        "deepseek-v3": dict(hidden_size=7168, n_routed_experts=a.deepseek_experts, num_experts_per_tok=8, n_group=8,
                            topk_group=4, norm_topk_prob=True, scoring_func="sigmoid", routed_scaling_factor=2.5,
                            moe_intermediate_size=2048, n_shared_experts=1),
        "qwen3-30b-a3b": dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                              moe_intermediate_size=768),
    }
    gen = torch.Generator().manual_seed(0)
    for name in a.models.split(","):
        cfg = models[name]
        w = weights(cfg, gen)
        layer = qllm.MoeLayer(cfg, w, experts="w8a8")
        h, k, I = cfg["hidden_size"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
        Is = cfg.get("n_shared_experts", 0) * I
        for T in [int(t) for t in a.tokens.split(",")]:
            x = torch.randn(T, h, generator=gen)
            t_q = median_ms(lambda: layer(x), a.reps, a.min_time)
            with torch.no_grad():
                t_t = median_ms(lambda: hf_moe.block(cfg, w, x), a.reps, a.min_time)
                ref = hf_moe.block(cfg, w, x.double()).numpy()
            y = layer(x)
            cos = float((y.ravel() @ ref.ravel()) / np.sqrt((y.ravel() @ y.ravel()) * (ref.ravel() @ ref.ravel())))
            ops = 2.0 * T * (3 * h * I * k + 3 * h * Is + h * hf_moe.num_experts(cfg))
            row = {
                "bench": "moe-layer-vs-torch",
                "case": {"model": name, "tokens": T, "experts": hf_moe.num_experts(cfg), "routing": "random", "threads": threads},
                "median_ms": t_q,
                "tokens_per_s": T / t_q * 1e3,
                "gops": ops / t_q / 1e6,
                "int8_peak_ratio": ops / t_q / 1e6 / peak["int8_gops"],
                "torch_fp32_ms": t_t,
                "torch_fp32_fma_peak_ratio": ops / t_t / 1e6 / peak["fma_gflops"],
                "speedup_vs_torch": t_t / t_q,
                "cosine_vs_fp64": cos,
            }
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{name:14s} T={T:4d}: qllm {t_q:9.2f} ms ({row['tokens_per_s']:9.1f} tok/s, int8 peak x{row['int8_peak_ratio']:.2f}) "
                      f"| torch fp32 eager {t_t:9.2f} ms (FMA peak x{row['torch_fp32_fma_peak_ratio']:.2f}) "
                      f"| speedup x{row['speedup_vs_torch']:.2f} | cosine {cos:.5f}", flush=True)
        del layer, w


if __name__ == "__main__":
    main()
