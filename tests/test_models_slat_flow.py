"""SLatFlowModel: res-blocks, down/up path, skip order, sparse modulated block (README 2.6, 3.8).

The reference forward below re-implements the conv stem with dense ``F.conv3d`` on a scattered grid
(an oracle independent of the sparse conv code) and runs each transformer block as its dense twin
per batch item.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trellis.models.structured_latent_flow import ElasticSLatFlowModel, SLatFlowModel, SparseResBlock3d
from trellis.modules.embeddings import sincos_position_embedding
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.transformer import ModulatedSparseTransformerCrossBlock, per_batch_rows
from trellis.modules.transformer import ModulatedTransformerCrossBlock

TINY = dict(resolution=16, in_channels=4, model_channels=64, cond_channels=32, out_channels=4, num_blocks=2,
            num_heads=4, patch_size=2, num_io_res_blocks=2, io_block_channels=[16], qk_rms_norm=True)


def _sparse_input(channels: int, seed: int = 0, res: int = 16, counts: tuple[int, ...] = (60, 35)) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(counts):
        flat = torch.randperm(res**3, generator=g)[:n].sort().values
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    return SparseTensor(torch.randn(coords.shape[0], channels, generator=g), coords)


def _randomize(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


# ----------------------------------------------------------------------------- dense oracle
def _conv_ref(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Submanifold 3x3x3 conv via a dense conv3d: weight (out, 3, 3, 3, in)."""
    c = coords.long()
    b, r = int(c[:, 0].max()) + 1, int(c[:, 1:].max()) + 1
    dense = feats.new_zeros(b, feats.shape[1], r, r, r)
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = feats
    out = F.conv3d(dense, weight.permute(0, 4, 1, 2, 3), bias, padding=1)
    return out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]  # [N, out]


