"""Components of the flow trainers: keyed per-sample randomness, the condition (raw tensors, DINOv2
image tokens or CLIP text tokens) and classifier-free-guidance dropout (reference TRAINING.md 9.5, 10).

Every random draw of a training step (t, noise, CFG dropout) is a function of (seed, step, dataset
index, stream) alone, so a global batch gives the same update on any number of ranks and micro-batches,
and a resumed run draws what an uninterrupted run draws.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from trellis.modules.sparse import SparseTensor
from trellis.utils.device import to_device_async

__all__ = ["keyed_seed", "keyed_generators", "keyed_randn_sparse", "RawCondition", "PrecomputedCondition", "ImageCondition",
           "TextCondition", "CFGDropout"]


def keyed_seed(seed: int, step: int, key: int, stream: str) -> int:
    """A 63-bit seed from (seed, step, dataset index, stream name)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(key), zlib.crc32(stream.encode())])
    return int(ss.generate_state(1, np.uint64)[0]) & (2 ** 63 - 1)


def keyed_generators(keys: torch.Tensor | None, batch_size: int, seed: int, step: int, stream: str,
                     device: torch.device | str = "cpu") -> list[torch.Generator | None]:
    """One generator per batch item keyed by its dataset index; ``[None] * B`` (global RNG) when the
    batch carries no keys."""
    if keys is None or len(keys) != batch_size:
        return [None] * batch_size
    gens = []
    for k in keys.tolist():
        g = torch.Generator(device=device)
        g.manual_seed(keyed_seed(seed, step, k, stream))
        gens.append(g)
    return gens


def keyed_randn_sparse(x: SparseTensor, gens: list[torch.Generator | None]) -> SparseTensor:
    """Standard normal feats shaped like ``x.feats`` [N, C]; item i's rows drawn from ``gens[i]``
    (generators on ``x.device``)."""
    if all(g is None for g in gens):
        return x.replace(torch.randn_like(x.feats))
    out = torch.empty_like(x.feats)
    for sl, g in zip(x.layout, gens):
        out[sl] = torch.randn((sl.stop - sl.start, *x.feats.shape[1:]), generator=g, device=x.device,
                              dtype=x.feats.dtype)
    return x.replace(out)


class RawCondition:
    """The dataset's ``cond`` used as is (a ``[B, L, C]`` tensor); null condition = zeros."""

    kind = "raw"

    def encode(self, cond: Any) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"the dataset's 'cond' must be a [B, L, C] tensor for this trainer, got "
                            f"{type(cond).__name__} (use an Image/TextConditioned trainer for images or captions)")
        return cond.float()

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)


class PrecomputedCondition(RawCondition):
    """Condition tokens precomputed into the dataset (``cond_features``, see
    ``dataset_toolkits.encode_cond``): ``[B, T, C]`` used as is, checked against the encoder's token
    count and width. Null condition: zeros for images (as ``ImageCondition``), the stored encoding of
    the empty caption for text (as ``TextCondition``). No encoder is loaded."""

    def __init__(self, kind: str, name: str, num_tokens: int, channels: int, null: torch.Tensor | None = None):
        self.kind, self.name, self.num_tokens, self.channels = kind, name, int(num_tokens), int(channels)
        self._null = null  # [T, C] or None (zeros)

    def encode(self, cond: Any) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.dim() != 3 or tuple(cond.shape[1:]) != (self.num_tokens,
                                                                                                self.channels):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"precomputed condition tokens ({self.name}) must be [B, {self.num_tokens}, "
                             f"{self.channels}], got {got}")
        return cond.float()

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        if self._null is None:
            return torch.zeros_like(cond)
        return self._null.to(cond.device, cond.dtype).expand(cond.shape[0], -1, -1).clone()


class ImageCondition:
    """DINOv2 tokens of the dataset's condition images; null condition = zeros (TRAINING.md 10)."""

    kind = "image"

    def __init__(self, model: str, weights: str | None, image_size: int, device: torch.device):
        from trellis.encoders.conditioners import ImageConditioner

        self.conditioner = ImageConditioner(model, weights=weights, image_size=image_size, device=device)

    @property
    def channels(self) -> int:
        return int(self.conditioner.channels)

    def encode(self, cond: Any) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"image-conditioned trainer: the dataset's 'cond' must be images [B,3,S,S], "
                            f"got {type(cond).__name__}")
        return self.conditioner.encode(cond).float()

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(cond)


class TextCondition:
    """CLIP tokens of the dataset's captions; null condition = the encoding of "" (TRAINING.md 10)."""

    kind = "text"

    def __init__(self, model: str, weights: str | None, device: torch.device):
        from trellis.encoders.conditioners import TextConditioner

        self.conditioner = TextConditioner(model, weights=weights, device=device)

    @property
    def channels(self) -> int:
        return int(self.conditioner.channels)

    def encode(self, cond: Any) -> torch.Tensor:
        return self.conditioner.encode(cond).float()

    def null(self, cond: torch.Tensor) -> torch.Tensor:
        return self.conditioner.null_condition(cond.shape[0]).to(cond.device, cond.dtype)


class CFGDropout:
    """With probability ``p_uncond`` per sample, the condition is replaced by the null condition."""

    def __init__(self, p_uncond: float):
        if not 0.0 <= float(p_uncond) <= 1.0:
            raise ValueError(f"trainer.args.p_uncond must be in [0, 1], got {p_uncond}")
        self.p_uncond = float(p_uncond)

    def mask(self, gens: list[torch.Generator | None]) -> torch.Tensor:
        """``[B]`` bool (CPU): True where the condition is dropped."""
        return torch.tensor([bool(torch.rand((), generator=g) < self.p_uncond) for g in gens], dtype=torch.bool)

    def apply(self, cond: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if not bool(drop.any()):
            return cond
        d = to_device_async(drop, cond.device).reshape(-1, *([1] * (cond.dim() - 1)))  # [B, 1, 1]
        return torch.where(d, null, cond)
