"""Elastic activation checkpointing: a training-only mixin for the ``Elastic*`` model classes.

TRELLIS trains the sparse models (whose token count varies from batch to batch) with a memory
controller that, before each micro-batch, picks a *memory ratio* r in [0, 1] from the batch's input
size and tells the model how many transformer blocks to checkpoint (reference TRAINING.md 6.3):

* r == 1.0: nothing is checkpointed (the constructor's ``use_checkpoint`` setting is restored);
* otherwise, with B = ``len(model.blocks)``, the first ``c = min(ceil((1 - r) * B) + 1, B)`` blocks
  use non-reentrant activation checkpointing; the *exact* ratio is ``1 - (c - 1) / B``.

Only the transformer ``blocks`` are covered (not conv res-blocks nor subdivision blocks). The mixin
adds no parameters and does not change the forward maths, so an ``Elastic*`` model's state dict is
the base class's and either loads the other's weights.

Interface used by the engine's ``LinearMemoryController`` (which lives in the trainers and is not
imported here)::

    n = model.input_size(x)            # rows of the input SparseTensor (voxels), or tokens if dense
    exact = model.set_mem_ratio(r)     # apply r, return the exact ratio achieved
    ...forward + backward...
    model.reset_mem_ratio()            # back to the constructor's setting

or, equivalently, ``with model.mem_ratio(r) as exact: ...`` around forward *and* backward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["ElasticModuleMixin", "SparseTransformerElasticMixin", "num_checkpointed_blocks"]


def num_checkpointed_blocks(mem_ratio: float, num_blocks: int) -> tuple[int, float]:
    """``(c, exact_ratio)`` for a requested ratio: ``c = min(ceil((1 - r) * B) + 1, B)`` blocks are
    checkpointed and ``exact = 1 - (c - 1) / B``; ``(0, 1.0)`` when ``r == 1.0``."""
    if not isinstance(mem_ratio, (int, float)) or math.isnan(mem_ratio) or not 0.0 <= mem_ratio <= 1.0:
        raise ValueError(f"mem_ratio must be a number in [0, 1], got {mem_ratio!r}")
    if num_blocks <= 0:
        raise ValueError(f"elastic checkpointing needs at least one block, got num_blocks={num_blocks}")
    if mem_ratio == 1.0:
        return 0, 1.0
    c = min(math.ceil((1.0 - mem_ratio) * num_blocks) + 1, num_blocks)
    return c, 1.0 - (c - 1) / num_blocks


class ElasticModuleMixin:
    """Generic part: ``input_size``, ``set_mem_ratio`` / ``reset_mem_ratio`` and ``mem_ratio()``.

    Subclasses implement :meth:`_apply_mem_ratio`. Put the mixin *before* the model class in the
    bases (``class ElasticX(SparseTransformerElasticMixin, X)``).
    """

    def input_size(self, x: Any) -> int:
        """Size the memory model scales with: the rows of a SparseTensor input (``x.feats.shape[0]``,
        voxels of the whole micro-batch), or for a dense ``[B, C, ...]`` tensor ``B * prod(spatial)``."""
        feats = getattr(x, "feats", None)
        if isinstance(feats, torch.Tensor):
            return int(feats.shape[0])
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return int(x.numel() // x.shape[1])
        raise TypeError(f"{type(self).__name__}.input_size: expected a SparseTensor or a tensor, got {type(x).__name__}")

    def set_mem_ratio(self, mem_ratio: float) -> float:
        """Applies the memory ratio and returns the exact ratio achieved (see module docstring)."""
        exact = self._apply_mem_ratio(mem_ratio)
        self._elastic_exact_ratio = exact
        return exact

    def reset_mem_ratio(self) -> None:
        """Restores the constructor's checkpointing setting."""
        self._restore_checkpointing()
        self._elastic_exact_ratio = 1.0

    @contextlib.contextmanager
    def mem_ratio(self, mem_ratio: float) -> Iterator[float]:
        """Context manager: ``set_mem_ratio`` on entry (yields the exact ratio), reset on exit."""
        exact = self.set_mem_ratio(mem_ratio)
        try:
            yield exact
        finally:
            self.reset_mem_ratio()

    def _apply_mem_ratio(self, mem_ratio: float) -> float:
        raise NotImplementedError

    def _restore_checkpointing(self) -> None:
        raise NotImplementedError


class SparseTransformerElasticMixin(ElasticModuleMixin):
    """Elastic checkpointing of ``self.blocks`` (each block has a ``use_checkpoint`` attribute)."""

    def _elastic_blocks(self) -> Any:
        blocks = getattr(self, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise AttributeError(f"{type(self).__name__}: elastic checkpointing needs a non-empty `blocks`")
        return blocks

    def _apply_mem_ratio(self, mem_ratio: float) -> float:
        blocks = self._elastic_blocks()
        c, exact = num_checkpointed_blocks(mem_ratio, len(blocks))
        if c == 0:
            self._restore_checkpointing()
            return exact
        for i, block in enumerate(blocks):
            block.use_checkpoint = i < c
        return exact

    def _restore_checkpointing(self) -> None:
        base = bool(getattr(self, "use_checkpoint", False))
        for block in self._elastic_blocks():
            block.use_checkpoint = base
