"""Stage ``extract_feature``: DINOv2 patch features of the rendered views, projected onto the voxels
(reference DATA.md section 5).

For each object with ``rendered`` and ``voxelized``:

1. every view ``renders/<sha>/NNN.png`` is resized to 518^2 (LANCZOS, RGBA), premultiplied on black and
   ImageNet-normalised;
2. the ViT's pre-norm patch tokens (CLS and registers dropped) form a [C, 37, 37] map per view;
3. each voxel centre of ``voxels/<sha>.ply`` is projected with the view's camera (OpenCV extrinsics,
   normalised intrinsics) and the map is sampled bilinearly there (``align_corners=False``, zeros
   outside the frame);
4. the samples are averaged over all views (no visibility test, as the released encoders expect).

Output ``features/<model>/<sha>.npz``: ``indices`` uint8 [N,3] = ``floor((p + 0.5) * 64)`` and
``patchtokens`` float16 [N,C], in the voxel-file order; ``features/<model>/model.json`` records the
model and its channel count C (1024 for ``dinov2_vitl14_reg``; 64 for ``tiny``).

    python -m dataset_toolkits.extract_feature --output_dir D [--model dinov2_vitl14_reg] [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from dataset_toolkits.stage import Stage, add_common_args, run_stage_from_args
from trellis.datasets.components import load_transforms
from trellis.encoders.dinov2 import PRESETS, DinoV2ViT, load_dinov2, normalize_images
from trellis.utils.geometry import c2w_blender_to_extrinsics, fov_to_intrinsics
from trellis.utils.ply import read_voxel_ply

IMAGE_SIZE = 518


def load_view(path: str, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """One RGBA render -> float32 [3,S,S] in [0,1], premultiplied (black background), not normalised."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: view not found")
    with Image.open(path) as im:
        rgba = im.convert("RGBA").resize((image_size, image_size), Image.Resampling.LANCZOS)
    arr = np.asarray(rgba, dtype=np.float32) / 255.0  # [S,S,4]
    return torch.from_numpy(arr[..., :3] * arr[..., 3:4]).permute(2, 0, 1).contiguous()


