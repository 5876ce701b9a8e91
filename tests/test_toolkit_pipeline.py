"""The geometry stages end to end on the shipped demo assets (few views, small images, CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dataset_toolkits import build_metadata, ledger, render, render_cond, voxelize
from dataset_toolkits.stage import run_stage
from dataset_toolkits.voxelize import voxelize_mesh
from trellis.utils.geometry import c2w_blender_to_extrinsics, fov_to_intrinsics
from trellis.utils.ply import read_mesh_ply, read_voxel_ply

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "assets", "demo")
FAST = ["--num_views", "6", "--resolution", "64", "--ssaa", "1", "--no_progress"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A root with every demo asset rendered, voxelized and condition-rendered."""
    root = str(tmp_path_factory.mktemp("demo_root"))
    assert build_metadata.main(["local", "--input", DEMO, "--output_dir", root]) == 0
    assert render.main(["local", "--output_dir", root, *FAST]) == 0
    assert voxelize.main(["local", "--output_dir", root, "--max_workers", "2", "--no_progress"]) == 0
    assert render_cond.main(["local", "--output_dir", root, "--num_views", "3", "--resolution", "48",
                             "--ssaa", "1", "--no_progress"]) == 0
    return root


def test_metadata_and_layout(demo_root):
    meta = ledger.read_metadata(demo_root)
    assert len(meta) == 8 and meta["rendered"].all() and meta["voxelized"].all() and meta["cond_rendered"].all()
    assert (meta["num_voxels"] > 100).all()
    caps = meta.set_index("file_identifier")["captions"]
    assert json.loads(caps["chair.glb"])[0].startswith("a wooden chair")
    assert meta.set_index("file_identifier").loc["torus_knot.off", "aesthetic_score"] == 6.0
    for sha in meta["sha256"]:
        d = os.path.join(demo_root, "renders", sha)
        tf = json.load(open(os.path.join(d, "transforms.json")))
        assert set(tf) == {"aabb", "scale", "offset", "frames"} and len(tf["frames"]) == 6
        fr = tf["frames"][0]
        assert fr["file_path"] == "000.png" and np.isclose(fr["camera_angle_x"], np.deg2rad(40))
        assert np.array(fr["transform_matrix"]).shape == (4, 4)
        img = Image.open(os.path.join(d, "005.png"))
        assert img.mode == "RGBA" and img.size == (64, 64)
        v, _ = read_mesh_ply(os.path.join(d, "mesh.ply"))
        assert np.isclose((v.max(0) - v.min(0)).max(), 1.0, atol=1e-5)
        assert np.allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-5)
        cond = json.load(open(os.path.join(demo_root, "renders_cond", sha, "transforms.json")))
        assert len(cond["frames"]) == 3 and Image.open(os.path.join(demo_root, "renders_cond", sha, "002.png")).size == (48, 48)
        assert not os.path.exists(os.path.join(demo_root, "renders_cond", sha, "mesh.ply"))
    assert not [n for n in os.listdir(os.path.join(demo_root, "renders")) if n.startswith(".tmp")]


def test_y_up_formats_are_rotated_to_z_up(demo_root):
    meta = ledger.read_metadata(demo_root).set_index("file_identifier")
    for name in ("chair.glb", "table/table.obj"):  # designed Z-up, stored Y-up: legs must point down
        v, _ = read_mesh_ply(os.path.join(demo_root, "renders", meta.loc[name, "sha256"], "mesh.ply"))
        low = v[v[:, 2] < v[:, 2].min() + 0.1]
        assert np.ptp(low[:, 0]) > 0.3  # four separate legs at the bottom, spread in x


