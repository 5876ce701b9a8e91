"""``SparseTransformerBase``: the sparse transformer trunk shared by the SLat encoder and decoders.

    x SparseTensor [N, in_channels] --input_layer--> [N, C] --+ APE(xyz)--> (to torso dtype)
      --> blocks[i]: SparseTransformerBlock (swin shift (window_size // 2) * (i % 2))
      --> SparseTensor [N, C] in the torso dtype (``self.dtype``)

The trunk returns features in the torso dtype; each head casts back to the input dtype (the mesh
decoder keeps going in the torso through its ``upsample`` blocks first). Reference README 3.4.

A subclass (encoder, decoder) adds its head modules after ``super().__init__(...)`` and then calls
``self._finish_init()``, which initialises the weights (xavier-uniform for every Linear, zero bias)
and applies the fp16 torso cast requested by ``use_fp16``. A decoder whose torso holds more than
the blocks (the mesh decoder's ``upsample``) sets ``torso_modules = ("blocks", "upsample")``.
"""

from __future__ import annotations

from torch import nn

from trellis.modules.embeddings import AbsolutePositionEmbedder
from trellis.modules.fp16 import TorsoPrecisionMixin
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.linear import SparseLinear
from trellis.modules.sparse.transformer import SparseTransformerBlock

__all__ = ["SparseTransformerBase", "block_attn_config"]

_ATTN_MODES = ("full", "swin")


def block_attn_config(attn_mode: str, window_size: int | None, index: int) -> dict:
    """Attention arguments of trunk block ``index``.

    "full": full attention per batch item. "swin": windowed attention with window ``window_size``,
    shifted by ``window_size // 2`` on odd blocks and 0 on even blocks.
    """
    if attn_mode == "full":
        return {"attn_mode": "full"}
    if attn_mode == "swin":
        if not window_size or window_size <= 0:
            raise ValueError(f"attn_mode 'swin' needs a positive window_size, got {window_size!r}")
        return {"attn_mode": "swin", "window_size": window_size, "shift_window": (window_size // 2) * (index % 2)}
    raise ValueError(f"attn_mode {attn_mode!r} not supported; expected one of {_ATTN_MODES}")


class SparseTransformerBase(TorsoPrecisionMixin, nn.Module):
    """Input projection + sinusoidal APE + a stack of unmodulated sparse transformer blocks.

    Args:
        in_channels: input feature width.
        model_channels: C.
        num_blocks: number of transformer blocks.
        num_heads: attention heads; default ``model_channels // num_head_channels``.
        num_head_channels: head width used when ``num_heads`` is None.
        mlp_ratio: FFN hidden width / C.
        attn_mode: "swin" (every TRELLIS config) or "full".
        window_size: swin window side (8).
        pe_mode: "ape" (the only mode of the released models).
        use_fp16: keep the torso (``blocks``) in float16.
        use_checkpoint: activation checkpointing of every block.
        qk_rms_norm: RMS norm of q and k in the attention.
    """

    torso_modules = ("blocks",)

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int = 64,
        mlp_ratio: float = 4.0,
        attn_mode: str = "swin",
        window_size: int | None = 8,
        pe_mode: str = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        if pe_mode != "ape":
            raise ValueError(f"{name}: pe_mode {pe_mode!r} not supported (only 'ape')")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads or model_channels // num_head_channels
        if model_channels % self.num_heads:
            raise ValueError(f"{name}: model_channels {model_channels} not divisible by num_heads {self.num_heads}")
        self.mlp_ratio = mlp_ratio
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.pe_mode = pe_mode
        self.use_checkpoint = use_checkpoint
        self.qk_rms_norm = qk_rms_norm
        self._requested_fp16 = bool(use_fp16)

        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = SparseLinear(in_channels, model_channels)
        self.blocks = nn.ModuleList([
            SparseTransformerBlock(
                model_channels, num_heads=self.num_heads, mlp_ratio=mlp_ratio,
                use_checkpoint=use_checkpoint, qk_rms_norm=qk_rms_norm, ln_affine=False,
                **block_attn_config(attn_mode, window_size, i),
            )
            for i in range(num_blocks)
        ])

    def initialize_weights(self) -> None:
        """xavier-uniform weights and zero biases for every Linear (incl. ``SparseLinear``)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _finish_init(self) -> None:
        """Call at the end of a subclass ``__init__``: weight init, then the fp16 torso cast."""
        self.initialize_weights()
        self._init_torso_precision(self._requested_fp16)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """``x`` SparseTensor ``[N, in_channels]`` -> SparseTensor ``[N, C]`` in ``self.dtype``."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__}: expected a SparseTensor input, got {type(x).__name__}")
        if x.feats.dim() != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected feats [N, {self.in_channels}], got {tuple(x.feats.shape)}"
            )
        h = self.input_layer(x.replace(x.feats.to(self.input_layer.weight.dtype)))
        h = h.replace(h.feats + self.pos_embedder(x.coords[:, 1:]).to(h.feats.dtype))
        h = h.replace(h.feats.to(self.dtype))
        for block in self.blocks:
            h = block(h)
        return h
