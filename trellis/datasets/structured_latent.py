"""``SLat`` and its text / image conditioned variants (SLat flow training, DATA.md 7.2 and 7.4).

A sample holds ``coords`` int32 [N,3] and ``feats`` float32 [N,8] from ``latents/<latent_model>/<sha>.npz``,
normalised per channel ``(f - mean) / std`` when ``normalization`` is set (the configs set it to the
``stat_latent`` values). ``loads[i]`` is the voxel count of instance ``i`` (for the balanced sampler).
``collate_fn(batch, split_size)`` builds ``x_0`` SparseTensors, split into load-balanced micro-batches.

The ``pretrained_slat_dec`` / ``slat_dec_path`` / ``slat_dec_ckpt`` arguments name the decoder the trainer
uses for snapshots; the dataset stores them and never builds a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from trellis.datasets.base import FailedSample, standard_filters
from trellis.datasets.components import (
    ImageConditionedMixin,
    KeyedDataset,
    TextConditionedMixin,
    balanced_groups,
    collate_sparse,
    normalization_tensors,
)
from trellis.datasets.structured_latent2render import load_latent


class SLat(KeyedDataset):
    """Args (as the original): ``latent_model`` (folder under ``latents/``), ``min_aesthetic_score``,
    ``max_num_voxels``, ``normalization`` ({"mean": [C], "std": [C]} or None), ``pretrained_slat_dec``,
    ``slat_dec_path`` + ``slat_dec_ckpt`` (snapshot decoder); ``max_bad_fraction``: see
    ``StandardDatasetBase``."""

    def __init__(self, roots: str, latent_model: str, min_aesthetic_score: float = 5.0,
                 max_num_voxels: int = 32768, normalization: dict | None = None,
                 pretrained_slat_dec: str = "JeffreyXiang/TRELLIS-image-large/ckpts/slat_dec_gs_swin8_B_64l8gs32_fp16",
                 slat_dec_path: str | None = None, slat_dec_ckpt: str | None = None,
                 max_bad_fraction: float = 0.01):
        self.latent_model = latent_model
        self.min_aesthetic_score = min_aesthetic_score
        self.max_num_voxels = max_num_voxels
        self.normalization = normalization
        self._norm = normalization_tensors(normalization, type(self).__name__)
        self.pretrained_slat_dec = pretrained_slat_dec
        self.slat_dec_path = slat_dec_path
        self.slat_dec_ckpt = slat_dec_ckpt
        super().__init__(roots, max_bad_fraction=max_bad_fraction)
        self.loads = [int(self.metadata[root].loc[sha, "num_voxels"]) for root, sha in self.instances]

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return standard_filters(metadata, f"latent_{self.latent_model}", self.min_aesthetic_score,
                                self.max_num_voxels)

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        coords, feats = load_latent(root, self.latent_model, sha256)
        if self._norm is not None:
            mean, std = self._norm
            if mean.shape[0] != feats.shape[1]:
                raise ValueError(f"latents/{self.latent_model}/{sha256}.npz in {root}: {feats.shape[1]} channels "
                                 f"but normalization has {mean.shape[0]}")
            feats = (feats - mean) / std
        return {"coords": coords, "feats": feats}

    def denormalize(self, feats: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation on [N,C] features (identity without ``normalization``)."""
        if self._norm is None:
            return feats
        mean, std = (t.to(feats.device, feats.dtype) for t in self._norm)
        return feats * std + mean

    @staticmethod
    def collate_fn(batch: list[Any], split_size: int | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """DATA.md 7.4. ``split_size=None``: one pack. Otherwise the good samples are grouped into
        ``split_size`` micro-batches by voxel count (greedy, unequal sizes, empty groups skipped) and a list
        of packs is returned. Each pack has ``x_0`` = SparseTensor [sum N, C] (batch ids 0..g-1 within the
        pack), ``cond`` stacked (images) or listed (captions), and ``_failed`` (failed samples of the whole
        batch listed in the first pack, empty in the others)."""
        if split_size is None:
            return collate_sparse(batch, "x_0")
        if split_size <= 0:
            raise ValueError(f"SLat.collate_fn: split_size must be positive, got {split_size}")
        failed = [b for b in batch if isinstance(b, FailedSample)]
        good = [b for b in batch if not isinstance(b, FailedSample)]
        groups = [g for g in balanced_groups([b["coords"].shape[0] for b in good], split_size) if g]
        packs = [collate_sparse([good[i] for i in g], "x_0") for g in groups]
        if not packs:
            packs = [{}]
        for i, pack in enumerate(packs):
            pack["_failed"] = failed if i == 0 else []
        return packs


class TextConditionedSLat(TextConditionedMixin, SLat):
    """``SLat`` + ``cond``: one caption (str) per access; rows need ``captions``."""


class ImageConditionedSLat(ImageConditionedMixin, SLat):
    """``SLat`` + ``cond`` float32 [3, image_size, image_size]; rows need ``cond_rendered``."""
