"""A tiny flow-training data root written directly in the TRELLIS layout (ss_latents/, latents/,
renders_cond/, captions), shared by the flow tests; and a check that the flow datasets read it."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pandas as pd
import torch
from PIL import Image

SS_MODEL = "ss_enc_tiny"
SLAT_MODEL = "tiny_slat_enc"


def _sha(i: int) -> str:
    return hashlib.sha256(f"flow-demo-{i}".encode()).hexdigest()


def _blob(rng: np.random.Generator) -> np.ndarray:
    """Surface voxels of a small random ellipsoid near the grid centre: uint8 [N, 3], N ~ 100-400."""
    axis = np.arange(64)
    g = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).astype(np.float64)  # [64,64,64,3]
    c = 32 + rng.uniform(-4, 4, 3)
    r = rng.uniform(3, 6, 3)
    inside = (((g - c) / r) ** 2).sum(-1) <= 1
    pad = np.pad(inside, 1)
    interior = inside & pad[:-2, 1:-1, 1:-1] & pad[2:, 1:-1, 1:-1] & pad[1:-1, :-2, 1:-1] & pad[1:-1, 2:, 1:-1] \
        & pad[1:-1, 1:-1, :-2] & pad[1:-1, 1:-1, 2:]
    return np.argwhere(inside & ~interior).astype(np.uint8)


def _cond_view(directory: str, rng: np.random.Generator, size: int = 64) -> None:
    os.makedirs(directory, exist_ok=True)
    img = np.zeros((size, size, 4), dtype=np.uint8)
    y0, x0 = rng.integers(8, 24, 2)
    img[y0:y0 + 24, x0:x0 + 30, :3] = rng.integers(0, 255, 3, dtype=np.uint8)
    img[y0:y0 + 24, x0:x0 + 30, 3] = 255
    Image.fromarray(img, "RGBA").save(os.path.join(directory, "000.png"))
    c2w = np.eye(4)
    c2w[:3, 3] = [0.0, -2.0, 0.0]
    frames = [{"file_path": "000.png", "transform_matrix": c2w.tolist(), "camera_angle_x": math.radians(40)}]
    with open(os.path.join(directory, "transforms.json"), "w") as f:
        json.dump({"frames": frames}, f)


def write_flow_root(root: str, num: int = 8, seed: int = 0) -> str:
    """Writes ``num`` assets with SS latents, SLat latents (+ stats.json), one condition view and two
    captions each; returns ``root``."""
    rng = np.random.default_rng(seed)
    for sub in (f"ss_latents/{SS_MODEL}", f"latents/{SLAT_MODEL}", "renders_cond"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rows = []
    for i in range(num):
        sha = _sha(i)
        np.savez_compressed(os.path.join(root, "ss_latents", SS_MODEL, f"{sha}.npz"),
                            mean=rng.standard_normal((8, 16, 16, 16)).astype(np.float32))
        coords = _blob(rng)
        feats = (rng.standard_normal((len(coords), 8)) * 2 + 0.5).astype(np.float32)
        np.savez_compressed(os.path.join(root, "latents", SLAT_MODEL, f"{sha}.npz"), coords=coords, feats=feats)
        _cond_view(os.path.join(root, "renders_cond", sha), rng)
        rows.append({"sha256": sha, "aesthetic_score": 5.5, "num_voxels": len(coords), "cond_rendered": True,
                     f"ss_latent_{SS_MODEL}": True, f"latent_{SLAT_MODEL}": True,
                     "captions": json.dumps([f"object number {i}", f"a small blob {i % 3}"])})
    with open(os.path.join(root, "latents", SLAT_MODEL, "stats.json"), "w") as f:
        json.dump({"mean": [0.5] * 8, "std": [2.0] * 8}, f)
    pd.DataFrame(rows).to_csv(os.path.join(root, "metadata.csv"), index=False)
    return root


def train_losses_of(cfg: dict, root: str, out: str, steps: int) -> tuple[list[float], object]:
    """Builds ``cfg``'s models, dataset and trainer (seed 0) and returns the losses of ``steps``
    steps and the trainer."""
    from trellis.config import build_dataset, build_models, validate_config
    from trellis.registry import TRAINERS

    validate_config(cfg)
    torch.manual_seed(0)
    models, dataset = build_models(cfg), build_dataset(cfg, root)
    tr = TRAINERS.get(cfg["trainer"]["name"])(models, dataset, output_dir=str(out), **cfg["trainer"]["args"])
    data = tr.batches()
    losses = []
    for _ in range(steps):
        tr._seed_step()
        losses.append(float(tr.run_step(next(data))["loss/loss"]))
        tr.step += 1
    return losses, tr


def test_flow_root_reads_through_the_datasets(tmp_path):
    from trellis.datasets.sparse_structure_latent import ImageConditionedSparseStructureLatent
    from trellis.datasets.structured_latent import TextConditionedSLat

    root = write_flow_root(str(tmp_path), num=4)
    ss = ImageConditionedSparseStructureLatent(root, latent_model=SS_MODEL, image_size=28, min_aesthetic_score=4.5)
    item = ss[0]
    assert item["x_0"].shape == (8, 16, 16, 16) and item["cond"].shape == (3, 28, 28)
    slat = TextConditionedSLat(root, latent_model=SLAT_MODEL, min_aesthetic_score=4.5)
    packs = slat.collate_fn([slat[i] for i in range(4)], split_size=2)
    assert len(packs) == 2 and all(isinstance(p["cond"], list) for p in packs)
    assert sum(p["x_0"].batch_size for p in packs) == 4
    assert torch.equal(torch.sort(torch.cat([p["_index"] for p in packs])).values, torch.arange(4))
