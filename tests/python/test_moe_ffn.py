"""The fused expert FFN against a PyTorch implementation of SPEC section 3, as a user would check it."""
import numpy as np
import pytest
import torch

import qllm

ops = qllm.ops


def torch_permute(w, T):
    """SPEC: reshape the last axis to (2, n1/T, T/2), swap the first two of those axes, flatten."""
    *lead, n1 = w.shape
    return w.reshape(*lead, 2, n1 // T, T // 2).transpose(-3, -2).reshape(*lead, n1)


def torch_dynamic_quant(y):
    amax = y.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(y * inv).clamp(-127, 127).to(torch.int8)
    return q, (amax / 127.0).squeeze(-1)


def torch_ffn(x1, w1, s1, pts, group_list, w2, s2, T):
    """SPEC section 3 in float32 torch: natural-order weights, then the per-row steps.
    Returns (out, total rows, h in natural order, q2, s2 per row)."""
    x1, w1, w2 = (torch.from_numpy(a).to(torch.int64) for a in (x1, w1, w2))
    s1, pts, s2 = (torch.from_numpy(a) for a in (s1, pts, s2))
    m, n2, n1 = x1.shape[0], w2.shape[1], w1.shape[2]
    out = torch.zeros(m, n2, dtype=torch.float32)
    hs = torch.zeros(m, n1, dtype=torch.float32)
    qs = torch.zeros(m, n1 // 2, dtype=torch.int8)
    ss = torch.zeros(m, dtype=torch.float32)
    start = 0
    for g, end in enumerate(group_list.tolist()):
        if end > start:
            acc1 = x1[start:end] @ w1[g]                                  # s32 exact (int64 here)
            h = (acc1.to(torch.float32) * s1[g]) * pts[start:end, None]
            if T:                                                         # undo the block permutation
                h = h.reshape(-1, n1 // T, 2, T // 2).transpose(1, 2).reshape(-1, n1)
            k2 = n1 // 2
            y = torch.nn.functional.silu(h[:, :k2]) * h[:, k2:]
            q, s = torch_dynamic_quant(y)
            acc2 = q.to(torch.int64) @ w2[g].T
            out[start:end] = (acc2.to(torch.float32) * s2[g]) * s[:, None]
            hs[start:end], qs[start:end], ss[start:end] = h, q, s
        start = end
    return out.numpy(), start, hs.numpy(), qs.numpy(), ss.numpy()


def make(m, k1, n1, n2, counts, seed=0):
    rng = np.random.default_rng(seed)
    G = len(counts)
    x1 = rng.integers(-128, 128, (m, k1), dtype=np.int8)
    w1 = rng.integers(-128, 128, (G, k1, n1), dtype=np.int8)
    w2 = rng.integers(-128, 128, (G, n2, n1 // 2), dtype=np.int8)
    s1 = rng.uniform(0.5, 2.0, (G, n1)).astype(np.float32) / (8192 * np.sqrt(k1))
    s2 = rng.uniform(1e-4, 1e-3, (G, n2)).astype(np.float32)
    pts = rng.uniform(0.5, 2.0, m).astype(np.float32)
    gl = np.cumsum(np.array(counts, dtype=np.int64))
    return x1, w1, s1, pts, gl, w2, s2


def step6_tolerance(w2, s2, s, rows, flips=2):
    """torch's exp differs from qllm's by an ulp or two, so a q2 value on a rounding boundary may
    come out one step apart; each such step moves out[r, c] by at most |w2| * scale2 * s2[r]."""
    return flips * 128.0 * np.abs(s2)[None, :] * s[:, None]


@pytest.mark.parametrize("m,k1,n1,n2,counts,perm", [
    (1, 100, 256, 40, [1], "n256"),
    (3, 7, 128, 17, [1, 0, 2], "n128"),
    (17, 100, 384, 33, [5, 0, 7], "n128"),
    (0, 32, 128, 8, [0], "n128"),
    (9, 33, 6, 5, [4, 5], "none"),
    (64, 256, 512, 96, [10, 0, 30, 24], "n256"),
])
def test_matches_torch(m, k1, n1, n2, counts, perm):
    x1, w1, s1, pts, gl, w2, s2 = make(m, k1, n1, n2, counts)
    T = {"none": 0, "n128": 128, "n256": 256}[perm]
    want, total, h, q_torch, s_rows = torch_ffn(x1, w1, s1, pts, gl, w2, s2, T)
    got = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, group_list_type="cumsum",
                                           weight_up_permute=perm, out_dtype="float32")
    assert got.dtype == np.float32 and got.shape == (m, n2)
    assert np.all(got[total:] == 0)
    # torch's exp and qllm's differ by an ulp or two, so a q2 value on a rounding boundary may
    # land one step apart. Count those steps per row with qllm's own swiglu_quant on torch's h.
    q_qllm, _ = ops.swiglu_quant(h)
    diff = np.abs(q_qllm[:total].astype(np.int32) - q_torch[:total])
    assert diff.max(initial=0) <= 1
    if total:
        assert diff.mean() < 0.01
    flips = diff.sum(axis=1)
    # Each step moves out[r, c] by at most 128 * scale2[g, c] * s2[r]; the rest is f32 rounding
    # of two products (2 ulp) on top of an s2[r] that may differ by an ulp or two (4 ulp).
    group_of_row = np.searchsorted(gl, np.arange(total), side="right")
    step = 128.0 * np.abs(s2[group_of_row]) * s_rows[:total, None]
    tol = flips[:, None] * step + 8 * np.finfo(np.float32).eps * np.abs(want[:total])
    assert np.all(np.abs(got[:total] - want[:total]) <= tol + 1e-30)


def test_f16_bf16_outputs_and_packed():
    x1, w1, s1, pts, gl, w2, s2 = make(20, 64, 256, 48, [8, 12])
    f32 = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, weight_up_permute="n256", out_dtype="float32")
    f16 = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, weight_up_permute="n256", out_dtype="float16")
    bf16 = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, weight_up_permute="n256", out_dtype="bfloat16")
    # The f16 / bf16 outputs are the f32 output rounded to nearest even, exactly.
    assert f16.dtype == np.float16 and np.array_equal(f16, f32.astype(np.float16))
    assert bf16.dtype == np.uint16
    # torch 1.13 cannot wrap uint16 arrays; the bits go through int16.
    assert torch.equal(torch.from_numpy(bf16.view(np.int16)).view(torch.bfloat16), torch.from_numpy(f32).to(torch.bfloat16))
    packed = qllm.PackedExpertFFN(w1, s1, w2, s2, weight_up_permute="n256")
    assert (packed.groups, packed.k1, packed.n1, packed.k2, packed.n2) == (2, 64, 256, 128, 48)
    again = ops.gmm_deq_swiglu_quant_gmm_deq(x1, per_token_scale1=pts, group_list=gl, packed=packed, out_dtype="float32")
    assert np.array_equal(again, f32)


def test_permute_helper_matches_torch_and_spec_layout():
    rng = np.random.default_rng(1)
    for T in (128, 256):
        w = rng.integers(-128, 128, (3, 10, 2 * T), dtype=np.int8)
        s = rng.random((3, 2 * T), dtype=np.float32)
        wp, sp = ops.permute_weight_up(w, s, T)
        assert np.array_equal(wp, torch_permute(torch.from_numpy(w), T).numpy())
        assert np.array_equal(sp, torch_permute(torch.from_numpy(s), T).numpy())
        # Natural weights with "none" and permuted ones with "n<T>" give the same bits.
        x1, _, s1, pts, gl, w2, s2 = make(5, 10, 2 * T, 8, [2, 3, 0])
        a = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w, s, pts, gl, w2, s2, weight_up_permute="none")
        b = ops.gmm_deq_swiglu_quant_gmm_deq(x1, wp, sp, pts, gl, w2, s2, weight_up_permute=f"n{T}")
        assert np.array_equal(a, b)


