"""Shared fixtures: tiny voxel datasets and tiny configs, all made on the fly (no downloads)."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_SS_VAE = {
    "models": {
        "encoder": {"name": "SparseStructureEncoder", "args": {
            "in_channels": 1, "latent_channels": 4, "num_res_blocks": 1, "num_res_blocks_middle": 1,
            "channels": [4, 8], "use_fp16": False}},
        "decoder": {"name": "SparseStructureDecoder", "args": {
            "out_channels": 1, "latent_channels": 4, "num_res_blocks": 1, "num_res_blocks_middle": 1,
            "channels": [8, 4], "use_fp16": False}},
    },
    "dataset": {"name": "SparseStructure", "args": {"resolution": 16, "min_aesthetic_score": 4.5}},
    "trainer": {"name": "SparseStructureVaeTrainer", "args": {
        "max_steps": 4, "batch_size_per_gpu": 4, "batch_split": 2,
        "optimizer": {"name": "AdamW", "args": {"lr": 1e-3, "weight_decay": 0.0}},
        "ema_rate": [0.9], "fp16_mode": None,
        "grad_clip": {"name": "AdaptiveGradClipper", "args": {"max_norm": 1.0, "clip_percentile": 95, "buffer_size": 3}},
        "i_print": 1, "i_log": 1, "i_sample": 0, "i_save": 2, "num_workers": 0,
        "loss_type": "bce", "lambda_kl": 1e-3}},
}


@pytest.fixture(scope="session")
def voxel_root(tmp_path_factory):
    """A 12-asset voxel dataset in the TRELLIS layout."""
    from make_demo_voxels import write_dataset

    root = str(tmp_path_factory.mktemp("voxels"))
    write_dataset(root, 12, seed=1)
    return root


@pytest.fixture
def tiny_config(tmp_path):
    """Returns (path of a written tiny SS-VAE config, the dict); edit the dict then call write()."""
    cfg = copy.deepcopy(TINY_SS_VAE)
    path = str(tmp_path / "config.json")

    def write(c=None):
        with open(path, "w") as f:
            json.dump(c or cfg, f)
        return path

    write()
    return path, cfg, write
