"""Norms, rope, flash / paged attention and the KV cache against PyTorch.

Tolerances: the C++ tests derive the bound |o - o*| <= (2 max ds + (2 Lk + 10) u) max|v| for
qllm's f32 attention (u = 2^-24, ds the score error (D/8 + 4) u sum|q k| scale); PyTorch's own
f32 result errs by a comparable amount, so the comparisons below allow twice that bound.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qllm

ops = qllm.ops
U = 2.0 ** -24


def attn_tol(q, k, v, Lk, q_int8=False):
    D = q.shape[-1]
    ds = (D / 8 + 4) * U * float((q.abs().max() * k.abs().max()) * D / math.sqrt(D))
    if q_int8:  # int8-KV decode quantises the scaled query per row: <= 0.51 step per element
        ds += 0.51 * float(q.abs().max()) / math.sqrt(D) / 127 * D * float(k.abs().max()) + 3 * U * ds / U
    return 2 * ((2 * ds + (2 * Lk + 10) * U) * float(v.abs().max())) + 1e-7


def sdpa(q, k, v, is_causal):
    """torch.nn.functional.scaled_dot_product_attention where this torch has it (2.0+); torch 1.13
    (Debian's) lacks it, so the same math in torch's f32 ops: softmax(q k^T / sqrt(D) + mask) v."""
    f = getattr(F, "scaled_dot_product_attention", None)
    if f is not None:
        return f(q, k, v, is_causal=is_causal)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        L, S = q.shape[-2], k.shape[-2]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def naive_attention(q, k, v, causal, window=0):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D], ends aligned, in float64."""
    Lq, Hq, D = q.shape
    Lk, Hkv, _ = k.shape
    g = Hq // Hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) / math.sqrt(D)
    pos = torch.arange(Lq)[:, None] + (Lk - Lq)
    j = torch.arange(Lk)[None, :]
    mask = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        mask &= j <= pos
    if window:
        mask &= j > pos - window
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see nothing give 0, like qllm
    return torch.einsum("hqk,khd->qhd", p, vv)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("D", [16, 64, 100])
def test_flash_attention_vs_sdpa(Hq, Hkv, D):
    lens = [1, 17, 64]
    T = sum(lens)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    for causal in (False, True):
        o = torch.from_numpy(ops.flash_attention(q, k, v, cu, cu, causal=causal))
        for b, L in enumerate(lens):
            s = slice(cu[b], cu[b + 1])
            kk = k[s].repeat_interleave(Hq // Hkv, dim=1)
            vv = v[s].repeat_interleave(Hq // Hkv, dim=1)
            want = sdpa(q[s].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                                  is_causal=causal).transpose(0, 1)
            torch.testing.assert_close(o[s], want, rtol=0, atol=attn_tol(q[s], k[s], v[s], L))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attention_aligned_causal_window_half(dtype):
    # Lq < Lk (chunked prefill: ends aligned) and a sliding window, f16/bf16 inputs.
    Lq, Lk, Hq, Hkv, D = 20, 90, 8, 2, 64
    q, k, v = (torch.randn(Lq, Hq, D).to(dtype), torch.randn(Lk, Hkv, D).to(dtype), torch.randn(Lk, Hkv, D).to(dtype))
    cq, ck = np.array([0, Lq], np.int32), np.array([0, Lk], np.int32)
    for window in (0, 7):
        o = ops.flash_attention(q, k, v, cq, ck, causal=True, window=window, out_dtype="f32")
        want = naive_attention(q.float(), k.float(), v.float(), True, window)
        torch.testing.assert_close(torch.from_numpy(o).double(), want, rtol=0,
                                   atol=attn_tol(q.float(), k.float(), v.float(), Lk))
    o16 = ops.flash_attention(q, k, v, cq, ck, causal=True)
    if dtype == torch.bfloat16:  # bfloat16 comes back as its bits (np.uint16)
        o16 = torch.from_numpy(o16.view(np.int16)).view(torch.bfloat16)
    else:
        o16 = torch.from_numpy(o16)
    assert o16.dtype == dtype


def make_cache(lens, bs, Hkv, D, dtype):
    nb = sum((L + bs - 1) // bs for L in lens) + 2
    perm = np.random.permutation(nb).astype(np.int32)
    maxb = max((L + bs - 1) // bs for L in lens) + 1
    tables = np.full((len(lens), maxb), -1, np.int32)
    slots, nxt = [], 0
    for b, L in enumerate(lens):
        for i in range((L + bs - 1) // bs):
            tables[b, i] = perm[nxt]
            nxt += 1
        slots += [tables[b, j // bs] * bs + j % bs for j in range(L)]
    T = sum(lens)
    k, v = torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    if dtype == "int8":
        kc = np.zeros((nb, bs, Hkv, D), np.int8)
        vc = np.zeros_like(kc)
        ks = np.zeros((nb, bs, Hkv), np.float32)
        vs = np.zeros_like(ks)
    else:
        kc = np.zeros((nb, bs, Hkv, D), np.float16)
        vc = np.zeros_like(kc)
        ks = vs = None
    ops.reshape_and_cache(k, v, kc, vc, np.array(slots, np.int32), ks, vs)
    return k, v, kc, vc, ks, vs, tables, np.array(slots)


def test_reshape_and_cache_int8_formula():
    k, v, kc, vc, ks, vs, tables, slots = make_cache([5, 9], 4, 2, 16, "int8")
    bs, Hkv = 4, 2
    for t, slot in enumerate(slots):
        for h in range(Hkv):
            x = k[t, h]
            amax = x.abs().max()
            scale = amax / 127
            qv = torch.round(x * (127 / amax)).clamp(-127, 127).to(torch.int8)
            assert torch.equal(torch.from_numpy(kc[slot // bs, slot % bs, h]), qv)
            assert ks[slot // bs, slot % bs, h] == pytest.approx(float(scale), rel=1e-6)


@pytest.mark.parametrize("kv", ["f16", "int8"])
def test_paged_attention_decode(kv):
    lens, bs, Hq, Hkv, D = [0, 1, 33, 300], 16, 8, 2, 64
    k, v, kc, vc, ks, vs, tables, slots = make_cache(lens, bs, Hkv, D, kv)
    q = torch.randn(len(lens), Hq, D)
    o = torch.from_numpy(ops.paged_attention(q, kc, vc, tables, np.array(lens, np.int32), ks, vs))
    start = 0
    for b, L in enumerate(lens):
        # Oracle over the values the cache holds (f16-rounded or dequantised int8).
        idx = slots[start:start + L]
        if kv == "int8":
            kd = torch.from_numpy(kc[idx // bs, idx % bs]).float() * torch.from_numpy(ks[idx // bs, idx % bs])[..., None]
            vd = torch.from_numpy(vc[idx // bs, idx % bs]).float() * torch.from_numpy(vs[idx // bs, idx % bs])[..., None]
        else:
            kd = torch.from_numpy(kc[idx // bs, idx % bs]).float()
            vd = torch.from_numpy(vc[idx // bs, idx % bs]).float()
        want = naive_attention(q[b:b + 1], kd, vd, True)
        if L == 0:
            assert torch.all(o[b] == 0)
        else:
            torch.testing.assert_close(o[b:b + 1].double(), want, rtol=0, atol=attn_tol(q, kd, vd, L, kv == "int8"))
            if kv == "int8":  # vs the unquantised f32 keys/values: the int8 KV accuracy target
                exact = naive_attention(q[b:b + 1], k[start:start + L], v[start:start + L], True)
                cos = F.cosine_similarity(o[b].double().flatten(), exact.flatten(), dim=0)
                assert cos >= 0.999
        start += L


def test_paged_prefill_vs_naive():
    lens, bs, Hq, Hkv, D = [40, 70], 8, 4, 2, 32
    new = [40, 25]  # a fresh prompt; a 25-token chunk after a 45-token cached prefix
    k, v, kc, vc, ks, vs, tables, slots = make_cache(lens, bs, Hkv, D, "f16")
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = torch.randn(int(cu[-1]), Hq, D)
    o = torch.from_numpy(ops.paged_prefill_attention(q, cu, kc, vc, tables, np.array(lens, np.int32)))
    start = 0
    for b, L in enumerate(lens):
        idx = slots[start:start + L]
        kd = torch.from_numpy(kc[idx // bs, idx % bs]).float()
        vd = torch.from_numpy(vc[idx // bs, idx % bs]).float()
        want = naive_attention(q[cu[b]:cu[b + 1]], kd, vd, True)
        torch.testing.assert_close(o[cu[b]:cu[b + 1]].double(), want, rtol=0, atol=attn_tol(q, kd, vd, L))
        start += L


def test_block_manager_copy_on_write():
    m = qllm.KvBlockManager(4, 4)
    m.add_sequence(0)
    slots, copies = m.append(0, 6)
    assert list(slots) == [0, 1, 2, 3, 4, 5] and copies.shape == (0, 2)
    m.fork(0, 1)
    slots, copies = m.append(1, 1)
    assert copies.tolist() == [[1, int(m.block_table(1)[1])]]
    with pytest.raises(qllm.Error, match="exhausted"):
        m.append(0, 100)
    assert m.length(0) == 6


def rms_ref(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


@pytest.mark.parametrize("h", [1, 17, 4096])
def test_norms_vs_torch(h):
    x, g, b, r = torch.randn(5, h), torch.rand(h) + 0.5, torch.randn(h), torch.randn(5, h)
    # f32 sums of h terms: (h/8 + 8) u relative (see tests/test_norm.cc), doubled for torch's own error.
    tol = 2 * (h / 8 + 8) * U
    torch.testing.assert_close(torch.from_numpy(ops.rms_norm(x, g, 1e-6)), rms_ref(x.double(), g.double(), 1e-6).float(),
                               rtol=tol, atol=tol)
    y, r2 = ops.add_rms_norm(x, r, g, 1e-6)
    torch.testing.assert_close(torch.from_numpy(r2), r + x, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(y), rms_ref((r + x).double(), g.double(), 1e-6).float(), rtol=tol, atol=tol)
    want = F.layer_norm(x.double(), (h,), g.double(), b.double(), 1e-5).float()
    scale = float(x.abs().max()) / float(x.std(unbiased=False, dim=-1).min() + 1e-3)
    torch.testing.assert_close(torch.from_numpy(ops.layer_norm(x, g, b, 1e-5)), want, rtol=tol, atol=tol * (1 + 4 * scale))
    bf = x.to(torch.bfloat16)
    yb = torch.from_numpy(ops.rms_norm(bf, g.to(torch.bfloat16), 1e-6).view(np.int16)).view(torch.bfloat16)
    torch.testing.assert_close(yb.float(), rms_ref(bf.double(), g.to(torch.bfloat16).double(), 1e-6).float(),
                               rtol=2 ** -8, atol=1e-30)


def rope_ref(x, pos, theta, rd, style):
    x = x.double().clone()
    half = rd // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / rd)
    ang = pos.double()[:, None] * inv[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    if style == "neox":
        a, b = x[..., :half].clone(), x[..., half:rd].clone()
        x[..., :half], x[..., half:rd] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0:rd:2].clone(), x[..., 1:rd:2].clone()
        x[..., 0:rd:2], x[..., 1:rd:2] = a * c - b * s, b * c + a * s
    return x.float()


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("D,rd", [(64, 0), (128, 64), (18, 6)])
def test_rope_vs_torch(style, D, rd):
    T = 6
    q, k = torch.randn(T, 4, D), torch.randn(T, 2, D)
    pos = torch.tensor([0, 1, 5, 100, 2047, 40000], dtype=torch.int64)
    qo, ko = ops.rope(q, k, pos.numpy(), 10000.0, rd, style)
    r = rd or D
    # cos/sin rounded to f32 (1 u each), two products and a sum: 6 u (|a| + |b|) <= 12 u max|x|.
    torch.testing.assert_close(torch.from_numpy(qo), rope_ref(q, pos, 10000.0, r, style), rtol=0, atol=12 * U * float(q.abs().max()))
    torch.testing.assert_close(torch.from_numpy(ko), rope_ref(k, pos, 10000.0, r, style), rtol=0, atol=12 * U * float(k.abs().max()))


def test_bad_input_raises():
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    cu = np.array([0, 4], np.int32)
    with pytest.raises(qllm.Error, match="multiple of the KV heads"):
        ops.flash_attention(q, k, k, cu, cu)
    with pytest.raises(qllm.Error, match="must start at 0"):
        ops.flash_attention(torch.randn(4, 2, 8), k, k, np.array([1, 4], np.int32), cu)
    kc = np.zeros((2, 4, 2, 8), np.float16)
    with pytest.raises(qllm.Error, match="beyond the cache"):
        ops.reshape_and_cache(k, k, kc, kc.copy(), np.array([0, 1, 2, 8], np.int32))
    with pytest.raises(qllm.Error, match="written in place"):
        ops.reshape_and_cache(k, k, kc[:, ::2], kc.copy(), np.array([0, 1, 2, 3], np.int32))
    with pytest.raises(qllm.Error, match="block_tables"):
        ops.paged_attention(torch.randn(1, 2, 8), kc, kc.copy(), np.array([[5]], np.int32), np.array([3], np.int32))
