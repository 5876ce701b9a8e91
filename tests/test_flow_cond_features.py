"""Precomputed condition tokens (``dataset_toolkits.encode_cond``, ``cond_features``): the stage
writes the conditioner's tokens of every condition view (or caption), the dataset reads one view's
(caption's) tokens, and a trainer on them trains as it does when it encodes the images (captions)
itself, without loading the encoder."""

import copy
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_flow_demo_data import SS_MODEL, train_losses_of, write_flow_root
from test_flow_trainers import config

from trellis.config import build_dataset, build_models, validate_config
from trellis.datasets.base import DatasetError
from trellis.datasets.components import crop_condition, load_transforms, open_rgba
from trellis.datasets.sparse_structure_latent import ImageConditionedSparseStructureLatent
from trellis.encoders.conditioners import ImageConditioner
from trellis.registry import TRAINERS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from dataset_toolkits import encode_cond

    root = write_flow_root(str(tmp_path_factory.mktemp("cond_root")), num=4)
    assert encode_cond.main(["--output_dir", root, "--model", "tiny", "--fp32", "--no_progress"]) == 0
    assert encode_cond.main(["--output_dir", root, "--kind", "text", "--model", "tiny", "--fp32", "--no_progress"]) == 0
    return root


def test_stage_writes_the_conditioners_tokens_of_every_view(root):
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    assert meta["cond_feature_tiny"].astype(bool).all()
    conditioner = ImageConditioner("tiny", image_size=518)
    for sha in meta["sha256"]:
        directory = os.path.join(root, "renders_cond", sha)
        paths = [os.path.join(directory, fr["file_path"]) for fr in load_transforms(directory)]
        images = torch.stack([crop_condition(open_rgba(p), 518, p) for p in paths])
        tokens = np.load(os.path.join(root, "cond_features", "tiny", f"{sha}.npy"))
        assert tokens.shape == (len(paths), conditioner.num_tokens, conditioner.channels)
        torch.testing.assert_close(torch.from_numpy(tokens), conditioner.encode(images), rtol=1e-5, atol=1e-5)
    from dataset_toolkits import encode_cond

    assert encode_cond.main(["--output_dir", root, "--model", "tiny", "--no_progress"]) == 0  # all done: no-op


def test_dataset_reads_one_views_tokens(root):
    ds = ImageConditionedSparseStructureLatent(root, latent_model=SS_MODEL, min_aesthetic_score=4.5,
                                               cond_features="tiny")
    assert ds.cond_feature_info["num_tokens"] == 1374 and len(ds) == 4
    item = ds[0]
    assert item["cond"].dtype == torch.float32 and item["cond"].shape == (1374, 64)
    with pytest.raises(DatasetError, match="cond_feature_dinov2_vitl14_reg .* 0 rows"):  # not precomputed
        ImageConditionedSparseStructureLatent(root, latent_model=SS_MODEL, min_aesthetic_score=4.5,
                                              cond_features="dinov2_vitl14_reg")


def _losses(root, out, cond_features, steps=2, text=False):
    if text:
        cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                     {"text_cond_model": "tiny"}, p_uncond=0.5, max_steps=steps)
    else:
        cfg = config("ImageConditionedFlowMatchingCFGTrainer", False, "ImageConditionedSparseStructureLatent",
                     {"image_cond_model": "tiny"}, p_uncond=0.5, max_steps=steps)
        cfg["dataset"]["args"]["image_size"] = 518
    if cond_features:
        cfg["dataset"]["args"]["cond_features"] = cond_features
    return train_losses_of(cfg, root, out, steps)


def test_trainer_on_precomputed_tokens_matches_online_encoding(root, tmp_path):
    online, _ = _losses(root, tmp_path / "online", None)
    pre, tr = _losses(root, tmp_path / "pre", "tiny")
    assert not hasattr(tr.condition, "conditioner")  # no encoder loaded
    torch.testing.assert_close(torch.tensor(pre), torch.tensor(online), rtol=1e-4, atol=1e-6)


