"""The TRELLIS "fp16 torso" convention, shared by every model.

A model built with ``use_fp16=True`` keeps the weights of its torso (the sub-modules named in its
``torso_modules`` class attribute, e.g. ``("blocks", "middle_block")``) in float16, except the
parameters of normalisation layers, which stay float32. Everything outside the torso (input and
output layers, time embedders, buffers) stays float32. The model casts activations to
``self.dtype`` on entry to the torso and back to float32 before its output layer.

This is what the released checkpoints hold (see the dtypes in ``reference/manifests``). The
training engine decides the precision policy from outside: with ``fp16_mode='inflat_all'`` it keeps
the fp16 torso; with ``amp``, ``bf16`` or fp32 training it calls ``convert_to_fp32()`` first.
"""

from __future__ import annotations

import torch
from torch import nn


def is_norm_module(module: nn.Module) -> bool:
    """Normalisation layers keep fp32 parameters inside an fp16 torso."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return True
    return "Norm" in type(module).__name__


def convert_params(module: nn.Module, dtype: torch.dtype) -> None:
    """Casts the parameters of ``module`` (recursively) to ``dtype``, skipping normalisation layers."""
    for sub in module.modules():
        if is_norm_module(sub):
            continue
        for p in sub.parameters(recurse=False):
            p.data = p.data.to(dtype)
            if p.grad is not None:
                p.grad = p.grad.to(dtype)


class TorsoPrecisionMixin:
    """Mixin for ``nn.Module`` models that follow the fp16-torso convention.

    Subclasses set ``torso_modules`` and call ``self._init_torso_precision(use_fp16)`` at the end of
    ``__init__`` (after creating every sub-module and initialising weights).
    """

    torso_modules: tuple[str, ...] = ("blocks",)

    def _init_torso_precision(self, use_fp16: bool) -> None:
        self.use_fp16 = bool(use_fp16)
        self._torso_dtype = torch.float32
        if self.use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """dtype the torso computes in; activations are cast to it on entry."""
        return self._torso_dtype

    def _torso(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.torso_modules if getattr(self, name, None) is not None]

    def convert_to_fp16(self) -> None:
        for m in self._torso():
            convert_params(m, torch.float16)
        self._torso_dtype = torch.float16

    def convert_to_fp32(self) -> None:
        for m in self._torso():
            convert_params(m, torch.float32)
        self._torso_dtype = torch.float32
