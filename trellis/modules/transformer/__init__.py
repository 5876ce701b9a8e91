"""Dense transformer blocks over ``[B, L, C]`` token sequences."""

from trellis.modules.transformer.blocks import (
    FeedForwardNet,
    TransformerBlock,
    TransformerCrossBlock,
    run_maybe_checkpointed,
)
from trellis.modules.transformer.modulated import ModulatedTransformerBlock, ModulatedTransformerCrossBlock

__all__ = [
    "FeedForwardNet",
    "TransformerBlock",
    "TransformerCrossBlock",
    "ModulatedTransformerBlock",
    "ModulatedTransformerCrossBlock",
    "run_maybe_checkpointed",
]
