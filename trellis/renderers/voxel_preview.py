"""Voxel previews without a GPU: ray-marched pictures of occupancy grids for snapshots.

Cameras follow the TRELLIS snapshot rule (reference DATA.md section 8): four views at yaw
0/90/180/270 degrees plus a shared offset, random pitch in [-45, 45] degrees, radius 2, FoV 30
degrees, looking at the origin with +Z up. Voxels are coloured by their normalised position and
shaded by the face the ray enters through; the background is black. The grid spans [-0.5, 0.5]^3.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """World -> camera rotation (OpenCV: x right, y down, z forward), rows = camera axes."""
    z = F.normalize(target - eye, dim=0)
    x = F.normalize(torch.linalg.cross(-up, z), dim=0)
    y = F.normalize(torch.linalg.cross(z, x), dim=0)
    return torch.stack([x, y, z])


def snapshot_cameras(rng: np.random.Generator, radius: float = 2.0) -> list[torch.Tensor]:
    """Four camera positions (DATA.md section 8: yaw measured from +Y)."""
    offset = rng.uniform(-math.pi / 4, math.pi / 4)
    eyes = []
    for k in range(4):
        yaw = k * math.pi / 2 + offset
        pitch = rng.uniform(-math.pi / 4, math.pi / 4)
        eyes.append(torch.tensor([math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch),
                                  math.sin(pitch)], dtype=torch.float32) * radius)
    return eyes


@torch.no_grad()
def render_voxels(occ: torch.Tensor, eye: torch.Tensor, resolution: int = 256, fov_deg: float = 30.0) -> torch.Tensor:
    """Ray-marches a boolean grid ``occ`` [R, R, R] seen from ``eye``; returns RGB [3, H, W] in [0, 1]."""
    occ = occ.bool().cpu()
    r = occ.shape[0]
    rot = look_at(eye, torch.zeros(3), torch.tensor([0.0, 0.0, 1.0]))
    f = 0.5 / math.tan(math.radians(fov_deg) / 2)
    pix = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    v, u = torch.meshgrid(pix, pix, indexing="ij")  # [H, W]
    dirs_cam = torch.stack([(u - 0.5) / f, (v - 0.5) / f, torch.ones_like(u)], -1)  # [H, W, 3]
    dirs = F.normalize(dirs_cam @ rot, dim=-1).reshape(-1, 3)  # camera -> world
    dist = float(eye.norm())
    half_diag = math.sqrt(3) / 2
    step = 0.5 / r
    ts = torch.arange(dist - half_diag, dist + half_diag, step)  # [S]
    padded = F.pad(occ, (1, 1, 1, 1, 1, 1))  # index 0 and r+1 are empty borders
    color = torch.zeros(dirs.shape[0], 3)
    for chunk in torch.split(torch.arange(dirs.shape[0]), 16384):
        d = dirs[chunk]  # [P, 3]
        pts = eye + d[:, None, :] * ts[None, :, None]  # [P, S, 3]
        idx = torch.floor((pts + 0.5) * r).long()
        inside = ((idx >= 0) & (idx < r)).all(-1)
        idx = (idx + 1).clamp(0, r + 1)
        hit = padded[idx[..., 0], idx[..., 1], idx[..., 2]] & inside  # [P, S]
        any_hit = hit.any(1)
        first = hit.float().argmax(1)  # first hit sample per ray
        rows = torch.nonzero(any_hit).squeeze(1)
        if rows.numel() == 0:
            continue
        hit_idx = idx[rows, first[rows]]  # [M, 3], padded coordinates
        prev_idx = idx[rows, (first[rows] - 1).clamp(min=0)]
        entered = (hit_idx != prev_idx).float()  # axes crossed into the voxel
        normal = -torch.sign(d[rows]) * entered
        normal = F.normalize(normal + 1e-6, dim=-1)
        shade = 0.35 + 0.65 * (normal * -d[rows]).sum(-1).clamp(min=0)
        base = (hit_idx.float() - 0.5) / r  # voxel centre in [0, 1]^3
        color[chunk[rows]] = base * shade[:, None]
    return color.reshape(resolution, resolution, 3).permute(2, 0, 1).clamp(0, 1)


def render_voxel_grid_2x2(occ: torch.Tensor, seed: int = 0, resolution: int = 256) -> torch.Tensor:
    """Four snapshot views of ``occ`` tiled 2x2 (view order [v0 v1; v2 v3]): [3, 2H, 2W]."""
    rng = np.random.default_rng(seed)
    views = [render_voxels(occ, eye, resolution) for eye in snapshot_cameras(rng)]
    top = torch.cat(views[:2], dim=2)
    bottom = torch.cat(views[2:], dim=2)
    return torch.cat([top, bottom], dim=1)


def image_grid(images: list[torch.Tensor], ncols: int = 8) -> torch.Tensor:
    """[3, H, W] images -> one [3, rows*H, ncols*W] grid (black padding)."""
    if not images:
        raise ValueError("image_grid: no images")
    c, h, w = images[0].shape
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    grid = torch.zeros(c, nrows * h, ncols * w)
    for i, img in enumerate(images):
        rr, cc = divmod(i, ncols)
        grid[:, rr * h:(rr + 1) * h, cc * w:(cc + 1) * w] = img
    return grid


def save_image(img: torch.Tensor, path: str) -> None:
    """Saves [3, H, W] in [0, 1] as PNG/JPEG (atomic)."""
    from PIL import Image

    from trellis.utils.io import atomic_path

    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format=fmt)
