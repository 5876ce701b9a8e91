"""``SparseStructureLatent`` and its text / image conditioned variants (SS flow training, DATA.md 7.2).

A sample holds ``x_0`` float32 [8,16,16,16], the SS-VAE posterior mean from
``ss_latents/<latent_model>/<sha>.npz`` (normalised per channel when ``normalization`` is set; the
shipped configs never set it). The conditioned variants add ``cond`` (a caption str, or an image
float32 [3,518,518]). The collate stacks (captions become a list of str).

The ``pretrained_ss_dec`` / ``ss_dec_path`` / ``ss_dec_ckpt`` arguments name the decoder the trainer uses
for snapshot pictures; the dataset stores them and never builds a model.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from trellis.datasets.base import standard_filters
from trellis.datasets.components import (
    ImageConditionedMixin,
    KeyedDataset,
    TextConditionedMixin,
    normalization_tensors,
    read_npz,
)


class SparseStructureLatent(KeyedDataset):
    """Args (as the original): ``latent_model`` (folder under ``ss_latents/``), ``min_aesthetic_score``,
    ``normalization`` ({"mean": [C], "std": [C]} or None), ``pretrained_ss_dec`` (released decoder id or
    path), ``ss_dec_path`` + ``ss_dec_ckpt`` (a run dir and step of a custom decoder, used instead when
    set); ``max_bad_fraction``: see ``StandardDatasetBase``."""

    def __init__(self, roots: str, latent_model: str, min_aesthetic_score: float = 5.0,
                 normalization: dict | None = None,
                 pretrained_ss_dec: str = "JeffreyXiang/TRELLIS-image-large/ckpts/ss_dec_conv3d_16l8_fp16",
                 ss_dec_path: str | None = None, ss_dec_ckpt: str | None = None, max_bad_fraction: float = 0.01):
        self.latent_model = latent_model
        self.min_aesthetic_score = min_aesthetic_score
        self.normalization = normalization
        self._norm = normalization_tensors(normalization, type(self).__name__)
        self.pretrained_ss_dec = pretrained_ss_dec
        self.ss_dec_path = ss_dec_path
        self.ss_dec_ckpt = ss_dec_ckpt
        super().__init__(roots, max_bad_fraction=max_bad_fraction)

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return standard_filters(metadata, f"ss_latent_{self.latent_model}", self.min_aesthetic_score)

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        path = os.path.join(root, "ss_latents", self.latent_model, f"{sha256}.npz")
        x = torch.from_numpy(read_npz(path, {"mean": (None, None, None, None)})["mean"].astype(np.float32))
        if self._norm is not None:
            mean, std = self._norm
            if mean.shape[0] != x.shape[0]:
                raise ValueError(f"{path}: {x.shape[0]} channels but normalization has {mean.shape[0]}")
            x = (x - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1)
        return {"x_0": x}

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation, [B,C,R,R,R] -> same (identity without ``normalization``)."""
        if self._norm is None:
            return x
        mean, std = (t.to(x.device, x.dtype).view(1, -1, 1, 1, 1) for t in self._norm)
        return x * std + mean


class TextConditionedSparseStructureLatent(TextConditionedMixin, SparseStructureLatent):
    """``SparseStructureLatent`` + ``cond``: one caption (str) per access; rows need ``captions``."""


class ImageConditionedSparseStructureLatent(ImageConditionedMixin, SparseStructureLatent):
    """``SparseStructureLatent`` + ``cond`` float32 [3, image_size, image_size]; rows need ``cond_rendered``."""