def test_equals_unfused_chain_and_single_expert():
    x1, w1, s1, pts, gl, w2, s2 = make(30, 96, 256, 40, [30])
    fused = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, out_dtype="float16")
    h = ops.grouped_matmul(x1, w1, gl, scale=s1, per_token_scale=pts, out_dtype="float32")
    q, s = ops.swiglu_quant(h)
    chain = ops.grouped_matmul(q, w2, gl, scale=s2, per_token_scale=s, transpose_w=True, out_dtype="float16")
    assert np.array_equal(fused, chain)
    single = ops.mm_deq_swiglu_quant_mm_deq(x1, w1[0], s1[0], pts, w2[0], s2[0], out_dtype="float16")
    assert np.array_equal(single, fused)


def test_torch_tensors_and_noncontiguous_inputs():
    x1, w1, s1, pts, gl, w2, s2 = make(12, 64, 256, 24, [5, 7])
    want = ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2)
    got = ops.gmm_deq_swiglu_quant_gmm_deq(*(torch.from_numpy(a) for a in (x1, w1, s1, pts, gl, w2, s2)))
    assert np.array_equal(want, got)
    wide = np.zeros((12, 128), np.int8)
    wide[:, ::2] = x1
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    assert np.array_equal(ops.gmm_deq_swiglu_quant_gmm_deq(strided, w1, s1, pts, gl, w2, s2), want)


