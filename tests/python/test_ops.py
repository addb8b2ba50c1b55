"""grouped_matmul, dynamic_quant, swiglu, swiglu_quant and dequant against PyTorch."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qllm

ops = qllm.ops


def bf16_bits_to_torch(a):
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def groups(counts, kind):
    c = np.array(counts, np.int64)
    return (np.cumsum(c) if kind == "cumsum" else c), int(c.sum())


@pytest.mark.parametrize("kind", ["cumsum", "count"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("m,k,n,counts", [(1, 1, 1, [1]), (3, 100, 17, [1, 0, 2]), (17, 33, 40, [5, 0, 7]),
                                          (64, 256, 96, [20, 44])])
def test_grouped_matmul_int8_exact(kind, transpose, m, k, n, counts):
    rng = np.random.default_rng(1)
    G = len(counts)
    x = rng.integers(-128, 128, (m, k), dtype=np.int8)
    w = rng.integers(-128, 128, (G, n, k) if transpose else (G, k, n), dtype=np.int8)
    gl, total = groups(counts, kind)
    y = ops.grouped_matmul(x, w, gl, group_list_type=kind, transpose_w=transpose)
    assert y.dtype == np.int32
    wt = torch.from_numpy(w).to(torch.int64)
    if transpose:
        wt = wt.transpose(1, 2)
    want = torch.zeros(m, n, dtype=torch.int64)
    start = 0
    for g, c in enumerate(counts):
        want[start:start + c] = torch.from_numpy(x[start:start + c]).to(torch.int64) @ wt[g]
        start += c
    assert np.array_equal(y, want.numpy())
    # Dequantised output: ((f32(acc) * scale[g, c]) * per_token_scale[r]), rounded once.
    scale = rng.uniform(1e-4, 1e-3, (G, n)).astype(np.float32)
    pts = rng.uniform(0.5, 2, m).astype(np.float32)
    gidx = np.searchsorted(np.cumsum(counts), np.arange(m), side="right").clip(max=G - 1)
    ref = (want.to(torch.float32) * torch.from_numpy(scale[gidx])) * torch.from_numpy(pts)[:, None]
    ref[total:] = 0
    for dt in ("float32", "float16", "bfloat16"):
        yd = ops.grouped_matmul(x, w, gl, scale=scale, per_token_scale=pts, group_list_type=kind,
                                transpose_w=transpose, out_dtype=dt)
        got = bf16_bits_to_torch(yd) if dt == "bfloat16" else torch.from_numpy(yd)
        assert torch.equal(got, ref.to(getattr(torch, dt)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_grouped_matmul_float(dtype):
    rng = np.random.default_rng(2)
    m, k, n, counts = 17, 37, 20, [5, 0, 9]
    G = len(counts)
    tdt = getattr(torch, dtype)
    x = torch.from_numpy(rng.uniform(-1, 1, (m, k)).astype(np.float32)).to(tdt)
    w = torch.from_numpy(rng.uniform(-1, 1, (G, k, n)).astype(np.float32)).to(tdt)
    bias = rng.uniform(-1, 1, (G, n)).astype(np.float32)
    gl, total = groups(counts, "cumsum")
    y = ops.grouped_matmul(x, w, gl, bias=bias, out_dtype="float32")
    want = torch.zeros(m, n, dtype=torch.float64)
    start = 0
    for g, c in enumerate(counts):
        want[start:start + c] = x[start:start + c].double() @ w[g].double() + torch.from_numpy(bias[g]).double()
        start += c
    # f32 accumulation over k terms: |error| <= k * eps32 * sum|x w| (sum|x w| <= k here).
    tol = k * np.finfo(np.float32).eps * k
    np.testing.assert_allclose(y, want.numpy(), rtol=0, atol=tol)
    # Default output dtype is x's dtype.
    yd = ops.grouped_matmul(x, w, gl, bias=bias)
    assert yd.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))


def test_dynamic_quant_matches_torch_exactly():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(17, 100)).astype(np.float32)
    x[4] = 0
    q, s = ops.dynamic_quant(x)
    t = torch.from_numpy(x)
    amax = t.abs().amax(1, keepdim=True)
    want = torch.where(amax > 0, torch.round(t * (127.0 / amax)), torch.zeros_like(t)).to(torch.int8)
    assert np.array_equal(q, want.numpy())
    assert np.array_equal(s, (amax / 127.0).squeeze(1).numpy())
    assert s[4] == 0 and not q[4].any()
    # Smoothing: [h] and grouped [G, h].
    sm = rng.uniform(0.5, 2, (2, 100)).astype(np.float32)
    q1, s1 = ops.dynamic_quant(x, smooth_scales=sm[0])
    q2, s2 = ops.dynamic_quant(x * sm[0])
    assert np.array_equal(q1, q2) and np.array_equal(s1, s2)
    qg, _ = ops.dynamic_quant(x, smooth_scales=sm, group_index=np.array([8, 17]))
    assert np.array_equal(qg[:8], ops.dynamic_quant(x[:8] * sm[0])[0])
    assert np.array_equal(qg[8:], ops.dynamic_quant(x[8:] * sm[1])[0])


@pytest.mark.parametrize("activate_left", [True, False])
def test_swiglu_matches_torch(activate_left):
    rng = np.random.default_rng(4)
    x = rng.normal(scale=3, size=(5, 2 * 45)).astype(np.float32)
    y = ops.swiglu(x, activate_left=activate_left)
    a, b = torch.from_numpy(x).chunk(2, dim=-1)
    if not activate_left:
        a, b = b, a
    want = (F.silu(a.double()) * b.double()).numpy()
    # qllm's exp is within 2 ulp of exp; division and product add an ulp each.
    np.testing.assert_allclose(y, want, rtol=6 * np.finfo(np.float32).eps, atol=1e-30)
    # bfloat16 in (a torch tensor), bfloat16 out.
    xb = torch.from_numpy(x).to(torch.bfloat16)
    yb = ops.swiglu(xb)
    assert yb.dtype == np.uint16
    ref = (F.silu(xb.float()[:, :45]) * xb.float()[:, 45:])
    got = bf16_bits_to_torch(yb).float()
    # One bf16 rounding of a value within a few f32 ulp of ref: at most one bf16 ulp apart.
    assert torch.all((got - ref).abs() <= ref.abs() * 2 ** -7 + 1e-30)


def test_swiglu_quant_equals_swiglu_then_quant():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 64)).astype(np.float32)
    q, s = ops.swiglu_quant(x)
    q2, s2 = ops.dynamic_quant(ops.swiglu(x))
    assert np.array_equal(q, q2) and np.array_equal(s, s2)


def test_dequant_matches_torch():
    rng = np.random.default_rng(6)
    acc = rng.integers(-10**6, 10**6, (4, 19), dtype=np.int32)
    sc = rng.uniform(1e-5, 1e-3, 19).astype(np.float32)
    pts = rng.uniform(0.1, 2, 4).astype(np.float32)
    want = (torch.from_numpy(acc).float() * torch.from_numpy(sc)) * torch.from_numpy(pts)[:, None]
    assert np.array_equal(ops.dequant(acc, sc, pts), want.numpy())
    assert np.array_equal(ops.dequant(acc, sc, pts, out_dtype="float16"), want.half().numpy())


def test_bad_inputs_raise_clear_errors():
    x = np.zeros((4, 8), np.int8)
    w = np.zeros((2, 8, 16), np.int8)
    with pytest.raises(qllm.Error, match=r"grouped_matmul: group_list\[1\] = 1 < group_list\[0\] = 3"):
        ops.grouped_matmul(x, w, np.array([3, 1]))
    with pytest.raises(qllm.Error, match="w must have x's dtype float32, got int8"):
        ops.grouped_matmul(x.astype(np.float32), w, np.array([2, 4]))
    with pytest.raises(qllm.Error, match="x has numpy dtype float64"):
        ops.grouped_matmul(x.astype(np.float64), w, np.array([2, 4]))
    with pytest.raises(qllm.Error, match=r"swiglu: x's last dimension must be even \(2h\), got 7"):
        ops.swiglu(np.zeros((2, 7), np.float32))
    with pytest.raises(qllm.Error, match="scale must have shape"):
        ops.dequant(np.zeros((2, 3), np.int32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):  # qllm.Error is a ValueError
        ops.dynamic_quant(np.zeros((2, 3), np.float32), group_index=np.array([1]))