def _down_ref(coords: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean with the +1 quirk; coarse voxels sorted by (b, x, y, z). Returns coarse coords, feats, parent."""
    coarse = coords.clone()
    coarse[:, 1:] //= 2
    uniq, parent = torch.unique(coarse, dim=0, return_inverse=True)  # lexicographic (b, x, y, z)
    sums = feats.new_zeros(uniq.shape[0], feats.shape[1]).index_add_(0, parent, feats)
    counts = torch.bincount(parent, minlength=uniq.shape[0]).to(feats.dtype)
    return uniq, sums / (counts + 1)[:, None], parent


def _res_ref(blk: SparseResBlock3d, coords, feats, emb):
    ln = F.layer_norm
    h = F.silu(ln(feats, feats.shape[-1:], blk.norm1.weight, blk.norm1.bias, 1e-6))
    h = _conv_ref(coords, h, blk.conv1.conv.weight, blk.conv1.conv.bias)
    mod = F.linear(F.silu(emb), blk.emb_layers[1].weight, blk.emb_layers[1].bias)
    scale, shift = mod[:, : blk.out_channels], mod[:, blk.out_channels:]  # scale first
    bid = coords[:, 0].long()
    h = F.silu(ln(h, h.shape[-1:], eps=1e-6) * (1 + scale[bid]) + shift[bid])
    h = _conv_ref(coords, h, blk.conv2.conv.weight, blk.conv2.conv.bias)
    skip = feats if blk.channels == blk.out_channels else F.linear(feats, blk.skip_connection.weight,
                                                                  blk.skip_connection.bias)
    return h + skip


def _dense_twin(blk: ModulatedSparseTransformerCrossBlock, ctx_channels: int) -> ModulatedTransformerCrossBlock:
    c = blk.norm2.weight.shape[0]
    twin = ModulatedTransformerCrossBlock(c, ctx_channels, num_heads=blk.self_attn.num_heads,
                                          qk_rms_norm=blk.self_attn.qk_rms_norm,
                                          qk_rms_norm_cross=blk.cross_attn.qk_rms_norm)
    twin.load_state_dict(blk.state_dict())
    return twin


def _flow_ref(m: SLatFlowModel, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    coords, feats = x.coords, F.linear(x.feats, m.input_layer.weight, m.input_layer.bias)
    emb = m.t_embedder(t)
    skips, parents = [], []
    for blk in m.input_blocks:
        if blk.resample is not None:
            coords_fine = coords
            coords, feats, parent = _down_ref(coords, feats)
            parents.append((coords_fine, parent))
        feats = _res_ref(blk, coords, feats, emb)
        skips.append(feats)
    feats = feats + sincos_position_embedding(coords[:, 1:], m.model_channels)  # coarse coords
    out = torch.empty_like(feats)
    for b in range(cond.shape[0]):
        rows = coords[:, 0] == b
        h = feats[rows][None]
        for blk in m.blocks:
            h = _dense_twin(blk, m.cond_channels)(h, emb[b:b + 1], cond[b:b + 1])
        out[rows] = h[0]
    feats = out
    for blk, skip in zip(m.out_blocks, reversed(skips)):
        feats = torch.cat([feats, skip], dim=1)  # h first, then the skip
        if blk.resample is not None:
            coords, parent = parents.pop()
            feats = feats[parent]  # each fine voxel copies its parent
        feats = _res_ref(blk, coords, feats, emb)
    feats = F.layer_norm(feats, feats.shape[-1:], eps=1e-5)
    return F.linear(feats, m.out_layer.weight, m.out_layer.bias)


# ----------------------------------------------------------------------------- tests
def test_layout_matches_reference_rules() -> None:
    m = SLatFlowModel(**{**TINY, "num_io_res_blocks": 3})
    ins = [(b.channels, b.out_channels, type(b.resample).__name__) for b in m.input_blocks]
    outs = [(b.channels, b.out_channels, type(b.resample).__name__) for b in m.out_blocks]
    assert ins == [(16, 16, "NoneType"), (16, 16, "NoneType"), (16, 64, "SparseDownsample")]
    assert outs == [(128, 16, "SparseUpsample"), (32, 16, "NoneType"), (32, 16, "NoneType")]
    with pytest.raises(ValueError, match="patch_size"):
        SLatFlowModel(**{**TINY, "patch_size": 4})


def test_sparse_modulated_block_equals_dense_twin_per_item() -> None:
    torch.manual_seed(0)
    blk = ModulatedSparseTransformerCrossBlock(32, 24, num_heads=4, qk_rms_norm=True)
    _randomize(blk, scale=0.2)
    twin = _dense_twin(blk, 24)
    x = _sparse_input(32, counts=(9, 5, 7))
    t, ctx = torch.randn(3, 32), torch.randn(3, 6, 24)
    y = blk(x, t, ctx).feats
    for b, sl in enumerate(x.layout):
        torch.testing.assert_close(y[sl], twin(x.feats[sl][None], t[b:b + 1], ctx[b:b + 1])[0])


def test_slat_flow_matches_dense_oracle() -> None:
    torch.manual_seed(0)
    m = SLatFlowModel(**TINY)
    _randomize(m)
    x = _sparse_input(4)
    t, cond = torch.rand(2) * 1000, torch.randn(2, 5, 32)
    y = m(x, t, cond)
    assert torch.equal(y.coords, x.coords) and y.feats.shape == (95, 4)
    with torch.no_grad():
        ref = _flow_ref(m, x, t, cond)
    torch.testing.assert_close(y.feats, ref, atol=1e-4, rtol=1e-4)


def test_slat_flow_init_outputs_zero_and_backward() -> None:
    torch.manual_seed(0)
    m = SLatFlowModel(**TINY, use_checkpoint=True)
    x = _sparse_input(4)
    t, cond = torch.rand(2) * 1000, torch.randn(2, 5, 32)
    assert torch.count_nonzero(m(x, t, cond).feats) == 0
    _randomize(m)
    m(x, t, cond).feats.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_slat_flow_without_skip_connections() -> None:
    torch.manual_seed(0)
    m = SLatFlowModel(**TINY, use_skip_connection=False)
    assert m.out_blocks[0].channels == 64 and m.out_blocks[1].channels == 16
    x = _sparse_input(4)
    assert m(x, torch.rand(2), torch.randn(2, 3, 32)).feats.shape == (95, 4)


def test_slat_flow_fp16_torso_matches_fp32() -> None:
    torch.manual_seed(0)
    m = SLatFlowModel(**TINY, use_fp16=True)
    _randomize(m)
    assert m.input_blocks[0].conv1.conv.weight.dtype == torch.float16
    assert m.input_blocks[0].norm1.weight.dtype == torch.float32
    assert m.out_layer.weight.dtype == torch.float32
    x = _sparse_input(4)
    t, cond = torch.rand(2) * 1000, torch.randn(2, 5, 32)
    with torch.no_grad():
        y16 = m(x, t, cond).feats
        m.convert_to_fp32()
        y32 = m(x, t, cond).feats
    assert y16.dtype == torch.float32
    assert (y16 - y32).abs().max() <= 2e-2 * y32.abs().max()


def test_elastic_slat_flow_covers_only_transformer_blocks() -> None:
    torch.manual_seed(0)
    m = ElasticSLatFlowModel(**{**TINY, "num_blocks": 4})
    assert m.set_mem_ratio(0.4) == pytest.approx(0.25)
    assert [b.use_checkpoint for b in m.blocks] == [True] * 4
    assert not any(hasattr(b, "use_checkpoint") for b in m.input_blocks)
    x = _sparse_input(4)
    assert m.input_size(x) == 95
    m(x, torch.rand(2), torch.randn(2, 3, 32)).feats.sum().backward()


def test_slat_flow_rejects_bad_input() -> None:
    m = SLatFlowModel(**TINY)
    x = _sparse_input(4)
    with pytest.raises(ValueError, match="cond must be"):
        m(x, torch.rand(2), torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.rand(3), torch.randn(2, 5, 32))


def test_per_batch_rows_matches_gather_and_its_gradient() -> None:
    x = _sparse_input(3, counts=(7, 4, 9))
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = per_batch_rows(x, v)
    assert torch.equal(out, v[x.batch_ids])
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, v, g)
    ref = torch.zeros_like(v).index_add_(0, x.batch_ids, g)
    torch.testing.assert_close(grad, ref)
    assert torch.autograd.gradcheck(lambda w: per_batch_rows(x, w), (v,))
    with pytest.raises(ValueError, match="per_batch_rows"):
        per_batch_rows(x, torch.randn(2, 5))
