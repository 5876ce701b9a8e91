"""adaLN-modulated dense transformer blocks (DiT: Peebles & Xie, 2023).

The modulation is ``adaLN_modulation = Sequential(SiLU, Linear(C -> 6C))`` applied to the raw
timestep embedding; its output is chunked, in this order, into
``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp`` (reference README section 2.6).
With ``share_mod=True`` the block has no ``adaLN_modulation`` and receives the 6C vector directly.
"""

from __future__ import annotations

import torch
from torch import nn

from trellis.modules.transformer.blocks import TransformerBlock, TransformerCrossBlock, run_maybe_checkpointed

__all__ = ["ModulatedTransformerBlock", "ModulatedTransformerCrossBlock", "modulate"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [B, L, C] * (1 + scale[B, 1, C]) + shift[B, 1, C]``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _mod_chunks(block: nn.Module, mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``mod [B, C]`` (t_emb) or ``[B, 6C]`` (share_mod) -> six ``[B, C]`` chunks."""
    if block.share_mod:
        return mod.chunk(6, dim=1)
    return block.adaLN_modulation(mod).chunk(6, dim=1)


class ModulatedTransformerBlock(TransformerBlock):
    """adaLN-modulated self-attention block (no cross-attention).

    ``x += gate_msa * Attn(LN1(x) * (1 + scale_msa) + shift_msa)``
    ``x += gate_mlp * MLP(LN2(x) * (1 + scale_mlp) + shift_mlp)``; both LNs without affine, eps 1e-6.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        use_checkpoint: bool = False,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
    ):
        super().__init__(channels, num_heads, mlp_ratio, attn_mode, use_checkpoint, use_rope, qk_rms_norm,
                         qkv_bias, ln_affine=False)
        self.share_mod = share_mod
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def _forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _mod_chunks(self, mod)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """``x [B, L, C]``, ``mod [B, C]`` (or ``[B, 6C]`` with share_mod) -> ``[B, L, C]``."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x, mod)


class ModulatedTransformerCrossBlock(TransformerCrossBlock):
    """The block of both TRELLIS flow models (reference README section 2.6).

    1. ``x += gate_msa * SelfAttn(LN1(x) * (1 + scale_msa) + shift_msa)``
    2. ``x += CrossAttn(LN2_affine(x), context)`` (no modulation, no gate)
    3. ``x += gate_mlp * MLP(LN3(x) * (1 + scale_mlp) + shift_mlp)``

    LayerNorms have eps 1e-6; only ``norm2`` is affine. Keys (in order): ``norm2.*``,
    ``self_attn.*``, ``cross_attn.*``, ``mlp.mlp.{0,2}.*``, ``adaLN_modulation.1.*``.

    Args:
        channels: C.
        ctx_channels: width of the condition tokens.
        num_heads: heads of both attentions.
        mlp_ratio: FFN hidden width / C.
        attn_mode: self-attention mode passed to ``MultiHeadAttention``.
        use_checkpoint: activation checkpointing of this block.
        use_rope: rotary embedding in the self-attention.
        qk_rms_norm: RMS norm of q, k in the self-attention.
        qk_rms_norm_cross: RMS norm of q, k in the cross-attention.
        qkv_bias: bias in the q/k/v projections.
        share_mod: receive the 6C modulation from the model instead of owning ``adaLN_modulation``.
    """

    def __init__(
        self,
        channels: int,
        ctx_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        use_checkpoint: bool = False,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
    ):
        super().__init__(channels, ctx_channels, num_heads, mlp_ratio, attn_mode, use_checkpoint, use_rope,
                         qk_rms_norm, qk_rms_norm_cross, qkv_bias, ln_affine=False)
        self.share_mod = share_mod
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))

    def _forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _mod_chunks(self, mod)
        x = x + gate_msa.unsqueeze(1) * self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, L, C]``, ``mod [B, C]`` (t_emb; ``[B, 6C]`` with share_mod), ``context [B, L_ctx, C_ctx]``."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x, mod, context)
