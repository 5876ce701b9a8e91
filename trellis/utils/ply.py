"""Small, dependency-free PLY reader and writers for the TRELLIS data layout.

Two files of the layout are PLY (reference DATA.md sections 3.4 and 4):

* ``voxels/<sha>.ply``: one ``vertex`` element with ``x, y, z`` float32 (voxel centres), binary
  little-endian. :func:`read_voxel_ply` / :func:`write_voxel_ply`.
* ``renders/<sha>/mesh.ply``: a triangle mesh, binary little-endian, ``x, y, z`` float32 (plus
  optional properties such as normals, UVs or colours, which the readers here ignore) and faces as
  ``uchar count + int32/uint32 indices``. :func:`read_mesh_ply` / :func:`write_mesh_ply`.

The reader understands the general format (binary little/big endian and ASCII, any scalar or list
property), so files written by Blender, Open3D, trimesh or plyfile all load. Every problem (bad
header, truncated data, missing property) raises :class:`PlyError` naming the file.

Writers are atomic: they write ``<path>.tmp-<pid>`` and ``os.replace`` it onto ``path``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

__all__ = [
    "PlyError",
    "read_ply",
    "read_voxel_ply",
    "write_voxel_ply",
    "read_mesh_ply",
    "write_mesh_ply",
]

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class PlyError(ValueError):
    """A PLY file that cannot be read; the message names the file and the problem."""


def _parse_header(path: str, data: bytes) -> Tuple[str, List[Tuple[str, int, list]], int]:
    """Returns (format, [(element name, count, [(prop name, dtype, list count dtype or None)])],
    offset of the body)."""
    if not data.startswith(b"ply"):
        raise PlyError(f"{path}: not a PLY file (missing 'ply' magic)")
    end = data.find(b"end_header")
    if end < 0:
        raise PlyError(f"{path}: truncated PLY header (no 'end_header')")
    nl = data.find(b"\n", end)
    if nl < 0:
        raise PlyError(f"{path}: truncated PLY header (no newline after 'end_header')")
    lines = data[:end].decode("ascii", errors="replace").replace("\r", "").split("\n")
    fmt = None
    elements: List[Tuple[str, int, list]] = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1] if len(tok) > 1 else None
        elif tok[0] == "element":
            if len(tok) != 3 or not tok[2].isdigit():
                raise PlyError(f"{path}: bad element line {line!r}")
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise PlyError(f"{path}: property before any element: {line!r}")
            if tok[1] == "list":
                if len(tok) != 5 or tok[2] not in _TYPES or tok[3] not in _TYPES:
                    raise PlyError(f"{path}: bad list property {line!r}")
                elements[-1][2].append((tok[4], _TYPES[tok[3]], _TYPES[tok[2]]))
            else:
                if len(tok) != 3 or tok[1] not in _TYPES:
                    raise PlyError(f"{path}: bad property {line!r}")
                elements[-1][2].append((tok[2], _TYPES[tok[1]], None))
        else:
            raise PlyError(f"{path}: unknown header line {line!r}")
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise PlyError(f"{path}: unsupported or missing PLY format {fmt!r}")
    return fmt, elements, nl + 1


def _read_binary(path: str, body: memoryview, elements, endian: str) -> Dict[str, Dict[str, np.ndarray]]:
    out: Dict[str, Dict[str, np.ndarray]] = {}
    pos = 0
    for name, count, props in elements:
        has_list = any(p[2] is not None for p in props)
        if not has_list:
            dtype = np.dtype([(p[0], endian + p[1]) for p in props])
            nbytes = dtype.itemsize * count
            if pos + nbytes > len(body):
                raise PlyError(f"{path}: truncated data in element '{name}' "
                               f"(needs {nbytes} bytes, {len(body) - pos} left)")
            arr = np.frombuffer(body, dtype=dtype, count=count, offset=pos)
            out[name] = {p[0]: np.ascontiguousarray(arr[p[0]]) for p in props}
            pos += nbytes
            continue
        # Fast path: a single list property whose rows all have the same length (triangles).
        if len(props) == 1 and count > 0:
            pname, item_t, count_t = props[0]
            ct = np.dtype(endian + count_t)
            if pos + ct.itemsize > len(body):
                raise PlyError(f"{path}: truncated data in element '{name}'")
            k = int(np.frombuffer(body, dtype=ct, count=1, offset=pos)[0])
            row = np.dtype([("n", ct), ("v", endian + item_t, (k,))])
            if pos + row.itemsize * count <= len(body):
                arr = np.frombuffer(body, dtype=row, count=count, offset=pos)
                if np.all(arr["n"] == k):
                    out[name] = {pname: np.ascontiguousarray(arr["v"])}
                    pos += row.itemsize * count
                    continue
        # General path: walk row by row (mixed polygon sizes, several properties).
        cols: Dict[str, list] = {p[0]: [] for p in props}
        for _ in range(count):
            for pname, item_t, count_t in props:
                t = np.dtype(endian + (count_t or item_t))
                if pos + t.itemsize > len(body):
                    raise PlyError(f"{path}: truncated data in element '{name}'")
                val = np.frombuffer(body, dtype=t, count=1, offset=pos)[0]
                pos += t.itemsize
                if count_t is not None:
                    it = np.dtype(endian + item_t)
                    n = int(val)
                    if pos + it.itemsize * n > len(body):
                        raise PlyError(f"{path}: truncated data in element '{name}'")
                    val = np.frombuffer(body, dtype=it, count=n, offset=pos).copy()
                    pos += it.itemsize * n
                cols[pname].append(val)
        out[name] = {k: _maybe_stack(v) for k, v in cols.items()}
    return out


def _maybe_stack(values: list):
    if values and isinstance(values[0], np.ndarray):
        if len({len(v) for v in values}) == 1:
            return np.stack(values)
        return values  # ragged polygons: list of arrays
    return np.asarray(values)


def _read_ascii(path: str, body: bytes, elements) -> Dict[str, Dict[str, np.ndarray]]:
    tokens = body.decode("ascii", errors="replace").split()
    pos = 0
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for name, count, props in elements:
        cols: Dict[str, list] = {p[0]: [] for p in props}
        for _ in range(count):
            for pname, item_t, count_t in props:
                if pos >= len(tokens):
                    raise PlyError(f"{path}: truncated data in element '{name}'")
                if count_t is None:
                    cols[pname].append(float(tokens[pos]))
                    pos += 1
                else:
                    n = int(tokens[pos])
                    if pos + 1 + n > len(tokens):
                        raise PlyError(f"{path}: truncated data in element '{name}'")
                    cols[pname].append(np.asarray(tokens[pos + 1:pos + 1 + n], dtype=np.float64).astype(item_t))
                    pos += 1 + n
        res = {}
        for pname, item_t, count_t in props:
            res[pname] = _maybe_stack(cols[pname]) if count_t else np.asarray(cols[pname], dtype=item_t)
        out[name] = res
    return out


def read_ply(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Reads any PLY file into ``{element: {property: array}}``.

    Scalar properties are 1-D arrays of length ``count``; list properties whose rows all have the
    same length are 2-D arrays ``[count, k]``, ragged ones are lists of 1-D arrays.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PlyError(f"{path}: cannot read PLY file ({e})") from e
    fmt, elements, start = _parse_header(path, data)
    if fmt == "ascii":
        return _read_ascii(path, data[start:], elements)
    endian = "<" if fmt == "binary_little_endian" else ">"
    return _read_binary(path, memoryview(data)[start:], elements, endian)


def read_voxel_ply(path: str) -> np.ndarray:
    """Reads voxel centres: float32 ``[N, 3]`` (x, y, z), in file order."""
    return _xyz(path, read_ply(path))


def _xyz(path: str, el: Dict[str, Dict[str, np.ndarray]]) -> np.ndarray:
    if "vertex" not in el:
        raise PlyError(f"{path}: no 'vertex' element")
    v = el["vertex"]
    missing = [k for k in "xyz" if k not in v]
    if missing:
        raise PlyError(f"{path}: vertex element lacks properties {missing}")
    return np.stack([v["x"], v["y"], v["z"]], axis=1).astype(np.float32)  # [N, 3]


def _atomic_write(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def write_voxel_ply(path: str, points: np.ndarray) -> None:
    """Writes points ``[N, 3]`` as binary little-endian PLY with only ``x, y, z`` float32."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"write_voxel_ply({path}): points must be [N, 3], got shape {pts.shape}")
    pts = np.ascontiguousarray(pts, dtype="<f4")
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(pts)}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    ).encode("ascii")
    _atomic_write(path, header + pts.tobytes())


