#!/usr/bin/env python3
"""qllm's weight-only quantised and 2:4 sparse matmuls against PyTorch on the same shapes, in one run.

Shapes: the bench wq-gemm / bench sparse24 ones (k = 7168, 14336; n = 4096; m = 1, 4, 16, 512).
qllm formats (weights packed once, as a serving engine would):
  w8       weight_quant_matmul, s8 per-channel scales, f16 x and out
  w4_g128  weight_quant_matmul, s4 with group 128 scales, f16 x and out
  s24_f16  sparse24_matmul, 2:4 pruned f16 values, f16 x and out
  s24_s8   sparse24_matmul, 2:4 pruned s8 values, s8 x (W8A8), per-channel/per-token scales, f32 out
PyTorch peers (Debian python3-torch 1.13, same thread count), on the dense weight of the same shape
(the dequantised / decompressed weight; a dense matmul's time does not depend on the values, so
each peer is timed once per (k, m) and shared by the formats):
  torch_fp32          torch.nn.functional.linear in float32
  torch_bf16          the same in bfloat16 (oneDNN)
  torch_dynamic_int8  torch.ao.quantization.quantize_dynamic int8 Linear (fbgemm; quantises x per
                      call), the peer of w8 and s24_s8
`speedup_vs_torch` is the fastest peer's time over qllm's. Every engine rotates over >= 128 MiB of
weight copies, one per call, so small m streams weights from DRAM rather than the 32 MB L3 (as the
C++ benchmarks do). Machine limits come from `build/qllm bench peak --json`, run first.

    PYTHONPATH=build/python /usr/bin/python3 bench/torch_wq_compare.py [--ks 7168] [--rows 1,4] [--json]
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "build", "python"))
sys.path.insert(0, HERE)
import qllm  # noqa: E402
from benchutil import machine_peak, median_ms  # noqa: E402

ops = qllm.ops
ROTATE_BYTES = 128 * 1024 * 1024
FORMATS = ["w8", "w4_g128", "s24_f16", "s24_s8"]


def copies_for(nbytes):
    return max(1, math.ceil(ROTATE_BYTES / nbytes))


class Rotating:
    """Calls fn(item) with the next of several weight copies on each call."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = items, fn, 0

    def __call__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return self.fn(item)


