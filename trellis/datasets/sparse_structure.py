"""``SparseStructure``: dense occupancy grids from ``voxels/<sha256>.ply`` (the SS VAE's data)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from trellis.datasets.base import StandardDatasetBase, standard_filters
from trellis.utils.ply import read_voxel_ply


def load_occupancy(path: str, resolution: int) -> torch.Tensor:
    """Voxel-centre PLY -> float32 occupancy [1, R, R, R] (1 at ``floor((p + 0.5) * R)``)."""
    points = read_voxel_ply(path)  # [N, 3] float32 in [-0.5, 0.5]
    if points.shape[0] == 0:
        raise ValueError(f"{path}: no voxels")
    if not np.isfinite(points).all():
        raise ValueError(f"{path}: non-finite voxel coordinates")
    idx = np.floor((points + 0.5) * resolution).astype(np.int64)
    if idx.min() < 0 or idx.max() >= resolution:
        raise ValueError(f"{path}: voxel centres outside [-0.5, 0.5]^3")
    ss = torch.zeros(1, resolution, resolution, resolution, dtype=torch.float32)
    ss[0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return ss


class SparseStructure(StandardDatasetBase):
    """Occupancy grids for the sparse-structure VAE.

    Filters, in order: ``voxelized``; ``aesthetic_score >= min_aesthetic_score`` (where the column exists).
    Sample: ``{"ss": float32 [1, R, R, R]}``.

    Args:
        roots: data root(s), comma-separated.
        resolution: grid size R (64 in TRELLIS).
        min_aesthetic_score: lower bound on ``aesthetic_score``; None disables the filter.
        max_bad_fraction: see ``StandardDatasetBase``.
    """

    def __init__(self, roots: str, resolution: int = 64, min_aesthetic_score: float | None = 5.0,
                 max_bad_fraction: float = 0.01):
        self.resolution = resolution
        self.min_aesthetic_score = min_aesthetic_score
        super().__init__(roots, max_bad_fraction=max_bad_fraction)

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return standard_filters(metadata, "voxelized", self.min_aesthetic_score)

    def get_instance(self, root: str, sha256: str) -> dict[str, torch.Tensor]:
        return {"ss": load_occupancy(os.path.join(root, "voxels", f"{sha256}.ply"), self.resolution)}

    def visualize_sample(self, ss: torch.Tensor) -> list[torch.Tensor]:
        """[B, 1, R, R, R] occupancy -> one 2x2 voxel preview [3, H, W] per item."""
        from trellis.renderers.voxel_preview import render_voxel_grid_2x2

        return [render_voxel_grid_2x2(ss[i, 0] > 0.5, seed=i, resolution=128) for i in range(ss.shape[0])]
