"""Stage ``cond_feature_<name>`` (new): condition tokens computed once, read by training from disk.

The conditioned flow trainers encode each sample's condition at every step (TRAINING.md section 10):
a random ``renders_cond`` view with DINOv2 ViT-L/14-reg, or a random caption with CLIP ViT-L/14.
This stage encodes all of an asset's views (``--kind image``, the default) or all of its captions
(``--kind text``) once, with the same preprocessing and the same encoders
(``trellis.encoders.conditioners``), so that no encoder runs in the training step. A dataset uses
them with ``"cond_features": "<name>"`` in its args.

``<name>``: the image model (``dinov2_vitl14_reg``; ``tiny`` in tests), or ``text_`` + the text
model's last path part (``text_clip-vit-large-patch14``; ``text_tiny``). Output
``cond_features/<name>/<sha>.npy``: tokens [K, T, C] (float16 by default; ``--fp32`` keeps float32):
the K views of ``renders_cond/<sha>/transforms.json`` in its frame order ([K, 1374, 1024] for
DINOv2: 2.8 MB per view in float16; ``--views K`` keeps K evenly spaced views), or the K captions
of the metadata ``captions`` list in their order ([K, 77, 768] for CLIP); a plain ``.npy`` so that
a dataset memory-maps it and reads only the entry it draws. ``cond_features/<name>/model.json``:
kind, model, token count and width; for text also ``null.npy``, the encoding of the empty caption
(the null condition of classifier-free guidance).

    python -m dataset_toolkits.encode_cond --output_dir D [--kind image|text] [--model M] [--weights PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np
import torch

from dataset_toolkits.encode_latent import flag_select
from dataset_toolkits.extract_feature import add_dinov2_args
from dataset_toolkits.stage import Stage, add_common_args, run_stage_from_args
from trellis.datasets.base import captions_filter
from trellis.datasets.components import crop_condition, load_transforms, open_rgba, parse_captions
from trellis.encoders.conditioners import ImageConditioner, TextConditioner
from trellis.utils.io import atomic_path, atomic_write_json

IMAGE_SIZE = 518
KINDS = ("image", "text")


def feature_name(kind: str, model: str) -> str:
    """The ``cond_features/`` directory (and flag suffix) of a conditioner."""
    return model if kind == "image" else "text_" + model.split("/")[-1]


def cond_feature_dir(root: str, name: str) -> str:
    return os.path.join(root, "cond_features", name)


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save adds no ".npy"
        np.save(f, array)


def write_model_info(root: str, name: str, kind: str, model: str,
                     conditioner: ImageConditioner | TextConditioner, fp32: bool) -> None:
    """``model.json`` (what a dataset checks before it reads the tokens) and, for text, ``null.npy``."""
    folder = cond_feature_dir(root, name)
    os.makedirs(folder, exist_ok=True)
    if kind == "text":
        null = conditioner.null_condition(1)[0].float().cpu().numpy()  # [77, C]
        _save_npy(os.path.join(folder, "null.npy"), null if fp32 else null.astype(np.float16))
    info = {"kind": kind, "model": model, "num_tokens": int(conditioner.num_tokens),
            "channels": int(conditioner.channels)}
    if kind == "image":
        info["image_size"] = int(conditioner.image_size)
    atomic_write_json(os.path.join(folder, "model.json"), info)  # workers may race: same content, own temp files


@torch.no_grad()
def encode_cond_one(conditioner: ImageConditioner | TextConditioner, root: str, name: str, row: dict,
                    fp32: bool = False, views: int | None = None) -> str:
    """Encodes every view (image; ``views``: only that many, evenly spaced) or caption (text) of one
    asset into ``cond_features/<name>/<sha>.npy``."""
    sha256 = row["sha256"]
    if isinstance(conditioner, TextConditioner):
        where = f"{sha256} in {os.path.join(root, 'metadata.csv')}"
        tokens = conditioner.encode(parse_captions(row.get("captions"), where))  # [K, 77, C]
    else:
        directory = os.path.join(root, "renders_cond", sha256)
        paths = [os.path.join(directory, fr["file_path"]) for fr in load_transforms(directory)]
        if views and views < len(paths):  # evenly spaced over the frame order (the cameras' order)
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, views).round().astype(int)]
        images = torch.stack([crop_condition(open_rgba(p), conditioner.image_size, p) for p in paths])  # [K,3,S,S]
        tokens = conditioner.encode(images)  # [K, T, C]
    tokens = tokens.float().cpu().numpy()
    if not np.isfinite(tokens).all():
        raise ValueError(f"non-finite condition tokens for {sha256}")
    out = os.path.join(cond_feature_dir(root, name), f"{sha256}.npy")
    _save_npy(out, tokens if fp32 else tokens.astype(np.float16))
    return out


def _setup(kind: str, model: str, weights: str | None, device: str | None,
           batch_size: int) -> ImageConditioner | TextConditioner:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if kind == "text":
        return TextConditioner(model, weights=weights, device=dev)
    return ImageConditioner(model, weights=weights, image_size=IMAGE_SIZE, batch_size=batch_size, device=dev)


def _process(kind: str, model: str, fp32: bool, views: int | None, root: str, row: dict,
             conditioner: ImageConditioner | TextConditioner) -> dict:
    name = feature_name(kind, model)
    if not os.path.isfile(os.path.join(cond_feature_dir(root, name), "model.json")):
        write_model_info(root, name, kind, model, conditioner, fp32)
    encode_cond_one(conditioner, root, name, row, fp32, views)
    return {f"cond_feature_{name}": True}


def _check_done(name: str, root: str, row: dict) -> dict | None:
    path = os.path.join(cond_feature_dir(root, name), f"{row['sha256']}.npy")
    return {f"cond_feature_{name}": True} if os.path.isfile(path) else None


def make_stage(kind: str = "image", model: str = "dinov2_vitl14_reg", weights: str | None = None,
               batch_size: int = 16, device: str | None = None, fp32: bool = False, views: int | None = None) -> Stage:
    """The ``cond_feature_<name>`` stage for ``run_stage`` (the encoder is built once per worker)."""
    if kind not in KINDS:
        raise ValueError(f"encode_cond: --kind must be one of {KINDS}, got {kind!r}")
    if views is not None and (kind != "image" or views < 1):
        raise ValueError(f"encode_cond: --views takes a positive count and only with --kind image, got {views}")
    name = feature_name(kind, model)
    column = f"cond_feature_{name}"
    return Stage(name=column, columns=[column], process=partial(_process, kind, model, fp32, views),
                 select=captions_filter if kind == "text" else partial(flag_select, "cond_rendered"),
                 check_done=partial(_check_done, name),
                 setup=partial(_setup, kind, model, weights, device, batch_size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_dinov2_args(p)
    p.add_argument("--kind", choices=KINDS, default="image",
                   help="image: DINOv2 tokens of the renders_cond views; text: CLIP tokens of the captions "
                        "(then --model is the text model, default openai/clip-vit-large-patch14)")
    p.add_argument("--fp32", action="store_true", help="store float32 tokens (default float16, half the disk)")
    p.add_argument("--views", type=int, default=None,
                   help="image: encode only this many views per asset, evenly spaced (default all; 2.8 MB each "
                        "in float16); training then draws among these")
    args = p.parse_args(argv)
    model = args.model
    if args.kind == "text" and model == "dinov2_vitl14_reg":  # the image default: take the text one
        model = "openai/clip-vit-large-patch14"
    return run_stage_from_args(make_stage(args.kind, model, args.weights, args.batch_size, args.device, args.fp32,
                                          args.views), args)

if __name__ == "__main__":
    sys.exit(main())
