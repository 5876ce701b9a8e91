"""SparseStructureFlowModel: the dense DiT of TRELLIS stage 1 (reference README section 3.3).

It predicts the rectified-flow velocity of the ``[B, 8, 16, 16, 16]`` sparse-structure latent,
conditioned on a timestep (``1000 * t``) and condition tokens (DINOv2 image or CLIP text).

    x [B, C_in, R, R, R] --patchify--> [B, (R/p)^3, C_in p^3] --input_layer + pos_emb-->
    [B, L, C] --blocks (fp16 torso)--> LN (no affine, eps 1e-5) --out_layer--> unpatchify

Weight init (DiT-style, Peebles & Xie 2023): xavier-uniform for every Linear with zero bias; the
timestep MLP N(0, 0.02); the last layer of every ``adaLN_modulation`` and ``out_layer`` zero. So a
freshly built model outputs exactly zero and each block starts as the identity (zero gates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis.modules.embeddings import TimestepEmbedder, sincos_position_embedding
from trellis.modules.fp16 import TorsoPrecisionMixin
from trellis.modules.transformer import ModulatedTransformerCrossBlock

__all__ = ["SparseStructureFlowModel", "patchify", "unpatchify", "init_dit_weights"]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, R, R, R]`` -> tokens ``[B, (R/p)^3, C * p^3]``.

    Token index ``x * (R/p)^2 + y * (R/p) + z``; channel index within a token
    ``c * p^3 + i * p^2 + j * p + k`` for the in-patch offset ``(i, j, k)``.
    """
    if x.dim() != 5:
        raise ValueError(f"patchify: expected [B, C, X, Y, Z], got shape {tuple(x.shape)}")
    b, c, *spatial = x.shape
    p = patch_size
    if any(s % p for s in spatial):
        raise ValueError(f"patchify: spatial size {spatial} not divisible by patch_size {p}")
    gx, gy, gz = (s // p for s in spatial)
    x = x.reshape(b, c, gx, p, gy, p, gz, p)  # [B, C, gx, i, gy, j, gz, k]
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, gx, gy, gz, C, i, j, k]
    return x.reshape(b, gx * gy * gz, c * p**3)  # [B, L, C p^3]


def unpatchify(tokens: torch.Tensor, patch_size: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, gx*gy*gz, C * p^3]`` -> ``[B, C, gx*p, gy*p, gz*p]``."""
    b, n, cp = tokens.shape
    p = patch_size
    gx, gy, gz = grid
    if n != gx * gy * gz or cp % p**3:
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit grid {grid} with patch {p}")
    c = cp // p**3
    x = tokens.reshape(b, gx, gy, gz, c, p, p, p)  # [B, gx, gy, gz, C, i, j, k]
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, gx, i, gy, j, gz, k]
    return x.reshape(b, c, gx * p, gy * p, gz * p)


def init_dit_weights(model: nn.Module) -> None:
    """DiT-style init: xavier-uniform Linear weights (zero bias) everywhere, then
    ``t_embedder.mlp.{0,2}`` N(0, 0.02), every ``adaLN_modulation`` last Linear zero, ``out_layer`` zero.
    Works for dense and sparse models (``SparseLinear`` is an ``nn.Linear``)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    t_embedder = getattr(model, "t_embedder", None)
    if t_embedder is not None:
        nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
    for m in model.modules():
        ada = getattr(m, "adaLN_modulation", None)
        if isinstance(ada, nn.Sequential):
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
    out_layer = getattr(model, "out_layer", None)
    if out_layer is not None:
        nn.init.zeros_(out_layer.weight)
        nn.init.zeros_(out_layer.bias)


