"""SLatFlowModel: the sparse DiT of TRELLIS stage 2 with a U-shaped conv stem (reference README 3.8).

    x SparseTensor [N, 8] (64^3) --input_layer--> [N, io0]
      --input_blocks: SparseResBlock3d (last one of each stage downsamples by 2)--> [N', C] (32^3)
      --+ APE(coarse xyz)--> blocks: ModulatedSparseTransformerCrossBlock (full attention)
      --out_blocks: SparseResBlock3d on cat[h, skip] (first one of each stage upsamples)--> [N, io0]
      --LN (no affine, eps 1e-5)--> out_layer --> [N, 8], same coords and row order as x

Input block i saves its output as a skip; out block j receives ``cat[h, skip of input block
(n_total - 1 - j)]`` along channels (h first). Torso (fp16 with ``use_fp16``): ``input_blocks``,
``blocks``, ``out_blocks``.

Weight init (DiT-style): xavier-uniform for every Linear (zero bias), timestep MLP N(0, 0.02), every
``adaLN_modulation`` last Linear zero, ``out_layer`` zero, and ``conv2`` of every res-block zero, so
a fresh model outputs zero and every res-block starts as its skip path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis.models.elastic import SparseTransformerElasticMixin
from trellis.models.sparse_structure_flow import init_dit_weights
from trellis.modules.embeddings import AbsolutePositionEmbedder, TimestepEmbedder
from trellis.modules.fp16 import TorsoPrecisionMixin
from trellis.modules.fused import FusedRegionsMixin
from trellis.modules.norm import LayerNorm32
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.conv import SparseConv3d
from trellis.modules.sparse.linear import SparseLinear
from trellis.modules.sparse.spatial import SparseDownsample, SparseUpsample
from trellis.modules.sparse.transformer import ModulatedSparseTransformerCrossBlock, per_batch_rows

__all__ = ["SparseResBlock3d", "SLatFlowModel", "ElasticSLatFlowModel"]


class SparseResBlock3d(nn.Module):
    """Sparse conv res-block with timestep conditioning and optional resampling.

    1. ``x = down(x)`` or ``up(x)`` (optional, first);
    2. ``h = conv1(SiLU(LN_affine(x)))``;
    3. ``[scale | shift] = emb_layers(emb)`` (scale first), per batch item;
    4. ``h = conv2(SiLU(LN(h) * (1 + scale) + shift))``;
    5. ``out = h + skip(x)`` (``skip_connection`` Linear when the width changes, else identity).

    Keys: ``norm1.*`` [ch], ``conv1.conv.*``, ``conv2.conv.*``, ``emb_layers.1.*`` Linear(emb -> 2 out),
    ``skip_connection.*`` (only when ``channels != out_channels``). LN eps 1e-6.

    Args:
        channels: input width.
        emb_channels: width of the timestep embedding.
        out_channels: output width (default ``channels``).
        downsample: halve the resolution first (``SparseDownsample(2)``).
        upsample: double the resolution first (``SparseUpsample(2)``, paired with an earlier downsample).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        if downsample and upsample:
            raise ValueError("SparseResBlock3d: downsample and upsample are mutually exclusive")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.norm1 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm2 = LayerNorm32(self.out_channels, elementwise_affine=False, eps=1e-6)
        self.conv1 = SparseConv3d(channels, self.out_channels, 3)
        self.conv2 = SparseConv3d(self.out_channels, self.out_channels, 3)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels, bias=True))
        self.skip_connection = (
            SparseLinear(channels, self.out_channels) if channels != self.out_channels else nn.Identity()
        )
        self.resample = SparseDownsample(2) if downsample else SparseUpsample(2) if upsample else None

    def forward(self, x: SparseTensor, emb: torch.Tensor) -> SparseTensor:
        """``x`` SparseTensor ``[N, channels]``, ``emb [B, emb_channels]`` -> SparseTensor ``[N', out]``."""
        if self.resample is not None:
            x = self.resample(x)
        mod = per_batch_rows(x, self.emb_layers(emb).to(x.feats.dtype))  # [B, 2 out] -> [N, 2 out]
        scale, shift = mod.chunk(2, dim=1)  # scale first
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = h.replace(F.silu(self.norm2(h.feats) * (1 + scale) + shift))
        h = self.conv2(h)
        return h.replace(h.feats + self.skip_connection(x).feats)  # Identity passes x through


