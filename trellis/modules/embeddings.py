"""Sinusoidal embeddings: absolute 3D position (APE) and diffusion timestep.

The two use *opposite* sin/cos orders, as in the released TRELLIS weights
(reference README sections 2.4 and 2.5):

* APE: per axis ``[sin(p * f), cos(p * f)]``, axes concatenated (x, y, z), zero-padded to C.
* Timestep: ``[cos(t * f), sin(t * f)]``, then an MLP (``mlp.0`` Linear(256 -> C), SiLU, ``mlp.2``).

Both follow the sinusoidal encoding of Vaswani et al., "Attention Is All You Need" (2017), and the
timestep MLP follows DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AbsolutePositionEmbedder", "TimestepEmbedder", "timestep_embedding", "sincos_position_embedding"]


def sincos_position_embedding(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal absolute position embedding.

    Args:
        coords: ``[N, D]`` positions (integers or floats), one column per axis.
        channels: output width C; must be at least ``2 * D``.

    Returns:
        ``[N, C]`` float32. With ``fd = C // D // 2`` and ``f_j = 10000 ** (-j / fd)``, axis ``a``
        fills columns ``[2*fd*a, 2*fd*(a+1))`` with ``[sin(p_a * f), cos(p_a * f)]``; the remaining
        ``C - 2*fd*D`` columns are zero.
    """
    if coords.dim() != 2:
        raise ValueError(f"sincos_position_embedding: coords must be [N, D], got shape {tuple(coords.shape)}")
    n, d = coords.shape
    fd = channels // d // 2
    if fd < 1:
        raise ValueError(f"sincos_position_embedding: channels={channels} too small for {d} axes")
    freqs = torch.arange(fd, dtype=torch.float32, device=coords.device) / fd
    freqs = 1.0 / (10000.0 ** freqs)  # [fd]
    angles = coords.float()[:, :, None] * freqs  # [N, D, fd]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [N, D, 2*fd]
    emb = emb.reshape(n, d * 2 * fd)  # [N, D*2*fd], axis-major
    pad = channels - d * 2 * fd
    if pad > 0:
        emb = torch.cat([emb, emb.new_zeros(n, pad)], dim=-1)  # [N, C]
    return emb


class AbsolutePositionEmbedder(nn.Module):
    """Parameter-free module wrapper of :func:`sincos_position_embedding`.

    Args:
        channels: output width C.
        in_channels: number of axes D (3 for voxel coordinates).
    """

    def __init__(self, channels: int, in_channels: int = 3):
        super().__init__()
        self.channels = channels
        self.in_channels = in_channels

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords [N, D]`` -> ``[N, C]`` float32."""
        if coords.dim() != 2 or coords.shape[1] != self.in_channels:
            raise ValueError(
                f"AbsolutePositionEmbedder: expected coords [N, {self.in_channels}], got {tuple(coords.shape)}"
            )
        return sincos_position_embedding(coords, self.channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Frequency features of scalar timesteps.

    Args:
        t: ``[B]`` timesteps (the flow models receive ``1000 * t_unit``).
        dim: output width; ``half = dim // 2`` frequencies ``f_j = exp(-ln(max_period) * j / half)``.

    Returns:
        ``[B, dim]`` float32 = ``[cos(t * f), sin(t * f)]`` (cos first), zero-padded by one column
        when ``dim`` is odd.
    """
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be [B], got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into ``[B, C]`` vectors.

    Keys: ``mlp.0`` Linear(frequency_embedding_size -> C), ``mlp.2`` Linear(C -> C); SiLU between.
    The output has no final activation; each consumer applies its own SiLU.

    Args:
        hidden_size: C.
        frequency_embedding_size: width of the sinusoidal features (256 in TRELLIS).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B]`` -> ``[B, C]`` in the dtype of ``mlp.0.weight``."""
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))