def read_mesh_ply(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a triangle mesh: vertices float32 ``[V, 3]``, faces int64 ``[F, 3]``.

    Polygons with more than 3 corners are split into triangle fans. Other vertex properties are
    ignored. Indices out of range raise :class:`PlyError`.
    """
    el = read_ply(path)
    verts = _xyz(path, el)
    if "face" not in el or not el["face"]:
        raise PlyError(f"{path}: no 'face' element")
    face_el = el["face"]
    key = "vertex_indices" if "vertex_indices" in face_el else next(iter(face_el))
    polys = face_el[key]
    if isinstance(polys, np.ndarray) and polys.ndim == 2:
        if polys.shape[1] < 3:
            raise PlyError(f"{path}: faces with {polys.shape[1]} corners")
        idx = np.arange(1, polys.shape[1] - 1)
        faces = np.stack([np.repeat(polys[:, :1], len(idx), 1), polys[:, idx], polys[:, idx + 1]], -1)
        faces = faces.reshape(-1, 3)  # [F * (k - 2), 3] triangle fans
    elif isinstance(polys, np.ndarray) and polys.size == 0:
        faces = np.zeros((0, 3), dtype=np.int64)
    else:
        tris = [[p[0], p[i], p[i + 1]] for p in polys for i in range(1, len(p) - 1)]
        faces = np.asarray(tris).reshape(-1, 3)
    faces = faces.astype(np.int64)
    if faces.size and (faces.min() < 0 or faces.max() >= len(verts)):
        raise PlyError(f"{path}: face index out of range [0, {len(verts)})")
    return verts, faces


def write_mesh_ply(path: str, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Writes a triangle mesh as binary little-endian PLY: ``x, y, z`` float32 vertices and faces as
    ``uchar 3 + int32 x3``."""
    v = np.asarray(vertices)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"write_mesh_ply({path}): vertices must be [V, 3], got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"write_mesh_ply({path}): faces must be [F, 3], got {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"write_mesh_ply({path}): face index out of range [0, {len(v)})")
    v = np.ascontiguousarray(v, dtype="<f4")
    rows = np.empty(len(f), dtype=np.dtype([("n", "u1"), ("v", "<i4", (3,))]))
    rows["n"] = 3
    rows["v"] = f
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {len(v)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        f"element face {len(f)}\n"
        "property list uchar int vertex_indices\nend_header\n"
    ).encode("ascii")
    _atomic_write(path, header + v.tobytes() + rows.tobytes())
