"""Cameras of the TRELLIS data layout (reference DATA.md sections 3 and 5, RENDERERS.md section 1).

Conventions:

* World: right-handed, Z up, objects inside [-0.5, 0.5]^3.
* ``c2w`` (camera-to-world, as stored in ``transforms.json``) uses the Blender/OpenGL camera axes:
  x right, y up, the camera looks along -z.
* ``extrinsics`` (world-to-camera) use the OpenCV axes: x right, y down, z forward.
  ``extrinsics = inverse(c2w with its y and z columns negated)``.
* ``intrinsics`` are normalised (image side = 1): ``fx = fy = 0.5 / tan(fov / 2)``, ``cx = cy = 0.5``.

All functions are numpy, float64 unless stated.
"""

from __future__ import annotations

import hashlib
from typing import Tuple

import numpy as np

__all__ = [
    "radical_inverse_base2",
    "hammersley_yaw_pitch",
    "yaw_pitch_to_position",
    "look_at_c2w_blender",
    "look_at_extrinsics",
    "c2w_blender_to_extrinsics",
    "extrinsics_to_c2w_blender",
    "fov_to_intrinsics",
    "intrinsics_to_fov",
    "seed_from_sha256",
    "training_views",
    "conditioning_views",
]


def radical_inverse_base2(i: np.ndarray) -> np.ndarray:
    """Van der Corput sequence: the binary digits of ``i`` mirrored after the point. ``[N]`` float64."""
    i = np.asarray(i, dtype=np.uint64)
    out = np.zeros(i.shape, dtype=np.float64)
    scale = 0.5
    rest = i.copy()
    while np.any(rest):
        out += (rest & np.uint64(1)).astype(np.float64) * scale
        rest = rest >> np.uint64(1)
        scale *= 0.5
    return out


