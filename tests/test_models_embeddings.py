"""Embeddings and fp32-computing norms: exact values of the maths facts (reference README 2.4, 2.5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trellis.modules.embeddings import (
    AbsolutePositionEmbedder,
    TimestepEmbedder,
    sincos_position_embedding,
    timestep_embedding,
)
from trellis.modules.norm import ChannelLayerNorm32, GroupNorm32, LayerNorm32


def _ape_reference(p: tuple[int, int, int], channels: int) -> list[float]:
    fd = channels // 3 // 2
    out: list[float] = []
    for a in range(3):
        freqs = [10000.0 ** (-j / fd) for j in range(fd)]
        out += [math.sin(p[a] * f) for f in freqs]
        out += [math.cos(p[a] * f) for f in freqs]
    return out + [0.0] * (channels - len(out))


@pytest.mark.parametrize("channels,pad", [(64, 4), (768, 0), (1024, 4), (1280, 2)])
def test_ape_values_sin_first_axis_major_zero_padded(channels: int, pad: int) -> None:
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [31, 7, 15]])
    emb = AbsolutePositionEmbedder(channels)(coords)
    assert emb.shape == (3, channels) and emb.dtype == torch.float32
    for i, p in enumerate(coords.tolist()):
        ref = torch.tensor(_ape_reference(tuple(p), channels), dtype=torch.float64)
        torch.testing.assert_close(emb[i].double(), ref, atol=1e-5, rtol=0)
    if pad:
        assert torch.count_nonzero(emb[:, channels - pad:]) == 0
    # the origin: sin = 0, cos = 1 in every axis block
    fd = channels // 6
    assert torch.equal(emb[0, :fd], torch.zeros(fd)) and torch.equal(emb[0, fd:2 * fd], torch.ones(fd))


def test_ape_rejects_wrong_coords() -> None:
    with pytest.raises(ValueError, match="AbsolutePositionEmbedder"):
        AbsolutePositionEmbedder(64)(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="too small"):
        sincos_position_embedding(torch.zeros(2, 3), 4)


def test_timestep_embedding_cos_first() -> None:
    t = torch.tensor([0.0, 1.0, 500.0, 1000.0])
    emb = timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs
    torch.testing.assert_close(emb[:, :128].double(), torch.cos(args), atol=1e-4, rtol=0)
    torch.testing.assert_close(emb[:, 128:].double(), torch.sin(args), atol=1e-4, rtol=0)
    assert torch.equal(emb[0, :128], torch.ones(128))  # cos(0) first
    odd = timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.count_nonzero(odd[:, -1]) == 0


def test_timestep_embedder_keys_and_maths() -> None:
    torch.manual_seed(0)
    te = TimestepEmbedder(32)
    assert [k for k in te.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert te.mlp[0].weight.shape == (32, 256)
    t = torch.tensor([3.0, 999.0])
    ref = F.linear(F.silu(F.linear(timestep_embedding(t, 256), te.mlp[0].weight, te.mlp[0].bias)),
                   te.mlp[2].weight, te.mlp[2].bias)
    torch.testing.assert_close(te(t), ref)


def test_channel_layer_norm_over_dim1() -> None:
    torch.manual_seed(0)
    norm = ChannelLayerNorm32(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), norm.weight, norm.bias, 1e-5).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(norm(x), ref)
    assert list(norm.state_dict()) == ["weight", "bias"] and norm.eps == 1e-5
    with pytest.raises(ValueError, match="ChannelLayerNorm32"):
        norm(torch.randn(2, 5, 3, 3, 3))


def test_norms_compute_in_fp32_and_return_input_dtype() -> None:
    torch.manual_seed(0)
    x = (torch.randn(4, 16) * 100 + 300).half()
    ln = LayerNorm32(16, eps=1e-6)
    y = ln(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (16,), eps=1e-6), atol=2e-3, rtol=0)
    gn = GroupNorm32(4, 16)
    xg = torch.randn(2, 16, 3).half()
    assert gn(xg).dtype == torch.float16
    torch.testing.assert_close(gn(xg).float(), F.group_norm(xg.float(), 4, eps=1e-5), atol=2e-3, rtol=0)
