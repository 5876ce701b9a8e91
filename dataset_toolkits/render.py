"""Stage ``render``: multi-view RGBA renders, ``transforms.json`` and ``mesh.ply`` per asset.

    python -m dataset_toolkits.render <source> --output_dir ROOT [--num_views 150] [--resolution 512]
        [--renderer builtin|blender] [--device auto|cpu|cuda] [--ssaa 2] [--rank r --world_size W]

Cameras follow reference DATA.md 3.1 (Hammersley sphere with the pitch remap, radius 2, FoV 40
degrees; the random offset is seeded from the asset's sha256, so renders are reproducible). Output
``renders/<sha>/`` holds ``000.png ...`` (RGBA, straight alpha, transparent background),
``transforms.json`` (DATA.md 3.3) and ``mesh.ply`` (the normalised mesh, Z up, DATA.md 3.4). Everything
is written into ``renders/.tmp-<sha>-<pid>/`` and renamed into place when complete, so a killed run
never leaves a directory that looks done. Records ``rendered``.

Renderers: ``builtin`` (default) is :mod:`trellis.renderers.rasterize` (textures, vertex colours,
material base colours, simple lighting; CPU or CUDA). ``blender`` runs Blender with Cycles on
:mod:`dataset_toolkits.blender_script` as a subprocess (``--blender PATH`` or ``blender`` on PATH).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from typing import Dict, List, Optional

import numpy as np

from dataset_toolkits.datasets import SOURCES, get_source
from dataset_toolkits.mesh_io import load_asset, normalise, to_raster_mesh
from dataset_toolkits.stage import AssetError, Stage, add_common_args, run_stage_from_args
from trellis.utils.geometry import (
    c2w_blender_to_extrinsics,
    conditioning_views,
    fov_to_intrinsics,
    training_views,
)
from trellis.utils.ply import write_mesh_ply

__all__ = ["render_views", "transforms_dict", "render_asset", "make_stage", "find_blender", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return device


def find_blender(path: Optional[str] = None) -> str:
    """The Blender executable: ``path``, ``$BLENDER`` or ``blender`` on PATH; a clear error otherwise."""
    cand = path or os.environ.get("BLENDER") or shutil.which("blender")
    if not cand or not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
        raise RuntimeError("--renderer blender needs a Blender executable: install Blender (3.x or 4.x), "
                           "put `blender` on PATH, or pass --blender PATH / set $BLENDER")
    return cand


def transforms_dict(c2w: np.ndarray, fov: np.ndarray, scale: float, offset: np.ndarray) -> dict:
    """DATA.md 3.3: ``aabb``, ``scale``, ``offset`` and per view ``file_path``, ``camera_angle_x``
    (radians) and ``transform_matrix`` (Blender camera-to-world, 4x4 rows)."""
    return {
        "aabb": [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]],
        "scale": float(scale),
        "offset": [float(x) for x in offset],
        "frames": [{"file_path": f"{i:03d}.png", "camera_angle_x": float(fov[i]),
                    "transform_matrix": np.asarray(c2w[i], dtype=float).tolist()} for i in range(len(fov))],
    }


def _clear_stale(parent: str, sha: str) -> None:
    for d in glob.glob(os.path.join(parent, f".tmp-{sha}-*")):
        shutil.rmtree(d, ignore_errors=False)


def render_views(mesh, c2w: np.ndarray, fov: np.ndarray, resolution: int, out_dir: str, device: str,
                 ssaa: int = 2, pixel_budget: int = 1 << 24) -> int:
    """Renders views with the built-in rasteriser into ``out_dir/NNN.png``; returns the number of
    views with at least one covered pixel."""
    import torch
    from PIL import Image

    from trellis.renderers.rasterize import render_mesh

    ext = torch.as_tensor(c2w_blender_to_extrinsics(c2w), dtype=torch.float32, device=device)
    intr = torch.as_tensor(fov_to_intrinsics(fov), dtype=torch.float32, device=device)
    per_batch = max(1, pixel_budget // (resolution * ssaa) ** 2)
    nonempty = 0
    for s in range(0, len(fov), per_batch):
        e = min(len(fov), s + per_batch)
        with torch.no_grad():
            rgba = render_mesh(mesh, ext[s:e], intr[s:e], resolution, ssaa=ssaa, outputs=("rgba",))["rgba"]
        img = (rgba * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # [b, R, R, 4]
        nonempty += int((img[..., 3] > 0).reshape(len(img), -1).any(1).sum())
        for k in range(len(img)):
            Image.fromarray(img[k], "RGBA").save(os.path.join(out_dir, f"{s + k:03d}.png"), compress_level=3)
    return nonempty


def _run_blender(blender: str, asset_path: str, tmp: str, c2w: np.ndarray, fov: np.ndarray,
                 resolution: int, save_mesh: bool, timeout: float) -> Dict:
    spec = {"object": os.path.abspath(asset_path), "output_folder": os.path.abspath(tmp),
            "resolution": resolution, "save_mesh": save_mesh,
            "views": [{"c2w": np.asarray(c2w[i]).tolist(), "fov": float(fov[i])} for i in range(len(fov))]}
    spec_path = os.path.join(tmp, "_views.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blender_script.py")
    cmd = [blender, "-b", "--factory-startup", "-P", script, "--", spec_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssetError(f"blender timed out after {timeout:.0f} s") from e
    if proc.returncode != 0 or not os.path.exists(os.path.join(tmp, "transforms.json")):
        tail = (proc.stdout[-800:] + proc.stderr[-800:]).strip()
        raise AssetError(f"blender failed (exit {proc.returncode}): {tail}")
    os.remove(spec_path)
    with open(os.path.join(tmp, "transforms.json")) as f:
        return json.load(f)


def render_asset(root: str, row: dict, ctx, source: str, subdir: str, views: str, num_views: int,
                 resolution: int, renderer: str = "builtin", device: str = "auto", ssaa: int = 2,
                 save_mesh: bool = True, max_faces: int = 10_000_000, blender: Optional[str] = None,
                 blender_timeout: float = 3600.0) -> dict:
    """Renders one asset into ``<root>/<subdir>/<sha>/`` atomically. ``views``: ``training`` (DATA.md
    3.1) or ``conditioning`` (3.2). Returns ``{flag: True, "_warnings": [...]}``."""
    sha = row["sha256"]
    path = get_source(source).asset_path(root, row)
    parent = os.path.join(root, subdir)
    os.makedirs(parent, exist_ok=True)
    _clear_stale(parent, sha)
    final = os.path.join(parent, sha)
    tmp = os.path.join(parent, f".tmp-{sha}-{os.getpid()}")
    os.makedirs(tmp)
    if views == "training":
        c2w, fov = training_views(sha, num_views)
    else:
        c2w, fov = conditioning_views(sha, num_views)
    warnings: List[str] = []
    try:
        if renderer == "blender":
            _run_blender(find_blender(blender), path, tmp, c2w, fov, resolution, save_mesh, blender_timeout)
        else:
            asset = load_asset(path, max_faces=max_faces)
            warnings += asset.warnings
            verts, scale, offset = normalise(asset.vertices)
            mesh = to_raster_mesh(asset, verts, device=resolve_device(device))
            if render_views(mesh, c2w, fov, resolution, tmp, mesh.vertices.device.type, ssaa=ssaa) == 0:
                raise AssetError("empty render: no view shows any geometry")
            if save_mesh:
                write_mesh_ply(os.path.join(tmp, "mesh.ply"), verts.astype(np.float32), asset.faces)
            tmp_json = os.path.join(tmp, "transforms.json.tmp")
            with open(tmp_json, "w") as f:
                json.dump(transforms_dict(c2w, fov, scale, offset), f, indent=4)
            os.replace(tmp_json, os.path.join(tmp, "transforms.json"))
        if os.path.exists(final):  # incomplete leftovers (e.g. from another tool): replace them
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    flag = "rendered" if subdir == "renders" else "cond_rendered"
    return {flag: True, "_warnings": warnings}


def check_rendered(root: str, row: dict, subdir: str = "renders", flag: str = "rendered"):
    """Done when ``<subdir>/<sha>/transforms.json`` exists (directories are renamed in complete)."""
    done = os.path.exists(os.path.join(root, subdir, row["sha256"], "transforms.json"))
    if done and subdir == "renders" and not os.path.exists(os.path.join(root, subdir, row["sha256"], "mesh.ply")):
        return None
    return {flag: True} if done else None


def _select_downloaded(df):
    if "local_path" not in df.columns:
        return df.iloc[:0]
    return df[df["local_path"].notna()]


def make_stage(source: str, num_views: int = 150, resolution: int = 512, renderer: str = "builtin",
               device: str = "auto", ssaa: int = 2, max_faces: int = 10_000_000,
               blender: Optional[str] = None, torch_threads: Optional[int] = None) -> Stage:
    """The ``rendered`` stage (training views)."""
    get_source(source)  # validates the name early
    if renderer not in ("builtin", "blender"):
        raise ValueError(f"unknown renderer {renderer!r}; use 'builtin' or 'blender'")
    return Stage(name="rendered", columns=("rendered",),
                 process=partial(render_asset, source=source, subdir="renders", views="training",
                                 num_views=num_views, resolution=resolution, renderer=renderer, device=device,
                                 ssaa=ssaa, save_mesh=True, max_faces=max_faces, blender=blender),
                 select=_select_downloaded, check_done=check_rendered, torch_threads=torch_threads)


def add_render_args(parser: argparse.ArgumentParser, num_views: int, resolution: int) -> None:
    parser.add_argument("source", choices=SOURCES, help="asset source (how local paths resolve)")
    add_common_args(parser)
    parser.add_argument("--num_views", type=int, default=num_views, help="views per asset")
    parser.add_argument("--resolution", type=int, default=resolution, help="image side in pixels")
    parser.add_argument("--renderer", choices=["builtin", "blender"], default="builtin")
    parser.add_argument("--device", default="auto", help="builtin renderer device: auto, cpu or cuda")
    parser.add_argument("--ssaa", type=int, default=2, help="builtin renderer supersampling factor")
    parser.add_argument("--max_faces", type=int, default=10_000_000, help="reject larger meshes")
    parser.add_argument("--blender", default=None, help="Blender executable (default: $BLENDER or PATH)")
    parser.add_argument("--torch_threads", type=int, default=None, help="torch threads per worker")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_render_args(parser, num_views=150, resolution=512)
    args = parser.parse_args(argv)
    if args.renderer == "blender":
        find_blender(args.blender)  # fail before touching any asset
    stage = make_stage(args.source, args.num_views, args.resolution, args.renderer, args.device, args.ssaa,
                       args.max_faces, args.blender, args.torch_threads)
    return run_stage_from_args(stage, args)


if __name__ == "__main__":
    sys.exit(main())
