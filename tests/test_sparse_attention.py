"""SparseMultiHeadAttention (full / swin / serialized / cross) against explicit float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from trellis.modules.attention import MultiHeadAttention
from trellis.modules.sparse import SparseTensor, encode_seq
from trellis.modules.sparse.attention import SparseMultiHeadAttention, window_plan


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("ATTN_BACKEND", raising=False)
    monkeypatch.delenv("SPARSE_ATTN_BACKEND", raising=False)


def _sparse(batch: int = 2, n: int = 120, res: int = 20, C: int = 32, seed: int = 0,
            dtype=torch.float64) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b in range(batch):
        xyz = torch.unique(torch.randint(0, res, (n, 3), generator=g), dim=0)
        coords.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], dim=1))
    c = torch.cat(coords).int()
    feats = torch.randn(c.shape[0], C, generator=g, dtype=dtype).requires_grad_(True)
    return SparseTensor(feats, c)


def _attend_groups(m: SparseMultiHeadAttention, x: SparseTensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Oracle: to_qkv, explicit softmax attention inside each row group, to_out (float64)."""
    N, C = x.feats.shape
    H, d = m.num_heads, m.head_dim
    qkv = x.feats @ m.to_qkv.weight.T + m.to_qkv.bias
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(N, H, d) for i in range(3))
    if m.qk_rms_norm:
        q = q / q.norm(dim=-1, keepdim=True) * m.q_rms_norm.gamma * math.sqrt(d)
        k = k / k.norm(dim=-1, keepdim=True) * m.k_rms_norm.gamma * math.sqrt(d)
    out = torch.zeros(N, H, d, dtype=q.dtype)
    for rows in groups:
        s = torch.einsum("qhd,khd->hqk", q[rows], k[rows]) / math.sqrt(d)
        out[rows] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[rows])
    return out.reshape(N, C) @ m.to_out.weight.T + m.to_out.bias