class SLatFlowModel(FusedRegionsMixin, TorsoPrecisionMixin, nn.Module):
    """Sparse flow transformer over the structured latent.

    Args:
        resolution: grid side of the input (64); stored, does not affect the weights.
        in_channels: latent width of the input (8).
        model_channels: C (768 B, 1024 L, 1280 XL).
        cond_channels: width of the condition tokens (1024 DINOv2, 768 CLIP).
        out_channels: velocity width (8).
        num_blocks: transformer blocks.
        num_heads: attention heads; default ``model_channels // num_head_channels``.
        num_head_channels: head width used when ``num_heads`` is None.
        mlp_ratio: FFN hidden width / C.
        patch_size: total downsampling factor; ``log2(patch_size) == len(io_block_channels)``.
        num_io_res_blocks: res-blocks per stage on each side (the last input / first output one resamples).
        io_block_channels: width of each stage ([128] or [256]).
        pe_mode: "ape" (the only mode of the released models).
        use_fp16: keep the torso (``input_blocks``, ``blocks``, ``out_blocks``) in float16.
        use_checkpoint: activation checkpointing of every transformer block.
        use_skip_connection: concatenate the input-block skips into the out blocks.
        share_mod: one top-level ``adaLN_modulation`` shared by all transformer blocks.
        qk_rms_norm: RMS norm of q, k in the self-attention.
        qk_rms_norm_cross: RMS norm of q, k in the cross-attention.

    Not compiled whole (its ``SparseTensor`` caches do not survive dynamo): ``compile_fused_regions``
    (what the trainer's ``compile`` calls) compiles the fused element-wise regions of its transformer
    blocks instead (``trellis.modules.fused``).
    """

    torso_modules = ("input_blocks", "blocks", "out_blocks")

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
        num_io_res_blocks: int = 2,
        io_block_channels: list[int] | None = None,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        use_skip_connection: bool = True,
        share_mod: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        if pe_mode != "ape":
            raise ValueError(f"{name}: pe_mode {pe_mode!r} not supported (only 'ape')")
        io_block_channels = list(io_block_channels) if io_block_channels is not None else [128]
        if not io_block_channels or patch_size != 2 ** len(io_block_channels):
            raise ValueError(
                f"{name}: patch_size ({patch_size}) must equal 2 ** len(io_block_channels) "
                f"(io_block_channels={io_block_channels})"
            )
        if num_io_res_blocks < 1:
            raise ValueError(f"{name}: num_io_res_blocks must be >= 1, got {num_io_res_blocks}")
        self.resolution = resolution
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        if model_channels % self.num_heads:
            raise ValueError(f"{name}: model_channels {model_channels} not divisible by num_heads {self.num_heads}")
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size
        self.num_io_res_blocks = num_io_res_blocks
        self.io_block_channels = io_block_channels
        self.pe_mode = pe_mode
        self.use_checkpoint = use_checkpoint
        self.use_skip_connection = use_skip_connection
        self.share_mod = share_mod

        self.t_embedder = TimestepEmbedder(model_channels)
        if share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 6 * model_channels))
        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = SparseLinear(in_channels, io_block_channels[0])

        # each stage: (n - 1) plain blocks, then one that downsamples to the next stage's width
        self.input_blocks = nn.ModuleList()
        next_widths = io_block_channels[1:] + [model_channels]
        for ch, next_ch in zip(io_block_channels, next_widths):
            for _ in range(num_io_res_blocks - 1):
                self.input_blocks.append(SparseResBlock3d(ch, model_channels, ch))
            self.input_blocks.append(SparseResBlock3d(ch, model_channels, next_ch, downsample=True))

        self.blocks = nn.ModuleList([
            ModulatedSparseTransformerCrossBlock(
                model_channels, cond_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                attn_mode="full", use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm,
                qk_rms_norm_cross=qk_rms_norm_cross, share_mod=share_mod,
            )
            for _ in range(num_blocks)
        ])

        # mirror: per stage (coarsest first) one upsampling block, then (n - 1) plain blocks
        mult = 2 if use_skip_connection else 1
        self.out_blocks = nn.ModuleList()
        prev_widths = [model_channels] + io_block_channels[::-1][:-1]
        for ch, prev_ch in zip(io_block_channels[::-1], prev_widths):
            self.out_blocks.append(SparseResBlock3d(prev_ch * mult, model_channels, ch, upsample=True))
            for _ in range(num_io_res_blocks - 1):
                self.out_blocks.append(SparseResBlock3d(ch * mult, model_channels, ch))

        self.out_layer = SparseLinear(io_block_channels[0], out_channels)

        init_dit_weights(self)
        for block in list(self.input_blocks) + list(self.out_blocks):
            nn.init.zeros_(block.conv2.conv.weight)
            nn.init.zeros_(block.conv2.conv.bias)
        self._init_torso_precision(use_fp16)

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> SparseTensor:
        """Velocity prediction.

        Args:
            x: SparseTensor ``[N, in_channels]`` on the ``resolution``^3 grid.
            t: ``[B]`` timesteps, ``1000 * t_unit``.
            cond: ``[B, L_cond, cond_channels]`` condition tokens.

        Returns:
            SparseTensor ``[N, out_channels]`` with the coords and row order of ``x``.
        """
        name = type(self).__name__
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{name}: x must be a SparseTensor, got {type(x).__name__}")
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(f"{name}: x.feats must be [N, {self.in_channels}], got {tuple(x.feats.shape)}")
        b = x.batch_size
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"{name}: t must be [B={b}], got {tuple(t.shape)}")
        if cond.dim() != 3 or cond.shape[0] != b or cond.shape[2] != self.cond_channels:
            raise ValueError(f"{name}: cond must be [B={b}, L, {self.cond_channels}], got {tuple(cond.shape)}")

        in_dtype = x.feats.dtype
        h = self.input_layer(x.replace(x.feats.to(self.input_layer.weight.dtype)))  # [N, io0]
        t_emb = self.t_embedder(t)  # [B, C]
        if self.share_mod:
            t_emb = self.adaLN_modulation(t_emb)  # [B, 6C]
        t_emb = t_emb.to(self.dtype)
        h = h.replace(h.feats.to(self.dtype))
        cond = cond.to(self.dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, t_emb)
            skips.append(h.feats)
        h = h.replace(h.feats + self.pos_embedder(h.coords[:, 1:]).to(h.feats.dtype))  # APE at coarse coords
        for block in self.blocks:
            h = block(h, t_emb, cond)
        for block, skip in zip(self.out_blocks, reversed(skips)):
            if self.use_skip_connection:
                h = h.replace(torch.cat([h.feats, skip], dim=1))  # [N_level, ch + skip_ch], h first
            h = block(h, t_emb)

        feats = F.layer_norm(h.feats.to(in_dtype), h.feats.shape[-1:], eps=1e-5)
        out = self.out_layer(h.replace(feats.to(self.out_layer.weight.dtype)))
        return x.replace(out.feats.to(in_dtype))


class ElasticSLatFlowModel(SparseTransformerElasticMixin, SLatFlowModel):
    """``SLatFlowModel`` with elastic activation checkpointing (training only; same weights)."""
