"""Loading 3D assets for the toolkit: one flat, coloured triangle mesh per file.

Formats: glb, gltf, obj (+mtl, textures), ply, stl, off, read with trimesh. A scene is flattened
with its node transforms. Colour sources, in this order of precedence per part: a base-colour
texture (PBR ``baseColorTexture`` or an OBJ ``map_Kd``) times the material's base colour; vertex
colours; face colours; the material's base colour; light grey. A texture that cannot be found falls
back to the base colour and adds a warning.

Axes: glTF/GLB and OBJ are Y-up by convention; they are rotated to Z-up as Blender's importers do,
``(x, y, z) -> (x, -z, y)``. PLY, STL and OFF are taken as Z-up (Blender imports them unchanged).

Normalisation (DATA.md 3.4): ``scale = 1 / max(extent)``, then ``offset = -(min + max) / 2`` of the
scaled box, so ``normalised = v * scale + offset`` lies in [-0.5, 0.5]^3, centred.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from dataset_toolkits.stage import AssetError

__all__ = ["SUPPORTED_EXTENSIONS", "Y_UP_EXTENSIONS", "Asset", "load_asset", "normalise", "to_raster_mesh"]

SUPPORTED_EXTENSIONS = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
Y_UP_EXTENSIONS = (".glb", ".gltf", ".obj")
_GREY = np.array([0.8, 0.8, 0.8])


@dataclass
class Asset:
    """A flattened asset. vertices float64 ``[V, 3]`` (Z up); faces int64 ``[F, 3]``;
    corner_colors float32 ``[F, 3, 3]``; corner_uvs float32 ``[F, 3, 2]`` or None; face_texture int64
    ``[F]`` (-1 = none); textures: uint8 ``[Ht, Wt, 3]`` images; warnings: strings."""

    vertices: np.ndarray
    faces: np.ndarray
    corner_colors: np.ndarray
    corner_uvs: np.ndarray | None
    face_texture: np.ndarray
    textures: List[np.ndarray] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _rgb(color) -> np.ndarray:
    c = np.asarray(color, dtype=np.float64).reshape(-1)[:3]
    return c / 255.0 if c.max() > 1.0 or np.issubdtype(np.asarray(color).dtype, np.integer) else c


def _missing_obj_textures(path: str) -> List[str]:
    """``map_Kd`` files referenced by an OBJ's material libraries that do not exist."""
    missing = []
    folder = os.path.dirname(path)
    with open(path, "r", errors="replace") as f:
        libs = [line.split(None, 1)[1].strip() for line in f if line.startswith("mtllib ")]
    for lib in libs:
        lib_path = os.path.join(folder, lib)
        if not os.path.exists(lib_path):
            missing.append(lib)
            continue
        with open(lib_path, "r", errors="replace") as f:
            for line in f:
                m = re.match(r"^\s*map_Kd\s+(?:-\S+\s+\S+\s+)*(.+?)\s*$", line)
                if m and not os.path.exists(os.path.join(os.path.dirname(lib_path), m.group(1))):
                    missing.append(m.group(1))
    return missing


def _part_colors(mesh, textures: List[np.ndarray], warnings: List[str], name: str):
    """Per-part corner colours ``[F, 3, 3]``, corner UVs ``[F, 3, 2]`` or None and texture ids ``[F]``."""
    import trimesh

    faces = mesh.faces
    nf = len(faces)
    visual = mesh.visual
    uvs = None
    tex_id = np.full(nf, -1, dtype=np.int64)
    if isinstance(visual, trimesh.visual.TextureVisuals):
        mat = visual.material
        image = getattr(mat, "baseColorTexture", None)
        if image is None:
            image = getattr(mat, "image", None)
        base = getattr(mat, "baseColorFactor", None)
        if base is None:
            base = getattr(mat, "diffuse", None)
        base_rgb = _GREY if base is None else _rgb(base)
        colors = np.broadcast_to(base_rgb, (nf, 3, 3))
        uv = getattr(visual, "uv", None)
        if image is not None and uv is not None and len(uv) == len(mesh.vertices):
            textures.append(np.array(image.convert("RGB"), dtype=np.uint8))
            tex_id[:] = len(textures) - 1
            uvs = np.asarray(uv, dtype=np.float32)[faces]  # [F, 3, 2]
        elif image is not None:
            warnings.append(f"{name}: texture without UV coordinates, using the base colour")
        return np.ascontiguousarray(colors, dtype=np.float32), uvs, tex_id
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3][faces] / 255.0
    elif kind == "face":
        colors = np.repeat((np.asarray(visual.face_colors, dtype=np.float64)[:, None, :3] / 255.0), 3, 1)
    else:
        colors = np.broadcast_to(_GREY, (nf, 3, 3))
    return np.ascontiguousarray(colors, dtype=np.float32), uvs, tex_id


