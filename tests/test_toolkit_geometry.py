"""Cameras, PLY I/O and the pure-PyTorch rasteriser of the dataset toolkit."""

import numpy as np
import pytest
import torch

from trellis.renderers.rasterize import RasterMesh, rasterize, render_mesh
from trellis.utils.geometry import (
    c2w_blender_to_extrinsics,
    conditioning_views,
    extrinsics_to_c2w_blender,
    fov_to_intrinsics,
    hammersley_yaw_pitch,
    look_at_c2w_blender,
    look_at_extrinsics,
    radical_inverse_base2,
    training_views,
)
from trellis.utils.ply import PlyError, read_mesh_ply, read_voxel_ply, write_mesh_ply, write_voxel_ply

SHA = "0123456789abcdef" * 4


def _project(points, ext, intr):
    """Normalised image coordinates [N, 2] and camera z [N] of world points."""
    cam = points @ ext[:3, :3].T + ext[:3, 3]
    uv = cam[:, :2] / cam[:, 2:3] * np.diag(intr)[:2] + intr[:2, 2]
    return uv, cam[:, 2]


def test_radical_inverse_and_hammersley_hemispheres():
    assert np.allclose(radical_inverse_base2(np.arange(5)), [0, 0.5, 0.25, 0.75, 0.125])
    yaw, pitch = hammersley_yaw_pitch(200, (0.3, 0.7))
    assert np.all(pitch[:50] < 0) and np.all(pitch[50:] >= 0)  # first quarter: lower hemisphere
    assert np.all(np.abs(pitch) <= np.pi / 2)


def test_training_views_look_at_origin_and_are_seeded():
    c2w, fov = training_views(SHA, 150)
    assert c2w.shape == (150, 4, 4) and np.allclose(fov, np.deg2rad(40))
    assert np.allclose(np.linalg.norm(c2w[:, :3, 3], axis=1), 2.0)
    assert np.allclose(c2w, training_views(SHA, 150)[0])
    assert not np.allclose(c2w, training_views("f" * 64, 150)[0])
    ext = c2w_blender_to_extrinsics(c2w)
    intr = fov_to_intrinsics(fov)
    for e, k, m in zip(ext, intr, c2w):
        uv, z = _project(np.zeros((1, 3)), e, k)
        assert np.allclose(uv, 0.5) and np.isclose(z[0], 2.0)
        # Image "up" (-y in OpenCV) leans to world +Z; camera y (Blender) is orthonormal.
        up = _project(np.array([[0, 0, 0.1]]), e, k)[0]
        assert up[0, 1] < 0.5 or np.isclose(abs(m[2, 2]), 1.0, atol=1e-3)
    assert np.allclose(extrinsics_to_c2w_blender(ext), c2w)


def test_look_at_extrinsics_matches_blender_convention():
    eye = np.array([1.0, -1.5, 0.7])
    e1 = look_at_extrinsics(eye)
    e2 = c2w_blender_to_extrinsics(look_at_c2w_blender(eye))
    assert np.allclose(e1, e2, atol=1e-9)


def test_conditioning_views_fit_bounding_sphere():
    c2w, fov = conditioning_views(SHA, 24)
    assert np.all(fov >= np.deg2rad(10) - 1e-9) and np.all(fov <= np.deg2rad(70) + 1e-9)
    radius = np.linalg.norm(c2w[:, :3, 3], axis=1)
    assert np.allclose(np.sin(fov / 2) * radius, np.sqrt(3) / 2)


def test_ply_roundtrip_and_errors(tmp_path):
    pts = np.random.default_rng(0).random((50, 3)).astype(np.float32) - 0.5
    write_voxel_ply(str(tmp_path / "v.ply"), pts)
    assert np.array_equal(read_voxel_ply(str(tmp_path / "v.ply")), pts)
    data = (tmp_path / "v.ply").read_bytes()
    assert b"property float x\nproperty float y\nproperty float z\nend_header" in data
    (tmp_path / "t.ply").write_bytes(data[:-7])
    with pytest.raises(PlyError, match="t.ply"):
        read_voxel_ply(str(tmp_path / "t.ply"))
    (tmp_path / "g.ply").write_bytes(b"garbage")
    with pytest.raises(PlyError, match="g.ply"):
        read_voxel_ply(str(tmp_path / "g.ply"))
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)
    f = np.array([[0, 1, 2], [2, 1, 3]])
    write_mesh_ply(str(tmp_path / "m.ply"), v, f)
    v2, f2 = read_mesh_ply(str(tmp_path / "m.ply"))
    assert np.array_equal(v, v2) and np.array_equal(f, f2) and f2.dtype == np.int64
    trimesh = pytest.importorskip("trimesh")
    tm = trimesh.load(str(tmp_path / "m.ply"), process=False)
    assert np.allclose(tm.vertices, v) and np.array_equal(tm.faces, f)


