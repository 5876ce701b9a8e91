"""encode_ss_latent, encode_latent and stat_latent over a tiny dataset root with tiny random encoders."""

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from dataset_toolkits import encode_latent, encode_ss_latent, stat_latent
from dataset_toolkits.encode_latent import encode_sparse_batch, load_encoder
from trellis.models import save_pretrained
from trellis.models.sparse_structure_vae import SparseStructureEncoder
from trellis.models.structured_latent_vae.encoder import SLatEncoder
from trellis.utils.ply import read_voxel_ply, write_voxel_ply

SS_ARGS = dict(in_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[4, 8, 8],
               use_fp16=False)
SLAT_ARGS = dict(resolution=64, in_channels=16, model_channels=32, latent_channels=8, num_blocks=2, num_heads=2,
                 window_size=8)


def sha(i):
    return hashlib.sha256(f"obj{i}".encode()).hexdigest()


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "voxels")
    os.makedirs(tmp_path / "features" / "tiny")
    rows = []
    for i in range(3):
        nv = 20 + 10 * i
        idx = np.stack(np.unravel_index(rng.choice(64 ** 3, nv, replace=False), (64,) * 3), 1)
        write_voxel_ply(str(tmp_path / "voxels" / f"{sha(i)}.ply"), ((idx + 0.5) / 64 - 0.5).astype(np.float32))
        np.savez_compressed(tmp_path / "features" / "tiny" / f"{sha(i)}.npz", indices=idx.astype(np.uint8),
                            patchtokens=rng.standard_normal((nv, 16)).astype(np.float16))
        rows.append({"sha256": sha(i), "rendered": True, "voxelized": True, "num_voxels": nv,
                     "feature_tiny": True, "aesthetic_score": 5.0})
    pd.DataFrame(rows).to_csv(tmp_path / "metadata.csv", index=False)
    return str(tmp_path)


def test_encode_ss_latent_release_weights(root, tmp_path):
    torch.manual_seed(0)
    enc = SparseStructureEncoder(**SS_ARGS).eval()
    rel = str(tmp_path / "weights" / "ss_enc_tiny")
    os.makedirs(os.path.dirname(rel))
    save_pretrained(enc, "SparseStructureEncoder", SS_ARGS, rel)
    assert encode_ss_latent.main(["--output_dir", root, "--enc_pretrained", rel, "--device", "cpu",
                                  "--no_progress"]) == 0
    out = np.load(os.path.join(root, "ss_latents", "ss_enc_tiny", f"{sha(1)}.npz"))["mean"]
    assert out.shape == (8, 16, 16, 16) and out.dtype == np.float32
    idx = np.floor((read_voxel_ply(os.path.join(root, "voxels", f"{sha(1)}.ply")) + 0.5) * 64).astype(int)
    x = torch.zeros(1, 1, 64, 64, 64)
    x[0, 0, idx[:, 0], idx[:, 1], idx[:, 2]] = 1
    with torch.no_grad():
        ref = enc(x, sample_posterior=False)[0].numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    assert meta["ss_latent_ss_enc_tiny"].all()


def _make_run(tmp_path, model, name, args, step=20, ema=None):
    run = tmp_path / "runs" / "slat_run"
    os.makedirs(run / "ckpts", exist_ok=True)
    with open(run / "config.json", "w") as f:
        json.dump({"models": {"encoder": {"name": name, "args": args}}}, f)
    torch.save(model.state_dict(), run / "ckpts" / f"encoder_step{step:07d}.pt")
    if ema is not None:
        torch.save(ema.state_dict(), run / "ckpts" / f"encoder_ema0.9999_step{step:07d}.pt")
    torch.save({}, run / "ckpts" / f"misc_step{step:07d}.pt")
    return str(run)


def test_encode_latent_from_run_dir_and_stats(root, tmp_path):
    torch.manual_seed(0)
    enc = SLatEncoder(**SLAT_ARGS).eval()
    ema = SLatEncoder(**SLAT_ARGS).eval()
    _make_run(tmp_path, enc, "SLatEncoder", SLAT_ARGS, ema=ema)
    argv = ["--output_dir", root, "--feat_model", "tiny", "--model_root", str(tmp_path / "runs"),
            "--enc_model", "slat_run", "--ckpt", "latest", "--device", "cpu", "--no_progress"]
    assert encode_latent.main(argv) == 0
    name = "tiny_slat_run_step0000020"
    feats = np.load(os.path.join(root, "features", "tiny", f"{sha(2)}.npz"))
    out = np.load(os.path.join(root, "latents", name, f"{sha(2)}.npz"))
    assert out["coords"].dtype == np.uint8 and np.array_equal(out["coords"], feats["indices"])
    assert out["feats"].shape == (40, 8) and out["feats"].dtype == np.float32
    (ref,) = encode_sparse_batch(enc, [(feats["indices"], feats["patchtokens"].astype(np.float32))])
    np.testing.assert_allclose(out["feats"], ref, rtol=1e-5, atol=1e-5)
    # several objects in one batch give the same latents as one at a time
    items = [(np.load(os.path.join(root, "features/tiny", f"{sha(i)}.npz"))["indices"],
              np.load(os.path.join(root, "features/tiny", f"{sha(i)}.npz"))["patchtokens"].astype(np.float32))
             for i in range(3)]
    batched = encode_sparse_batch(enc, items)
    np.testing.assert_allclose(batched[2], ref, rtol=1e-4, atol=1e-4)
    ema_model, ema_name = load_encoder(model_root=str(tmp_path / "runs"), enc_model="slat_run", ema_rate="0.9999")
    assert ema_name == "slat_run_step0000020_ema0.9999"
    assert torch.equal(ema_model.out_layer.weight, ema.out_layer.weight)
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    assert meta[f"latent_{name}"].all()
    # stats: each object weighs equally
    assert stat_latent.main(["--output_dir", root, "--model", name]) == 0
    stats = json.load(open(os.path.join(root, "latents", name, "stats.json")))
    per = [np.load(os.path.join(root, "latents", name, f"{sha(i)}.npz"))["feats"].astype(np.float64) for i in range(3)]
    mean = np.mean([p.mean(0) for p in per], 0)
    std = np.sqrt(np.mean([(p ** 2).mean(0) for p in per], 0) - mean ** 2)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(stats["std"], std, rtol=1e-9)


def test_strict_loading_and_bad_latents(root, tmp_path):
    enc = SLatEncoder(**SLAT_ARGS)
    other = dict(SLAT_ARGS, model_channels=64, num_heads=4)
    _make_run(tmp_path, enc, "SLatEncoder", other)
    with pytest.raises(Exception, match="does not fit the model"):
        load_encoder(model_root=str(tmp_path / "runs"), enc_model="slat_run")
    with pytest.raises(FileNotFoundError, match="missing_enc"):
        load_encoder(enc_pretrained=str(tmp_path / "missing_enc"))
    folder = os.path.join(root, "latents", "lat")
    os.makedirs(folder)
    np.savez_compressed(os.path.join(folder, f"{sha(0)}.npz"), coords=np.zeros((2, 3), np.uint8),
                        feats=np.array([[np.nan] * 8, [0.0] * 8], np.float32))
    with pytest.raises(ValueError, match=sha(0)):
        stat_latent.latent_stats(root, "lat")
