"""Sparse convolution against dense ``F.conv3d`` on the densified grid (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trellis.backends import BackendError, has_module, use_backend
from trellis.modules.sparse import SparseTensor
from trellis.modules.sparse.conv import SparseConv3d, SparseInverseConv3d, submanifold_map


def random_sparse(batch_counts, C, res, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(batch_counts):
        flat = torch.sort(torch.randperm(res[0] * res[1] * res[2], generator=g)[:n]).values
        xyz = torch.stack([flat // (res[1] * res[2]), (flat // res[2]) % res[1], flat % res[2]], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], C, generator=g, dtype=torch.float64).to(dtype)
    return SparseTensor(feats, coords, shape=[len(batch_counts), C])


def sample(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``[B, C, X, Y, Z]`` at ``[N, 4]`` coords -> ``[N, C]``."""
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def dense_weight(conv) -> torch.Tensor:
    """``(out, kx, ky, kz, in)`` -> conv3d layout ``(out, in, kx, ky, kz)``."""
    return conv.conv.weight.permute(0, 4, 1, 2, 3)


def check_grads(x, conv, y, run_ref):
    """Backpropagates the same random cotangent through the sparse conv and the dense reference."""
    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    gf, gw, gb = x.feats.grad.clone(), conv.conv.weight.grad.clone(), conv.conv.bias.grad.clone()
    x.feats.grad = None
    conv.zero_grad()
    ref = run_ref()
    (ref * g).sum().backward()
    torch.testing.assert_close(gf, x.feats.grad)
    torch.testing.assert_close(gw, conv.conv.weight.grad)
    torch.testing.assert_close(gb, conv.conv.bias.grad)


CASES = [  # batch counts, C_in, C_out, kernel, dilation, grid
    ((30, 0, 50), 4, 6, 3, 1, (6, 5, 7)),
    ((80,), 3, 5, 3, 2, (7, 7, 7)),
    ((20, 25), 5, 2, (3, 1, 5), 1, (5, 6, 7)),
    ((40, 40, 10, 5), 8, 8, 5, 1, (6, 6, 6)),
]