def assert_voxels_inside_alpha_masks(root: str, sha: str) -> None:
    """Every view's camera projects the asset's voxel centres into that view's alpha mask."""
    pts = read_voxel_ply(os.path.join(root, "voxels", f"{sha}.ply")).astype(np.float64)
    assert np.allclose(((pts + 0.5) * 64 - 0.5) % 1, 0, atol=1e-4)  # centres (i + 0.5)/64 - 0.5
    tf = json.load(open(os.path.join(root, "renders", sha, "transforms.json")))
    for fr in tf["frames"]:
        ext = c2w_blender_to_extrinsics(np.array(fr["transform_matrix"]))
        intr = fov_to_intrinsics(fr["camera_angle_x"])
        cam = pts @ ext[:3, :3].T + ext[:3, 3]
        uv = cam[:, :2] / cam[:, 2:] * intr[0, 0] + 0.5
        alpha = np.asarray(Image.open(os.path.join(root, "renders", sha, fr["file_path"])))[..., 3] > 0
        res = alpha.shape[0]
        # Dilate by one pixel: a voxel centre is up to half a voxel diagonal off the surface.
        dil = alpha.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                dil |= np.roll(np.roll(alpha, dy, 0), dx, 1)
        px = np.floor(uv * res).astype(int)
        ok = (px >= 0).all(1) & (px < res).all(1)
        assert dil[px[ok, 1], px[ok, 0]].mean() > 0.98, (sha, fr["file_path"])


def test_voxels_project_inside_alpha_masks(demo_root):
    for sha in ledger.read_metadata(demo_root)["sha256"]:
        assert_voxels_inside_alpha_masks(demo_root, sha)


@pytest.mark.skipif(shutil.which("blender") is None, reason="no blender executable (apt-get install blender)")
def test_blender_renderer_matches_the_builtin_geometry(tmp_path):
    """``--renderer blender`` (Cycles in a subprocess): the same cameras and normalised mesh as the
    builtin renderer, and the voxels of its mesh.ply project inside its alpha masks."""
    assets = str(tmp_path / "in")
    _copy_demo(assets, ["mug.ply", "chair.glb"])
    roots = {}
    for renderer in ("blender", "builtin"):
        root = roots[renderer] = str(tmp_path / renderer)
        assert build_metadata.main(["local", "--input", assets, "--output_dir", root]) == 0
        assert render.main(["local", "--output_dir", root, "--renderer", renderer, "--num_views", "3",
                            "--resolution", "64", "--ssaa", "1", "--no_progress"]) == 0
    assert voxelize.main(["local", "--output_dir", roots["blender"], "--no_progress"]) == 0
    for sha in ledger.read_metadata(roots["blender"])["sha256"]:
        assert_voxels_inside_alpha_masks(roots["blender"], sha)
        frames = [json.load(open(os.path.join(r, "renders", sha, "transforms.json")))["frames"] for r in roots.values()]
        for a, b in zip(*frames):  # cameras are seeded by the sha256
            assert np.allclose(a["transform_matrix"], b["transform_matrix"], atol=1e-5)
        v_blender, _ = read_mesh_ply(os.path.join(roots["blender"], "renders", sha, "mesh.ply"))
        v_builtin, _ = read_mesh_ply(os.path.join(roots["builtin"], "renders", sha, "mesh.ply"))
        assert np.allclose(v_builtin.min(0), v_blender.min(0), atol=2e-3)
        assert np.allclose(v_builtin.max(0), v_blender.max(0), atol=2e-3)


def _clip_polygon(poly, axis, bound, keep_below):
    out = []
    for i in range(len(poly)):
        a, b = poly[i], poly[(i + 1) % len(poly)]
        ina = a[axis] <= bound if keep_below else a[axis] >= bound
        inb = b[axis] <= bound if keep_below else b[axis] >= bound
        if ina:
            out.append(a)
        if ina != inb:
            t = (bound - a[axis]) / (b[axis] - a[axis])
            out.append(a + t * (b - a))
    return out


def _tri_box_clip(tri, lo, hi):
    """Independent oracle: a triangle meets a closed box iff clipping it to the box leaves something."""
    poly = [p.astype(np.float64) for p in tri]
    for ax in range(3):
        poly = _clip_polygon(poly, ax, hi[ax] + 1e-9, True)
        if not poly:
            return False
        poly = _clip_polygon(poly, ax, lo[ax] - 1e-9, False)
        if not poly:
            return False
    return True


def test_voxelize_matches_clipping_oracle():
    rng = np.random.default_rng(3)
    v = rng.uniform(-0.5, 0.5, (12, 3))
    f = rng.integers(0, 12, (10, 3))
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    res = 8
    got = {tuple(x) for x in voxelize_mesh(v, f, res)}
    want = set()
    for tri in np.clip(v, -0.5 + 1e-6, 0.5 - 1e-6)[f]:
        for idx in np.ndindex(res, res, res):
            lo = np.array(idx) / res - 0.5
            if _tri_box_clip(tri, lo, lo + 1 / res):
                want.add(idx)
    assert got == want


