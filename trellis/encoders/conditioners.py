"""Frozen condition encoders for the flow trainers and pipelines (TRAINING.md section 10).

- ``ImageConditioner``: DINOv2 ViT-L/14-reg on [B,3,518,518] images in [0,1] (premultiplied on black),
  ImageNet-normalised; output = all pre-norm tokens (CLS, 4 registers, 37x37 patches) followed by a
  parameter-free LayerNorm (eps 1e-5): [B, 1374, 1024]. Null condition: zeros of that shape.
- ``TextConditioner``: CLIP ViT-L/14 text ``last_hidden_state`` over 77 tokens: [B, 77, 768]. Null
  condition: the encoding of the empty string, computed once and repeated.

Both hold their model frozen (eval, no grad), encode in chunks of ``batch_size``, and have a ``tiny``
random-initialised variant (``model="tiny"``) for tests.

    >>> cond = ImageConditioner("tiny")
    >>> cond.encode(torch.rand(2, 3, 518, 518)).shape    # [2, 1374, 64]
    >>> cond.null_condition(2).shape                     # [2, 1374, 64]
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from trellis.encoders.clip import load_clip_text
from trellis.encoders.dinov2 import load_dinov2, normalize_images


class _Frozen:
    """Shared plumbing: a frozen ``self.model`` moved with ``to(device)``."""

    model: torch.nn.Module

    def _freeze(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> _Frozen:
        self.model.to(device)
        return self


class ImageConditioner(_Frozen):
    """DINOv2 image tokens. ``model``: ``dinov2_vitl14_reg`` (weights from ``weights`` or
    ``$TRELLIS_WEIGHTS_DIR``) or ``tiny``. ``image_size``: expected input side (518)."""

    def __init__(self, model: str = "dinov2_vitl14_reg", weights: str | os.PathLike | None = None,
                 image_size: int = 518, batch_size: int = 64, device: torch.device | str = "cpu"):
        self.model = load_dinov2(model, weights)
        self._freeze()
        self.model.to(device)
        self.image_size = image_size
        self.batch_size = batch_size
        grid = image_size // self.model.cfg.patch_size
        self.num_tokens = self.model.num_prefix_tokens + grid * grid
        self.channels = self.model.embed_dim

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] float in [0,1] -> [B, 1374, C] float32 (layer-normed pre-norm tokens)."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"image condition must be [B,3,{self.image_size},{self.image_size}], "
                             f"got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("image condition contains NaN or Inf values")
        out = []
        for chunk in images.split(self.batch_size):
            x = normalize_images(chunk.to(self.device, torch.float32))
            tokens = self.model(x)["x_prenorm"]  # [b, T, C]
            out.append(F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5))
        return torch.cat(out, dim=0)

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """Zeros [B, 1374, C] on the model's device."""
        return torch.zeros(batch_size, self.num_tokens, self.channels, device=self.device)


class TextConditioner(_Frozen):
    """CLIP text tokens. ``model``: ``openai/clip-vit-large-patch14`` (local directory from ``weights`` or
    ``$TRELLIS_WEIGHTS_DIR/clip-vit-large-patch14``) or ``tiny``."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", weights: str | os.PathLike | None = None,
                 batch_size: int = 256, device: torch.device | str = "cpu"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        self.model = load_clip_text(model, weights)
        self._freeze()
        self.model.to(device)
        self.batch_size = batch_size
        self.num_tokens = 77
        self.channels = int(self.model.width)
        self._null: torch.Tensor | None = None

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """list of B captions -> [B, 77, C] float32."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text condition must be a list of str, got {type(texts).__name__}")
        out = [self.model(list(texts[i:i + self.batch_size])) for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out, dim=0).float()

    def null_condition(self, batch_size: int) -> torch.Tensor:
        """The encoding of "" repeated: [B, 77, C]."""
        if self._null is None or self._null.device != self.device:
            self._null = self.encode([""])
        return self._null.expand(batch_size, -1, -1).clone()
