"""Dense transformer blocks and SparseStructureFlowModel (reference README 2.6, 3.3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trellis.models.sparse_structure_flow import SparseStructureFlowModel, patchify, unpatchify
from trellis.modules.embeddings import sincos_position_embedding
from trellis.modules.transformer import FeedForwardNet, ModulatedTransformerCrossBlock, TransformerBlock

TINY = dict(resolution=8, in_channels=4, model_channels=64, cond_channels=32, out_channels=4, num_blocks=2,
            num_heads=4, patch_size=2, qk_rms_norm=True, qk_rms_norm_cross=True)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero values everywhere (the DiT init zeroes gates and the output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))


def test_patchify_order_and_round_trip() -> None:
    b, c, r, p = 2, 3, 4, 2
    x = torch.randn(b, c, r, r, r)
    tok = patchify(x, p)
    assert tok.shape == (b, (r // p) ** 3, c * p**3)
    g = r // p
    for (gx, gy, gz, ch, i, j, k) in [(0, 0, 0, 0, 0, 0, 0), (1, 0, 1, 2, 1, 0, 1), (1, 1, 1, 1, 0, 1, 1)]:
        token = gx * g * g + gy * g + gz
        chan = ch * p**3 + i * p * p + j * p + k
        assert tok[1, token, chan] == x[1, ch, gx * p + i, gy * p + j, gz * p + k]
    assert torch.equal(unpatchify(tok, p, (g, g, g)), x)
    assert torch.equal(unpatchify(patchify(x, 1), 1, (r, r, r)), x)


def test_feed_forward_keys_and_tanh_gelu() -> None:
    ffn = FeedForwardNet(8, mlp_ratio=4)
    assert list(ffn.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    x = torch.randn(3, 8)
    ref = F.linear(F.gelu(F.linear(x, ffn.mlp[0].weight, ffn.mlp[0].bias), approximate="tanh"),
                   ffn.mlp[2].weight, ffn.mlp[2].bias)
    torch.testing.assert_close(ffn(x), ref)


def test_modulated_block_adaln_chunk_order() -> None:
    """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; only norm2 affine; no gate on cross."""
    torch.manual_seed(0)
    c = 16
    blk = ModulatedTransformerCrossBlock(c, 12, num_heads=2, qk_rms_norm=True)
    _randomize(blk)
    assert [k for k in blk.state_dict() if "norm" in k and "rms" not in k] == ["norm2.weight", "norm2.bias"]
    x, t, ctx = torch.randn(2, 5, c), torch.randn(2, c), torch.randn(2, 3, 12)
    mod = F.linear(F.silu(t), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    shift_msa, scale_msa, gate_msa = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    shift_mlp, scale_mlp, gate_mlp = mod[:, 3 * c:4 * c], mod[:, 4 * c:5 * c], mod[:, 5 * c:]
    ln = lambda h: F.layer_norm(h, (c,), eps=1e-6)  # noqa: E731
    h = ln(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    ref = x + gate_msa[:, None] * blk.self_attn(h)
    ref = ref + blk.cross_attn(F.layer_norm(ref, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6), ctx)
    h = ln(ref) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    ref = ref + gate_mlp[:, None] * blk.mlp(h)
    torch.testing.assert_close(blk(x, t, ctx), ref)


def test_share_mod_block_takes_6c_vector() -> None:
    torch.manual_seed(0)
    own = ModulatedTransformerCrossBlock(16, 8, num_heads=2)
    shared = ModulatedTransformerCrossBlock(16, 8, num_heads=2, share_mod=True)
    _randomize(own)
    assert not any(k.startswith("adaLN") for k in shared.state_dict())
    shared.load_state_dict({k: v for k, v in own.state_dict().items() if not k.startswith("adaLN")})
    x, t, ctx = torch.randn(1, 4, 16), torch.randn(1, 16), torch.randn(1, 2, 8)
    torch.testing.assert_close(shared(x, own.adaLN_modulation(t), ctx), own(x, t, ctx))


def test_block_checkpointing_same_values_and_grads() -> None:
    torch.manual_seed(0)
    blk = TransformerBlock(16, num_heads=2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    y0 = blk(x)
    g0 = torch.autograd.grad(y0.square().sum(), [x, *blk.parameters()])
    blk.use_checkpoint = True
    y1 = blk(x)
    g1 = torch.autograd.grad(y1.square().sum(), [x, *blk.parameters()])
    torch.testing.assert_close(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_ss_flow_init_outputs_zero_and_pos_emb_buffer() -> None:
    torch.manual_seed(0)
    m = SparseStructureFlowModel(**TINY)
    x, t, cond = torch.randn(2, 4, 8, 8, 8), torch.rand(2) * 1000, torch.randn(2, 3, 32)
    assert torch.count_nonzero(m(x, t, cond)) == 0
    g = 4
    coords = torch.tensor([[i, j, k] for i in range(g) for j in range(g) for k in range(g)])
    assert torch.equal(m.pos_emb, sincos_position_embedding(coords, 64))
    assert "pos_emb" in m.state_dict()


def test_ss_flow_forward_matches_manual_pipeline() -> None:
    torch.manual_seed(0)
    m = SparseStructureFlowModel(**TINY)
    _randomize(m)
    x, t, cond = torch.randn(2, 4, 8, 8, 8), torch.rand(2) * 1000, torch.randn(2, 3, 32)
    h = m.input_layer(patchify(x, 2)) + m.pos_emb
    temb = m.t_embedder(t)
    for blk in m.blocks:
        h = blk(h, temb, cond)
    h = m.out_layer(F.layer_norm(h, (64,), eps=1e-5))
    torch.testing.assert_close(m(x, t, cond), unpatchify(h, 2, (4, 4, 4)))


def test_ss_flow_tiny_forward_backward() -> None:
    torch.manual_seed(0)
    m = SparseStructureFlowModel(**TINY, use_checkpoint=True)
    _randomize(m)
    x, t, cond = torch.randn(2, 4, 8, 8, 8), torch.rand(2) * 1000, torch.randn(2, 3, 32)
    y = m(x, t, cond)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.blocks[0].self_attn.to_qkv.weight.grad.abs().sum() > 0


def test_ss_flow_fp16_torso_matches_fp32() -> None:
    torch.manual_seed(0)
    m = SparseStructureFlowModel(**TINY, use_fp16=True)
    _randomize(m)
    assert m.blocks[0].mlp.mlp[0].weight.dtype == torch.float16
    assert m.blocks[0].norm2.weight.dtype == torch.float32
    assert m.blocks[0].self_attn.q_rms_norm.gamma.dtype == torch.float32
    assert m.out_layer.weight.dtype == torch.float32 and m.t_embedder.mlp[0].weight.dtype == torch.float32
    x, t, cond = torch.randn(2, 4, 8, 8, 8), torch.rand(2) * 1000, torch.randn(2, 3, 32)
    with torch.no_grad():
        y16 = m(x, t, cond)
        m.convert_to_fp32()
        y32 = m(x, t, cond)
    assert y16.dtype == torch.float32
    assert (y16 - y32).abs().max() <= 2e-2 * y32.abs().max()


def test_ss_flow_rejects_bad_input() -> None:
    m = SparseStructureFlowModel(**TINY)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 4, 4, 4, 4), torch.rand(2), torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="cond must be"):
        m(torch.randn(2, 4, 8, 8, 8), torch.rand(2), torch.randn(2, 3, 31))
    with pytest.raises(ValueError, match="pe_mode"):
        SparseStructureFlowModel(**{**TINY, "pe_mode": "rope"})


def test_ss_flow_share_mod_uses_one_top_level_modulation() -> None:
    torch.manual_seed(0)
    m = SparseStructureFlowModel(**TINY, share_mod=True)
    keys = list(m.state_dict())
    assert "adaLN_modulation.1.weight" in keys and not any(".adaLN_modulation" in k for k in keys)
    _randomize(m)
    x, t, cond = torch.randn(1, 4, 8, 8, 8), torch.rand(1) * 1000, torch.randn(1, 3, 32)
    y = m(x, t, cond)
    assert y.shape == x.shape and torch.isfinite(y).all()
