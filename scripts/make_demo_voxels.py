"""Writes a small voxel dataset in the TRELLIS layout (``metadata.csv`` + ``voxels/<sha256>.ply``)
from procedural shapes: surface shells of random superellipsoids, boxes and tori on the 64^3 grid.

Used by the tests and as a fallback demo dataset; the demo itself builds its data with the dataset
toolkit from the shipped assets. Deterministic for a given ``--seed``.

    python scripts/make_demo_voxels.py --output_dir data/voxel_demo --num 32
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import pandas as pd

from trellis.utils.io import atomic_write_text
from trellis.utils.ply import write_voxel_ply


def grid(resolution: int) -> np.ndarray:
    ax = (np.arange(resolution) + 0.5) / resolution - 0.5
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1)  # [R, R, R, 3]


def random_solid(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """A random solid occupancy [R, R, R] (bool): union of 1-3 superellipsoids, boxes or tori."""
    occ = np.zeros(p.shape[:3], dtype=bool)
    for _ in range(rng.integers(1, 4)):
        c = rng.uniform(-0.15, 0.15, 3)
        kind = rng.choice(["superellipsoid", "box", "torus"])
        q = p - c
        if kind == "superellipsoid":
            r = rng.uniform(0.1, 0.35, 3)
            e = rng.uniform(2, 4)
            occ |= (np.abs(q / r) ** e).sum(-1) <= 1
        elif kind == "box":
            r = rng.uniform(0.05, 0.3, 3)
            occ |= (np.abs(q) <= r).all(-1)
        else:
            big, small = rng.uniform(0.15, 0.3), rng.uniform(0.04, 0.1)
            occ |= (np.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2) - big) ** 2 + q[..., 2] ** 2 <= small ** 2
    return occ


def surface(occ: np.ndarray) -> np.ndarray:
    """Occupied voxels with at least one empty 6-neighbour (a surface shell)."""
    pad = np.pad(occ, 1)
    interior = occ.copy()
    for axis in range(3):
        for shift in (-1, 1):
            interior &= np.roll(pad, shift, axis)[1:-1, 1:-1, 1:-1]
    return occ & ~interior


def write_dataset(output_dir: str, num: int, seed: int = 0, resolution: int = 64) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(output_dir, "voxels"), exist_ok=True)
    p = grid(resolution)
    rows = []
    for i in range(num):
        shell = surface(random_solid(rng, p))
        idx = np.argwhere(shell)
        sha = hashlib.sha256(f"demo-voxels-{seed}-{i}".encode()).hexdigest()
        write_voxel_ply(os.path.join(output_dir, "voxels", f"{sha}.ply"), (idx + 0.5) / resolution - 0.5)
        rows.append({"sha256": sha, "aesthetic_score": float(rng.uniform(4.5, 7.0)), "voxelized": True,
                     "num_voxels": len(idx), "rendered": False})
    df = pd.DataFrame(rows)
    atomic_write_text(os.path.join(output_dir, "metadata.csv"), df.to_csv(index=False))
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    df = write_dataset(args.output_dir, args.num, args.seed)
    print(f"wrote {len(df)} voxel assets to {args.output_dir} (voxels per asset: "
          f"{int(df.num_voxels.min())}-{int(df.num_voxels.max())})")


if __name__ == "__main__":
    main()