@pytest.mark.parametrize("case", CASES)
def test_submanifold_matches_dense(case):
    counts, cin, cout, k, d, res = case
    x = random_sparse(counts, cin, res, seed=len(counts))
    x.feats.requires_grad_(True)
    conv = SparseConv3d(cin, cout, k, dilation=d).double()
    with use_backend("sparse_conv", "torch"):
        y = conv(x)
    assert torch.equal(y.coords, x.coords)
    ks = conv.kernel_size
    pad = tuple(d * (kk // 2) for kk in ks)

    def run_ref():
        dense = x.dense(res)
        return sample(F.conv3d(dense, dense_weight(conv), conv.conv.bias, padding=pad, dilation=d), x.coords)

    torch.testing.assert_close(y.feats, run_ref().detach())
    check_grads(x, conv, y, run_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_submanifold_low_precision(dtype):
    x = random_sparse((60, 70), 16, (6, 6, 6), seed=3)
    conv = SparseConv3d(16, 24, 3).double()
    ref = conv(x).feats
    conv_lp = SparseConv3d(16, 24, 3).to(dtype)
    conv_lp.load_state_dict(conv.state_dict())
    xl = x.type(dtype)
    xl.feats.requires_grad_(True)
    with use_backend("sparse_conv", "torch"):
        y = conv_lp(xl)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(y.feats.double(), ref, atol=tol * 4, rtol=tol)
    y.feats.float().sum().backward()
    assert xl.feats.grad.dtype == dtype and torch.isfinite(xl.feats.grad.float()).all()


def test_neighbours_stay_in_batch():
    coords = torch.tensor([[0, 2, 2, 2], [1, 2, 2, 3]], dtype=torch.int32)  # same xyz neighbourhood
    x = SparseTensor(torch.ones(2, 1, dtype=torch.float64), coords)
    conv = SparseConv3d(1, 1, 3, bias=False).double()
    torch.nn.init.ones_(conv.conv.weight)
    with use_backend("sparse_conv", "torch"):
        assert conv(x).feats.flatten().tolist() == [1.0, 1.0]


def test_kernel_index_orientation():
    """Kernel index (i, j, k) multiplies the input at (x+i-1, y+j-1, z+k-1)."""
    coords = torch.tensor([[0, 3, 3, 3], [0, 4, 3, 3]], dtype=torch.int32)
    x = SparseTensor(torch.tensor([[1.0], [10.0]], dtype=torch.float64), coords)
    conv = SparseConv3d(1, 1, 3, bias=False).double()
    torch.nn.init.zeros_(conv.conv.weight)
    with torch.no_grad():
        conv.conv.weight[0, 2, 1, 1, 0] = 1.0  # i = 2: reads x + 1
    with use_backend("sparse_conv", "torch"):
        assert conv(x).feats.flatten().tolist() == [10.0, 0.0]


def test_kernel_map_cached_and_shared_by_replace():
    x = random_sparse((30, 30), 4, (5, 5, 5))
    kmap = submanifold_map(x, (3, 3, 3), (1, 1, 1))
    assert submanifold_map(x.replace(x.feats * 2), (3, 3, 3), (1, 1, 1)) is kmap
    conv = SparseConv3d(4, 4, 3).double()
    with use_backend("sparse_conv", "torch"):
        y = conv(x)
    assert y.get_spatial_cache("conv_subm:(3, 3, 3):(1, 1, 1)") is kmap
    # transposed submanifold map (offset reversal) equals the explicit transpose of the pairs
    in_idx, out_idx, _ = kmap.pairs()
    assert kmap.num_pairs == int((kmap.nbr >= 0).sum())
    assert torch.equal(kmap.transposed().nbr, kmap.nbr.flip(1))


@pytest.mark.parametrize("k,s,p,res", [(2, 2, 0, (8, 7, 6)), (3, 2, 1, (7, 7, 5)), (3, 2, 0, (9, 6, 7)),
                                       (3, 1, 1, (4, 5, 4))])
def test_strided_conv_coords_and_values(k, s, p, res):
    x = random_sparse((25, 40, 0, 10), 3, res, seed=k + s + p)
    x.register_spatial_cache("spatial_shape", list(res))
    x.feats.requires_grad_(True)
    conv = SparseConv3d(3, 5, k, stride=s, padding=p, indice_key="down").double()
    with use_backend("sparse_conv", "torch"):
        y = conv(x)

    def run_ref():
        return F.conv3d(x.dense(res), dense_weight(conv), conv.conv.bias, stride=s, padding=p)

    ref = run_ref()
    occ = torch.zeros(4, 1, *res, dtype=torch.float64)
    c = x.coords.long()
    occ[c[:, 0], 0, c[:, 1], c[:, 2], c[:, 3]] = 1.0
    occupancy = F.conv3d(occ, torch.ones(1, 1, k, k, k, dtype=torch.float64), stride=s, padding=p)
    expect_coords = torch.nonzero(occupancy[:, 0] > 0).int()  # sorted (b, x, y, z)
    assert torch.equal(y.coords, expect_coords)
    assert y.get_spatial_cache("spatial_shape") == list(ref.shape[2:])
    torch.testing.assert_close(y.feats, sample(ref, y.coords).detach())
    check_grads(x, conv, y, lambda: sample(run_ref(), y.coords))


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2)])
def test_inverse_conv_is_transposed_conv(k, s):
    res = (8, 6, 7)
    x = random_sparse((30, 20), 3, res, seed=5)
    x.register_spatial_cache("spatial_shape", list(res))
    down = SparseConv3d(3, 4, k, stride=s, indice_key="lvl1").double()
    up = SparseInverseConv3d(4, 2, k, indice_key="lvl1").double()
    with use_backend("sparse_conv", "torch"):
        h = down(x)
        h = h.replace(h.feats.detach().requires_grad_(True))
        y = up(h)
    assert torch.equal(y.coords, x.coords)
    assert y.get_spatial_cache() is x.get_spatial_cache()
    # conv_transpose3d weight (in, out, kx, ky, kz); inverse weight (out, kx, ky, kz, in)
    wt = up.conv.weight.permute(4, 0, 1, 2, 3)

    def run_ref():
        dense = h.dense(h.get_spatial_cache("spatial_shape"))
        full = F.conv_transpose3d(dense, wt, stride=s)
        # fine sites beyond the strided conv's floor(extent) get no input, only the bias
        full = F.pad(full, [0, max(0, res[2] - full.shape[4]), 0, max(0, res[1] - full.shape[3]),
                            0, max(0, res[0] - full.shape[2])])
        return sample(full, x.coords) + up.conv.bias

    torch.testing.assert_close(y.feats, run_ref().detach())
    g = torch.randn_like(y.feats)
    (y.feats * g).sum().backward()
    gh, gw = h.feats.grad.clone(), up.conv.weight.grad.clone()
    h.feats.grad = None
    up.zero_grad()
    (run_ref() * g).sum().backward()
    torch.testing.assert_close(gh, h.feats.grad)
    torch.testing.assert_close(gw, up.conv.weight.grad)
    with pytest.raises(ValueError, match="indice_key"):
        SparseInverseConv3d(4, 2, k, indice_key="other").double()(h)


