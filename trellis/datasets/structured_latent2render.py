"""``SLat2Render`` and ``Slat2RenderGeo``: structured latents + one rendered view (RF / mesh decoder
training, DATA.md 7.2).

A sample holds a random view of ``renders/<sha>`` (``image`` [3,S,S], ``alpha`` [S,S], ``extrinsics``
[4,4], ``intrinsics`` [3,3]) and the latent ``coords`` int32 [N,3] + ``feats`` float32 [N,8] from
``latents/<latent_model>/<sha>.npz`` (raw, not normalised). ``Slat2RenderGeo`` adds ``mesh`` =
{``vertices`` float32 [V,3], ``faces`` int64 [F,3]} from ``renders/<sha>/mesh.ply``. The collate builds
``latents`` as a ``SparseTensor``, stacks tensors, and lists the meshes.
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
from trellis.utils.ply import read_mesh_ply


def load_latent(root: str, latent_model: str, sha256: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents/<latent_model>/<sha>.npz`` -> (coords int32 [N,3], feats float32 [N,C]); errors name the file."""
    path = os.path.join(root, "latents", latent_model, f"{sha256}.npz")
    data = read_npz(path, {"coords": (None, 3), "feats": (None, None)})
    if data["coords"].shape[0] != data["feats"].shape[0]:
        raise ValueError(f"{path}: {data['coords'].shape[0]} coords but {data['feats'].shape[0]} feats")
    if data["coords"].shape[0] == 0:
        raise ValueError(f"{path}: empty sparse sample (no voxels)")
    return torch.from_numpy(data["coords"].astype(np.int32)), torch.from_numpy(data["feats"].astype(np.float32))


class SLat2Render(KeyedDataset):
    """Args (as the original): ``image_size``, ``latent_model`` (latent folder name),
    ``min_aesthetic_score``, ``max_num_voxels``; ``max_bad_fraction``: see ``StandardDatasetBase``."""

    def __init__(self, roots: str, image_size: int, latent_model: str, min_aesthetic_score: float = 5.0,
                 max_num_voxels: int = 32768, max_bad_fraction: float = 0.01):
        self.image_size = image_size
        self.latent_model = latent_model
        self.min_aesthetic_score = min_aesthetic_score
        self.max_num_voxels = max_num_voxels
        super().__init__(roots, max_bad_fraction=max_bad_fraction)

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return standard_filters(metadata, f"latent_{self.latent_model}", self.min_aesthetic_score,
                                self.max_num_voxels)

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        pack = load_render_view(os.path.join(root, "renders", sha256), self.image_size, rng)
        pack["coords"], pack["feats"] = load_latent(root, self.latent_model, sha256)
        return pack

    @staticmethod
    def collate_fn(batch: list[Any]) -> dict[str, Any]:
        """``latents`` SparseTensor [sum N, 8]; other tensors stacked, lists concatenated, the rest listed."""
        return collate_sparse(batch, "latents")


class Slat2RenderGeo(SLat2Render):
    """``SLat2Render`` plus the normalised mesh: ``mesh`` = {vertices float32 [V,3], faces int64 [F,3]}."""

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        pack = super().get_instance(root, sha256, rng)
        path = os.path.join(root, "renders", sha256, "mesh.ply")
        vertices, faces = read_mesh_ply(path)
        if len(vertices) == 0 or len(faces) == 0:
            raise ValueError(f"{path}: empty mesh")
        pack["mesh"] = {
            "vertices": torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)),
            "faces": torch.from_numpy(np.ascontiguousarray(faces, dtype=np.int64)),
        }
        return pack
