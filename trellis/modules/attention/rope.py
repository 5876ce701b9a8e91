"""Rotary position embedding (RoFormer, Su et al. 2021, arXiv:2104.09864) over 1-D or N-D positions.

No released TRELLIS config uses RoPE (they all use ``pe_mode='ape'``); it is offered for new models.
For ``n_axes`` position axes and head dim d, each axis gets ``f = d // n_axes // 2`` frequencies
``w_j = 10000^(-j / f)``. The rotation angles of a token are ``[p_0 w, p_1 w, ..., p_{n-1} w]`` (axis
major), ``n * f`` angles in all; the remaining ``d / 2 - n * f`` channel pairs are not rotated.
Channel pair i is ``(x[2i], x[2i+1])`` and is rotated by angle i: ``(a, b) -> (a cos - b sin, a sin + b cos)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryPositionEmbedder"]


class RotaryPositionEmbedder(nn.Module):
    """Applies RoPE to queries and keys.

    Args:
        hidden_size: head dim d (must be even).
        in_channels: number of position axes (1 for sequences, 3 for voxels).

    Has no parameters and no state-dict entries.
    """

    def __init__(self, hidden_size: int, in_channels: int = 1):
        super().__init__()
        if hidden_size % 2 != 0:
            raise ValueError(f"RotaryPositionEmbedder: hidden_size must be even, got {hidden_size}")
        if in_channels < 1:
            raise ValueError(f"RotaryPositionEmbedder: in_channels must be >= 1, got {in_channels}")
        self.hidden_size = hidden_size
        self.in_channels = in_channels
        self.freq_dim = hidden_size // in_channels // 2
        if self.freq_dim < 1:
            raise ValueError(
                f"RotaryPositionEmbedder: hidden_size {hidden_size} too small for {in_channels} position axes"
            )
        freqs = 10000.0 ** (-torch.arange(self.freq_dim, dtype=torch.float64) / self.freq_dim)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions ``[..., in_channels]`` (or ``[...]`` when in_channels == 1) -> angles ``[..., d/2]``."""
        if self.in_channels == 1 and (positions.dim() == 0 or positions.shape[-1] != 1):
            positions = positions.unsqueeze(-1)
        if positions.shape[-1] != self.in_channels:
            raise ValueError(
                f"RotaryPositionEmbedder: positions must end in {self.in_channels} axes, got {tuple(positions.shape)}"
            )
        ang = positions.float().unsqueeze(-1) * self.freqs.to(positions.device)  # [..., n, f]
        ang = ang.flatten(-2)  # [..., n, f] -> [..., n*f]
        pad = self.hidden_size // 2 - ang.shape[-1]
        if pad > 0:
            ang = torch.cat([ang, ang.new_zeros(*ang.shape[:-1], pad)], dim=-1)
        return ang

    def rotate(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """x ``[..., H, d]`` rotated by angles ``[..., d/2]`` (broadcast over heads); computed in fp32."""
        xf = x.float().unflatten(-1, (-1, 2))  # [..., H, d] -> [..., H, d/2, 2]
        a, b = xf[..., 0], xf[..., 1]
        cos = angles.cos().unsqueeze(-2)  # [..., 1, d/2]
        sin = angles.sin().unsqueeze(-2)
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)  # [..., H, d/2, 2]
        return out.flatten(-2).to(x.dtype)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k ``[B, L, H, d]`` (or ``[N, H, d]``); positions ``[L, n]``, ``[B, L, n]`` or ``[N, n]``.

        Without positions, token index ``arange(L)`` along dim -3 is used (needs in_channels == 1).
        """
        if positions is None:
            if self.in_channels != 1:
                raise ValueError("RotaryPositionEmbedder: positions are required when in_channels > 1")
            positions = torch.arange(q.shape[-3], device=q.device)
        ang = self.angles(positions)
        return self.rotate(q, ang), self.rotate(k, ang)
