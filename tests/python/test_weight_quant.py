"""weight_quant_matmul, quantize_weight, dequantize_weight against PyTorch.

The reference is what a user would write: quantise in torch with the documented formulas, then
a dense matmul of the dequantised weight (x.float() @ W' + bias)."""
import numpy as np
import pytest
import torch

import qllm

ops = qllm.ops


def bf16_bits_to_torch(a):
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def unpack_s4(q):
    """uint8 packed int4 pairs along the last axis -> int8 values (element 2i in the low nibble)."""
    q = q.astype(np.int16)
    lo, hi = q & 0xF, q >> 4
    v = np.stack([lo, hi], axis=-1).reshape(q.shape[:-1] + (q.shape[-1] * 2,))
    return np.where(v >= 8, v - 16, v).astype(np.int8)


def torch_quantize(w, bits, group_size, symmetric, transpose):
    """The documented quantize_weight formulas, in torch, on w [k, n] (or [n, k])."""
    wt = torch.from_numpy(w).float()
    if transpose:
        wt = wt.t()
    k, n = wt.shape
    gs = group_size or k
    G = (k + gs - 1) // gs
    q = torch.empty(k, n, dtype=torch.int32)
    scale = torch.empty(G, n)
    offset = torch.empty(G, n)
    for g in range(G):
        v = wt[g * gs:(g + 1) * gs]
        if symmetric:
            qmax = 127 if bits == 8 else 7
            amax = v.abs().amax(0)
            inv = torch.where(amax > 0, torch.tensor(float(qmax)) / amax, torch.zeros(()))
            q[g * gs:(g + 1) * gs] = torch.round(v * inv).clamp(-qmax, qmax).to(torch.int32)
            scale[g] = amax / qmax
            offset[g] = 0
        else:
            qr = 255 if bits == 8 else 15
            half = (qr + 1) // 2
            lo = v.amin(0).clamp(max=0)
            hi = v.amax(0).clamp(min=0)
            rng = hi - lo
            inv = torch.where(rng > 0, torch.tensor(float(qr)) / rng, torch.zeros(()))
            z = torch.round(-lo * inv).clamp(0, qr)
            u = (torch.round(v * inv) + z).clamp(0, qr)
            u = torch.where(rng > 0, u, torch.full_like(u, half))
            q[g * gs:(g + 1) * gs] = (u - half).to(torch.int32)
            scale[g] = rng / qr
            offset[g] = torch.where(rng > 0, half - z, torch.zeros_like(z))
    return q, scale, offset


def dequant_torch(q_kn, scale, offset, group_size):
    k = q_kn.shape[0]
    gs = group_size or k
    g = torch.arange(k) // gs
    s = torch.from_numpy(np.asarray(scale, np.float32)).reshape(-1, q_kn.shape[1])[g]
    o = 0 if offset is None else torch.from_numpy(np.asarray(offset, np.float32)).reshape(-1, q_kn.shape[1])[g]
    return (q_kn.float() + o) * s


def q_to_kn(q, bits, transpose):
    v = q if bits == 8 else unpack_s4(q)
    t = torch.from_numpy(v.astype(np.int32))
    return t.t() if transpose else t


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [0, 32, 128])
@pytest.mark.parametrize("transpose", [False, True])
def test_quantize_weight_matches_torch(bits, symmetric, group_size, transpose):
    rng = np.random.default_rng(3)
    k, n = 160, 34
    w = rng.standard_t(3, (n, k) if transpose else (k, n)).astype(np.float32)
    w[..., 0] = 0  # an all-zero channel (transpose) or k row
    q, s, o = ops.quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, transpose_w=transpose)
    assert q.dtype == (np.int8 if bits == 8 else np.uint8)
    assert (o is None) == symmetric
    tq, ts, to = torch_quantize(w, bits, group_size, symmetric, transpose)
    assert torch.equal(q_to_kn(q, bits, transpose), tq)
    assert torch.equal(torch.from_numpy(s).reshape(ts.shape), ts)
    if not symmetric:
        assert torch.equal(torch.from_numpy(o).reshape(to.shape), to)
    # dequantize_weight is (q + offset) * scale in w's layout.
    d = ops.dequantize_weight(q, s, o, group_size=group_size, transpose_w=transpose)
    want = dequant_torch(tq, ts, None if symmetric else to, group_size)
    assert torch.equal(torch.from_numpy(d), want.t() if transpose else want)


def check_matmul(m, k, n, bits, group_size, symmetric, transpose, dtype, out_dtype, with_bias, packed):
    rng = np.random.default_rng(m * 1000 + k + n)
    w = rng.standard_normal((n, k) if transpose else (k, n)).astype(np.float32)
    q, s, o = ops.quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, transpose_w=transpose)
    tdt = getattr(torch, dtype)
    x = torch.randn(m, k).to(tdt)
    bias = torch.randn(n) if with_bias else None
    kw = dict(bias=bias, out_dtype=out_dtype)
    if packed:
        pw = qllm.PackedQuantWeight(q, s, o, group_size=group_size, transpose_w=transpose)
        assert (pw.k, pw.n, pw.bits) == (k, n, bits)
        y = ops.weight_quant_matmul(x, packed_w=pw, **kw)
    else:
        y = ops.weight_quant_matmul(x, q, s, o, group_size=group_size, transpose_w=transpose, **kw)
    odt = out_dtype or dtype
    got = bf16_bits_to_torch(y).float() if odt == "bfloat16" else torch.from_numpy(y).float()
    wq = dequant_torch(q_to_kn(q, bits, transpose), s, o, group_size)
    ref = x.double() @ wq.double()
    if with_bias:
        ref += bias.double()
    # f32 accumulation over k terms: each kernel's error is below (k + 3 * groups + 4) * 2^-24
    # times sum_k |x| (|q| + bias_q + |offset|) |scale| (the matrix-vector kernel sums biased
    # codes, bias_q = 128 or 8, and corrects per group); plus rounding to the output dtype.
    bq = 128 if bits == 8 else 8
    gs = group_size or k
    g = torch.arange(k) // gs
    st = torch.from_numpy(np.asarray(s, np.float32)).reshape(-1, n)[g].double()
    ot = 0 if o is None else torch.from_numpy(np.asarray(o, np.float32)).reshape(-1, n)[g].abs().double()
    mag = x.double().abs() @ ((wq.double().abs() + (bq + ot) * st.abs()))
    groups = (k + gs - 1) // gs
    out_eps = {"float32": 2**-24, "float16": 2**-11, "bfloat16": 2**-8}[odt]
    tol = (k + 3 * groups + 8) * 2**-24 * mag + 2 * out_eps * ref.abs() + 1e-30
    if with_bias:
        tol += 2**-24 * bias.double().abs()
    assert got.shape == (m, n)
    assert torch.all((got.double() - ref).abs() <= tol), (got.double() - ref).abs().max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m,k,n,group_size", [(1, 38, 18, 0), (3, 100, 34, 32), (8, 256, 40, 64), (17, 384, 50, 128),
                                              (9, 192, 2, 96)])
