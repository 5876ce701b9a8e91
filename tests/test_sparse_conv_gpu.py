"""GPU sparse convolution: the Triton implicit-GEMM backend (and spconv, if installed) against the
pure-PyTorch backend, values and gradients."""

from __future__ import annotations

import pytest
import torch

from trellis.backends import has_module, use_backend
from trellis.modules.sparse import SparseTensor
from trellis.modules.sparse.conv import SparseConv3d, SparseInverseConv3d

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not has_module("triton"), reason="needs Triton"),
]


@pytest.fixture(autouse=True)
def _fixed_triton_config(monkeypatch):
    """One fixed kernel config: compiles fast; autotuned configs differ only in block sizes."""
    monkeypatch.setenv("TRELLIS_TRITON_AUTOTUNE", "0")


def shells(batch, res, C, dtype, seed=0):
    """``batch`` random spherical shells of radius ~res/3 on a ``res^3`` grid."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ar = torch.arange(res, device="cuda", dtype=torch.float32)
    X, Y, Z = torch.meshgrid(ar, ar, ar, indexing="ij")
    coords = []
    for b in range(batch):
        c = res / 2 + (torch.rand(3, generator=g, device="cuda") - 0.5) * res * 0.1
        r = res * (0.28 + 0.08 * torch.rand(1, generator=g, device="cuda"))
        d = ((X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2).sqrt()
        xyz = torch.nonzero((d <= r) & (d > r - 1.5))
        coords.append(torch.cat([torch.full_like(xyz[:, :1], b), xyz], 1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], C, device="cuda", generator=g).to(dtype)
    return SparseTensor(feats, coords, shape=[batch, C])


def run(conv, x, backend, grad_seed=1):
    xf = x.replace(x.feats.detach().clone().requires_grad_(True))
    conv.zero_grad()
    with use_backend("sparse_conv", backend):
        y = conv(xf)
    g = torch.randn(y.feats.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(grad_seed))
    (y.feats.float() * g).sum().backward()
    return y, xf.feats.grad.float(), conv.conv.weight.grad.float().clone()


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cin,cout", [(16, 32), (128, 128), (72, 8)])
def test_triton_submanifold_matches_torch(dtype, cin, cout):
    x = shells(3, 24, cin, dtype)
    conv = SparseConv3d(cin, cout, 3).cuda().to(dtype)
    y_ref, gx_ref, gw_ref = run(conv, x, "torch")
    y, gx, gw = run(conv, x, "triton")
    atol, rtol = TOL[dtype]
    assert torch.equal(y.coords, y_ref.coords)
    torch.testing.assert_close(y.feats.float(), y_ref.feats.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=rtol)
    scale = gw_ref.abs().max().item()
    torch.testing.assert_close(gw / scale, gw_ref / scale, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_strided_and_inverse_match_torch(dtype):
    x = shells(2, 20, 32, dtype, seed=3)
    down = SparseConv3d(32, 48, 2, stride=2, indice_key="d").cuda().to(dtype)
    up = SparseInverseConv3d(48, 16, 2, indice_key="d").cuda().to(dtype)
    outs = {}
    for backend in ("torch", "triton"):
        xf = x.replace(x.feats.detach().clone().requires_grad_(True))
        with use_backend("sparse_conv", backend):
            y = up(down(xf))
        y.feats.float().square().sum().backward()
        outs[backend] = (y.feats.float(), xf.feats.grad.float(), down.conv.weight.grad.float().clone())
        down.zero_grad()
        up.zero_grad()
    atol, rtol = TOL[dtype]
    for a, b in zip(outs["triton"], outs["torch"]):
        scale = b.abs().max().item()
        torch.testing.assert_close(a / scale, b / scale, atol=atol, rtol=rtol)


@pytest.mark.skipif(not has_module("spconv"), reason="spconv not installed")
def test_spconv_gpu_matches_torch():
    x = shells(2, 24, 64, torch.float16, seed=5)
    conv = SparseConv3d(64, 64, 3).cuda().half()
    y_ref, gx_ref, _ = run(conv, x, "torch")
    y, gx, _ = run(conv, x, "spconv")
    torch.testing.assert_close(y.feats.float(), y_ref.feats.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(gx, gx_ref, atol=2e-2, rtol=1e-2)
