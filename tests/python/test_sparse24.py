"""2:4 structured sparsity (SPEC section 6) against PyTorch: the dense matmul of the decompressed
weight, with the odd shapes (m = 1, 3, 17; k = 4, 12, 100), all-zero rows and sparse groups."""
import numpy as np
import pytest
import torch

import qllm

ops = qllm.ops


def bf16_bits_to_torch(a):
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)


def torch_prune_24(w):
    """SPEC: keep the two largest magnitudes of every group of 4 (ties: lower position)."""
    n, k = w.shape
    g = w.float().reshape(n, k // 4, 4)
    # Stable descending sort of magnitudes keeps the lower position first among ties.
    order = torch.sort(g.abs(), dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return (w.reshape(n, k // 4, 4) * mask.to(w.dtype)).reshape(n, k)


def make_w(n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if n > 1:
        w[1] = 0                                  # an all-zero row
    w.view(n, k // 4, 4)[:, ::3, 1:] = 0          # groups with one non-zero
    w.view(n, k // 4, 4)[:, 1::5] = 0             # empty groups
    if dtype == torch.int8:
        return (w * 40).round().clamp(-127, 127).to(torch.int8)
    return w.to(dtype)


def as_np(t):
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def to_torch(a, dtype):
    return bf16_bits_to_torch(a) if dtype == torch.bfloat16 else torch.from_numpy(a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("k", [4, 12, 100])
def test_prune_compress_decompress(dtype, k):
    w = make_w(6, k, dtype)
    values, meta = ops.prune_24(as_np(w))
    assert values.shape == (6, k // 2) and meta.shape == (6, (k + 7) // 8) and meta.dtype == np.uint8
    dense = to_torch(ops.decompress_24(values, meta), dtype)
    assert torch.equal(dense, torch_prune_24(w))
    v2, m2 = ops.compress_24(dense)  # torch tensors are accepted too
    np.testing.assert_array_equal(v2, values)
    np.testing.assert_array_equal(m2, meta)
    # Positions are increasing in every group.
    nib = np.stack([meta & 0xF, meta >> 4], -1).reshape(6, -1)[:, : k // 4]
    assert ((nib & 3) < (nib >> 2)).all()


def reference(x, w):
    """Dense product of the decompressed weight in float64 (float) or int64 (int8)."""
    if x.dtype == torch.int8:
        return x.to(torch.int64) @ w.to(torch.int64).T
    return x.double() @ w.double().T


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
# m = 31 | 32, 70: both sides of the large-m (rows) kernel's switch at 32; 70 = a partial 64-row panel.
@pytest.mark.parametrize("m", [1, 3, 17, 31, 32, 70])
@pytest.mark.parametrize("k", [4, 12, 100])
@pytest.mark.parametrize("packed", [False, True])
def test_float_matmul(wdtype, m, k, packed):
    n = 33
    w = torch_prune_24(make_w(n, k, wdtype, seed=k))
    values, meta = ops.prune_24(as_np(w))
    x = torch.randn(m, k).to(wdtype)
    kw = dict(packed=qllm.PackedSparse24(values, meta)) if packed else dict(values=values, meta=meta)
    y = ops.sparse24_matmul(as_np(x), out_dtype="float32", **kw)
    want = reference(x, w)
    # f32 accumulation of k/2 products (one rounding per FMA) plus 3 reduction adds (m >= 32:
    # one chain of k/2 FMAs, no reduction adds, inside the same bound):
    # |err| <= (k/2 + 4) * 2^-24 * sum|w x| (first-order gamma_n bound).
    tol = (k / 2 + 4) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((torch.from_numpy(y).double() - want).abs() <= tol + 1e-30).all()
    # Output in x's dtype by default: one more rounding (half an ulp of the result).
    y16 = to_torch(ops.sparse24_matmul(x, **kw), wdtype)
    assert y16.dtype == wdtype and y16.shape == (m, n)
    eps = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[wdtype]
    assert ((y16.double() - want).abs() <= tol + eps * want.abs() + 1e-30).all()


# m = 39 | 40, 70: both sides of the s8 large-m (rows) kernel's switch at 40; 70 = a partial
# second 64-row panel. Weight row 0's kept values are -128 (full s8 range on both sides).
@pytest.mark.parametrize("m", [1, 3, 17, 39, 40, 70])
@pytest.mark.parametrize("k", [4, 12, 100])
def test_int8_matmul(m, k):
    n = 34
    w = torch_prune_24(make_w(n, k, torch.int8, seed=k))
    w[0][w[0] != 0] = -128
    values, meta = ops.prune_24(w)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    x[0] = -128
    acc = ops.sparse24_matmul(x, values, meta)
    assert acc.dtype == np.int32
    want = reference(x, w)
    assert torch.equal(torch.from_numpy(acc).to(torch.int64), want)
    scale = torch.rand(n) * 1e-3 + 1e-4
    pts = torch.rand(m) + 0.5
    for out, tdt in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        y = to_torch(ops.sparse24_matmul(x, values, meta, scale=scale, per_token_scale=pts, out_dtype=out), tdt)
        expect = ((want.to(torch.float32) * scale) * pts[:, None]).to(tdt)  # SPEC section 1, same order
        assert torch.equal(y, expect)


def test_real_depth_matches_torch():
    k, n = 7168, 64
    w = torch_prune_24(torch.randn(n, k).to(torch.float16))
    values, meta = ops.prune_24(w)
    pk = qllm.PackedSparse24(values, meta)
    assert (pk.n, pk.k, pk.dtype) == (n, k, "float16")
    x = torch.randn(1, k)
    y = torch.from_numpy(ops.sparse24_matmul(x, packed=pk)).double()
    want = reference(x, w.float())
    tol = (k / 2 + 4) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((y - want).abs() <= tol).all()


def test_rejects_bad_input():
    with pytest.raises(qllm.Error, match="k = 6.*multiple of 4"):
        ops.prune_24(np.ones((2, 6), np.float32))
    w = np.zeros((3, 16), np.float32)
    w[2, 4:7] = 1.0
    with pytest.raises(qllm.Error, match=r"compress_24.*w\[row 2, group 1\].*3 non-zeros"):
        ops.compress_24(w)
    values, meta = ops.prune_24(np.ones((3, 16), np.float32))
    bad = meta.copy()
    bad[1, 0] = 0x16  # row 1, group 0: i0 = 2, i1 = 1
    with pytest.raises(qllm.Error, match=r"meta\[row 1, group 0\].*i0 = 2, i1 = 1"):
        ops.decompress_24(values, bad)
    with pytest.raises(qllm.Error, match=r"sparse24_matmul.*meta\[row 1, group 0\]"):
        ops.sparse24_matmul(np.ones((2, 16), np.float32), values, bad)
    with pytest.raises(qllm.Error, match="PackedSparse24.*i0 < i1"):
        qllm.PackedSparse24(values, bad)
    with pytest.raises(qllm.Error, match="sparse24_matmul.*x has k = 12"):
        ops.sparse24_matmul(np.ones((2, 12), np.float32), values, meta)
    with pytest.raises(qllm.Error, match="int8 x needs int8 values"):
        ops.sparse24_matmul(np.ones((2, 16), np.int8), values, meta)
    with pytest.raises(qllm.Error, match="meta"):
        ops.sparse24_matmul(np.ones((2, 16), np.float32), values, meta[:, :1])
    v8, m8 = ops.prune_24(np.ones((3, 16), np.int8))
    with pytest.raises(qllm.Error, match="scale"):
        ops.sparse24_matmul(np.ones((2, 16), np.int8), v8, m8, out_dtype="float32")
    with pytest.raises(qllm.Error, match="per_token_scale"):
        ops.sparse24_matmul(np.ones((2, 16), np.int8), v8, m8, scale=np.ones(3, np.float32),
                            per_token_scale=np.ones(5, np.float32))