def load_cameras(frames: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """transforms.json frames -> (extrinsics float32 [V,4,4] OpenCV world-to-camera, intrinsics [V,3,3])."""
    c2w = np.stack([np.asarray(f["transform_matrix"], dtype=np.float64) for f in frames])
    fov = np.array([float(f["camera_angle_x"]) for f in frames])
    return torch.from_numpy(c2w_blender_to_extrinsics(c2w)).float(), torch.from_numpy(fov_to_intrinsics(fov)).float()


def project(points: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """World points [N,3] -> image coordinates uv [V,N,2] in [0,1] ((0,0) = top-left corner) per view."""
    cam = points @ extrinsics[:, :3, :3].transpose(1, 2) + extrinsics[:, None, :3, 3]  # [V,N,3]
    pix = cam @ intrinsics.transpose(1, 2)  # [V,N,3]
    return pix[..., :2] / pix[..., 2:3]


def sample_patch_grid(grid: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of feature maps [V,C,h,w] at uv [V,N,2] in [0,1] -> [V,N,C] (zeros outside)."""
    g = (uv * 2 - 1)[:, None]  # [V,1,N,2], x = u (width), y = v (height)
    out = F.grid_sample(grid, g.to(grid.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :, 0].transpose(1, 2)  # [V,C,1,N] -> [V,N,C]


@torch.no_grad()
def object_features(vit: DinoV2ViT, render_dir: str, points: np.ndarray, batch_size: int = 16,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean over all views of ``render_dir`` of the sampled pre-norm patch tokens at ``points`` [N,3].
    Returns float32 [N,C] on the CPU. Views go through the ViT ``batch_size`` at a time."""
    frames = load_transforms(render_dir)
    extr, intr = load_cameras(frames)
    pts = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)).to(device)
    total = torch.zeros(pts.shape[0], vit.embed_dim, device=device)
    paths = [os.path.join(render_dir, f["file_path"]) for f in frames]
    # PNG decoding and the LANCZOS resize release the GIL: decode views on threads, a chunk ahead of the ViT.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        views = pool.map(load_view, paths)
        for start in range(0, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            images = torch.stack([next(views) for _ in chunk]).to(device)
            grid = vit.patch_grid(normalize_images(images)).float()  # [v, C, 37, 37]
            uv = project(pts, extr[start:start + len(chunk)].to(device), intr[start:start + len(chunk)].to(device))
            total += sample_patch_grid(grid, uv).sum(dim=0)  # [N, C]
    return (total / len(frames)).cpu()


def voxel_indices(points: np.ndarray, path: str) -> np.ndarray:
    """Voxel centres [N,3] -> uint8 indices ``floor((p + 0.5) * 64)``; errors name ``path``."""
    idx = np.floor((points.astype(np.float64) + 0.5) * 64).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() > 63):
        raise ValueError(f"{path}: voxel centres outside [-0.5, 0.5]^3")
    return idx.astype(np.uint8)


def extract_one(vit: DinoV2ViT, root: str, sha256: str, model: str, batch_size: int = 16,
                device: torch.device | str = "cpu") -> str:
    """Writes ``features/<model>/<sha>.npz`` for one object; returns its path."""
    voxel_path = os.path.join(root, "voxels", f"{sha256}.ply")
    points = read_voxel_ply(voxel_path)
    if len(points) == 0:
        raise ValueError(f"{voxel_path}: no voxels")
    indices = voxel_indices(points, voxel_path)
    feats = object_features(vit, os.path.join(root, "renders", sha256), points, batch_size, device)
    out = os.path.join(root, "features", model, f"{sha256}.npz")
    save_npz(out, indices=indices, patchtokens=feats.numpy().astype(np.float16))
    return out


def save_npz(path: str, compress: bool = False, **arrays: np.ndarray) -> None:
    """Atomic npz: written beside ``path`` and renamed onto it. Uncompressed by default: zlib saves
    under 10% on float16 features and costs about 1 s per 20k-voxel asset (``np.load`` reads both)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    (np.savez_compressed if compress else np.savez)(tmp, **arrays)
    os.replace(tmp, path)


def write_model_info(root: str, model: str) -> None:
    """``features/<model>/model.json``: the model name and its channel count (the npz width)."""
    cfg = PRESETS[model]
    info = {"model": model, "channels": cfg.embed_dim, "image_size": IMAGE_SIZE, "grid": IMAGE_SIZE // cfg.patch_size}
    path = os.path.join(root, "features", model, "model.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=4)
    os.replace(path + ".tmp", path)


def _setup(model: str, weights: str | None, device: str | None, tf32: bool = True) -> tuple[DinoV2ViT, torch.device]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":  # TensorFloat-32 matmuls: 10-bit mantissa inputs, fp32 accumulation, ~1.7x faster
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return load_dinov2(model, weights).to(dev), dev


def _select(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["rendered"].astype(bool) & df["voxelized"].astype(bool)]


def _check_done(model: str, root: str, row: dict) -> dict | None:
    path = os.path.join(root, "features", model, f"{row['sha256']}.npz")
    return {f"feature_{model}": True} if os.path.isfile(path) else None


def _process(model: str, batch_size: int, root: str, row: dict, ctx: tuple) -> dict:
    vit, device = ctx
    extract_one(vit, root, row["sha256"], model, batch_size, device)
    return {f"feature_{model}": True}


def make_stage(model: str = "dinov2_vitl14_reg", weights: str | None = None, batch_size: int = 16,
               device: str | None = None, tf32: bool = True) -> Stage:
    """The ``feature_<model>`` stage for ``run_stage`` (the ViT is built once per worker by ``setup``).
    ``tf32`` (default): TensorFloat-32 matmuls on CUDA; ``False`` computes in full fp32 as the original
    does (about 1.7x slower on an H200). No effect on the CPU."""
    return Stage(name=f"feature_{model}", columns=[f"feature_{model}"],
                 process=partial(_process, model, batch_size), select=_select,
                 check_done=partial(_check_done, model), setup=partial(_setup, model, weights, device, tf32))


def add_dinov2_args(p: argparse.ArgumentParser) -> None:
    """``--model --weights --batch_size --device`` of the stages that run DINOv2."""
    p.add_argument("--model", default="dinov2_vitl14_reg", help="dinov2_vitl14_reg, or tiny (random, tests)")
    p.add_argument("--weights", default=None, help="checkpoint file or HF directory (default: $TRELLIS_WEIGHTS_DIR)")
    p.add_argument("--batch_size", type=int, default=16, help="views per ViT forward")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_dinov2_args(p)
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp32", dest="tf32", action="store_false",
                      help="full-fp32 matmuls on CUDA, as the original (default: TensorFloat-32, ~1.7x faster)")
    prec.add_argument("--tf32", dest="tf32", action="store_true", help="TensorFloat-32 matmuls on CUDA (the default)")
    p.set_defaults(tf32=True)
    args = p.parse_args(argv)
    write_model_info(args.output_dir, args.model)
    return run_stage_from_args(make_stage(args.model, args.weights, args.batch_size, args.device, args.tf32), args)


if __name__ == "__main__":
    sys.exit(main())