def test_voxels_cover_the_mesh_surface(demo_root):
    meta = ledger.read_metadata(demo_root)
    rng = np.random.default_rng(0)
    for sha in meta["sha256"]:
        v, f = read_mesh_ply(os.path.join(demo_root, "renders", sha, "mesh.ply"))
        occ = {tuple(x) for x in np.floor((read_voxel_ply(os.path.join(demo_root, "voxels", f"{sha}.ply")) + 0.5)
                                          * 64).astype(int)}
        tri = v[f].astype(np.float64)
        w = rng.dirichlet([1, 1, 1], size=len(f))
        samples = np.einsum("fk,fkd->fd", w, tri)  # one random point per triangle
        idx = np.clip(np.floor((np.clip(samples, -0.5 + 1e-6, 0.5 - 1e-6) + 0.5) * 64), 0, 63).astype(int)
        assert all(tuple(i) in occ for i in idx)


def _copy_demo(dst, names):
    os.makedirs(dst)
    for n in names:
        src = os.path.join(DEMO, n)
        shutil.copytree(src, os.path.join(dst, n)) if os.path.isdir(src) else shutil.copy(src, dst)


def test_broken_files_are_recorded_and_skipped(tmp_path):
    assets = str(tmp_path / "in")
    _copy_demo(assets, ["mug.ply", "table"])
    (tmp_path / "in" / "broken.glb").write_bytes(b"glTF this is not a real file")
    (tmp_path / "in" / "empty.obj").write_text("# nothing here\n")
    (tmp_path / "in" / "flat.off").write_text("OFF\n3 1 0\n0 0 0\n0 0 0\n0 0 0\n3 0 1 2\n")
    with open(tmp_path / "in" / "table" / "table.mtl", "a") as f:  # a second material with a lost texture
        f.write("\nnewmtl lost\nmap_Kd lost_texture.png\n")
    root = str(tmp_path / "root")
    build_metadata.main(["local", "--input", assets, "--output_dir", root])
    assert render.main(["local", "--output_dir", root, *FAST]) == 0
    meta = ledger.read_metadata(root).set_index("file_identifier")
    assert meta["rendered"].to_dict() == {"broken.glb": False, "empty.obj": False, "flat.off": False,
                                          "mug.ply": True, "table/table.obj": True}
    reasons = ledger.read_failures(root, "rendered").set_index("sha256")["reason"]
    assert "unreadable" in reasons[meta.loc["broken.glb", "sha256"]]
    assert "no triangle geometry" in reasons[meta.loc["empty.obj", "sha256"]]
    assert "degenerate geometry" in reasons[meta.loc["flat.off", "sha256"]]
    warns = ledger.read_failures(root, "rendered", kind="warnings")
    assert warns["warning"].str.contains("lost_texture.png").any()
    assert "failed (not done): 3" in open(os.path.join(root, "statistics.txt")).read()


def test_resume_after_half_written_output(tmp_path):
    root = str(tmp_path / "root")
    assets = str(tmp_path / "in")
    _copy_demo(assets, ["mug.ply", "lamp.stl"])
    build_metadata.main(["local", "--input", assets, "--output_dir", root])
    meta = ledger.read_metadata(root)
    sha = meta["sha256"].iloc[0]
    os.makedirs(os.path.join(root, "renders", sha))  # a directory without transforms.json: not done
    Image.new("RGBA", (4, 4)).save(os.path.join(root, "renders", sha, "000.png"))
    os.makedirs(os.path.join(root, "renders", f".tmp-{sha}-99999"))  # a killed run's temp dir
    os.makedirs(os.path.join(root, "voxels"))
    with open(os.path.join(root, "voxels", f"{meta['sha256'].iloc[1]}.ply.tmp-123"), "w") as f:
        f.write("ply\n")  # a killed writer's temp file is never read as output
    assert render.main(["local", "--output_dir", root, *FAST]) == 0
    assert voxelize.main(["local", "--output_dir", root, "--no_progress"]) == 0
    meta = ledger.read_metadata(root)
    assert meta["rendered"].all() and meta["voxelized"].all()
    assert Image.open(os.path.join(root, "renders", sha, "000.png")).size == (64, 64)
    assert not os.path.exists(os.path.join(root, "renders", f".tmp-{sha}-99999"))


