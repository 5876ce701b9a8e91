"""Sparse transformer trunk, SLatEncoder and the elastic checkpointing mixin (README 2.8, 3.4; TRAINING 6.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trellis.models.elastic import num_checkpointed_blocks
from trellis.models.structured_latent_vae.encoder import ElasticSLatEncoder, SLatEncoder
from trellis.modules.embeddings import sincos_position_embedding
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.transformer import SparseTransformerBlock

TINY = dict(resolution=16, in_channels=12, model_channels=64, latent_channels=4, num_blocks=2, num_heads=4,
            window_size=4)


def _sparse_input(channels: int, seed: int = 0, res: int = 16, counts: tuple[int, ...] = (40, 25)) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(res**3, generator=g)[:n].sort().values
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)


def _randomize(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def test_swin_shift_alternates_per_block() -> None:
    m = SLatEncoder(**{**TINY, "num_blocks": 4, "window_size": 8})
    assert [blk.attn.attn_mode for blk in m.blocks] == ["swin"] * 4
    assert [blk.attn.shift_window for blk in m.blocks] == [0, 4, 0, 4]
    # behaviour: voxels at x = 3 and x = 4 share a window without shift (0..7) but not with shift 4
    # (windows ..., [-4, 4), [4, 12), ...)
    coords = torch.tensor([[0, 3, 0, 0], [0, 4, 0, 0]], dtype=torch.int32)
    for i, interacts in [(0, True), (1, False)]:
        attn = m.blocks[i].attn
        a = SparseTensor(torch.randn(2, 64), coords)
        b = SparseTensor(a.feats.clone(), coords.clone())
        b.feats[1] += 1.0
        with torch.no_grad():
            changed = not torch.allclose(attn(a).feats[0], attn(b).feats[0])
        assert changed == interacts, f"block {i}"


def test_sparse_block_has_no_norm_keys_and_prenorm_maths() -> None:
    torch.manual_seed(0)
    blk = SparseTransformerBlock(32, num_heads=2)
    assert sorted({k.split(".")[0] for k in blk.state_dict()}) == ["attn", "mlp"]
    _randomize(blk)
    x = _sparse_input(32)
    h = x.feats + blk.attn(x.replace(F.layer_norm(x.feats, (32,), eps=1e-6))).feats
    ref = h + blk.mlp(F.layer_norm(h, (32,), eps=1e-6))
    torch.testing.assert_close(blk(x).feats, ref)


def test_encoder_matches_manual_pipeline() -> None:
    torch.manual_seed(0)
    m = SLatEncoder(**TINY)
    x = _sparse_input(12)
    h = F.linear(x.feats, m.input_layer.weight, m.input_layer.bias)
    h = h + sincos_position_embedding(x.coords[:, 1:], 64)
    hs = x.replace(h)
    for blk in m.blocks:
        hs = blk(hs)
    out = F.linear(F.layer_norm(hs.feats, (64,), eps=1e-5), m.out_layer.weight, m.out_layer.bias)
    z, mean, logvar = m(x, sample_posterior=False, return_raw=True)
    torch.testing.assert_close(mean, out[:, :4])
    torch.testing.assert_close(logvar, out[:, 4:])
    assert torch.equal(z.feats, mean) and torch.equal(z.coords, x.coords)


def test_encoder_posterior_sampling() -> None:
    torch.manual_seed(0)
    m = SLatEncoder(**TINY)
    x = _sparse_input(12)
    torch.manual_seed(1)
    z, mean, logvar = m(x, sample_posterior=True, return_raw=True)
    torch.manual_seed(1)
    eps = torch.randn_like(mean)
    torch.testing.assert_close(z.feats, mean + torch.exp(0.5 * logvar) * eps)


def test_encoder_tiny_forward_backward_with_checkpoint() -> None:
    torch.manual_seed(0)
    m = SLatEncoder(**TINY, use_checkpoint=True, qk_rms_norm=True)
    x = _sparse_input(12)
    z = m(x, sample_posterior=True)
    assert z.feats.shape == (65, 4) and z.feats.dtype == torch.float32
    z.feats.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_encoder_fp16_torso_matches_fp32() -> None:
    torch.manual_seed(0)
    m = SLatEncoder(**TINY, use_fp16=True)
    assert m.blocks[0].attn.to_qkv.weight.dtype == torch.float16
    assert m.input_layer.weight.dtype == torch.float32 and m.out_layer.weight.dtype == torch.float32
    x = _sparse_input(12)
    with torch.no_grad():
        y16 = m(x, sample_posterior=False).feats
        m.convert_to_fp32()
        y32 = m(x, sample_posterior=False).feats
    assert y16.dtype == torch.float32
    assert (y16 - y32).abs().max() <= 1e-2 * y32.abs().max()


def test_encoder_rejects_bad_input() -> None:
    m = SLatEncoder(**TINY)
    with pytest.raises(ValueError, match="feats"):
        m(_sparse_input(11))
    with pytest.raises(TypeError, match="SparseTensor"):
        m(torch.randn(4, 12))
    with pytest.raises(ValueError, match="attn_mode"):
        SLatEncoder(**{**TINY, "attn_mode": "shift_order"})


@pytest.mark.parametrize("ratio,blocks,c,exact", [
    (1.0, 12, 0, 1.0), (0.5, 12, 7, 0.5), (0.0, 12, 12, 1 - 11 / 12), (0.99, 12, 2, 1 - 1 / 12),
    (0.75, 24, 7, 0.75), (0.3, 4, 4, 0.25),
])
def test_num_checkpointed_blocks(ratio: float, blocks: int, c: int, exact: float) -> None:
    got_c, got_exact = num_checkpointed_blocks(ratio, blocks)
    assert got_c == c and got_exact == pytest.approx(exact)


def test_elastic_mixin_toggles_blocks_and_keeps_maths() -> None:
    torch.manual_seed(0)
    m = ElasticSLatEncoder(**{**TINY, "num_blocks": 4})
    x = _sparse_input(12)
    assert m.input_size(x) == 65
    with pytest.raises(ValueError, match="mem_ratio"):
        m.set_mem_ratio(1.5)

    def grads() -> list[torch.Tensor]:
        m.zero_grad()
        m(x, sample_posterior=False).feats.square().sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    ref = grads()
    assert m.set_mem_ratio(0.5) == pytest.approx(0.5)
    assert [b.use_checkpoint for b in m.blocks] == [True, True, True, False]
    for a, b in zip(ref, grads()):
        torch.testing.assert_close(a, b)
    m.reset_mem_ratio()
    assert not any(b.use_checkpoint for b in m.blocks)
    with m.mem_ratio(0.0) as exact:
        assert exact == pytest.approx(0.25) and all(b.use_checkpoint for b in m.blocks)
    assert not any(b.use_checkpoint for b in m.blocks)
    assert m.set_mem_ratio(1.0) == 1.0 and not any(b.use_checkpoint for b in m.blocks)
