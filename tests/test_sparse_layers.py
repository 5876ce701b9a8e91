"""Sparse layers (linear, activations, norms), spatial ops and serialization against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trellis.modules.sparse import SparseTensor
from trellis.modules.sparse.linear import SparseLinear
from trellis.modules.sparse.nonlinearity import SparseGELU, SparseReLU, SparseSiLU
from trellis.modules.sparse.norm import SparseGroupNorm, SparseGroupNorm32, SparseLayerNorm, SparseLayerNorm32
from trellis.modules.sparse.serialize import encode_seq
from trellis.modules.sparse.spatial import SparseDownsample, SparseSubdivide, SparseUpsample


def random_sparse(batch_counts=(40, 0, 25, 60), C=64, res=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(batch_counts):
        flat = torch.sort(torch.randperm(res**3, generator=g)[:n]).values
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], C, generator=g).to(dtype)
    return SparseTensor(feats, coords, shape=[len(batch_counts), C])


def test_linear_and_activations():
    x = random_sparse(C=16)
    lin = SparseLinear(16, 8)
    assert set(lin.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(lin(x).feats, x.feats @ lin.weight.T + lin.bias)
    torch.testing.assert_close(SparseReLU()(x).feats, F.relu(x.feats))
    torch.testing.assert_close(SparseSiLU()(x).feats, F.silu(x.feats))
    torch.testing.assert_close(SparseGELU(approximate="tanh")(x).feats, F.gelu(x.feats, approximate="tanh"))
    with pytest.raises(TypeError, match="SparseTensor"):
        lin(x.feats)


def test_layer_norm():
    x = random_sparse(C=32)
    ln = SparseLayerNorm(32, eps=1e-6)
    torch.nn.init.normal_(ln.weight)
    torch.testing.assert_close(ln(x).feats, F.layer_norm(x.feats, (32,), ln.weight, ln.bias, 1e-6))
    ln32 = SparseLayerNorm32(32, elementwise_affine=False, eps=1e-6)
    y = ln32(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.feats.float(), F.layer_norm(x.feats.half().float(), (32,), eps=1e-6),
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cls", [SparseGroupNorm, SparseGroupNorm32])
def test_group_norm_per_batch_item(cls):
    x = random_sparse(C=64)
    gn = cls(32, 64, eps=1e-5)
    torch.nn.init.normal_(gn.weight)
    torch.nn.init.normal_(gn.bias)
    x.feats.requires_grad_(True)
    y = gn(x)
    ref_gn = torch.nn.GroupNorm(32, 64, eps=1e-5)
    ref_gn.load_state_dict(gn.state_dict())
    xr = x.feats.detach().clone().requires_grad_(True)
    ref = []
    for s in x.layout:  # reference: one nn.GroupNorm call per batch item over [1, C, n]
        if s.stop > s.start:
            ref.append(ref_gn(xr[s].T[None])[0].T)
    ref = torch.cat(ref)
    torch.testing.assert_close(y.feats, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    (y.feats * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.feats.grad, xr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gn.weight.grad, ref_gn.weight.grad, atol=1e-4, rtol=1e-4)


def test_group_norm32_half_input():
    x = random_sparse(C=64, dtype=torch.float16)
    gn = SparseGroupNorm32(32, 64)
    y = gn(x)
    assert y.dtype == torch.float16
    ref = torch.cat([F.group_norm(x.feats[s].float().T[None], 32, eps=1e-5)[0].T for s in x.layout if s.stop > s.start])
    torch.testing.assert_close(y.feats.float(), ref, atol=3e-3, rtol=3e-3)


def test_downsample_mean_count_plus_one_and_upsample():
    x = random_sparse(C=8, res=8)
    down = SparseDownsample(2)
    y = down(x)
    # reference: python dict over (b, x//2, y//2, z//2)
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(x.coords.tolist()):
        groups.setdefault((c[0], c[1] // 2, c[2] // 2, c[3] // 2), []).append(i)
    keys = sorted(groups)
    assert y.coords.tolist() == [list(k) for k in keys]
    expect = torch.stack([x.feats[groups[k]].sum(0) / (len(groups[k]) + 1) for k in keys])
    torch.testing.assert_close(y.feats, expect)
    assert y.batch_size == x.batch_size
    up = SparseUpsample(2)(y * 2.0)
    assert torch.equal(up.coords, x.coords)
    parent = torch.tensor([keys.index((c[0], c[1] // 2, c[2] // 2, c[3] // 2)) for c in x.coords.tolist()])
    torch.testing.assert_close(up.feats, 2.0 * y.feats[parent])
    x.register_spatial_cache("marker", 1)
    assert up.get_spatial_cache("marker") == 1  # fine tensor gets its own cache back
    with pytest.raises(ValueError, match="SparseDownsample"):
        SparseUpsample(2)(x)
    with pytest.raises(ValueError, match="SparseDownsample"):
        SparseUpsample(4)(y)


def test_subdivide_child_order():
    x = random_sparse(batch_counts=(3, 2), C=4)
    y = SparseSubdivide()(x)
    assert y.feats.shape == (40, 4)
    order = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    for i, c in enumerate(x.coords.tolist()):
        for k, (dx, dy, dz) in enumerate(order):
            assert y.coords[8 * i + k].tolist() == [c[0], 2 * c[1] + dx, 2 * c[2] + dy, 2 * c[3] + dz]
            assert torch.equal(y.feats[8 * i + k], x.feats[i])


@pytest.mark.parametrize("mode", ["z_order", "hilbert"])
def test_encode_seq(mode):
    d = 3
    r = 1 << d
    grid = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1).reshape(-1, 3)  # [r^3, 3]
    code = encode_seq(grid, mode, depth=d)
    assert code.dtype == torch.int64 and torch.unique(code).numel() == r**3 and int(code.max()) == r**3 - 1
    path = grid[torch.argsort(code)]
    steps = (path[1:] - path[:-1]).abs().sum(1)
    if mode == "hilbert":
        assert int(steps.max()) == 1  # a Hilbert curve moves to a face neighbour each step
    else:
        assert path[:8].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1],
                                     [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    with_batch = torch.cat([torch.tensor([[1]]).expand(r**3, 1), grid], 1)
    assert (encode_seq(with_batch, mode, depth=d) == code + (1 << (3 * d))).all()
    with pytest.raises(ValueError, match="mode"):
        encode_seq(grid, "peano")
    with pytest.raises(ValueError, match="2\\*\\*3"):
        encode_seq(grid + r, mode, depth=d)