def test_1x1x1_quirk():
    x = random_sparse((10, 12), 6, (4, 4, 4))
    conv = SparseConv3d(6, 4, 1).double()
    assert conv.conv.weight.shape == (4, 1, 1, 1, 6)
    y = conv(x)
    torch.testing.assert_close(y.feats, x.feats @ conv.conv.weight.reshape(6, 4) + conv.conv.bias)
    assert not torch.allclose(y.feats, x.feats @ conv.conv.weight[:, 0, 0, 0, :].T + conv.conv.bias)


def test_backend_selection_errors(monkeypatch):
    x = random_sparse((10,), 2, (4, 4, 4))
    conv = SparseConv3d(2, 2, 3).double()
    monkeypatch.setenv("SPARSE_BACKEND", "torchsparse")
    with pytest.raises(BackendError, match="valid"):
        conv(x)
    monkeypatch.setenv("SPARSE_BACKEND", "triton")
    with pytest.raises(BackendError, match="CUDA"):
        conv(x)
    if not has_module("spconv"):
        monkeypatch.setenv("SPARSE_BACKEND", "spconv")
        with pytest.raises(BackendError, match="spconv"):
            conv(x)
    monkeypatch.setenv("SPARSE_BACKEND", "torch")
    with pytest.raises(TypeError, match="dtype"):
        conv.float()(x)


@pytest.mark.skipif(not has_module("spconv"), reason="spconv not installed")
@pytest.mark.parametrize("k,stride", [(3, 1), (1, 1), (2, 2)])
def test_spconv_matches_torch(k, stride):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # spconv's CPU build is nondeterministic with more threads
    try:
        x = random_sparse((40, 30), 8, (6, 6, 6), dtype=torch.float32)
        conv = SparseConv3d(8, 16, k, stride=stride, indice_key="s").train()
        inv = SparseInverseConv3d(16, 4, k, indice_key="s").train()
        outs = {}
        for backend in ("torch", "spconv"):
            with use_backend("sparse_conv", backend):
                y = conv(x.replace(x.feats.clone()))
                outs[backend] = (y, inv(y) if stride > 1 else None)
        (y, yi), (ref, refi) = outs["spconv"], outs["torch"]
        oy, oref = torch.argsort(_key(y.coords)), torch.argsort(_key(ref.coords))
        assert torch.equal(y.coords[oy], ref.coords[oref])
        torch.testing.assert_close(y.feats[oy], ref.feats[oref], atol=1e-4, rtol=1e-4)
        if stride > 1:
            assert torch.equal(yi.coords, x.coords) and torch.equal(refi.coords, x.coords)
            torch.testing.assert_close(yi.feats, refi.feats, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(threads)


def _key(c):
    c = c.long()
    return ((c[:, 0] * 4096 + c[:, 1]) * 4096 + c[:, 2]) * 4096 + c[:, 3]


def test_bad_input_is_a_clear_error():
    x = SparseTensor(torch.randn(5, 4), torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 2, 2], [1, 0, 0, 0], [1, 3, 3, 3]]))
    with pytest.raises(ValueError, match=r"SparseConv3d: expected feats \[N, 3\], got \[5, 4\]"):
        SparseConv3d(3, 8, 3)(x)
    with pytest.raises(TypeError, match="does not match weight dtype"):
        SparseConv3d(4, 8, 3)(x.replace(x.feats.double()))
