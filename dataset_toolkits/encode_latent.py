"""Stage ``encode_latent``: structured latents of the voxel features (reference DATA.md section 6).

For each object with ``feature_<feat_model>``: a SparseTensor with coords ``[0, indices]`` and feats
``patchtokens`` (float32), in file order, goes through the SLat encoder with ``sample_posterior=False``
(the posterior mean), one object per forward.

Output ``latents/<feat_model>_<enc_name>/<sha>.npz``: ``coords`` uint8 [N,3] (the same voxels, the same
order) and ``feats`` float32 [N,8].

The encoder is either a release (``--enc_pretrained <dir>/<name>`` = ``<name>.json`` + ``<name>.safetensors``)
or a training run (``--model_root <runs> --enc_model <run> --ckpt <step|latest> [--ema_rate 0.9999]``:
``<run>/config.json`` ``models.encoder`` + ``<run>/ckpts/encoder[_ema<rate>]_step%07d.pt``), loaded strictly.

    python -m dataset_toolkits.encode_latent --output_dir D --enc_pretrained weights/slat_enc_swin8_B_64l8_fp16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import numpy as np
import pandas as pd
import torch

from dataset_toolkits.stage import Stage, add_common_args, run_stage_from_args
from trellis.datasets.components import read_npz
from trellis.modules.sparse import SparseTensor

DEFAULT_SLAT_ENC = "slat_enc_swin8_B_64l8_fp16"


# ------------------------------------------------------------------------------------ encoder loading
def _release_name(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for ext in (".json", ".safetensors"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name


def _run_step(model_root: str | None, enc_model: str, ckpt: str | int) -> tuple[str, int]:
    """(run directory, checkpoint step) of a training run; ``ckpt`` = a step or ``latest``."""
    from trellis.trainers.checkpoint import CheckpointError, find_latest

    run = os.path.join(model_root, enc_model) if model_root else enc_model
    step = find_latest(run) if ckpt == "latest" else int(ckpt)
    if step is None:
        raise CheckpointError(f"no complete checkpoint in {os.path.join(run, 'ckpts')}")
    return run, step


def encoder_name(enc_pretrained: str | None = None, model_root: str | None = None, enc_model: str | None = None,
                 ckpt: str | int = "latest", ema_rate: float | str | None = None) -> str:
    """The encoder's output-folder name, without loading it: the release basename, or
    ``<run>_step%07d`` (plus ``_ema<rate>``) for a training run."""
    if enc_pretrained is not None:
        return _release_name(enc_pretrained)
    if enc_model is None:
        raise ValueError("give --enc_pretrained, or --enc_model (a run directory, under --model_root)")
    run, step = _run_step(model_root, enc_model, ckpt)
    return f"{os.path.basename(run.rstrip('/'))}_step{step:07d}" + ("" if ema_rate is None else f"_ema{ema_rate}")


def load_encoder(enc_pretrained: str | None = None, model_root: str | None = None, enc_model: str | None = None,
                 ckpt: str | int = "latest", ema_rate: float | str | None = None, key: str = "encoder",
                 device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """Returns (encoder in eval mode, ``encoder_name(...)``).

    ``enc_pretrained``: a release path (``<name>.json`` + ``<name>.safetensors``, with or without extension).
    Otherwise ``<model_root>/<enc_model>`` is a run dir: its ``config.json`` gives ``models.<key>`` and
    ``ckpts/<key>_step%07d.pt`` (or ``<key>_ema<rate>_step%07d.pt``) the weights. Loading is strict."""
    from trellis.models import from_pretrained
    from trellis.registry import MODELS
    from trellis.trainers.checkpoint import ema_file, load_file, load_state_dict_strict, model_file

    name = encoder_name(enc_pretrained, model_root, enc_model, ckpt, ema_rate)
    if enc_pretrained is not None:
        return from_pretrained(enc_pretrained, device=device).eval(), name
    run, step = _run_step(model_root, enc_model, ckpt)
    cfg_path = os.path.join(run, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (a training run directory holds config.json and ckpts/)")
    with open(cfg_path) as f:
        spec = json.load(f).get("models", {}).get(key)
    if spec is None:
        raise KeyError(f"{cfg_path}: no models.{key} entry")
    path = model_file(run, key, step) if ema_rate is None else ema_file(run, key, ema_rate, step)
    model = MODELS.get(spec["name"])(**spec.get("args", {}))
    load_state_dict_strict(model, load_file(path), path)
    return model.to(device).eval(), name


# ------------------------------------------------------------------------------------------- encoding
def load_features(root: str, feat_model: str, sha256: str) -> tuple[np.ndarray, np.ndarray]:
    """``features/<feat_model>/<sha>.npz`` -> (indices uint8 [N,3], patchtokens float32 [N,C])."""
    path = os.path.join(root, "features", feat_model, f"{sha256}.npz")
    data = read_npz(path, {"indices": (None, 3), "patchtokens": (None, None)})
    n = data["indices"].shape[0]
    if n == 0:
        raise ValueError(f"{path}: empty sparse sample (no voxels)")
    if data["patchtokens"].shape[0] != n:
        raise ValueError(f"{path}: {n} indices but {data['patchtokens'].shape[0]} patch tokens")
    return data["indices"], data["patchtokens"].astype(np.float32)


@torch.no_grad()
def encode_sparse_batch(encoder: torch.nn.Module, items: list[tuple[np.ndarray, np.ndarray]],
                        device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Encodes several objects in one forward. items: [(indices uint8 [N_i,3], feats float32 [N_i,C])]
    -> list of posterior means float32 [N_i, latent], in the items' row order."""
    coords, feats, sizes = [], [], []
    for b, (idx, f) in enumerate(items):
        coords.append(torch.cat([torch.full((len(idx), 1), b, dtype=torch.int32),
                                 torch.from_numpy(idx.astype(np.int32))], dim=1))  # [N_i, 4]
        feats.append(torch.from_numpy(f))
        sizes.append(len(idx))
    x = SparseTensor(feats=torch.cat(feats).to(device), coords=torch.cat(coords).to(device), shape=(len(items),))
    z = encoder(x, sample_posterior=False)
    if not torch.equal(z.coords.cpu(), x.coords.cpu()):
        raise RuntimeError("the SLat encoder changed the voxel order; cannot map latents back to the voxels")
    return [t.float().cpu().numpy() for t in z.feats.split(sizes)]


