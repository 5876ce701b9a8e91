"""``SparseFeat2Render``: DINOv2 voxel features + one rendered view (GS / RF VAE training, DATA.md 7.2).

A sample holds a random view of ``renders/<sha>`` (``image`` [3,S,S], ``alpha`` [S,S], ``extrinsics``
[4,4], ``intrinsics`` [3,3]) and the voxel features ``coords`` int32 [N,3] + ``feats`` float32 [N,C]
(C = 1024 for DINOv2 ViT-L) from ``features/<model>/<sha>.npz``. The collate builds ``feats`` as a
``SparseTensor`` with coords [N,4] (batch, x, y, z) and stacks the rest.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from trellis.datasets.base import standard_filters
from trellis.datasets.components import (
    KeyedDataset,
    collate_sparse,
    load_render_view,
    read_npz,
)


def pool_features(coords: torch.Tensor, feats: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pools 64^3 voxel features onto a grid ``factor`` times coarser, as the reference does: a scatter-sum
    onto zeros divided by (count + 1). coords int [N,3], feats [N,C] -> (coords int32 [M,3], feats [M,C])."""
    coarse = torch.div(coords.long(), factor, rounding_mode="floor")  # [N,3]
    uniq, inverse = torch.unique(coarse, dim=0, return_inverse=True)  # [M,3], [N]
    total = torch.zeros(uniq.shape[0], feats.shape[1], dtype=feats.dtype).index_add_(0, inverse, feats)
    count = torch.zeros(uniq.shape[0], dtype=feats.dtype).index_add_(0, inverse, torch.ones_like(feats[:, 0]))
    return uniq.int(), total / (count[:, None] + 1)


class SparseFeat2Render(KeyedDataset):
    """Args (as the original): ``image_size`` (render side S), ``model`` (feature folder name),
    ``resolution`` (voxel grid; < 64 pools the features), ``min_aesthetic_score``, ``max_num_voxels``.
    ``max_bad_fraction``: see ``StandardDatasetBase``."""

    def __init__(self, roots: str, image_size: int, model: str = "dinov2_vitl14_reg", resolution: int = 64,
                 min_aesthetic_score: float = 5.0, max_num_voxels: int = 32768, max_bad_fraction: float = 0.01):
        if resolution <= 0 or 64 % resolution:
            raise ValueError(f"SparseFeat2Render.resolution must divide 64, got {resolution}")
        self.image_size = image_size
        self.model = model
        self.resolution = resolution
        self.min_aesthetic_score = min_aesthetic_score
        self.max_num_voxels = max_num_voxels
        super().__init__(roots, max_bad_fraction=max_bad_fraction)

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return standard_filters(metadata, f"feature_{self.model}", self.min_aesthetic_score, self.max_num_voxels)

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        pack = load_render_view(os.path.join(root, "renders", sha256), self.image_size, rng)
        path = os.path.join(root, "features", self.model, f"{sha256}.npz")
        data = read_npz(path, {"indices": (None, 3), "patchtokens": (None, None)})
        if data["indices"].shape[0] != data["patchtokens"].shape[0]:
            raise ValueError(f"{path}: {data['indices'].shape[0]} indices but {data['patchtokens'].shape[0]} tokens")
        if data["indices"].shape[0] == 0:
            raise ValueError(f"{path}: empty sparse sample (no voxels)")
        coords = torch.from_numpy(data["indices"].astype(np.int32))
        feats = torch.from_numpy(data["patchtokens"].astype(np.float32))
        if self.resolution < 64:
            coords, feats = pool_features(coords, feats, 64 // self.resolution)
        pack["coords"], pack["feats"] = coords, feats
        return pack

    @staticmethod
    def collate_fn(batch: list[Any]) -> dict[str, Any]:
        """``feats`` SparseTensor [sum N, C]; ``image`` [B,3,S,S], ``alpha`` [B,S,S], ``extrinsics``
        [B,4,4], ``intrinsics`` [B,3,3]; failed samples under ``_failed``."""
        return collate_sparse(batch, "feats")
