"""Stage ``stat_latent``: per-channel mean and std of structured latents (reference DATA.md section 6).

Up to ``--num_samples`` objects of ``latents/<model>/`` are drawn without replacement (seeded, unlike the
original). Per object the channel mean and the channel mean of squares over its voxels are taken; both
are averaged over objects (each object weighs equally); ``std = sqrt(E[x^2] - mean^2)``.

Output ``latents/<model>/stats.json``: ``{"mean": [C floats], "std": [C floats]}`` (JSON, indent 4). Copy
it into the SLat flow config's ``dataset.args.normalization``.

    python -m dataset_toolkits.stat_latent --output_dir D --model dinov2_vitl14_reg_slat_enc_swin8_B_64l8_fp16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dataset_toolkits import ledger
from trellis.datasets.components import read_npz


def latent_shas(root: str, model: str) -> list[str]:
    """Objects with a latent: the rows flagged ``latent_<model>`` in metadata.csv when that column exists,
    else every ``<sha>.npz`` file of the folder; sorted."""
    folder = os.path.join(root, "latents", model)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such latent folder (run encode_latent first)")
    df = ledger.read_metadata(root, required=False)
    col = f"latent_{model}"
    if df is not None and col in df.columns:
        return sorted(df.loc[df[col].to_numpy(dtype=bool), "sha256"].tolist())
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npz") and not f.startswith("."))


def latent_stats(root: str, model: str, num_samples: int = 50000, seed: int = 0) -> dict[str, list[float]]:
    """Returns {"mean": [C], "std": [C]} over a seeded sample of objects; errors name the bad file."""
    shas = latent_shas(root, model)
    if not shas:
        raise ValueError(f"{os.path.join(root, 'latents', model)}: no latents to measure")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(shas), size=min(num_samples, len(shas)), replace=False)
    sums = sq_sums = None
    for i in sorted(chosen.tolist()):
        path = os.path.join(root, "latents", model, f"{shas[i]}.npz")
        feats = read_npz(path, {"feats": (None, None)})["feats"].astype(np.float64)  # [N,C]; NaN is an error
        if feats.shape[0] == 0:
            raise ValueError(f"{path}: empty sparse sample (no voxels)")
        m, m2 = feats.mean(axis=0), (feats ** 2).mean(axis=0)
        if sums is not None and m.shape != sums.shape:
            raise ValueError(f"{path}: {m.shape[0]} channels, other latents have {sums.shape[0]}")
        sums = m if sums is None else sums + m
        sq_sums = m2 if sq_sums is None else sq_sums + m2
    mean = sums / len(chosen)
    var = np.maximum(sq_sums / len(chosen) - mean ** 2, 0.0)
    return {"mean": mean.tolist(), "std": np.sqrt(var).tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="dataset root")
    p.add_argument("--model", required=True, help="latent folder under latents/")
    p.add_argument("--num_samples", type=int, default=50000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stats = latent_stats(args.output_dir, args.model, args.num_samples, args.seed)
    path = os.path.join(args.output_dir, "latents", args.model, "stats.json")
    with open(path + ".tmp", "w") as f:
        json.dump(stats, f, indent=4)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}\n  mean: {np.round(stats['mean'], 6).tolist()}\n  std:  {np.round(stats['std'], 6).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
