"""Stage ``encode_ss_latent``: sparse-structure latents of the voxel grids (reference DATA.md section 6).

For each voxelized object: a dense occupancy [1,64,64,64] (1 at ``floor((p + 0.5) * 64)`` of each voxel
centre of ``voxels/<sha>.ply``) goes through the SS encoder with ``sample_posterior=False`` (the posterior
mean), one object per forward.

Output ``ss_latents/<enc_name>/<sha>.npz``: ``mean`` float32 [8,16,16,16]. ``<enc_name>`` is the release
basename (default ``ss_enc_conv3d_16l8_fp16``) or ``<run>_step%07d`` for a training run; the encoder
options are those of ``encode_latent``.

    python -m dataset_toolkits.encode_ss_latent --output_dir D --enc_pretrained weights/ss_enc_conv3d_16l8_fp16
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np
import torch

from dataset_toolkits.encode_latent import (
    add_encoder_args,
    encoder_name,
    encoder_setup,
    flag_select,
    npz_done,
)
from dataset_toolkits.extract_feature import save_npz, voxel_indices
from dataset_toolkits.stage import Stage, add_common_args, run_stage_from_args
from trellis.utils.ply import read_voxel_ply

DEFAULT_SS_ENC = "ss_enc_conv3d_16l8_fp16"


def occupancy(root: str, sha256: str, resolution: int = 64) -> torch.Tensor:
    """``voxels/<sha>.ply`` -> float32 [1,R,R,R] occupancy grid."""
    path = os.path.join(root, "voxels", f"{sha256}.ply")
    points = read_voxel_ply(path)
    if len(points) == 0:
        raise ValueError(f"{path}: empty sparse sample (no voxels)")
    idx = torch.from_numpy(voxel_indices(points, path).astype(np.int64)) * resolution // 64  # [N,3]
    grid = torch.zeros(1, resolution, resolution, resolution)
    grid[0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1.0
    return grid


@torch.no_grad()
def encode_ss_one(encoder: torch.nn.Module, root: str, out_name: str, sha256: str,
                  device: torch.device | str = "cpu") -> str:
    """Encodes one object and writes ``ss_latents/<out_name>/<sha>.npz``; returns its path."""
    x = occupancy(root, sha256)[None].to(device)  # [1,1,64,64,64]
    mean = encoder(x, sample_posterior=False)[0].float().cpu().numpy()  # [8,16,16,16]
    if not np.isfinite(mean).all():
        raise ValueError(f"non-finite SS latent for {sha256} (from voxels/{sha256}.ply)")
    path = os.path.join(root, "ss_latents", out_name, f"{sha256}.npz")
    save_npz(path, mean=mean.astype(np.float32))
    return path


def _process(out_name: str, root: str, row: dict, ctx: tuple) -> dict:
    encoder, device = ctx
    encode_ss_one(encoder, root, out_name, row["sha256"], device)
    return {f"ss_latent_{out_name}": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_encoder_args(p, DEFAULT_SS_ENC)
    args = p.parse_args(argv)
    out_name = encoder_name(args.enc_pretrained, args.model_root, args.enc_model, args.ckpt, args.ema_rate)
    column = f"ss_latent_{out_name}"
    stage = Stage(
        name=column, columns=[column], process=partial(_process, out_name), select=partial(flag_select, "voxelized"),
        check_done=partial(npz_done, os.path.join("ss_latents", out_name), column),
        setup=partial(encoder_setup, args.enc_pretrained, args.model_root, args.enc_model, args.ckpt,
                      args.ema_rate, args.device),
    )
    return run_stage_from_args(stage, args)


if __name__ == "__main__":
    sys.exit(main())