class SparseStructureFlowModel(TorsoPrecisionMixin, nn.Module):
    """Dense flow transformer over the sparse-structure latent grid.

    Args:
        resolution: R, side of the latent grid (16).
        in_channels: latent channels of the input (8).
        model_channels: C (768 B, 1024 L, 1280 XL).
        cond_channels: width of the condition tokens (1024 DINOv2, 768 CLIP).
        out_channels: velocity channels (8).
        num_blocks: number of modulated cross blocks.
        num_heads: attention heads; default ``model_channels // num_head_channels``.
        num_head_channels: head width used when ``num_heads`` is None.
        mlp_ratio: FFN hidden width / C.
        patch_size: p (1 in every TRELLIS config).
        pe_mode: "ape" (sinusoidal, the only mode of the released models).
        use_fp16: keep the torso (``blocks``) in float16.
        use_checkpoint: activation checkpointing of every block.
        share_mod: one top-level ``adaLN_modulation`` shared by all blocks.
        qk_rms_norm: RMS norm of q, k in the self-attention.
        qk_rms_norm_cross: RMS norm of q, k in the cross-attention.
    """

    torso_modules = ("blocks",)

    def __init__(
        self,
        resolution: int,
        in_channels: int,
        model_channels: int,
        cond_channels: int,
        out_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = 2,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        if pe_mode != "ape":
            raise ValueError(f"SparseStructureFlowModel: pe_mode {pe_mode!r} not supported (only 'ape')")
        if resolution % patch_size:
            raise ValueError(
                f"SparseStructureFlowModel: resolution {resolution} not divisible by patch_size {patch_size}"
            )
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.pe_mode = pe_mode
        self.use_checkpoint = use_checkpoint
        self.share_mod = share_mod
        if model_channels % self.num_heads:
            raise ValueError(
                f"SparseStructureFlowModel: model_channels {model_channels} not divisible by num_heads "
                f"{self.num_heads}"
            )

        g = resolution // patch_size
        axis = torch.arange(g)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)  # [g^3, 3]
        self.register_buffer("pos_emb", sincos_position_embedding(grid, model_channels), persistent=True)

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.input_layer = nn.Linear(in_channels * patch_size**3, model_channels)
        self.blocks = nn.ModuleList([
            ModulatedTransformerCrossBlock(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                attn_mode="full", use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm,
                qk_rms_norm_cross=qk_rms_norm_cross, share_mod=share_mod,
            )
            for _ in range(num_blocks)
        ])
        self.out_layer = nn.Linear(model_channels, out_channels * patch_size**3)

        init_dit_weights(self)
        self._init_torso_precision(use_fp16)

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity prediction.

        Args:
            x: ``[B, in_channels, R, R, R]`` noisy latent.
            t: ``[B]`` timesteps, ``1000 * t_unit``.
            cond: ``[B, L_cond, cond_channels]`` condition tokens.

        Returns:
            ``[B, out_channels, R, R, R]`` in the dtype of ``x``.
        """
        r, p = self.resolution, self.patch_size
        if x.dim() != 5 or tuple(x.shape[1:]) != (self.in_channels, r, r, r):
            raise ValueError(
                f"SparseStructureFlowModel: x must be [B, {self.in_channels}, {r}, {r}, {r}], got {tuple(x.shape)}"
            )
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"SparseStructureFlowModel: t must be [B={x.shape[0]}], got {tuple(t.shape)}")
        if cond.dim() != 3 or cond.shape[0] != x.shape[0] or cond.shape[2] != self.cond_channels:
            raise ValueError(
                f"SparseStructureFlowModel: cond must be [B={x.shape[0]}, L, {self.cond_channels}], "
                f"got {tuple(cond.shape)}"
            )
        in_dtype = x.dtype
        h = patchify(x, p)  # [B, L, C_in p^3]
        h = self.input_layer(h.to(self.input_layer.weight.dtype))  # [B, L, C]
        h = h + self.pos_emb[None].to(h.dtype)
        t_emb = self.t_embedder(t)  # [B, C]
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)  # [B, 6C]
        h = h.to(self.dtype)
        t_emb = t_emb.to(self.dtype)
        cond = cond.to(self.dtype)
        for block in self.blocks:
            h = block(h, t_emb, cond)
        h = F.layer_norm(h.float(), h.shape[-1:], eps=1e-5)
        h = self.out_layer(h.to(self.out_layer.weight.dtype))  # [B, L, C_out p^3]
        g = r // p
        return unpatchify(h, p, (g, g, g)).to(in_dtype)
