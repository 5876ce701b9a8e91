"""Sparse-structure VAE: a dense 3D conv VAE between the 64^3 occupancy grid and a 16^3 x 8 latent.

State dicts match ``reference/manifests/ss_vae_conv3d_16l8_fp16.{encoder,decoder}.json`` (reference
README sections 3.1-3.2). The decoder's upsampling is a conv to ``8 C`` channels followed by a 3D
pixel shuffle (input channel ``c*8 + a*4 + b*2 + e`` -> output channel ``c`` at ``(2x+a, 2y+b, 2z+e)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis.modules.fp16 import TorsoPrecisionMixin
from trellis.modules.norm import ChannelLayerNorm32, GroupNorm32


def norm_layer(norm_type: str, channels: int) -> nn.Module:
    if norm_type == "layer":
        return ChannelLayerNorm32(channels, eps=1e-5)
    if norm_type == "group":
        return GroupNorm32(32, channels, eps=1e-5)
    raise ValueError(f"norm_type must be 'layer' or 'group', got {norm_type!r}")


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C*f^3, X, Y, Z] -> [B, C, X*f, Y*f, Z*f]; channel c*f^3 + a*f^2 + b*f + e -> (c, fx+a, fy+b, fz+e)."""
    b, c, x_, y_, z_ = x.shape
    c_out = c // factor ** 3
    x = x.reshape(b, c_out, factor, factor, factor, x_, y_, z_)  # [B, C, a, b, e, X, Y, Z]
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C, X, a, Y, b, Z, e]
    return x.reshape(b, c_out, x_ * factor, y_ * factor, z_ * factor)


class ResBlock3d(nn.Module):
    """h = conv1(SiLU(norm1(x))); h = conv2(SiLU(norm2(h))); out = h + skip(x)."""

    def __init__(self, channels: int, out_channels: int | None = None, norm_type: str = "layer"):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = norm_layer(norm_type, channels)
        self.norm2 = norm_layer(norm_type, out_channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Conv3d with kernel 2, stride 2: [B, C, R] -> [B, C', R/2]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleBlock3d(nn.Module):
    """Conv3d(k3) to 8 C' channels, then 3D pixel shuffle x2: [B, C, R] -> [B, C', 2R]."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


class SparseStructureEncoder(TorsoPrecisionMixin, nn.Module):
    """[B, in_channels, R, R, R] occupancy -> latent [B, latent_channels, R/4, R/4, R/4].

    Args:
        in_channels: input channels (1: occupancy).
        latent_channels: latent channels (8); the head outputs mean and logvar (2x).
        num_res_blocks: res blocks per stage.
        channels: one stage per entry; every stage but the last ends with a stride-2 conv.
        num_res_blocks_middle: res blocks after the last stage.
        norm_type: 'layer' (channel LayerNorm) or 'group' (GroupNorm, 32 groups).
        use_fp16: keep the torso (``blocks``, ``middle_block``) in fp16.
    """

    torso_modules = ("blocks", "middle_block")

    def __init__(self, in_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.input_layer = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                blocks.append(DownsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[-1], channels[-1], norm_type)
                                            for _ in range(num_res_blocks_middle)])
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], latent_channels * 2, 3, padding=1))
        self._init_torso_precision(use_fp16)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, return_raw: bool = False):
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseStructureEncoder: expected [B, {self.in_channels}, R, R, R], got {tuple(x.shape)}")
        h = self.input_layer(x.float()).type(self.dtype)
        for block in self.blocks:
            h = block(h)
        h = self.middle_block(h)
        h = self.out_layer(h.float())
        mean, logvar = h.chunk(2, dim=1)  # [B, 8, r, r, r] each
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample_posterior else mean
        return (z, mean, logvar) if return_raw else z


class SparseStructureDecoder(TorsoPrecisionMixin, nn.Module):
    """Latent [B, latent_channels, r, r, r] -> occupancy logits [B, out_channels, 4r, 4r, 4r].

    Args mirror the encoder; ``channels`` go from coarse to fine and every stage but the last ends
    with a x2 upsampling. State-dict order: ``input_layer``, ``middle_block``, ``blocks``, ``out_layer``.
    """

    torso_modules = ("blocks", "middle_block")

    def __init__(self, out_channels: int, latent_channels: int, num_res_blocks: int, channels: list[int],
                 num_res_blocks_middle: int = 2, norm_type: str = "layer", use_fp16: bool = False):
        super().__init__()
        self.out_channels = out_channels
        self.latent_channels = latent_channels
        self.input_layer = nn.Conv3d(latent_channels, channels[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(channels[0], channels[0], norm_type)
                                            for _ in range(num_res_blocks_middle)])
        blocks: list[nn.Module] = []
        for i, ch in enumerate(channels):
            blocks.extend(ResBlock3d(ch, ch, norm_type) for _ in range(num_res_blocks))
            if i < len(channels) - 1:
                blocks.append(UpsampleBlock3d(ch, channels[i + 1]))
        self.blocks = nn.ModuleList(blocks)
        self.out_layer = nn.Sequential(norm_layer(norm_type, channels[-1]), nn.SiLU(),
                                       nn.Conv3d(channels[-1], out_channels, 3, padding=1))
        self._init_torso_precision(use_fp16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.latent_channels:
            raise ValueError(f"SparseStructureDecoder: expected [B, {self.latent_channels}, r, r, r], got {tuple(x.shape)}")
        h = self.input_layer(x.float()).type(self.dtype)
        h = self.middle_block(h)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h.float())
