"""extract_feature on a synthetic rendered object, checked against a direct per-voxel computation."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_toolkits.extract_feature import extract_one, load_view, project, voxel_indices
from trellis.encoders.dinov2 import load_dinov2, normalize_images
from trellis.utils.geometry import training_views
from trellis.utils.ply import write_voxel_ply

SHA = "ab" * 32


def make_object(root, num_views=3, seed=0):
    rng = np.random.default_rng(seed)
    rdir = os.path.join(root, "renders", SHA)
    os.makedirs(rdir)
    c2w, fov = training_views(SHA, num_views=num_views)
    frames = []
    for i in range(num_views):
        img = rng.integers(0, 256, (64, 64, 4)).astype(np.uint8)
        img[..., 3] = np.where(rng.random((64, 64)) < 0.7, 255, 0)
        Image.fromarray(img, "RGBA").save(os.path.join(rdir, f"{i:03d}.png"))
        frames.append({"file_path": f"{i:03d}.png", "camera_angle_x": float(fov[i]),
                       "transform_matrix": c2w[i].tolist()})
    with open(os.path.join(rdir, "transforms.json"), "w") as f:
        json.dump({"frames": frames}, f)
    idx = np.stack(np.unravel_index(rng.choice(64 ** 3, 40, replace=False), (64,) * 3), 1)
    idx[0] = [0, 0, 0]
    idx[1] = [63, 63, 63]
    points = ((idx + 0.5) / 64 - 0.5).astype(np.float32)
    os.makedirs(os.path.join(root, "voxels"))
    write_voxel_ply(os.path.join(root, "voxels", f"{SHA}.ply"), points)
    return frames, points


def _bilinear_zero_pad(fmap, x, y):
    """fmap [C,h,w]; continuous pixel coords (x, y) with pixel centres at integers; zero outside."""
    c, h, w = fmap.shape
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(c)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                out += wgt * fmap[:, yi, xi]
    return out


def test_features_match_direct_computation(tmp_path):
    root = str(tmp_path)
    frames, points = make_object(root)
    vit = load_dinov2("tiny")
    path = extract_one(vit, root, SHA, "tiny", batch_size=2)
    data = np.load(path)
    assert data["indices"].dtype == np.uint8 and data["indices"].shape == (40, 3)
    assert data["patchtokens"].dtype == np.float16 and data["patchtokens"].shape == (40, 64)
    assert data["indices"][0].tolist() == [0, 0, 0] and data["indices"][1].tolist() == [63, 63, 63]
    # direct computation for a few voxels: Blender camera -> OpenCV by flipping y and z, pinhole projection,
    # bilinear lookup in the 37x37 patch map (align_corners=False => pixel centres at (i + 0.5) / 37)
    maps = []
    for fr in frames:
        img = normalize_images(load_view(os.path.join(root, "renders", SHA, fr["file_path"]))[None])
        with torch.no_grad():
            toks = vit(img)["x_prenorm"][0, 5:].numpy()  # [1369, C]
        maps.append(toks.T.reshape(64, 37, 37))
    for v in (0, 1, 7, 23):
        acc = np.zeros(64)
        for fr, fmap in zip(frames, maps):
            c2w = np.array(fr["transform_matrix"])
            cam = np.linalg.inv(c2w) @ np.append(points[v].astype(np.float64), 1.0)  # Blender camera coords
            x, y, z = cam[0], -cam[1], -cam[2]  # OpenCV: y down, z forward
            f = 0.5 / np.tan(fr["camera_angle_x"] / 2)
            u, w = f * x / z + 0.5, f * y / z + 0.5
            acc += _bilinear_zero_pad(fmap, u * 37 - 0.5, w * 37 - 0.5)
        np.testing.assert_allclose(data["patchtokens"][v].astype(np.float64), acc / len(frames),
                                   rtol=2e-3, atol=2e-3)


def test_projection_convention():
    # camera at (0, -2, 0) looking at the origin along +y, up +z (Blender c2w columns: x, y=up, z=back)
    c2w = np.array([[1, 0, 0, 0], [0, 0, -1, -2], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    from trellis.utils.geometry import c2w_blender_to_extrinsics, fov_to_intrinsics

    ext = torch.from_numpy(c2w_blender_to_extrinsics(c2w)).float()[None]
    intr = torch.from_numpy(fov_to_intrinsics(np.deg2rad(40.0))).float()[None]
    uv = project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.3, 0.0, 0.0]]), ext, intr)[0]
    torch.testing.assert_close(uv[0], torch.tensor([0.5, 0.5]))
    assert uv[1, 1] < 0.5 and abs(uv[1, 0] - 0.5) < 1e-6  # world up is image up (row 0 at the top)
    assert uv[2, 0] > 0.5  # world +x is to the right when looking along +y


def test_bad_voxels_named(tmp_path):
    with pytest.raises(ValueError, match="bad.ply"):
        voxel_indices(np.array([[0.6, 0.0, 0.0]]), "bad.ply")


def test_cli_writes_records_and_model_info(tmp_path):
    import pandas as pd

    from dataset_toolkits import extract_feature

    root = str(tmp_path)
    make_object(root, num_views=2)
    pd.DataFrame([{"sha256": SHA, "rendered": True, "voxelized": True, "num_voxels": 40},
                  {"sha256": "cd" * 32, "rendered": True, "voxelized": True, "num_voxels": 5}]).to_csv(
        os.path.join(root, "metadata.csv"), index=False)
    rc = extract_feature.main(["--output_dir", root, "--model", "tiny", "--device", "cpu", "--no_progress"])
    assert rc == 0
    meta = pd.read_csv(os.path.join(root, "metadata.csv"), dtype={"sha256": str}).set_index("sha256")
    assert bool(meta.loc[SHA, "feature_tiny"]) and not bool(meta.loc["cd" * 32, "feature_tiny"])
    info = json.load(open(os.path.join(root, "features", "tiny", "model.json")))
    assert info["channels"] == 64
    failures = open(os.path.join(root, "failed_feature_tiny_0.csv")).read()
    assert f"voxels/{'cd' * 32}.ply" in failures