@pytest.mark.parametrize("change,fragment", [
    (lambda a: a.update(x1=a["x1"].astype(np.float32)), "x1 must be int8, got float32"),
    (lambda a: a.update(scale1=a["scale1"][:, :-1]), "scale1 must have shape [2, 256], got [2, 255]"),
    (lambda a: a.update(group_list=np.array([6, 4])), "group_list[1] = 4 < group_list[0] = 6"),
    (lambda a: a.update(group_list=np.array([4, 9])), "exceeds m = 8"),
    (lambda a: a.update(group_list=np.array([8])), "group_list must have 2 entries"),
    (lambda a: a.update(group_list=np.array([4, 8], np.int32)), "group_list must be int64, got int32"),
    (lambda a: a.update(weight2=a["weight2"][:, :, :-1]), "weight2 must be [G, n2, k2] = [2, n2, 128]"),
    (lambda a: a.update(per_token_scale1=None), "per_token_scale1 is required"),
    (lambda a: a.update(scale2=None), "scale2 is required"),
    (lambda a: a.update(weight_up_permute="n512"), "weight_up_permute = 'n512'"),
    (lambda a: a.update(out_dtype="int8"), "out_dtype must be float16, bfloat16 or float32, got int8"),
])
def test_bad_input(change, fragment):
    x1, w1, s1, pts, gl, w2, s2 = make(8, 32, 256, 16, [4, 4])
    args = dict(x1=x1, weight1=w1, scale1=s1, per_token_scale1=pts, group_list=gl, weight2=w2, scale2=s2,
                weight_up_permute="n256")
    change(args)
    with pytest.raises(qllm.Error) as e:
        ops.gmm_deq_swiglu_quant_gmm_deq(**args)
    assert fragment in str(e.value)
    assert str(e.value).startswith("gmm_deq_swiglu_quant_gmm_deq: ")


def test_n1_not_multiple_of_T():
    x1, w1, s1, pts, gl, w2, s2 = make(4, 16, 384, 8, [4])
    with pytest.raises(qllm.Error, match="n1 = 384 must be a multiple of the permute block T = 256"):
        ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1, s1, pts, gl, w2, s2, weight_up_permute="n256")
    with pytest.raises(qllm.Error, match="must be even"):
        ops.gmm_deq_swiglu_quant_gmm_deq(x1, w1[:, :, :383], s1[:, :383], pts, gl, w2, s2)