def encode_one(encoder: torch.nn.Module, root: str, feat_model: str, out_name: str, sha256: str,
               device: torch.device | str = "cpu") -> str:
    """Encodes one object and writes ``latents/<out_name>/<sha>.npz``; returns its path."""
    from dataset_toolkits.extract_feature import save_npz

    idx, feats = load_features(root, feat_model, sha256)
    (mean,) = encode_sparse_batch(encoder, [(idx, feats)], device)
    if not np.isfinite(mean).all():
        raise ValueError(f"non-finite latent for {sha256} (from features/{feat_model}/{sha256}.npz)")
    path = os.path.join(root, "latents", out_name, f"{sha256}.npz")
    save_npz(path, coords=idx.astype(np.uint8), feats=mean.astype(np.float32))
    return path


# ---------------------------------------------------------------------------------------------- stage
def add_encoder_args(p: argparse.ArgumentParser, default_pretrained: str) -> None:
    p.add_argument("--enc_pretrained", default=None,
                   help=f"release path <dir>/<name> (.json + .safetensors), e.g. <weights>/{default_pretrained}")
    p.add_argument("--model_root", default=None, help="directory of training runs")
    p.add_argument("--enc_model", default=None, help="run directory (under --model_root) of a trained VAE")
    p.add_argument("--ckpt", default="latest", help="step of the run's checkpoint, or latest")
    p.add_argument("--ema_rate", default=None, help="load the EMA weights of this rate (e.g. 0.9999)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def encoder_setup(enc_pretrained, model_root, enc_model, ckpt, ema_rate, device) -> tuple[torch.nn.Module, torch.device]:
    """``Stage.setup``: the encoder on its device (built once per worker)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_encoder(enc_pretrained, model_root, enc_model, ckpt, ema_rate, device=dev)
    return model, dev


def flag_select(flag: str, df: pd.DataFrame) -> pd.DataFrame:
    return df[df[flag].astype(bool)] if flag in df.columns else df.iloc[:0]


def npz_done(folder: str, column: str, root: str, row: dict) -> dict | None:
    return {column: True} if os.path.isfile(os.path.join(root, folder, f"{row['sha256']}.npz")) else None


def _process(feat_model: str, out_name: str, root: str, row: dict, ctx: tuple) -> dict:
    encoder, device = ctx
    encode_one(encoder, root, feat_model, out_name, row["sha256"], device)
    return {f"latent_{out_name}": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--feat_model", default="dinov2_vitl14_reg", help="feature folder under features/")
    add_encoder_args(p, DEFAULT_SLAT_ENC)
    args = p.parse_args(argv)
    out_name = f"{args.feat_model}_{encoder_name(args.enc_pretrained, args.model_root, args.enc_model, args.ckpt, args.ema_rate)}"
    column = f"latent_{out_name}"
    stage = Stage(
        name=column, columns=[column], process=partial(_process, args.feat_model, out_name),
        select=partial(flag_select, f"feature_{args.feat_model}"),
        check_done=partial(npz_done, os.path.join("latents", out_name), column),
        setup=partial(encoder_setup, args.enc_pretrained, args.model_root, args.enc_model, args.ckpt,
                      args.ema_rate, args.device),
    )
    return run_stage_from_args(stage, args)


if __name__ == "__main__":
    sys.exit(main())
