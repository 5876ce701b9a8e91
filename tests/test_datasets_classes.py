"""Dataset classes over a synthetic data root: shapes, dtypes, filters, funnels, errors, collate."""

import hashlib
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from trellis.datasets.base import DatasetError, FailedSample
from trellis.datasets.components import SampleKey, balanced_groups, crop_condition, read_npz
from trellis.datasets.sparse_feat2render import SparseFeat2Render, pool_features
from trellis.datasets.sparse_structure_latent import (
    ImageConditionedSparseStructureLatent,
    SparseStructureLatent,
    TextConditionedSparseStructureLatent,
)
from trellis.datasets.structured_latent import ImageConditionedSLat, SLat, TextConditionedSLat
from trellis.datasets.structured_latent2render import SLat2Render, Slat2RenderGeo
from trellis.modules.sparse import SparseTensor
from trellis.registry import DATASETS
from trellis.utils.ply import write_mesh_ply

SIZE = 32  # render side of the synthetic views


def sha(i):
    return hashlib.sha256(str(i).encode()).hexdigest()


def _write_views(directory, n, rng, size=SIZE):
    os.makedirs(directory, exist_ok=True)
    frames = []
    for i in range(n):
        img = np.zeros((size, size, 4), np.uint8)
        img[..., :3] = rng.integers(0, 256, (size, size, 3))
        img[8 + i:20 + i, 5:17, 3] = 255
        Image.fromarray(img, "RGBA").save(os.path.join(directory, f"{i:03d}.png"))
        c2w = np.eye(4)
        c2w[:3, 3] = [0, -2.0, 0.1 * i]
        frames.append({"file_path": f"{i:03d}.png", "camera_angle_x": 0.6981, "transform_matrix": c2w.tolist()})
    with open(os.path.join(directory, "transforms.json"), "w") as f:
        json.dump({"aabb": [[-0.5] * 3, [0.5] * 3], "scale": 1.0, "offset": [0, 0, 0], "frames": frames}, f)