def _windows(coords: torch.Tensor, w: int, s: int) -> list[torch.Tensor]:
    """Rows of each window, found with a dict over (batch, floor((x+s)/w), ...) (reference README 2.8)."""
    groups: dict[tuple, list[int]] = {}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        groups.setdefault((b, (x + s) // w, (y + s) // w, (z + s) // w), []).append(i)
    return [torch.tensor(r) for r in groups.values()]


def _compare(m, x, out, ref) -> None:
    torch.testing.assert_close(out.feats, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(ref)
    leaves = [x.feats, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out.feats, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shift", [0, 4])
def test_swin_matches_explicit_windows(shift):
    torch.manual_seed(0)
    x = _sparse(res=24)
    m = SparseMultiHeadAttention(32, 4, attn_mode="swin", window_size=8, shift_window=shift).double()
    out = m(x)
    assert out.coords is x.coords and out.get_spatial_cache() is x.get_spatial_cache()
    ref = _attend_groups(m, x, _windows(x.coords, 8, shift))
    _compare(m, x, out, ref)


def test_windowed_alias_tuple_shift_and_cache():
    x = _sparse(res=16, n=80)
    m = SparseMultiHeadAttention(32, 4, attn_mode="windowed", window_size=(8, 8, 8), shift_window=(4, 4, 4)).double()
    m(x)
    plan = window_plan(x, (8, 8, 8), (4, 4, 4))
    assert plan is window_plan(x, (8, 8, 8), (4, 4, 4))  # cached per coordinate set and shift
    assert plan is not window_plan(x, (8, 8, 8), (0, 0, 0))
    y = x.replace(torch.randn_like(x.feats))  # same coords share the cache
    assert window_plan(y, (8, 8, 8), (4, 4, 4)) is plan
    assert sorted(plan.lens_q) == sorted(len(r) for r in _windows(x.coords, 8, 4))


def test_swin_windows_are_independent():
    x = _sparse(res=24, n=150, seed=3)
    m = SparseMultiHeadAttention(32, 4, attn_mode="swin", window_size=8, shift_window=4).double()
    base = m(x).feats.detach()
    groups = _windows(x.coords, 8, 4)
    rows = groups[0]
    feats = x.feats.detach().clone()
    feats[rows] += 1.0
    changed = (m(x.replace(feats)).feats.detach() - base).abs().sum(-1) > 1e-12
    expect = torch.zeros_like(changed)
    expect[rows] = True
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("qk_rms_norm", [False, True])
def test_full_matches_dense_mha_per_item(qk_rms_norm):
    torch.manual_seed(1)
    x = _sparse(batch=3, n=60)
    m = SparseMultiHeadAttention(32, 4, qk_rms_norm=qk_rms_norm).double()
    if qk_rms_norm:
        with torch.no_grad():
            m.q_rms_norm.gamma.uniform_(0.5, 1.5)
            m.k_rms_norm.gamma.uniform_(0.5, 1.5)
    dense = MultiHeadAttention(32, 4, qk_rms_norm=qk_rms_norm).double()
    dense.load_state_dict(m.state_dict())
    out = m(x)
    ref = torch.cat([dense(x.feats[sl][None])[0] for sl in x.layout])
    tol = 1e-5 if qk_rms_norm else 1e-9  # RMS norm computes in float32
    torch.testing.assert_close(out.feats, ref, rtol=tol, atol=tol)
    if not qk_rms_norm:
        _compare(m, x, out, _attend_groups(m, x, [torch.arange(sl.start, sl.stop) for sl in x.layout]))


@pytest.mark.parametrize("mode", ["z_order", "hilbert"])
def test_serialized_matches_curve_chunks(mode):
    x = _sparse(res=16, n=90, seed=5)
    W, s = 16, 5
    m = SparseMultiHeadAttention(32, 4, attn_mode="serialized", window_size=W, serialize_mode=mode,
                                 shift_sequence=s).double()
    groups = []
    for sl in x.layout:
        rows = torch.arange(sl.start, sl.stop)
        order = rows[torch.argsort(encode_seq(x.coords[rows, 1:], mode, depth=4), stable=True)]
        L = order.numel()
        size = math.ceil(L / math.ceil(L / W))
        chunk = (torch.arange(L) + s) // size
        groups += [order[chunk == c] for c in chunk.unique()]
    _compare(m, x, m(x), _attend_groups(m, x, groups))


@pytest.mark.parametrize("sparse_ctx", [False, True])
def test_cross_attention_matches_dense_per_item(sparse_ctx):
    torch.manual_seed(2)
    x = _sparse(batch=2, n=50)
    m = SparseMultiHeadAttention(32, 4, ctx_channels=24, type="cross", qk_rms_norm=True).double()
    dense = MultiHeadAttention(32, 4, ctx_channels=24, type="cross", qk_rms_norm=True).double()
    dense.load_state_dict(m.state_dict())
    if sparse_ctx:
        ctx = _sparse(batch=2, n=30, C=24, seed=9)
        out = m(x, ctx)
        ref = torch.cat([dense(x.feats[a][None], ctx.feats[b][None])[0] for a, b in zip(x.layout, ctx.layout)])
        leaves = [x.feats, ctx.feats]
    else:
        ctx = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
        out = m(x, ctx)
        ref = torch.cat([dense(x.feats[sl][None], ctx[i:i + 1])[0] for i, sl in enumerate(x.layout)])
        leaves = [x.feats, ctx]
    torch.testing.assert_close(out.feats, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out.feats, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rope_uses_voxel_coords():
    torch.manual_seed(3)
    x = _sparse(res=12, n=40, dtype=torch.float32)
    m = SparseMultiHeadAttention(32, 2, use_rope=True)
    y1 = m(x).feats
    shifted = x.coords.clone()
    shifted[:, 1:] += 5  # RoPE is relative: a global translation leaves full attention unchanged
    y2 = m(SparseTensor(x.feats, shifted)).feats
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    plain = SparseMultiHeadAttention(32, 2)
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x).feats, y1)


def test_state_dict_keys_and_errors():
    m = SparseMultiHeadAttention(768, 12, attn_mode="swin", window_size=8, shift_window=4, qk_rms_norm=True)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == [
        ("to_qkv.weight", (2304, 768)), ("to_qkv.bias", (2304,)), ("q_rms_norm.gamma", (12, 64)),
        ("k_rms_norm.gamma", (12, 64)), ("to_out.weight", (768, 768)), ("to_out.bias", (768,)),
    ]
    with pytest.raises(ValueError, match="window_size"):
        SparseMultiHeadAttention(64, 4, attn_mode="swin")
    with pytest.raises(ValueError, match="attn_mode"):
        SparseMultiHeadAttention(64, 4, attn_mode="shift_order")
    with pytest.raises(ValueError, match="cross"):
        SparseMultiHeadAttention(64, 4, type="cross", attn_mode="swin", window_size=8)
    x = _sparse(C=32, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch size"):
        SparseMultiHeadAttention(32, 4, type="cross")(x, torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="feats"):
        SparseMultiHeadAttention(64, 4)(x)


def test_empty_batch_item_and_half_precision():
    x = _sparse(batch=2, n=30, dtype=torch.float32)
    c = x.coords.clone()
    c[:, 0] = torch.where(c[:, 0] == 1, 2, 0).int()  # batch item 1 is empty
    y = SparseTensor(x.feats.detach().bfloat16(), c)
    m = SparseMultiHeadAttention(32, 4, attn_mode="swin", window_size=8).bfloat16()
    assert m(y).feats.dtype == torch.bfloat16
    mc = SparseMultiHeadAttention(32, 4, type="cross")
    out = mc(SparseTensor(x.feats.detach(), c), torch.randn(3, 4, 32))
    assert torch.isfinite(out.feats).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "torch_varlen", "torch"])
def test_swin_gpu_backends_match_cpu_reference(backend, monkeypatch):
    from trellis.modules.attention.backend import backend_unavailable_reason

    dev = torch.device("cuda")
    reason = backend_unavailable_reason(backend, dev, torch.bfloat16, varlen=True)
    if reason is not None:
        pytest.skip(reason)
    x = _sparse(batch=2, n=400, res=32, C=128, dtype=torch.float32)
    m = SparseMultiHeadAttention(128, 2, attn_mode="swin", window_size=8, shift_window=4)
    ref = m(x).feats.detach().double()
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", backend)
    mg = m.to(dev).bfloat16()
    xg = SparseTensor(x.feats.detach().to(dev).bfloat16(), x.coords.to(dev))
    out = mg(xg).feats.double().cpu()
    assert (out - ref).norm() / ref.norm() < 3e-2
