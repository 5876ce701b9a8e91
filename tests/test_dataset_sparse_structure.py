"""``SparseStructure`` and the dataset base: filters, funnel, and every kind of bad input."""

from __future__ import annotations

import os
import shutil

import pandas as pd
import pytest
import torch

from trellis.datasets.base import DatasetError, FailedSample
from trellis.datasets.sparse_structure import SparseStructure
from trellis.utils.ply import read_voxel_ply


@pytest.fixture
def root(tmp_path, voxel_root):
    dst = str(tmp_path / "data")
    shutil.copytree(voxel_root, dst)
    return dst


def test_occupancy_matches_voxel_file(root):
    ds = SparseStructure(root, resolution=64, min_aesthetic_score=None)
    sample = ds[0]
    pts = read_voxel_ply(os.path.join(root, "voxels", f"{ds.instances[0][1]}.ply"))
    assert sample["ss"].shape == (1, 64, 64, 64) and sample["ss"].dtype == torch.float32
    assert int(sample["ss"].sum()) == len(pts)
    idx = ((torch.from_numpy(pts) + 0.5) * 64).floor().long()
    assert bool(sample["ss"][0, idx[:, 0], idx[:, 1], idx[:, 2]].all())


def test_filters_and_funnel(root):
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    meta.loc[0, "voxelized"] = False
    meta.loc[1, "aesthetic_score"] = 1.0
    meta.to_csv(os.path.join(root, "metadata.csv"), index=False)
    ds = SparseStructure(root, min_aesthetic_score=4.5)
    assert len(ds) == len(meta) - 2
    assert [n for _, _, n in ds.funnel] == [len(meta), len(meta) - 1, len(meta) - 2]
    assert "aesthetic_score >= 4.5" in ds.describe_funnel()


def test_several_roots(root, tmp_path, voxel_root):
    ds = SparseStructure(f"{root},{voxel_root}", min_aesthetic_score=None)
    assert len(ds) == 2 * len(pd.read_csv(os.path.join(voxel_root, "metadata.csv")))


def test_missing_dir_and_bad_metadata(tmp_path):
    with pytest.raises(DatasetError, match="data dir not found"):
        SparseStructure(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="metadata.csv not found"):
        SparseStructure(str(tmp_path / "empty"))
    (tmp_path / "empty" / "metadata.csv").write_text("")
    with pytest.raises(DatasetError, match="metadata.csv is empty"):
        SparseStructure(str(tmp_path / "empty"))
    (tmp_path / "empty" / "metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="no 'sha256' column"):
        SparseStructure(str(tmp_path / "empty"))
    (tmp_path / "empty" / "metadata.csv").write_text("sha256,voxelized\nabc,False\n")
    with pytest.raises(DatasetError, match="no usable sample after filtering"):
        SparseStructure(str(tmp_path / "empty"))


def test_corrupt_voxel_file_is_named_not_substituted(root):
    ds = SparseStructure(root, min_aesthetic_score=None)
    sha = ds.instances[3][1]
    with open(os.path.join(root, "voxels", f"{sha}.ply"), "wb") as f:
        f.write(b"ply\nformat binary_little_endian 1.0\nelement vertex 100\nproperty float x\n")
    bad = ds[3]
    assert isinstance(bad, FailedSample) and bad.sha256 == sha
    batch = ds.collate_fn([ds[2], bad, ds[4]])
    assert batch["ss"].shape[0] == 2
    assert [f.sha256 for f in batch["_failed"]] == [sha]
    os.remove(os.path.join(root, "voxels", f"{sha}.ply"))
    assert "No such file" in ds[3].reason or "not found" in ds[3].reason.lower()


def test_training_stops_when_too_many_assets_are_broken(tmp_path, root, tiny_config):
    from test_engine import train

    path, cfg, write = tiny_config
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    for sha in meta["sha256"][:4]:
        with open(os.path.join(root, "voxels", f"{sha}.ply"), "wb") as f:
            f.write(b"garbage")
    r = train("--config", path, "--output_dir", str(tmp_path / "run"), "--data_dir", root,
              "--set", "trainer.args.max_steps=8")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "broken asset" in r.stderr and "max_bad_fraction" in r.stderr
    # With a tolerant threshold the same data trains, and each broken asset is named in the log.
    r = train("--config", path, "--output_dir", str(tmp_path / "run2"), "--data_dir", root,
              "--set", "trainer.args.max_steps=3", "--set", "dataset.args.max_bad_fraction=0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped broken asset" in r.stdout + r.stderr