def make_root(path, n=6, seed=0):
    """n assets; asset i has 10 + 5 i voxels, aesthetic 4 + i/2, captions for even i, cond views for i < 4."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sha_i = sha(i)
        nv = 10 + 5 * i
        idx = rng.choice(64 ** 3, nv, replace=False)
        coords = np.stack(np.unravel_index(idx, (64, 64, 64)), 1).astype(np.uint8)
        _write_views(os.path.join(path, "renders", sha_i), 3, rng)
        write_mesh_ply(os.path.join(path, "renders", sha_i, "mesh.ply"),
                       np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) * 0.4, np.array([[0, 1, 2]]))
        if i < 4:
            _write_views(os.path.join(path, "renders_cond", sha_i), 2, rng, size=48)
        for d in ("features/tiny", "latents/lat", "ss_latents/ss"):
            os.makedirs(os.path.join(path, d), exist_ok=True)
        np.savez_compressed(os.path.join(path, "features/tiny", f"{sha_i}.npz"), indices=coords,
                            patchtokens=rng.standard_normal((nv, 16)).astype(np.float16))
        np.savez_compressed(os.path.join(path, "latents/lat", f"{sha_i}.npz"), coords=coords,
                            feats=rng.standard_normal((nv, 8)).astype(np.float32))
        np.savez_compressed(os.path.join(path, "ss_latents/ss", f"{sha_i}.npz"),
                            mean=rng.standard_normal((8, 16, 16, 16)).astype(np.float32))
        rows.append({
            "sha256": sha_i, "aesthetic_score": 4.0 + i / 2,
            "captions": json.dumps([f"object {i}", f"thing {i}"]) if i % 2 == 0 else None,
            "rendered": True, "voxelized": True, "num_voxels": nv, "cond_rendered": i < 4,
            "feature_tiny": True, "latent_lat": True, "ss_latent_ss": True,
        })
    pd.DataFrame(rows).to_csv(os.path.join(path, "metadata.csv"), index=False)
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("root"))


def test_registry_resolves_every_dataset_class():
    for name in ("SparseFeat2Render", "SLat2Render", "Slat2RenderGeo", "SparseStructureLatent",
                 "TextConditionedSparseStructureLatent", "ImageConditionedSparseStructureLatent", "SLat",
                 "TextConditionedSLat", "ImageConditionedSLat"):
        assert DATASETS.get(name).__name__ == name


def test_sparse_feat2render_shapes_and_funnel(root):
    ds = SparseFeat2Render(root, image_size=SIZE, model="tiny", min_aesthetic_score=4.5, max_num_voxels=30)
    # aesthetic >= 4.5 keeps i >= 1; num_voxels <= 30 keeps i <= 4
    assert [n for _, _, n in ds.funnel] == [6, 6, 5, 4]
    assert len(ds) == 4
    s = ds[0]
    assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
    assert s["alpha"].shape == (SIZE, SIZE) and 0 <= s["alpha"].min() and s["alpha"].max() <= 1
    assert s["extrinsics"].shape == (4, 4) and s["intrinsics"].shape == (3, 3)
    assert s["coords"].dtype == torch.int32 and s["coords"].shape == (15, 3)
    assert s["feats"].dtype == torch.float32 and s["feats"].shape == (15, 16)
    torch.testing.assert_close(s["intrinsics"][0, 0], torch.tensor(0.5 / np.tan(0.6981 / 2), dtype=torch.float32))
    batch = SparseFeat2Render.collate_fn([ds[0], ds[1]])
    assert isinstance(batch["feats"], SparseTensor)
    assert batch["feats"].coords.shape == (15 + 20, 4) and batch["feats"].coords.dtype == torch.int32
    assert batch["feats"].coords[:15, 0].eq(0).all() and batch["feats"].coords[15:, 0].eq(1).all()
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["extrinsics"].shape == (2, 4, 4)
    assert batch["_index"].tolist() == [0, 1]
    resized = SparseFeat2Render(root, image_size=16, model="tiny", min_aesthetic_score=0)[0]
    assert resized["image"].shape == (3, 16, 16) and resized["alpha"].shape == (16, 16)


def test_render_view_is_straight_rgb_and_camera_is_opencv(root):
    ds = SparseFeat2Render(root, image_size=SIZE, model="tiny", min_aesthetic_score=0)
    s = ds[SampleKey(0, epoch=0, seed=0)]
    sha0 = ds.instances[0][1]
    frames = json.load(open(os.path.join(root, "renders", sha0, "transforms.json")))["frames"]
    matches = []
    for fr in frames:
        png = np.asarray(Image.open(os.path.join(root, "renders", sha0, fr["file_path"])).convert("RGBA"))
        if np.allclose(s["image"].permute(1, 2, 0).numpy(), png[..., :3] / 255.0):
            matches.append(fr)
    assert len(matches) == 1
    c2w = np.array(matches[0]["transform_matrix"])
    # the camera centre maps to the origin; a point in front of a Blender camera (-z) has z > 0 in OpenCV
    ext = s["extrinsics"].double().numpy()
    np.testing.assert_allclose(ext @ c2w[:, 3], [0, 0, 0, 1], atol=1e-6)
    ahead = c2w @ np.array([0, 0, -1.0, 1])
    assert (ext @ ahead)[2] > 0.99


def test_random_view_is_keyed_by_seed_epoch_index(root):
    ds = SparseFeat2Render(root, image_size=SIZE, model="tiny", min_aesthetic_score=0)
    a = [ds[SampleKey(2, epoch=e, seed=0)]["extrinsics"] for e in range(8)]
    b = [ds[SampleKey(2, epoch=e, seed=0)]["extrinsics"] for e in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x.flatten().tolist()) for x in a}) > 1  # views change across epochs
    key = pickle.loads(pickle.dumps(SampleKey(2, epoch=3, seed=7)))
    assert (int(key), key.epoch, key.seed) == (2, 3, 7)


def test_slat2render_and_geo(root):
    ds = Slat2RenderGeo(root, image_size=SIZE, latent_model="lat", min_aesthetic_score=0)
    assert len(ds) == 6
    s = ds[1]
    assert s["feats"].shape == (15, 8) and s["coords"].dtype == torch.int32
    assert s["mesh"]["vertices"].dtype == torch.float32 and s["mesh"]["faces"].dtype == torch.int64
    batch = Slat2RenderGeo.collate_fn([ds[0], ds[1], ds[2]])
    assert isinstance(batch["latents"], SparseTensor) and batch["latents"].feats.shape == (10 + 15 + 20, 8)
    assert [sl.stop - sl.start for sl in batch["latents"].layout] == [10, 15, 20]
    assert isinstance(batch["mesh"], list) and len(batch["mesh"]) == 3
    assert batch["alpha"].shape == (3, SIZE, SIZE)
    plain = SLat2Render(root, image_size=SIZE, latent_model="lat", min_aesthetic_score=0)[0]
    raw = np.load(os.path.join(root, "latents/lat", f"{sha(0)}.npz"))["feats"]
    np.testing.assert_array_equal(plain["feats"].numpy(), raw)  # not normalised


def test_sparse_structure_latent_variants(root):
    norm = {"mean": [0.5] * 8, "std": [2.0] * 8}
    ds = SparseStructureLatent(root, latent_model="ss", min_aesthetic_score=0, normalization=norm)
    raw = np.load(os.path.join(root, "ss_latents/ss", f"{sha(0)}.npz"))["mean"]
    x = ds[0]["x_0"]
    assert x.shape == (8, 16, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x, (torch.from_numpy(raw) - 0.5) / 2.0)
    torch.testing.assert_close(ds.denormalize(x[None])[0], torch.from_numpy(raw))
    txt = TextConditionedSparseStructureLatent(root, latent_model="ss", min_aesthetic_score=0)
    assert len(txt) == 3 and txt.funnel[-1][1] == "captions"
    s = txt[SampleKey(1, epoch=0)]
    assert s["cond"] in ("object 2", "thing 2")
    batch = txt.collate_fn([txt[0], txt[1]])
    assert batch["x_0"].shape == (2, 8, 16, 16, 16) and isinstance(batch["cond"], list)
    caps = {txt[SampleKey(0, epoch=e)]["cond"] for e in range(12)}
    assert caps == {"object 0", "thing 0"}
    img = ImageConditionedSparseStructureLatent(root, latent_model="ss", min_aesthetic_score=0, image_size=64)
    assert len(img) == 4
    c = img[0]["cond"]
    assert c.shape == (3, 64, 64) and c.dtype == torch.float32 and 0 <= c.min() and c.max() <= 1


def test_slat_normalisation_loads_and_split_collate(root):
    norm = {"mean": list(np.arange(8.0)), "std": [3.0] * 8}
    ds = SLat(root, latent_model="lat", min_aesthetic_score=0, normalization=norm)
    assert ds.loads == [10, 15, 20, 25, 30, 35]
    raw = np.load(os.path.join(root, "latents/lat", f"{sha(3)}.npz"))["feats"]
    torch.testing.assert_close(ds[3]["feats"], (torch.from_numpy(raw) - torch.arange(8.0)) / 3.0)
    torch.testing.assert_close(ds.denormalize(ds[3]["feats"]), torch.from_numpy(raw))
    batch = [ds[i] for i in range(6)]
    one = SLat.collate_fn(batch)
    assert isinstance(one["x_0"], SparseTensor) and one["x_0"].batch_size == 6
    packs = SLat.collate_fn(batch, split_size=2)
    assert len(packs) == 2
    # greedy by load: 35->g0, 30->g1, 25->g1, 20->g0, 15->g0, 10->g1: loads 70 and 65
    sizes = sorted(p["x_0"].feats.shape[0] for p in packs)
    assert sizes == [65, 70]
    for p in packs:
        assert p["x_0"].coords[:, 0].max().item() == p["x_0"].batch_size - 1
    assert packs[0]["_failed"] == [] and packs[1]["_failed"] == []
    assert sorted(packs[0]["_index"].tolist() + packs[1]["_index"].tolist()) == list(range(6))
    packed = pickle.loads(pickle.dumps(packs[0]))
    assert torch.equal(packed["x_0"].feats, packs[0]["x_0"].feats)
    txt = TextConditionedSLat(root, latent_model="lat", min_aesthetic_score=0)
    tp = TextConditionedSLat.collate_fn([txt[i] for i in range(3)], split_size=2)
    assert sum(len(p["cond"]) for p in tp) == 3
    img = ImageConditionedSLat(root, latent_model="lat", min_aesthetic_score=0, image_size=40)
    ip = ImageConditionedSLat.collate_fn([img[i] for i in range(4)], split_size=3)
    assert sum(p["cond"].shape[0] for p in ip) == 4 and ip[0]["cond"].shape[1:] == (3, 40, 40)


def test_balanced_groups_rule():
    # by load 5(0) 4(2) 3(3) 2(4) 1(1): 0->g0, 2->g1, 3->g1 (4<5), 4->g0 (5<7), 1->g0 (tie 7,7: first)
    assert balanced_groups([5, 1, 4, 3, 2], 2) == [[0, 4, 1], [2, 3]]
    g = balanced_groups([9, 1, 1, 1, 1, 1], 2, equal_size=True)
    assert sorted(len(x) for x in g) == [3, 3]
    assert balanced_groups([1, 1, 1], 2, equal_size=True) == [[0], [1]]


def test_condition_crop_rule():
    img = np.zeros((100, 100, 4), np.uint8)
    img[20:41, 30:61] = [255, 128, 0, 255]  # bbox x 30..60, y 20..40 -> centre (45, 30), half 18
    out = crop_condition(Image.fromarray(img, "RGBA"), 36)
    # crop box (27, 12, 63, 48) is 36 px: a 1:1 copy, the object at rows 8..28, cols 3..33
    assert out.shape == (3, 36, 36)
    expect = np.zeros((36, 36, 3), np.float32)
    expect[8:29, 3:34] = [1.0, 128 / 255, 0.0]
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expect, atol=1e-6)
    with pytest.raises(ValueError, match="transparent"):
        crop_condition(Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA"), 8, "x.png")


def test_pool_features_divides_by_count_plus_one():
    coords = torch.tensor([[0, 0, 0], [1, 1, 1], [2, 0, 0]], dtype=torch.int32)
    feats = torch.tensor([[3.0], [6.0], [4.0]])
    c, f = pool_features(coords, feats, 2)
    assert c.tolist() == [[0, 0, 0], [1, 0, 0]]
    torch.testing.assert_close(f, torch.tensor([[3.0], [2.0]]))


def test_bad_files_are_named(tmp_path):
    root = make_root(tmp_path / "r", n=3)
    sha0, sha1, sha2 = (sha(i) for i in range(3))
    with open(os.path.join(root, "latents/lat", f"{sha0}.npz"), "wb") as f:
        f.write(b"PK\x03\x04 this is not a zip")
    np.savez_compressed(os.path.join(root, "latents/lat", f"{sha1}.npz"),
                        coords=np.zeros((2, 3), np.uint8), feats=np.full((2, 8), np.nan, np.float32))
    np.savez_compressed(os.path.join(root, "latents/lat", f"{sha2}.npz"),
                        coords=np.zeros((0, 3), np.uint8), feats=np.zeros((0, 8), np.float32))
    ds = SLat(root, latent_model="lat", min_aesthetic_score=0)
    results = [ds[i] for i in range(3)]
    assert all(isinstance(r, FailedSample) for r in results)
    assert "corrupt npz" in results[0].reason and sha0 in results[0].reason
    assert "NaN" in results[1].reason and sha1 in results[1].reason
    assert "empty sparse sample" in results[2].reason
    packs = SLat.collate_fn(results, split_size=2)
    assert len(packs[0]["_failed"]) == 3 and "x_0" not in packs[0]
    with pytest.raises(ValueError, match="missing array"):
        read_npz(os.path.join(root, "ss_latents/ss", f"{sha0}.npz"), {"feats": (None,)})
    with pytest.raises(DatasetError, match="no usable sample"):
        SLat(root, latent_model="nope")
    with pytest.raises(ValueError, match="normalization"):
        SLat(root, latent_model="lat", normalization={"mean": [0.0]})


def test_original_config_dataset_args_validate():
    import glob

    from trellis.config import INJECTED_ARGS, ConfigError, check_spec

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(repo, "configs", "vae", "*.json"))
                   + glob.glob(os.path.join(repo, "configs", "generation", "*.json")))
    checked = 0
    for path in files:
        spec = json.load(open(path))["dataset"]
        if spec["name"] == "SparseStructure":
            continue  # the lead's class
        check_spec(DATASETS, spec, "dataset", INJECTED_ARGS["dataset"])
        checked += 1
    assert checked == 11
    with pytest.raises(ConfigError, match="did you mean 'image_size'"):
        check_spec(DATASETS, {"name": "ImageConditionedSLat", "args": {"latent_model": "x", "image_sise": 5}},
                   "dataset", INJECTED_ARGS["dataset"])