def test_resume_after_kill(tmp_path):
    root = str(tmp_path / "root")
    assets = str(tmp_path / "in")
    _copy_demo(assets, ["mug.ply", "lamp.stl", "torus_knot.off", "rocket.obj", "chair.glb", "car.glb"])
    build_metadata.main(["local", "--input", assets, "--output_dir", root])
    cmd = [sys.executable, "-m", "dataset_toolkits.render", "local", "--output_dir", root, "--num_views", "24",
           "--resolution", "96", "--ssaa", "1", "--no_progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rec = os.path.join(root, "rendered_0.csv")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(rec) and len(ledger.read_records(rec)) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_dirs = [d for d in os.listdir(os.path.join(root, "renders")) if not d.startswith(".")]
    assert all(os.path.exists(os.path.join(root, "renders", d, "transforms.json")) for d in done_dirs)
    before = {d: os.path.getmtime(os.path.join(root, "renders", d, "000.png")) for d in done_dirs}
    counts = run_stage(render.make_stage("local", 24, 96, ssaa=1), root, progress=False)
    assert counts["processed"] + counts["found_on_disk"] == 6 and counts["found_on_disk"] == len(done_dirs)
    assert len(done_dirs) < 6 or counts["processed"] == 0
    for d, t in before.items():  # finished assets were not redone
        assert os.path.getmtime(os.path.join(root, "renders", d, "000.png")) == t
    assert ledger.read_metadata(root)["rendered"].all()
    assert not [n for n in os.listdir(os.path.join(root, "renders")) if n.startswith(".tmp")]


def test_sharded_render_covers_every_asset_once(tmp_path):
    root = str(tmp_path / "root")
    assets = str(tmp_path / "in")
    _copy_demo(assets, ["mug.ply", "lamp.stl", "rocket.obj"])
    build_metadata.main(["local", "--input", assets, "--output_dir", root])
    for r in (0, 1):
        assert render.main(["local", "--output_dir", root, "--rank", str(r), "--world_size", "2",
                            "--no_merge", *FAST]) == 0
    a = set(ledger.read_records(os.path.join(root, "rendered_0.csv"))["sha256"])
    b = set(ledger.read_records(os.path.join(root, "rendered_1.csv"))["sha256"])
    assert len(a) == 1 and len(b) == 2 and not a & b
    assert not ledger.read_metadata(root)["rendered"].any()  # pending until merged
    build_metadata.main(["local", "--output_dir", root])
    meta = pd.read_csv(os.path.join(root, "metadata.csv"))
    assert meta["rendered"].all()


def test_trellis500k_subset_source(tmp_path):
    """An original source (here ABO): the released subset CSV plus assets the user downloaded (a
    ``downloaded_<rank>.csv`` record with ``local_path``) go through the same stages."""
    import hashlib

    root = str(tmp_path / "abo")
    os.makedirs(os.path.join(root, "raw"))
    rows, downloaded = [], []
    for name in ("mug.ply", "crate.glb"):
        shutil.copy(os.path.join(DEMO, name), os.path.join(root, "raw", name))
        with open(os.path.join(DEMO, name), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        rows.append({"sha256": sha, "file_identifier": f"abo/{name}", "aesthetic_score": 5.5,
                     "captions": json.dumps([f"a {name.split('.')[0]}"])})
        downloaded.append({"sha256": sha, "local_path": os.path.join("raw", name)})
    pd.DataFrame(rows).to_csv(os.path.join(root, "ABO.csv"), index=False)
    pd.DataFrame(downloaded).to_csv(os.path.join(root, "downloaded_0.csv"), index=False)
    assert build_metadata.main(["ABO", "--output_dir", root]) == 0
    meta = ledger.read_metadata(root)
    assert sorted(meta["local_path"]) == ["raw/crate.glb", "raw/mug.ply"]
    assert render.main(["ABO", "--output_dir", root, *FAST]) == 0
    assert voxelize.main(["ABO", "--output_dir", root, "--no_progress"]) == 0
    meta = ledger.read_metadata(root)
    assert meta["rendered"].all() and meta["voxelized"].all() and (meta["num_voxels"] > 100).all()
    # Without the subset CSV the source says where to get it instead of downloading.
    other = str(tmp_path / "hssd")
    os.makedirs(other)
    with pytest.raises(FileNotFoundError, match="does not download"):
        build_metadata.main(["HSSD", "--output_dir", other])