def _brute_force(v, f, ext, intr, size):
    """Per-pixel, per-triangle float64 reference: nearest covering triangle id and its depth."""
    fid = np.full((len(ext), size, size), -1)
    depth = np.full((len(ext), size, size), np.inf)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    for b in range(len(ext)):
        uv, z = _project(v, ext[b], intr[b])
        sx, sy = uv[:, 0] * size, uv[:, 1] * size
        for k, (i0, i1, i2) in enumerate(f):
            area = (sx[i1] - sx[i0]) * (sy[i2] - sy[i0]) - (sx[i2] - sx[i0]) * (sy[i1] - sy[i0])
            if abs(area) < 1e-12:
                continue
            l1 = ((xs - sx[i0]) * (sy[i2] - sy[i0]) - (ys - sy[i0]) * (sx[i2] - sx[i0])) / area
            l2 = ((sx[i1] - sx[i0]) * (ys - sy[i0]) - (sy[i1] - sy[i0]) * (xs - sx[i0])) / area
            l0 = 1 - l1 - l2
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
            zz = 1 / (l0 / z[i0] + l1 / z[i1] + l2 / z[i2])
            upd = inside & (zz < depth[b])
            depth[b][upd] = zz[upd]
            fid[b][upd] = k
    return fid, depth


def test_rasterize_matches_brute_force():
    rng = np.random.default_rng(1)
    v = rng.uniform(-0.5, 0.5, (30, 3))
    f = rng.integers(0, 30, (40, 3))
    c2w, fov = training_views(SHA, 3)
    ext, intr = c2w_blender_to_extrinsics(c2w), fov_to_intrinsics(fov)
    fr = rasterize(torch.tensor(v, dtype=torch.float64), torch.tensor(f), torch.tensor(ext), torch.tensor(intr),
                   32, 32, max_candidates=100)  # tiny chunks exercise the chunking
    fid, depth = _brute_force(v, f, ext, intr, 32)
    hit = fid >= 0
    assert (fr.mask.numpy() == hit).mean() > 0.995  # edge ties may differ on a few pixels
    both = hit & fr.mask.numpy()
    assert np.allclose(fr.depth.numpy()[both], depth[both], atol=1e-6)
    assert (fr.face_id.numpy()[both] == fid[both]).mean() > 0.99
    assert np.allclose(fr.bary.sum(-1).numpy()[both], 1.0)


def test_render_mesh_texture_alpha_and_ssaa():
    # A unit quad in the z=0 plane, facing a camera on +Z; texture left half red, right half green.
    v = torch.tensor([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.float32)[f]
    tex = torch.zeros(8, 8, 3)
    tex[:, :4, 0] = 1
    tex[:, 4:, 1] = 1
    mesh = RasterMesh(v, f, corner_uvs=uv, face_texture=torch.zeros(2, dtype=torch.long), textures=[tex])
    ext = torch.tensor(look_at_extrinsics(np.array([0, 0, 3.0]), up=(0, 1, 0)), dtype=torch.float32)[None]
    intr = torch.tensor(fov_to_intrinsics(np.deg2rad(40)), dtype=torch.float32)[None]
    out = render_mesh(mesh, ext, intr, 32, lights=(), ambient=1.0)
    rgba = out["rgba"][0]
    assert rgba.shape == (32, 32, 4)
    assert rgba[16, 0, 3] == 0 and torch.all(rgba[16, 0, :3] == 0)  # transparent background
    # OpenCV image x grows with world +x here (the camera's y axis points to world -y).
    assert rgba[16, 10, 0] > 0.9 and rgba[16, 10, 1] < 0.1  # u < 0.5: red
    assert rgba[16, 21, 1] > 0.9 and rgba[16, 21, 0] < 0.1  # u > 0.5: green
    ss = render_mesh(mesh, ext, intr, 32, ssaa=2, lights=(), ambient=1.0)["rgba"][0]
    edge = (ss[..., 3] > 0) & (ss[..., 3] < 1)
    assert edge.any()  # anti-aliased border
    assert torch.all((ss[..., 0] + ss[..., 1])[edge] > 0.9)  # straight alpha: colour not darkened


@pytest.mark.gpu
def test_rasterize_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rng = np.random.default_rng(2)
    v = torch.tensor(rng.uniform(-0.5, 0.5, (200, 3)), dtype=torch.float32)
    f = torch.tensor(rng.integers(0, 200, (300, 3)))
    c2w, fov = training_views(SHA, 8)
    ext = torch.tensor(c2w_blender_to_extrinsics(c2w), dtype=torch.float32)
    intr = torch.tensor(fov_to_intrinsics(fov), dtype=torch.float32)
    a = rasterize(v, f, ext, intr, 64, 64)
    b = rasterize(v.cuda(), f.cuda(), ext.cuda(), intr.cuda(), 64, 64)
    assert (a.face_id == b.face_id.cpu()).float().mean() > 0.999
