#!/usr/bin/env python3
"""qllm's fused int8 expert FFN against PyTorch on the same data, in one run.

Peers (Debian python3-torch): the fp32 eager chain (x @ W1 -> silu(gate) * up -> @ W2^T) and
torch's dynamic int8 Linear (torch.ao.quantization.quantize_dynamic, fbgemm/oneDNN engine).
Machine limits come from `build/qllm bench peak --json`, run first in the same invocation.

    PYTHONPATH=build/python /usr/bin/python3 bench/torch_compare.py [--rows 1,16,64] [--json]
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
import qllm  # noqa: E402
from benchutil import machine_peak, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64,256,512", help="rows per expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k1", type=int, default=7168)
    ap.add_argument("--n1", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    G, k1, n1 = a.experts, a.k1, a.n1
    k2, n2 = n1 // 2, k1
    threads = qllm.info()["threads"]
    torch.set_num_threads(threads)

    peak = machine_peak(threads)
    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (G, k1, n1), dtype=np.int8)
    w2 = rng.integers(-127, 128, (G, n2, k2), dtype=np.int8)
    s1 = (rng.uniform(0.5, 1.5, (G, n1)) / (64 * 64 * np.sqrt(k1))).astype(np.float32)
    s2 = rng.uniform(1e-4, 2e-4, (G, n2)).astype(np.float32)
    packed = qllm.PackedExpertFFN(w1, s1, w2, s2)
    # The same weights in float32 (dequantised) for the torch peers.
    W1 = [torch.from_numpy(w1[g].astype(np.float32) * s1[g]) for g in range(G)]      # [k1, n1]
    W2 = [torch.from_numpy(w2[g].astype(np.float32) * s2[g][:, None]) for g in range(G)]  # [n2, k2]
    del w1, w2
    lin1, lin2 = [], []
    for g in range(G):
        l1 = torch.nn.Linear(k1, n1, bias=False)
        l1.weight.data = W1[g].T.contiguous()
        l2 = torch.nn.Linear(k2, n2, bias=False)
        l2.weight.data = W2[g].contiguous()
        lin1.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(l1), {torch.nn.Linear}, dtype=torch.qint8))
        lin2.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(l2), {torch.nn.Linear}, dtype=torch.qint8))
    weight_bytes = G * (k1 * n1 + n1 * 4 + n2 * k2 + n2 * 4)

    for rpe in [int(r) for r in a.rows.split(",")]:
        m = G * rpe
        x1 = rng.integers(-127, 128, (m, k1), dtype=np.int8)
        pts = rng.uniform(0.5, 1.5, m).astype(np.float32) / 127
        gl = np.arange(1, G + 1, dtype=np.int64) * rpe
        xf = torch.from_numpy(x1.astype(np.float32) * pts[:, None])

        def run_qllm():
            qllm.ops.gmm_deq_swiglu_quant_gmm_deq(x1, per_token_scale1=pts, group_list=gl, packed=packed)

        def run_fp32():
            with torch.no_grad():
                for g in range(G):
                    h = xf[g * rpe:(g + 1) * rpe] @ W1[g]
                    y = torch.nn.functional.silu(h[:, :k2]) * h[:, k2:]
                    _ = y @ W2[g].T

        def run_dyn():
            with torch.no_grad():
                for g in range(G):
                    h = lin1[g](xf[g * rpe:(g + 1) * rpe])
                    y = torch.nn.functional.silu(h[:, :k2]) * h[:, k2:]
                    _ = lin2[g](y)

        t_q = median_ms(run_qllm, a.reps, a.min_time)
        t_f = median_ms(run_fp32, a.reps, a.min_time)
        t_d = median_ms(run_dyn, a.reps, a.min_time)
        ops = 2.0 * m * (k1 * n1 + k2 * n2)
        row = {
            "bench": "moe-ffn-vs-torch",
            "case": {"experts": G, "rows_per_expert": rpe, "k1": k1, "n1": n1, "k2": k2, "n2": n2, "threads": threads},
            "median_ms": t_q,
            "gops": ops / t_q / 1e6,
            "int8_peak_ratio": ops / t_q / 1e6 / peak["int8_gops"],
            "dram_ratio": weight_bytes / t_q / 1e6 / peak["dram_gbps"],
            "torch_fp32_ms": t_f,
            "torch_dynamic_int8_ms": t_d,
            "torch_dynamic_int8_int8_peak_ratio": ops / t_d / 1e6 / peak["int8_gops"],
            "speedup_vs_torch_fp32": t_f / t_q,
            "speedup_vs_torch_dynamic_int8": t_d / t_q,
        }
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"rows/expert {rpe:4d}: qllm {t_q:9.2f} ms ({row['gops']:6.1f} GOP/s, int8 peak x{row['int8_peak_ratio']:.2f}, "
                  f"DRAM x{row['dram_ratio']:.2f}) | torch fp32 {t_f:9.2f} ms (x{row['speedup_vs_torch_fp32']:.2f}) | "
                  f"torch dynamic int8 {t_d:9.2f} ms (x{row['speedup_vs_torch_dynamic_int8']:.2f})", flush=True)


if __name__ == "__main__":
    main()