def build_qllm(fmt, w32, rng):
    """Packed weight copies, the call, the bytes one call reads (weight), and x's dtype tag."""
    n, k = w32.shape
    if fmt in ("w8", "w4_g128"):
        bits, gs = (8, 0) if fmt == "w8" else (4, 128)
        q, s, o = ops.quantize_weight(w32, bits=bits, group_size=gs, symmetric=True, transpose_w=True)
        first = qllm.PackedQuantWeight(q, s, o, group_size=gs, transpose_w=True)
        packs = [first] + [qllm.PackedQuantWeight(q, s, o, group_size=gs, transpose_w=True)
                           for _ in range(copies_for(first.nbytes) - 1)]
        return packs, (lambda x, pw: ops.weight_quant_matmul(x, packed_w=pw)), first.nbytes, "f16"
    if fmt == "s24_f16":
        values, meta = ops.prune_24(w32.astype(np.float16))
        first = qllm.PackedSparse24(values, meta)
        packs = [first] + [qllm.PackedSparse24(values, meta) for _ in range(copies_for(first.nbytes) - 1)]
        return packs, (lambda x, pk: ops.sparse24_matmul(x, packed=pk)), first.nbytes, "f16"
    # s24_s8: symmetric per-channel int8 weight, pruned 2:4.
    amax = np.abs(w32).max(axis=1, keepdims=True)
    w8 = np.clip(np.rint(w32 / amax * 127), -127, 127).astype(np.int8)
    scale = (amax[:, 0] / 127).astype(np.float32)
    values, meta = ops.prune_24(w8)
    first = qllm.PackedSparse24(values, meta)
    packs = [first] + [qllm.PackedSparse24(values, meta) for _ in range(copies_for(first.nbytes) - 1)]

    def call(xs, pk):
        x8, pts = xs
        return ops.sparse24_matmul(x8, packed=pk, scale=scale, per_token_scale=pts, out_dtype="float32")
    return packs, call, first.nbytes, "s8"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="7168,14336")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rows", default="1,4,16,512", help="m values")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--no-bf16", action="store_true", help="skip the torch bf16 peer")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    n = a.n
    rows = [int(r) for r in a.rows.split(",")]
    formats = a.formats.split(",")
    for f in formats:
        if f not in FORMATS:
            ap.error(f"unknown format {f}; choose from {FORMATS}")
    threads = qllm.info()["threads"]
    torch.set_num_threads(threads)

    peak = machine_peak(threads)
    if not a.json:
        print(f"threads {threads}; peak FMA {peak['fma_gflops']:.0f} GFLOP/s, int8 exact {peak['int8_exact_gops']:.0f} GOP/s, "
              f"DRAM {peak['dram_gbps']:.1f} GB/s", flush=True)

    rng = np.random.default_rng(0)
    for k in [int(v) for v in a.ks.split(",")]:
        w32 = (rng.standard_normal((n, k), dtype=np.float32) * 0.05).astype(np.float32)
        # Torch peers: dense weights of this shape, with copies for rotation.
        wt = torch.from_numpy(w32)
        t32 = [wt] + [wt.clone() for _ in range(copies_for(4 * n * k) - 1)]
        tb16 = []
        if not a.no_bf16:
            b = wt.to(torch.bfloat16)
            tb16 = [b] + [b.clone() for _ in range(copies_for(2 * n * k) - 1)]
        dyn = []
        if "w8" in formats or "s24_s8" in formats:
            for _ in range(copies_for(n * k)):
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.data = wt.clone()
                dyn.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
        qllm_w = {f: build_qllm(f, w32, rng) for f in formats}

        for m in rows:
            x32 = rng.standard_normal((m, k), dtype=np.float32)
            x16 = x32.astype(np.float16)
            x8 = np.clip(np.rint(x32 * 32), -127, 127).astype(np.int8)
            pts = np.full(m, 1 / 32, np.float32)
            xt32 = torch.from_numpy(x32)
            xtb = xt32.to(torch.bfloat16)
            with torch.no_grad():
                peers = {"torch_fp32": median_ms(Rotating(t32, lambda w: torch.nn.functional.linear(xt32, w)), a.reps, a.min_time)}
                if tb16:
                    peers["torch_bf16"] = median_ms(Rotating(tb16, lambda w: torch.nn.functional.linear(xtb, w)), a.reps, a.min_time)
                if dyn:
                    peers["torch_dynamic_int8"] = median_ms(Rotating(dyn, lambda mod: mod(xt32)), a.reps, a.min_time)
            for f in formats:
                packs, call, wbytes, xkind = qllm_w[f]
                xs = (x8, pts) if xkind == "s8" else x16
                t_q = median_ms(Rotating(packs, lambda pw: call(xs, pw)), a.reps, a.min_time)
                fpeers = {p: t for p, t in peers.items() if p != "torch_dynamic_int8" or f in ("w8", "s24_s8")}
                best = min(fpeers, key=fpeers.get)
                flops = 2.0 * m * n * k
                row = {"bench": "wq-vs-torch", "case": {"format": f, "m": m, "k": k, "n": n, "threads": threads},
                       "median_ms": t_q, "gflops": flops / t_q / 1e6}
                # gflops counts 2 m n k (dense-equivalent for the 2:4 formats). The W8A8 2:4 kernel
                # runs integer multiply-adds, so its limit is the exact int8 (vpmaddwd) peak.
                if xkind == "s8":
                    row["int8_exact_ratio"] = row["gflops"] / peak["int8_exact_gops"]
                else:
                    row["fma_peak_ratio"] = row["gflops"] / peak["fma_gflops"]
                if m <= 4:
                    nbytes = wbytes + x32.size * (1 if xkind == "s8" else 2)
                    row["gbps"] = nbytes / t_q / 1e6
                    row["dram_ratio"] = row["gbps"] / peak["dram_gbps"]
                for p, t in fpeers.items():
                    row[p + "_ms"] = t
                    row["speedup_vs_" + p] = t / t_q
                row["fastest_torch"] = best
                row["speedup_vs_torch"] = fpeers[best] / t_q
                if a.json:
                    print(json.dumps(row), flush=True)
                else:
                    peak_s = (f"int8 exact peak x{row['int8_exact_ratio']:.2f}" if xkind == "s8"
                              else f"FMA peak x{row['fma_peak_ratio']:.2f}")
                    lim = (f"{row['gbps']:6.1f} GB/s (DRAM x{row['dram_ratio']:.2f})" if m <= 4
                           else f"{row['gflops']:6.1f} GFLOP/s ({peak_s})")
                    ps = " | ".join(f"{p} {t:8.3f} ms" for p, t in fpeers.items())
                    print(f"k {k:5d} m {m:3d} {f:8s}: qllm {t_q:8.3f} ms {lim} | {ps} | speedup_vs_torch x{row['speedup_vs_torch']:.2f} ({best})",
                          flush=True)


if __name__ == "__main__":
    main()
