"""Released-size transformer models on CUDA with the fp16 torso: forward/backward and fp16-vs-fp32 agreement."""

from __future__ import annotations

import pytest
import torch

from trellis.registry import MODELS

pytestmark = pytest.mark.gpu

# args of the released configs (reference/configs), inlined so the test needs no reference files
SLAT_FLOW_L = ("ElasticSLatFlowModel", dict(
    resolution=64, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024, num_blocks=24,
    num_heads=16, mlp_ratio=4, patch_size=2, num_io_res_blocks=2, io_block_channels=[128], pe_mode="ape",
    qk_rms_norm=True, use_fp16=True))
SS_FLOW_XL = ("SparseStructureFlowModel", dict(
    resolution=16, in_channels=8, out_channels=8, model_channels=1280, cond_channels=768, num_blocks=28,
    num_heads=16, mlp_ratio=4, patch_size=1, pe_mode="ape", qk_rms_norm=True, qk_rms_norm_cross=True,
    use_fp16=True))
SLAT_ENC = ("ElasticSLatEncoder", dict(
    resolution=64, in_channels=1024, model_channels=768, latent_channels=8, num_blocks=12, num_heads=12,
    mlp_ratio=4, attn_mode="swin", window_size=8, use_fp16=True))


def _build(spec: tuple[str, dict]) -> torch.nn.Module:
    with torch.device("cuda"):
        return MODELS.get(spec[0])(**spec[1])


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _randomize(model: torch.nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g, device="cuda") * scale).to(p.dtype))


def _sparse(channels: int, counts: tuple[int, ...], res: int = 64):
    from trellis.modules.sparse.basic import SparseTensor

    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(res**3, device="cuda")[:n].sort().values
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b, device="cuda"), xyz], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, device="cuda"), coords)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_slat_flow_L_fp16_cuda() -> None:
    model = _build(SLAT_FLOW_L)
    _randomize(model)
    x = _sparse(8, (6000, 4000))
    t, cond = torch.rand(2, device="cuda") * 1000, torch.randn(2, 1374, 1024, device="cuda")
    assert model.set_mem_ratio(0.5) == pytest.approx(0.5)
    y = model(x, t, cond)
    assert torch.equal(y.coords, x.coords) and y.feats.dtype == torch.float32
    y.feats.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.reset_mem_ratio()
    with torch.no_grad():
        y16 = model(x, t, cond).feats
        model.convert_to_fp32()
        y32 = model(x, t, cond).feats
    assert _rel_err(y16, y32) < 3e-2


def test_ss_flow_XL_fp16_cuda() -> None:
    model = _build(SS_FLOW_XL)
    _randomize(model)
    x = torch.randn(2, 8, 16, 16, 16, device="cuda")
    t, cond = torch.rand(2, device="cuda") * 1000, torch.randn(2, 77, 768, device="cuda")
    y = model(x, t, cond)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        y16 = model(x, t, cond)
        model.convert_to_fp32()
        y32 = model(x, t, cond)
    assert _rel_err(y16, y32) < 3e-2


def test_slat_encoder_fp16_cuda() -> None:
    model = _build(SLAT_ENC)
    x = _sparse(1024, (9000, 5000))
    z = model(x, sample_posterior=True)
    z.feats.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        y16 = model(x, sample_posterior=False).feats
        model.convert_to_fp32()
        y32 = model(x, sample_posterior=False).feats
    assert _rel_err(y16, y32) < 3e-2