def test_text_tokens_per_caption_with_the_empty_captions_encoding_as_null(root, tmp_path):
    from trellis.datasets.sparse_structure_latent import TextConditionedSparseStructureLatent
    from trellis.encoders.conditioners import TextConditioner

    conditioner = TextConditioner("tiny")
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    assert meta["cond_feature_text_tiny"].astype(bool).all()
    row = meta.iloc[0]
    tokens = np.load(os.path.join(root, "cond_features", "text_tiny", f"{row['sha256']}.npy"))
    torch.testing.assert_close(torch.from_numpy(tokens), conditioner.encode(json.loads(row["captions"])))
    ds = TextConditionedSparseStructureLatent(root, latent_model=SS_MODEL, min_aesthetic_score=4.5,
                                              cond_features="text_tiny")
    torch.testing.assert_close(ds.cond_feature_null, conditioner.null_condition(1)[0])
    assert ds[1]["cond"].shape == (77, conditioner.channels)
    online, _ = _losses(root, tmp_path / "online", None, text=True)
    pre, tr = _losses(root, tmp_path / "pre", "text_tiny", text=True)  # p_uncond 0.5: the null is used too
    assert not hasattr(tr.condition, "conditioner")
    torch.testing.assert_close(torch.tensor(pre), torch.tensor(online), rtol=1e-4, atol=1e-6)


def test_trainer_rejects_tokens_of_another_encoder(root, tmp_path):
    cfg = config("ImageConditionedFlowMatchingCFGTrainer", False, "ImageConditionedSparseStructureLatent",
                 {"image_cond_model": "dinov2_vitl14_reg"})
    cfg["dataset"]["args"]["cond_features"] = "tiny"
    validate_config(cfg)
    models, dataset = build_models(copy.deepcopy(cfg)), build_dataset(cfg, root)
    with pytest.raises(ValueError, match="holds image tokens of 'tiny' but trainer.args.image_cond_model"):
        TRAINERS.get(cfg["trainer"]["name"])(models, dataset, output_dir=str(tmp_path), **cfg["trainer"]["args"])


def test_ledger_finds_the_tokens_on_disk_and_a_missing_model_info_is_named(root, tmp_path):
    import shutil

    from dataset_toolkits import ledger

    copy_root = str(tmp_path / "copy")
    shutil.copytree(root, copy_root)
    columns = ["cond_feature_tiny", "cond_feature_text_tiny"]
    meta = pd.read_csv(os.path.join(copy_root, "metadata.csv")).drop(columns=columns)
    found = ledger.scan_from_file(copy_root, meta)  # the columns come back from cond_features/
    assert all(found[c].astype(bool).all() for c in columns)
    os.remove(os.path.join(copy_root, "cond_features", "tiny", "model.json"))
    with pytest.raises(FileNotFoundError, match="model.json: not found; precompute"):
        ImageConditionedSparseStructureLatent(copy_root, latent_model=SS_MODEL, min_aesthetic_score=4.5,
                                              cond_features="tiny")


def test_sparse_dataset_collates_the_tokens_into_its_micro_batches(root):
    from test_flow_demo_data import SLAT_MODEL

    from trellis.datasets.structured_latent import ImageConditionedSLat

    ds = ImageConditionedSLat(root, latent_model=SLAT_MODEL, min_aesthetic_score=4.5, cond_features="tiny",
                              normalization={"mean": [0.5] * 8, "std": [2.0] * 8})
    packs = ds.collate_fn([ds[i] for i in range(4)], split_size=2)
    assert [tuple(p["cond"].shape) for p in packs] == [(2, 1374, 64), (2, 1374, 64)]
    assert all(p["cond"].shape[0] == p["x_0"].batch_size for p in packs)


def test_views_option_keeps_evenly_spaced_views(root, tmp_path):
    import shutil

    from dataset_toolkits import encode_cond

    copy_root = str(tmp_path / "views")
    shutil.copytree(root, copy_root)
    sha = pd.read_csv(os.path.join(copy_root, "metadata.csv"))["sha256"][0]
    directory = os.path.join(copy_root, "renders_cond", sha)
    with open(os.path.join(directory, "transforms.json")) as f:
        frames = json.load(f)["frames"]
    for i in range(1, 5):  # five views: 000.png and four shifted copies
        img = np.roll(np.asarray(open_rgba(os.path.join(directory, "000.png"))), 3 * i, axis=1)
        Image.fromarray(img, "RGBA").save(os.path.join(directory, f"{i:03d}.png"))
        frames.append(dict(frames[0], file_path=f"{i:03d}.png"))
    with open(os.path.join(directory, "transforms.json"), "w") as f:
        json.dump({"frames": frames}, f)
    conditioner = ImageConditioner("tiny", image_size=518)
    every = np.load(encode_cond.encode_cond_one(conditioner, copy_root, "tiny", {"sha256": sha}, fp32=True))
    three = np.load(encode_cond.encode_cond_one(conditioner, copy_root, "tiny", {"sha256": sha}, fp32=True, views=3))
    assert every.shape[0] == 5 and three.shape[0] == 3
    np.testing.assert_allclose(three, every[[0, 2, 4]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--views"):
        encode_cond.make_stage("text", "tiny", views=2)