def hammersley_yaw_pitch(n: int, offset: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """DATA.md 3.1: ``n`` (yaw, pitch) pairs in radians on a Hammersley sphere with the pitch remap.

    ``u = i/n + o1/n``; ``v = phi2(i) + o2``; ``u' = 2u`` if ``u < 0.25`` else ``2u/3 + 1/3``;
    ``pitch = arccos(1 - 2u') - pi/2``; ``yaw = 2 pi v``. Returns two ``[n]`` arrays.
    """
    if n <= 0:
        raise ValueError(f"number of views must be positive, got {n}")
    i = np.arange(n)
    u = i / n + offset[0] / n
    v = radical_inverse_base2(i) + offset[1]
    u = np.where(u < 0.25, 2.0 * u, 2.0 / 3.0 * u + 1.0 / 3.0)
    pitch = np.arccos(np.clip(1.0 - 2.0 * u, -1.0, 1.0)) - np.pi / 2
    yaw = 2.0 * np.pi * v
    return yaw, pitch


def yaw_pitch_to_position(yaw: np.ndarray, pitch: np.ndarray, radius) -> np.ndarray:
    """Camera centres ``(r cos yaw cos pitch, r sin yaw cos pitch, r sin pitch)``: ``[n, 3]``."""
    yaw, pitch, radius = np.broadcast_arrays(np.asarray(yaw, float), np.asarray(pitch, float),
                                             np.asarray(radius, float))
    return np.stack([radius * np.cos(yaw) * np.cos(pitch),
                     radius * np.sin(yaw) * np.cos(pitch),
                     radius * np.sin(pitch)], axis=-1)


def look_at_c2w_blender(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world ``[..., 4, 4]`` in the Blender camera convention, as Blender's "track -Z, up Y"
    constraint builds it: the camera's -z axis points at ``target`` and its +y axis leans to ``up``.
    At the poles (view direction parallel to ``up``) the camera x axis is world +x."""
    eye = np.asarray(eye, dtype=np.float64)
    fwd = np.asarray(target, dtype=np.float64) - eye
    fwd = fwd / np.linalg.norm(fwd, axis=-1, keepdims=True)
    right = np.cross(fwd, np.broadcast_to(np.asarray(up, float), fwd.shape))
    norm = np.linalg.norm(right, axis=-1, keepdims=True)
    pole = norm[..., 0] < 1e-9
    right = np.where(pole[..., None], np.array([1.0, 0.0, 0.0]), right / np.maximum(norm, 1e-12))
    z_axis = -fwd
    y_axis = np.cross(z_axis, right)
    c2w = np.zeros(eye.shape[:-1] + (4, 4))
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = y_axis
    c2w[..., :3, 2] = z_axis
    c2w[..., :3, 3] = eye
    c2w[..., 3, 3] = 1.0
    return c2w


def look_at_extrinsics(eye: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """World-to-camera ``[..., 4, 4]`` (OpenCV) by RENDERERS.md 1: ``z = normalise(target - eye)``,
    ``x = normalise(-up x z)``, ``y = z x x``; rotation rows ``[x; y; z]``, translation ``-R eye``."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, float) - eye
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    x = np.cross(-np.broadcast_to(np.asarray(up, float), z.shape), z)
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.cross(z, x)
    ext = np.zeros(eye.shape[:-1] + (4, 4))
    rot = np.stack([x, y, z], axis=-2)  # [..., 3, 3], rows are the camera axes
    ext[..., :3, :3] = rot
    ext[..., :3, 3] = -np.einsum("...ij,...j->...i", rot, eye)
    ext[..., 3, 3] = 1.0
    return ext


def c2w_blender_to_extrinsics(c2w: np.ndarray) -> np.ndarray:
    """Blender/OpenGL camera-to-world ``[..., 4, 4]`` -> OpenCV world-to-camera ``[..., 4, 4]``."""
    c2w = np.array(c2w, dtype=np.float64)
    c2w[..., :3, 1:3] *= -1.0
    return np.linalg.inv(c2w)


def extrinsics_to_c2w_blender(extrinsics: np.ndarray) -> np.ndarray:
    """Inverse of :func:`c2w_blender_to_extrinsics`."""
    c2w = np.linalg.inv(np.asarray(extrinsics, dtype=np.float64))
    c2w[..., :3, 1:3] *= -1.0
    return c2w


def fov_to_intrinsics(fov) -> np.ndarray:
    """Normalised intrinsics ``[..., 3, 3]`` for a square image with field of view ``fov`` (radians)."""
    fov = np.asarray(fov, dtype=np.float64)
    f = 0.5 / np.tan(fov / 2)
    k = np.zeros(fov.shape + (3, 3))
    k[..., 0, 0] = f
    k[..., 1, 1] = f
    k[..., 0, 2] = 0.5
    k[..., 1, 2] = 0.5
    k[..., 2, 2] = 1.0
    return k


def intrinsics_to_fov(intrinsics: np.ndarray) -> np.ndarray:
    """FoV in radians along x: ``2 atan(0.5 / fx)``."""
    return 2.0 * np.arctan(0.5 / np.asarray(intrinsics)[..., 0, 0])


def seed_from_sha256(sha256: str, salt: str) -> int:
    """A 64-bit seed from an asset id and a stage name, so each stage draws its own numbers."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{sha256}".encode()).digest()[:8], "little")


def training_views(sha256: str, num_views: int = 150, radius: float = 2.0,
                   fov_deg: float = 40.0) -> Tuple[np.ndarray, np.ndarray]:
    """DATA.md 3.1 cameras for one object, seeded from its sha256.

    Returns ``c2w`` ``[n, 4, 4]`` (Blender convention) and ``fov`` ``[n]`` (radians).
    """
    rng = np.random.default_rng(seed_from_sha256(sha256, "render"))
    offset = rng.random(2)
    yaw, pitch = hammersley_yaw_pitch(num_views, (offset[0], offset[1]))
    c2w = look_at_c2w_blender(yaw_pitch_to_position(yaw, pitch, radius))
    return c2w, np.full(num_views, np.deg2rad(fov_deg))


def conditioning_views(sha256: str, num_views: int = 24, fov_min_deg: float = 10.0,
                       fov_max_deg: float = 70.0) -> Tuple[np.ndarray, np.ndarray]:
    """DATA.md 3.2 cameras: Hammersley directions, ``sin^2(fov/2)`` uniform in the FoV range and the
    radius ``(sqrt(3)/2) / sin(fov/2)`` so the bounding sphere of the unit cube touches the frame.

    Returns ``c2w`` ``[n, 4, 4]`` (Blender convention) and ``fov`` ``[n]`` (radians).
    """
    rng = np.random.default_rng(seed_from_sha256(sha256, "render_cond"))
    offset = rng.random(2)
    yaw, pitch = hammersley_yaw_pitch(num_views, (offset[0], offset[1]))
    lo, hi = np.sin(np.deg2rad(fov_min_deg) / 2) ** 2, np.sin(np.deg2rad(fov_max_deg) / 2) ** 2
    s2 = rng.uniform(lo, hi, size=num_views)  # sin^2(fov / 2)
    fov = 2.0 * np.arcsin(np.sqrt(s2))
    radius = (np.sqrt(3.0) / 2.0) / np.sqrt(s2)
    c2w = look_at_c2w_blender(yaw_pitch_to_position(yaw, pitch, radius))
    return c2w, fov
