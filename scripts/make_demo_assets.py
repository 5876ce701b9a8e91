"""Generates the shipped demo assets under ``assets/demo/`` (procedural, licence-clean: CC0).

    python scripts/make_demo_assets.py [--out assets/demo]

Objects are designed Z-up. Formats that are Y-up by convention (glTF/GLB and OBJ; the toolkit
rotates them to Z-up on import as Blender does) are written rotated, (x, y, z) -> (x, z, -y).
Writes ``captions.json`` ({filename: [captions]}) and ``aesthetic_scores.json`` ({filename: score}).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import trimesh
from PIL import Image

Z_TO_Y_UP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=float)


def _box(extents, center, color=None):
    m = trimesh.creation.box(extents=extents)
    m.apply_translation(center)
    if color is not None:
        m.visual.face_colors = color
    return m


def _pbr(mesh: trimesh.Trimesh, rgba) -> trimesh.Trimesh:
    mat = trimesh.visual.material.PBRMaterial(baseColorFactor=rgba, metallicFactor=0.0, roughnessFactor=0.8)
    mesh.visual = trimesh.visual.TextureVisuals(material=mat)
    return mesh


def _cyl(radius, height, center, sections=24):
    m = trimesh.creation.cylinder(radius=radius, height=height, sections=sections)
    m.apply_translation(center)
    return m


def _texture(kind: str, size: int = 128) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    if kind == "wood":
        rings = 0.5 + 0.5 * np.sin(40 * x + 6 * np.sin(8 * y))
        rgb = np.stack([0.55 + 0.2 * rings, 0.35 + 0.12 * rings, 0.15 + 0.05 * rings], -1)
    else:  # crate: checker with a border
        check = ((x * 4).astype(int) + (y * 4).astype(int)) % 2
        border = (x < 0.06) | (x > 0.94) | (y < 0.06) | (y > 0.94)
        rgb = np.where(border[..., None], [0.2, 0.12, 0.05], np.where(check[..., None], [0.9, 0.7, 0.3],
                                                                       [0.3, 0.5, 0.8]))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def chair() -> trimesh.Scene:
    scene = trimesh.Scene()
    wood, cushion = [120, 72, 40, 255], [180, 40, 40, 255]
    scene.add_geometry(_pbr(_box([0.5, 0.5, 0.06], [0, 0, 0.45]), cushion), node_name="seat")
    scene.add_geometry(_pbr(_box([0.5, 0.06, 0.5], [0, 0.22, 0.73]), wood), node_name="back")
    leg = _pbr(_box([0.05, 0.05, 0.42], [0, 0, 0]), wood)
    for i, (x, y) in enumerate([(-0.2, -0.2), (0.2, -0.2), (-0.2, 0.2), (0.2, 0.2)]):
        tf = trimesh.transformations.translation_matrix([x, y, 0.21])
        scene.add_geometry(leg, node_name=f"leg{i}", transform=tf)  # one mesh, four instances
    return scene


def car() -> trimesh.Scene:
    scene = trimesh.Scene()
    scene.add_geometry(_pbr(_box([1.0, 0.45, 0.2], [0, 0, 0.2]), [30, 90, 200, 255]), node_name="body")
    scene.add_geometry(_pbr(_box([0.5, 0.4, 0.16], [-0.05, 0, 0.38]), [200, 220, 240, 255]), node_name="cabin")
    for i, (x, y) in enumerate([(-0.33, -0.24), (0.33, -0.24), (-0.33, 0.24), (0.33, 0.24)]):
        wheel = _cyl(0.11, 0.08, [0, 0, 0])
        wheel.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
        wheel.apply_translation([x, y, 0.11])
        scene.add_geometry(_pbr(wheel, [20, 20, 20, 255]), node_name=f"wheel{i}")
    return scene


def crate() -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=[0.6, 0.6, 0.6])
    m.unmerge_vertices()
    # Per-face planar UVs: each triangle gets the corners of its square face.
    uv = np.zeros((len(m.vertices), 2))
    for fi, face in enumerate(m.faces):
        n = np.abs(m.face_normals[fi])
        ax = [a for a in range(3) if a != int(np.argmax(n))]
        uv[face] = (m.vertices[face][:, ax] / 0.6) + 0.5
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=_texture("crate"), baseColorFactor=[255] * 4)
    m.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
    return m


def table() -> trimesh.Trimesh:
    parts = [_box([1.0, 0.6, 0.05], [0, 0, 0.5])]
    parts += [_box([0.05, 0.05, 0.48], [x, y, 0.24]) for x in (-0.45, 0.45) for y in (-0.25, 0.25)]
    m = trimesh.util.concatenate(parts)
    m.unmerge_vertices()
    uv = np.stack([m.vertices[:, 0] + 0.5, m.vertices[:, 1] + m.vertices[:, 2] + 0.5], 1)
    mat = trimesh.visual.material.SimpleMaterial(image=_texture("wood"), diffuse=[255, 255, 255, 255])
    m.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
    return m


def mug() -> trimesh.Trimesh:
    outer = trimesh.creation.annulus(r_min=0.17, r_max=0.2, height=0.4, sections=32)
    bottom = _cyl(0.18, 0.03, [0, 0, -0.185], sections=32)
    handle = trimesh.creation.torus(major_radius=0.1, minor_radius=0.025, major_sections=24, minor_sections=12)
    handle.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0]))
    handle.apply_translation([0.27, 0, 0])
    m = trimesh.util.concatenate([outer, bottom, handle])
    t = (m.vertices[:, 2] - m.vertices[:, 2].min()) / np.ptp(m.vertices[:, 2])
    colors = np.stack([0.9 - 0.6 * t, 0.3 + 0.5 * t, 0.2 + 0.7 * t, np.ones_like(t)], 1)
    m.visual = trimesh.visual.ColorVisuals(m, vertex_colors=(colors * 255).astype(np.uint8))
    return m


def lamp() -> trimesh.Trimesh:
    base = _cyl(0.2, 0.04, [0, 0, 0.02], sections=32)
    stem = _cyl(0.025, 0.7, [0, 0, 0.39], sections=12)
    shade = trimesh.creation.cone(radius=0.3, height=0.35, sections=32)
    shade.apply_translation([0, 0, 0.68])
    return trimesh.util.concatenate([base, stem, shade])


def torus_knot(p: int = 2, q: int = 3, n: int = 160, m: int = 12, tube: float = 0.08) -> trimesh.Trimesh:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 0.3 + 0.12 * np.cos(q * t)
    curve = np.stack([r * np.cos(p * t), r * np.sin(p * t), 0.12 * np.sin(q * t)], 1)  # [n, 3]
    tangent = np.roll(curve, -1, 0) - np.roll(curve, 1, 0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.cross(tangent, [0, 0, 1.0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    binormal = np.cross(tangent, normal)
    a = np.linspace(0, 2 * np.pi, m, endpoint=False)
    ring = np.cos(a)[None, :, None] * normal[:, None] + np.sin(a)[None, :, None] * binormal[:, None]
    verts = (curve[:, None] + tube * ring).reshape(-1, 3)  # [n * m, 3]
    i, j = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
    v00, v10 = i * m + j, ((i + 1) % n) * m + j
    v01, v11 = i * m + (j + 1) % m, ((i + 1) % n) * m + (j + 1) % m
    faces = np.concatenate([np.stack([v00, v10, v11], -1).reshape(-1, 3),
                            np.stack([v00, v11, v01], -1).reshape(-1, 3)])
    return trimesh.Trimesh(verts, faces, process=False)


def rocket() -> trimesh.Trimesh:
    body = _cyl(0.12, 0.6, [0, 0, 0.3], sections=24)
    nose = trimesh.creation.cone(radius=0.12, height=0.25, sections=24)
    nose.apply_translation([0, 0, 0.6])
    fins = [_box([0.02, 0.16, 0.18], [0, 0, 0]) for _ in range(3)]
    for k, fin in enumerate(fins):
        fin.apply_translation([0, 0.17, 0.09])
        fin.apply_transform(trimesh.transformations.rotation_matrix(2 * np.pi * k / 3, [0, 0, 1]))
    return trimesh.util.concatenate([body, nose] + fins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "assets", "demo"))
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    scene = chair()
    scene.apply_transform(Z_TO_Y_UP)
    scene.export(os.path.join(out, "chair.glb"))
    scene = car()
    scene.apply_transform(Z_TO_Y_UP)
    scene.export(os.path.join(out, "car.glb"))
    m = crate()
    m.apply_transform(Z_TO_Y_UP)
    m.export(os.path.join(out, "crate.glb"))
    table_dir = os.path.join(out, "table")
    os.makedirs(table_dir, exist_ok=True)
    m = table()
    m.apply_transform(Z_TO_Y_UP)
    m.export(os.path.join(table_dir, "table.obj"), mtl_name="table.mtl")
    m = rocket()
    m.apply_transform(Z_TO_Y_UP)
    m.export(os.path.join(out, "rocket.obj"), include_texture=False)
    mug().export(os.path.join(out, "mug.ply"))
    lamp().export(os.path.join(out, "lamp.stl"))
    torus_knot().export(os.path.join(out, "torus_knot.off"))
    captions = {
        "chair.glb": ["a wooden chair with a red seat cushion", "a simple dining chair"],
        "car.glb": ["a blue toy car with four black wheels", "a boxy low-poly car"],
        "crate.glb": ["a wooden crate with a checker pattern", "a textured cube box"],
        "table/table.obj": ["a wooden table with four legs", "a rectangular wood-grain table"],
        "rocket.obj": ["a small grey rocket with three fins"],
        "mug.ply": ["a colourful mug with a handle", "a coffee cup with a gradient glaze"],
        "lamp.stl": ["a floor lamp with a conical shade"],
        "torus_knot.off": ["a trefoil torus knot", "an abstract knotted tube"],
    }
    scores = {"chair.glb": 5.6, "car.glb": 5.2, "crate.glb": 4.8, "table/table.obj": 5.1,
              "rocket.obj": 4.6, "mug.ply": 5.4, "lamp.stl": 4.4, "torus_knot.off": 6.0}
    with open(os.path.join(out, "captions.json"), "w") as f:
        json.dump(captions, f, indent=2)
    with open(os.path.join(out, "aesthetic_scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(out) for n in ns)
    print(f"wrote demo assets to {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
