"""Stage ``cond_feature_<model>`` (new): the DINOv2 condition tokens of every condition view, once.

The image-conditioned flow trainers encode a random ``renders_cond`` view of each sample with DINOv2
ViT-L/14-reg at every step (TRAINING.md section 10). This stage encodes all of an asset's condition
views once, with the same preprocessing (DATA.md 7.3: crop around the alpha box, LANCZOS to 518,
premultiplied on black) and the same encoder (``trellis.encoders.conditioners.ImageConditioner``:
pre-norm tokens, parameter-free LayerNorm), so that training reads the tokens from disk and no
encoder runs in the step. A dataset uses them with ``"cond_features": "<model>"`` in its args.

Output ``cond_features/<model>/<sha>.npy``: tokens [V, 1374, C] (float16 by default; ``--fp32`` keeps
float32) of the V views of ``renders_cond/<sha>/transforms.json``, in its frame order; a plain
``.npy`` so that a dataset memory-maps it and reads only the view it draws.
``cond_features/<model>/model.json``: the model, its token count and width. Storage: 2.8 MB per
view in float16 (ViT-L, 1374 x 1024 tokens).

    python -m dataset_toolkits.encode_cond --output_dir D [--model dinov2_vitl14_reg] [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import numpy as np
import torch

from dataset_toolkits.encode_latent import flag_select
from dataset_toolkits.extract_feature import add_dinov2_args
from dataset_toolkits.stage import Stage, add_common_args, run_stage_from_args
from trellis.datasets.components import crop_condition, load_transforms, open_rgba
from trellis.encoders.conditioners import ImageConditioner

IMAGE_SIZE = 518


def cond_feature_dir(root: str, model: str) -> str:
    return os.path.join(root, "cond_features", model)


def write_model_info(root: str, model: str, conditioner: ImageConditioner) -> None:
    """``cond_features/<model>/model.json``: what a dataset checks before it reads the tokens."""
    info = {"model": model, "num_tokens": int(conditioner.num_tokens), "channels": int(conditioner.channels),
            "image_size": int(conditioner.image_size)}
    path = os.path.join(cond_feature_dir(root, model), "model.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(info, f, indent=4)
    os.replace(path + ".tmp", path)


@torch.no_grad()
def encode_cond_one(conditioner: ImageConditioner, root: str, model: str, sha256: str, fp32: bool = False) -> str:
    """Encodes every condition view of one asset; writes ``cond_features/<model>/<sha>.npy``."""
    directory = os.path.join(root, "renders_cond", sha256)
    frames = load_transforms(directory)
    paths = [os.path.join(directory, fr["file_path"]) for fr in frames]
    images = torch.stack([crop_condition(open_rgba(p), conditioner.image_size, p) for p in paths])  # [V,3,S,S]
    tokens = conditioner.encode(images).float().cpu().numpy()  # [V, T, C]
    if not np.isfinite(tokens).all():
        raise ValueError(f"non-finite condition tokens for {sha256} (from {directory})")
    out = os.path.join(cond_feature_dir(root, model), f"{sha256}.npy")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}.npy"
    np.save(tmp, tokens if fp32 else tokens.astype(np.float16))
    os.replace(tmp, out)
    return out


def _setup(model: str, weights: str | None, device: str | None, batch_size: int) -> ImageConditioner:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return ImageConditioner(model, weights=weights, image_size=IMAGE_SIZE, batch_size=batch_size, device=dev)


def _process(model: str, fp32: bool, root: str, row: dict, conditioner: ImageConditioner) -> dict:
    if not os.path.isfile(os.path.join(cond_feature_dir(root, model), "model.json")):
        write_model_info(root, model, conditioner)
    encode_cond_one(conditioner, root, model, row["sha256"], fp32)
    return {f"cond_feature_{model}": True}


def _check_done(model: str, root: str, row: dict) -> dict | None:
    path = os.path.join(cond_feature_dir(root, model), f"{row['sha256']}.npy")
    return {f"cond_feature_{model}": True} if os.path.isfile(path) else None


def make_stage(model: str = "dinov2_vitl14_reg", weights: str | None = None, batch_size: int = 16,
               device: str | None = None, fp32: bool = False) -> Stage:
    """The ``cond_feature_<model>`` stage for ``run_stage`` (the encoder is built once per worker)."""
    column = f"cond_feature_{model}"
    return Stage(name=column, columns=[column], process=partial(_process, model, fp32),
                 select=partial(flag_select, "cond_rendered"),
                 check_done=partial(_check_done, model),
                 setup=partial(_setup, model, weights, device, batch_size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_dinov2_args(p)
    p.add_argument("--fp32", action="store_true", help="store float32 tokens (default float16, half the disk)")
    args = p.parse_args(argv)
    return run_stage_from_args(make_stage(args.model, args.weights, args.batch_size, args.device, args.fp32), args)


if __name__ == "__main__":
    sys.exit(main())
