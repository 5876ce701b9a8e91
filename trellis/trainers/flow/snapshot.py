"""Snapshot helpers of the flow trainers: loading the decoder a dataset names, and turning latents
into pictures (reference TRAINING.md 11).

* SS latents ``[B, 8, 16, 16, 16]`` -> SS decoder -> occupancy ``logits > 0`` [B, 64^3] -> four
  ray-marched voxel views (``trellis.renderers.voxel_preview``), tiled 2x2. Without a decoder the
  picture shows where the latent's channel mean is positive (16^3), so something is still visible.
* SLat ``SparseTensor [N, 8]`` -> four axis-aligned orthographic views of the voxels, each pixel
  coloured by ``sigmoid`` of the first three (normalised) latent channels of the front-most voxel, so
  a sample and its ground truth on the same coords can be told apart.

Decoders: ``pretrained`` is a release-format path (``<name>.json`` + ``<name>.safetensors``), looked
up as given and under ``$TRELLIS_WEIGHTS_DIR``; ``run_dir`` + ``ckpt`` name a training run and a
checkpoint (a step number, ``latest``, or a file suffix such as ``ema0.9999_step0100000``).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from trellis.modules.sparse import SparseTensor

__all__ = ["find_release", "load_decoder", "ss_pictures", "slat_pictures"]


def find_release(pretrained: str | None) -> str | None:
    """The local stem of a release-format model, or None when it is not on this machine."""
    if not pretrained:
        return None
    candidates = [pretrained]
    weights_dir = os.environ.get("TRELLIS_WEIGHTS_DIR")
    if weights_dir:
        candidates.append(os.path.join(weights_dir, pretrained))
    for c in candidates:
        stem = c[:-5] if c.endswith(".json") else c[:-12] if c.endswith(".safetensors") else c
        if os.path.isfile(stem + ".json") and os.path.isfile(stem + ".safetensors"):
            return stem
    return None


def _run_ckpt_file(run_dir: str, key: str, ckpt: str | int) -> str:
    from trellis.trainers import checkpoint as ckpt_lib

    text = str(ckpt)
    if text == "latest":
        step = ckpt_lib.find_latest(run_dir)
        if step is None:
            raise FileNotFoundError(f"{run_dir}/ckpts: no checkpoint found for the snapshot decoder")
        return ckpt_lib.model_file(run_dir, key, step)
    if text.isdigit():
        return ckpt_lib.model_file(run_dir, key, int(text))
    return os.path.join(ckpt_lib.ckpt_dir(run_dir), f"{key}_{text}.pt")


def load_decoder(pretrained: str | None, run_dir: str | None, ckpt: str | int | None,
                 device: torch.device, key: str = "decoder") -> torch.nn.Module | None:
    """The snapshot decoder (eval, on ``device``), or None when none is available locally.

    A ``run_dir`` that is given must load (errors name the file); a ``pretrained`` release that is not
    on this machine gives None (the caller says so once)."""
    from trellis.models import from_pretrained
    from trellis.registry import MODELS
    from trellis.trainers import checkpoint as ckpt_lib

    if run_dir:
        if ckpt is None:
            raise ValueError(f"snapshot decoder: {run_dir} given without a checkpoint (set the *_dec_ckpt argument)")
        cfg_path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"snapshot decoder: {cfg_path} not found")
        with open(cfg_path) as f:
            spec = json.load(f)["models"][key]
        model = MODELS.get(spec["name"])(**spec.get("args", {}))
        path = _run_ckpt_file(run_dir, key, ckpt)
        ckpt_lib.load_state_dict_strict(model, ckpt_lib.load_file(path), path)
        return model.to(device).eval()
    stem = find_release(pretrained)
    if stem is None:
        return None
    return from_pretrained(stem, device)


@torch.no_grad()
def ss_pictures(latents: torch.Tensor, decoder: torch.nn.Module | None, resolution: int = 128,
                seed: int = 0) -> torch.Tensor:
    """``[B, 8, r, r, r]`` latents -> ``[B, 3, 2H, 2W]`` voxel pictures in [0, 1]."""
    from trellis.renderers.voxel_preview import render_voxel_grid_2x2

    if decoder is not None:
        logits = decoder(latents.float())  # [B, 1, R, R, R]
        occ = logits[:, 0] > 0  # [B, R, R, R]
    else:
        occ = latents.float().mean(1) > 0  # [B, r, r, r]
    return torch.stack([render_voxel_grid_2x2(o.cpu(), seed=seed, resolution=resolution) for o in occ])


def _ortho_view(coords: torch.Tensor, colors: torch.Tensor, axis: int, flip: bool, res: int) -> torch.Tensor:
    """Front-most voxel colour along ``axis`` (looking from the low side, or the high side if ``flip``):
    coords [n, 3] in [0, res), colors [n, 3] -> [3, res, res]."""
    others = [a for a in range(3) if a != axis]
    depth = coords[:, axis].long()
    if flip:
        depth = res - 1 - depth
    pix = coords[:, others[0]].long() * res + coords[:, others[1]].long()  # [n]
    n = coords.shape[0]
    key = depth * n + torch.arange(n, device=coords.device)  # nearest first, ties by row
    best = torch.full((res * res,), res * n, dtype=torch.long, device=coords.device)
    best = best.scatter_reduce(0, pix, key, reduce="amin")
    img = torch.zeros(res * res, 3, device=coords.device)
    hit = best < res * n
    img[hit] = colors[best[hit] % n]
    return img.reshape(res, res, 3).permute(2, 0, 1).flip(1)  # [3, res, res], image rows = -axis


@torch.no_grad()
def slat_pictures(x: SparseTensor, resolution: int = 64, scale: int = 2) -> torch.Tensor:
    """SparseTensor ``[N, C]`` -> ``[B, 3, 2 S, 2 S]`` with ``S = resolution * scale``: views along
    -x, +y, +x, -y, tiled 2x2."""
    pics = []
    for sl in x.layout:
        coords = x.coords[sl, 1:].cpu().clamp(0, resolution - 1)
        feats = x.feats[sl].float().cpu()
        colors = torch.sigmoid(feats[:, :3]) if feats.shape[1] >= 3 else torch.ones(feats.shape[0], 3)
        views = [_ortho_view(coords, colors, axis, flip, resolution)
                 for axis, flip in ((0, False), (1, True), (0, True), (1, False))]
        grid = torch.cat([torch.cat(views[:2], 2), torch.cat(views[2:], 2)], 1)  # [3, 2R, 2R]
        pics.append(F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0])
    return torch.stack(pics)