def load_asset(path: str, max_faces: int = 10_000_000) -> Asset:
    """Loads ``path`` into one flat :class:`Asset` (Z up, not normalised). Raises :class:`AssetError`
    for unsupported, unreadable, empty or oversized files."""
    import trimesh

    ext = os.path.splitext(path)[1].lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise AssetError(f"unsupported file type {ext!r} ({path}); supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    if not os.path.isfile(path):
        raise AssetError(f"file not found: {path}")
    if os.path.getsize(path) == 0:
        raise AssetError(f"empty file: {path}")
    warnings: List[str] = []
    if ext == ".obj":
        warnings += [f"missing texture or material file {m!r}: using the base colour"
                     for m in _missing_obj_textures(path)]
    try:
        scene = trimesh.load(path, force="scene")
        parts = scene.dump(concatenate=False)
    except Exception as e:  # trimesh raises many types for corrupt files; the reason is recorded
        raise AssetError(f"unreadable file {os.path.basename(path)}: {type(e).__name__}: {e}") from e
    parts = [p for p in parts if isinstance(p, trimesh.Trimesh) and len(p.faces) > 0]
    if not parts:
        raise AssetError(f"no triangle geometry in {os.path.basename(path)}")
    total = sum(len(p.faces) for p in parts)
    if total > max_faces:
        raise AssetError(f"too many faces: {total} > max_faces {max_faces}")
    verts, faces, colors, uvs, tex = [], [], [], [], []
    textures: List[np.ndarray] = []
    offset = 0
    any_uv = False
    for k, part in enumerate(parts):
        c, uv, t = _part_colors(part, textures, warnings, f"part {k}")
        verts.append(np.asarray(part.vertices, dtype=np.float64))
        faces.append(np.asarray(part.faces, dtype=np.int64) + offset)
        offset += len(part.vertices)
        colors.append(c)
        any_uv |= uv is not None
        uvs.append(uv if uv is not None else np.zeros((len(part.faces), 3, 2), dtype=np.float32))
        tex.append(t)
    v = np.concatenate(verts)
    if not np.isfinite(v).all():
        raise AssetError("non-finite vertex coordinates")
    if ext in Y_UP_EXTENSIONS:
        v = np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)  # Y-up -> Z-up, as Blender imports it
    return Asset(vertices=v, faces=np.concatenate(faces), corner_colors=np.concatenate(colors),
                 corner_uvs=np.concatenate(uvs) if any_uv else None, face_texture=np.concatenate(tex),
                 textures=textures, warnings=warnings)


def normalise(vertices: np.ndarray) -> Tuple[np.ndarray, float, np.ndarray]:
    """Scales the longest bbox side to 1 and centres: returns (normalised ``[V, 3]``, scale, offset
    ``[3]``) with ``normalised = v * scale + offset``. Degenerate (zero-size) geometry raises."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 1e-12:
        raise AssetError(f"degenerate geometry: bounding box extent {extent}")
    scale = 1.0 / extent
    offset = -(lo + hi) / 2 * scale
    return vertices * scale + offset, scale, offset


def to_raster_mesh(asset: Asset, vertices: np.ndarray, device: str = "cpu"):
    """A :class:`trellis.renderers.rasterize.RasterMesh` of ``asset`` with the given (normalised)
    vertices, on ``device``."""
    import torch

    from trellis.renderers.rasterize import RasterMesh

    return RasterMesh(
        vertices=torch.as_tensor(vertices, dtype=torch.float32, device=device),
        faces=torch.as_tensor(asset.faces, dtype=torch.long, device=device),
        corner_colors=torch.as_tensor(asset.corner_colors, dtype=torch.float32, device=device),
        corner_uvs=None if asset.corner_uvs is None else torch.as_tensor(asset.corner_uvs, device=device),
        face_texture=torch.as_tensor(asset.face_texture, dtype=torch.long, device=device),
        textures=[torch.as_tensor(t, device=device).float() / 255.0 for t in asset.textures],
    )
