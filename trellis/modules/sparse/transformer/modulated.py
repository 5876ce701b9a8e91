"""adaLN-modulated sparse cross block: the transformer block of the SLat flow model.

Same maths and keys as the dense ``ModulatedTransformerCrossBlock`` (reference README section 2.6),
with the per-batch modulation vectors broadcast to the voxels of each batch item and the
cross-attention attending from each item's voxels to that item's dense condition tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from trellis.modules import fused
from trellis.modules.attention.varlen import attention_with_plan, packed_attention_with_plan
from trellis.modules.norm import LayerNorm32
from trellis.modules.sparse.attention import SparseMultiHeadAttention
from trellis.modules.sparse.attention.partition import cross_plan
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.transformer.blocks import FeedForwardNet, run_maybe_checkpointed

__all__ = ["ModulatedSparseTransformerCrossBlock", "per_batch_rows"]


def _check_per_batch(x: SparseTensor, v: torch.Tensor) -> None:
    if v.dim() != 2 or v.shape[0] != x.batch_size:
        raise ValueError(f"per_batch_rows: expected [B={x.batch_size}, K], got {tuple(v.shape)}")


def per_batch_rows(x: SparseTensor, v: torch.Tensor) -> torch.Tensor:
    """Broadcasts per-batch vectors ``v [B, K]`` to the rows of ``x``: ``[N, K]``, row i = ``v[batch(i)]``."""
    _check_per_batch(x, v)
    if not (torch.is_grad_enabled() and v.requires_grad):
        return v[x.batch_ids]
    return fused.PerBatchRows.apply(v, x.batch_ids)


class ModulatedSparseTransformerCrossBlock(nn.Module):
    """Sparse DiT block with self-attention, cross-attention and FFN.

    1. ``x += gate_msa * SelfAttn(LN1(x) * (1 + scale_msa) + shift_msa)``
    2. ``x += CrossAttn(LN2_affine(x), context)``
    3. ``x += gate_mlp * MLP(LN3(x) * (1 + scale_mlp) + shift_mlp)``

    The 6C modulation is chunked as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    Keys (in order): ``norm2.*``, ``self_attn.*``, ``cross_attn.*``, ``mlp.mlp.{0,2}.*``,
    ``adaLN_modulation.1.*`` (absent with ``share_mod``).

    Fused (``trellis.modules.fused``; ``fused_setting``, default ``TRELLIS_FUSED``): everything
    between the two attentions runs as three segments, linear layers included (adaLN + LN1 + qkv
    + q/k norm; out projection + gated residual + LN2 + cross q, k, v; out projection + residual +
    LN3 + MLP + gated residual), compiled once for all blocks. Same maths, same keys.

    Args:
        channels: C.
        ctx_channels: width of the condition tokens.
        num_heads: heads of both attentions.
        mlp_ratio: FFN hidden width / C.
        attn_mode: self-attention mode ("full" in every TRELLIS config).
        window_size: window side for "swin".
        shift_window: window shift for "swin".
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
        window_size: int | None = None,
        shift_window: int | tuple[int, int, int] | None = None,
        use_checkpoint: bool = False,
        use_rope: bool = False,
        qk_rms_norm: bool = False,
        qk_rms_norm_cross: bool = False,
        qkv_bias: bool = True,
        share_mod: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.share_mod = share_mod
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.self_attn = SparseMultiHeadAttention(
            channels, num_heads=num_heads, type="self", attn_mode=attn_mode, window_size=window_size,
            shift_window=shift_window, qkv_bias=qkv_bias, use_rope=use_rope, qk_rms_norm=qk_rms_norm,
        )
        self.cross_attn = SparseMultiHeadAttention(
            channels, ctx_channels=ctx_channels, num_heads=num_heads, type="cross", attn_mode="full",
            qkv_bias=qkv_bias, qk_rms_norm=qk_rms_norm_cross,
        )
        self.mlp = FeedForwardNet(channels, mlp_ratio=mlp_ratio)
        if not share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 6 * channels, bias=True))
        self.fused_setting: fused.FusedSetting | None = None  # None: follow TRELLIS_FUSED

    def _forward_segments(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor,
                          kern: fused._Kernels) -> SparseTensor:
        """The same maths as :meth:`_forward` as three fused segments around the two attentions
        (``fused._block_pre`` / ``_block_mid`` / ``_block_post``), linear layers included."""
        sa, ca = self.self_attn, self.cross_attn
        ids = x.batch_ids
        if mod.dim() != 2 or mod.shape[0] != x.batch_size:
            raise ValueError(f"{type(self).__name__}: expected mod [B={x.batch_size}, C], got {tuple(mod.shape)}")
        ctx = ca.context_rows(context)
        ada = (None, None) if self.share_mod else (self.adaLN_modulation[1].weight, self.adaLN_modulation[1].bias)
        norms = (sa.q_rms_norm.gamma, sa.k_rms_norm.gamma) if sa.qk_rms_norm else (None, None)
        kern.mark_rows(x.feats, ids, mod, ctx)
        mod6, *qkv = kern.block_pre(x.feats, ids, mod, *ada, self.norm1.eps, sa.to_qkv.weight, sa.to_qkv.bias,
                                    *norms, sa.head_dim ** 0.5, sa.num_heads)
        plan = sa.self_plan(x)
        if sa.use_rope:
            q, k, v = qkv[0].unbind(dim=1) if len(qkv) == 1 else qkv
            ang = sa.rope.angles(x.coords[:, 1:])  # [N, d/2]
            qkv = [sa.rope.rotate(q, ang), sa.rope.rotate(k, ang), v]
        attn = packed_attention_with_plan(qkv[0], plan) if len(qkv) == 1 else attention_with_plan(*qkv, plan)
        norms = (ca.q_rms_norm.gamma, ca.k_rms_norm.gamma) if ca.qk_rms_norm else (None, None)
        kern.mark_rows(attn, mod6)
        feats, q, k, v = kern.block_mid(x.feats, ids, mod6, attn, sa.to_out.weight, sa.to_out.bias, self.norm2.weight,
                                        self.norm2.bias, self.norm2.eps, ca.to_q.weight, ca.to_q.bias, ctx,
                                        ca.to_kv.weight, ca.to_kv.bias, *norms, ca.head_dim ** 0.5, ca.num_heads)
        attn = attention_with_plan(q, k, v, cross_plan(x, context))
        kern.mark_rows(feats, attn)
        mlp = self.mlp.mlp
        out = kern.block_post(feats, ids, mod6, attn, ca.to_out.weight, ca.to_out.bias, self.norm3.eps,
                              mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)
        return x.replace(out)

    def _forward(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        kern = fused.fused_kernels(self)
        if kern is not None:
            return self._forward_segments(x, mod, context, kern)
        mod6 = mod if self.share_mod else self.adaLN_modulation(mod)  # [B, 6C]
        mod6 = per_batch_rows(x, mod6)  # [B, 6C] -> [N, 6C], per-batch vectors broadcast to voxels
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod6.chunk(6, dim=1)
        h = self.norm1(x.feats) * (1 + scale_msa) + shift_msa
        h = self.self_attn(x.replace(h)).feats
        feats = x.feats + gate_msa * h
        h = self.cross_attn(x.replace(self.norm2(feats)), context).feats
        feats = feats + h
        h = self.mlp(self.norm3(feats) * (1 + scale_mlp) + shift_mlp)
        return x.replace(feats + gate_mlp * h)

    def forward(self, x: SparseTensor, mod: torch.Tensor, context: torch.Tensor) -> SparseTensor:
        """``x`` SparseTensor ``[N, C]``, ``mod [B, C]`` (t_emb; ``[B, 6C]`` with share_mod),
        ``context [B, L_ctx, C_ctx]`` -> SparseTensor ``[N, C]`` (same coords and row order)."""
        return run_maybe_checkpointed(self._forward, self.use_checkpoint, x, mod, context)
