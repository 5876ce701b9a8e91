"""Stage ``voxelize``: 64^3 surface voxels of each rendered asset (reference DATA.md section 4).

    python -m dataset_toolkits.voxelize <source> --output_dir ROOT [--rank r --world_size W]

Reads ``renders/<sha>/mesh.ply`` (so it runs after ``render``), clamps vertices to
``[-0.5 + 1e-6, 0.5 - 1e-6]``, marks voxel ``(i, j, k)`` when a triangle intersects the closed cube
``[-0.5 + i/64, -0.5 + (i+1)/64] x ...`` (separating-axis test, Akenine-Moeller, "Fast 3D
Triangle-Box Overlap Testing", 2001), and writes the voxel centres ``(idx + 0.5)/64 - 0.5`` to
``voxels/<sha>.ply`` (x, y, z float32; sorted by index). Records ``voxelized`` and ``num_voxels``.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

from dataset_toolkits.datasets import SOURCES
from dataset_toolkits.stage import AssetError, Stage, add_common_args, run_stage_from_args
from trellis.utils.ply import PlyError, read_mesh_ply, read_voxel_ply, write_voxel_ply

__all__ = ["voxelize_mesh", "voxel_centres", "make_stage"]


def _axis_separates(axis: np.ndarray, tri: np.ndarray, half: float) -> np.ndarray:
    """Whether ``axis`` ``[N, 3]`` separates triangles ``[N, 3, 3]`` (relative to box centres) from
    the cube of half-size ``half``; zero axes never separate. Returns bool ``[N]``."""
    p = np.einsum("nd,nkd->nk", axis, tri)  # [N, 3] projections of the corners
    r = half * np.abs(axis).sum(1)
    return (p.min(1) > r) | (p.max(1) < -r)


def voxelize_mesh(vertices: np.ndarray, faces: np.ndarray, resolution: int = 64,
                  max_candidates: int = 1 << 21) -> np.ndarray:
    """Surface voxels of a mesh in [-0.5, 0.5]^3: int64 ``[N, 3]`` unique indices, sorted.

    vertices ``[V, 3]`` are clamped to ``[-0.5 + 1e-6, 0.5 - 1e-6]``; faces ``[F, 3]``.
    """
    v = np.clip(np.asarray(vertices, dtype=np.float64), -0.5 + 1e-6, 0.5 - 1e-6)
    f = np.asarray(faces, dtype=np.int64)
    if f.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    tri = (v[f] + 0.5) * resolution  # [F, 3, 3] in voxel units; voxel i spans [i, i + 1]
    lo = np.clip(np.ceil(tri.min(1)) - 1, 0, resolution - 1).astype(np.int64)  # closed cubes
    hi = np.clip(np.floor(tri.max(1)), 0, resolution - 1).astype(np.int64)
    size = hi - lo + 1  # [F, 3]
    counts = size.prod(1)
    ends = np.cumsum(counts)
    hits = []
    start = 0
    while start < len(f):
        base = ends[start - 1] if start > 0 else 0
        stop = max(int(np.searchsorted(ends, base + max_candidates, side="right")), start + 1)
        cnt = counts[start:stop]
        rep = np.repeat(np.arange(start, stop), cnt)  # [N] triangle of each candidate
        local = np.arange(len(rep)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        s = size[rep]
        idx = lo[rep] + np.stack([local // (s[:, 1] * s[:, 2]), (local // s[:, 2]) % s[:, 1], local % s[:, 2]], 1)
        t = tri[rep] - (idx + 0.5)[:, None, :]  # [N, 3, 3] corners relative to the box centre
        e = np.stack([t[:, 1] - t[:, 0], t[:, 2] - t[:, 1], t[:, 0] - t[:, 2]], 1)  # [N, 3, 3] edges
        sep = _axis_separates(np.cross(e[:, 0], e[:, 1]), t, 0.5)  # triangle plane
        for k in range(3):  # box axis x edge axes
            unit = np.zeros(3)
            unit[k] = 1.0
            for j in range(3):
                sep |= _axis_separates(np.cross(np.broadcast_to(unit, e[:, j].shape), e[:, j]), t, 0.5)
        hits.append(idx[~sep])
        start = stop
    occ = np.unique(np.concatenate(hits), axis=0)
    return occ.astype(np.int64)


def voxel_centres(indices: np.ndarray, resolution: int = 64) -> np.ndarray:
    """``(idx + 0.5) / resolution - 0.5`` as float32 ``[N, 3]``."""
    return ((np.asarray(indices, dtype=np.float64) + 0.5) / resolution - 0.5).astype(np.float32)


def _check_done(root: str, row: dict):
    path = os.path.join(root, "voxels", f"{row['sha256']}.ply")
    if not os.path.exists(path):
        return None
    try:
        return {"voxelized": True, "num_voxels": len(read_voxel_ply(path))}
    except PlyError:
        return None  # a corrupt file is redone (writes are atomic, so this is foreign damage)


def _process(root: str, row: dict, ctx, resolution: int = 64) -> dict:
    sha = row["sha256"]
    mesh_path = os.path.join(root, "renders", sha, "mesh.ply")
    if not os.path.exists(mesh_path):
        raise AssetError(f"no mesh.ply (render the asset first): {mesh_path}")
    try:
        verts, faces = read_mesh_ply(mesh_path)
    except PlyError as e:
        raise AssetError(f"unreadable mesh.ply: {e}") from e
    occ = voxelize_mesh(verts, faces, resolution)
    if len(occ) == 0:
        raise AssetError("no voxels (empty mesh)")
    os.makedirs(os.path.join(root, "voxels"), exist_ok=True)
    write_voxel_ply(os.path.join(root, "voxels", f"{sha}.ply"), voxel_centres(occ, resolution))
    return {"voxelized": True, "num_voxels": int(len(occ))}


def _select_rendered(df):
    return df[df["rendered"]]


def make_stage(resolution: int = 64) -> Stage:
    """The ``voxelized`` stage: input rows are those with ``rendered`` True."""
    return Stage(name="voxelized", columns=("voxelized", "num_voxels"),
                 process=partial(_process, resolution=resolution), select=_select_rendered,
                 check_done=_check_done, torch_threads=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=SOURCES, help="asset source (kept for the original's argument shape)")
    add_common_args(parser)
    parser.add_argument("--resolution", type=int, default=64, help="grid resolution (TRELLIS: 64)")
    args = parser.parse_args(argv)
    return run_stage_from_args(make_stage(args.resolution), args)


if __name__ == "__main__":
    sys.exit(main())