def test_matmul_vs_torch(bits, transpose, m, k, n, group_size):
    for symmetric in (True, False):
        check_matmul(m, k, n, bits, group_size, symmetric, transpose, "float32", None, m % 2 == 1, packed=False)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("out_f32", [False, True])
@pytest.mark.parametrize("m", [1, 4, 13])
def test_matmul_dtypes(dtype, out_f32, m):
    check_matmul(m, 160, 24, 4, 32, False, True, dtype, "float32" if out_f32 else None, True, packed=True)
    check_matmul(m, 70, 20, 8, 0, True, False, dtype, "float32" if out_f32 else None, False, packed=True)


def test_packed_equals_raw_and_model_size():
    rng = np.random.default_rng(5)
    k, n = 7168, 64
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s, _ = ops.quantize_weight(w, bits=4, group_size=128, transpose_w=True)
    pw = qllm.PackedQuantWeight(torch.from_numpy(q), torch.from_numpy(s), group_size=128, transpose_w=True)
    for m in (1, 4, 20):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        a = ops.weight_quant_matmul(x, packed_w=pw)
        b = ops.weight_quant_matmul(x, q, s, group_size=128, transpose_w=True)
        assert np.array_equal(a, b)
    check_matmul(1, 7168, 32, 4, 128, True, True, "bfloat16", None, False, packed=True)
    check_matmul(20, 7168, 32, 8, 0, True, True, "float16", None, True, packed=True)


def test_zero_rows_and_weights():
    k, n = 64, 16
    q = np.zeros((n, k), np.int8)
    s = np.ones(n, np.float32)
    x = np.zeros((3, k), np.float32)
    x[1] = 1
    y = ops.weight_quant_matmul(x, q, s, transpose_w=True)
    assert np.array_equal(y, np.zeros((3, n), np.float32))


def test_bad_input():
    k, n = 64, 8
    x = np.ones((2, k), np.float32)
    w = np.zeros((k, n), np.int8)
    s1 = np.ones(n, np.float32)
    s2 = np.ones((2, n), np.float32)
    with pytest.raises(qllm.Error, match="group_size must be 0 .* multiple of 32, got 48"):
        ops.weight_quant_matmul(x, w, s2, group_size=48)
    with pytest.raises(qllm.Error, match="group_size = 96 is larger than k = 64"):
        ops.weight_quant_matmul(x, w, s2, group_size=96)
    with pytest.raises(qllm.Error, match=r"scale must be \[ceil\(k / group_size\), n\] = \[2, 8\]"):
        ops.weight_quant_matmul(x, w, s1, group_size=32)
    with pytest.raises(qllm.Error, match=r"offset must be \[ceil\(k / group_size\), n\] = \[2, 8\]"):
        ops.weight_quant_matmul(x, w, s2, offset=s1, group_size=32)
    with pytest.raises(qllm.Error, match=r"scale must be \[n\] = \[8\] for per-channel"):
        ops.weight_quant_matmul(x, w, s2)
    # s4x2 with an odd packed dimension
    with pytest.raises(qllm.Error, match="s4x2 w .* k = 7 .*odd"):
        ops.weight_quant_matmul(np.ones((1, 7), np.float32), np.zeros((n, 4), np.uint8), s1, transpose_w=True)
    with pytest.raises(qllm.Error, match="odd"):
        ops.weight_quant_matmul(x, np.zeros((k, 4), np.uint8), np.ones(7, np.float32))
    with pytest.raises(qllm.Error, match="quantize_weight: .*odd size 7"):
        ops.quantize_weight(np.ones((k, 7), np.float32), bits=4)
    with pytest.raises(qllm.Error, match="bits must be 8 or 4"):
        ops.quantize_weight(np.ones((k, 8), np.float32), bits=3)
    with pytest.raises(qllm.Error, match="x must be float32, float16 or bfloat16"):
        ops.weight_quant_matmul(np.ones((2, k), np.int8), w, s1)
    with pytest.raises(qllm.Error, match="does not match x's k"):
        ops.weight_quant_matmul(np.ones((2, k + 1), np.float32), w, s1)
    with pytest.raises(qllm.Error, match="out_dtype|y must have x's dtype"):
        ops.weight_quant_matmul(x, w, s1, out_dtype="bfloat16")
    with pytest.raises(qllm.Error, match="bias"):
        ops.weight_quant_matmul(x, w, s1, bias=np.ones(n + 1, np.float32))
