"""A pure-PyTorch triangle rasteriser, batched over views, for CPU and CUDA.

Cameras follow reference RENDERERS.md section 1 / DATA.md section 5: ``extrinsics`` ``[B, 4, 4]``
world-to-camera with OpenCV axes (x right, y down, z forward) and normalised ``intrinsics``
``[B, 3, 3]`` (``u = fx x/z + cx`` in [0, 1], 0 = left / top). Pixel ``(i, j)`` (column, row) is
sampled at its centre, normalised ``((i + 0.5)/W, (j + 0.5)/H)``.

Algorithm (two passes):

1. **Visibility** (no autograd). Vertices go to camera space and screen space per view. Every
   (view, triangle) pair gets its pixel bounding box; the pixels of all boxes are enumerated as
   candidates, in chunks of at most ``max_candidates`` so that memory stays bounded. A candidate is
   inside when its three screen-space barycentrics are >= 0; its depth is the perspective-correct
   camera z (``1/z`` is affine in screen space). A z-buffer keeps, per pixel, the minimum of
   ``(float32 bits of z) << 32 | triangle id`` with ``scatter_reduce(amin)``: the nearest triangle
   wins, ties go to the lower id, and the result is deterministic.
2. **Interpolation** (autograd-friendly). For each covered pixel the winning triangle's
   perspective-correct barycentrics are recomputed from the camera-space vertices, so gradients reach
   vertex attributes and, inside silhouettes, vertex positions.

Triangles with a vertex at camera ``z <= near`` are dropped (no near-plane clipping); triangles are
two-sided. :func:`render_mesh` adds colour (corner colours x material texture), simple lighting,
optional supersampling, and returns straight-alpha RGBA.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Fragments", "RasterMesh", "rasterize", "interpolate", "render_mesh", "DEFAULT_LIGHTS"]

_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per-pixel rasterisation result for ``B`` views of ``H x W`` pixels.

    face_id: long ``[B, H, W]``, the visible triangle or -1.
    bary: float ``[B, H, W, 3]``, perspective-correct barycentrics (0 where empty).
    depth: float ``[B, H, W]``, camera-space z of the surface (0 where empty).
    mask: bool ``[B, H, W]``.
    """

    face_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor
    mask: torch.Tensor


@dataclass
class RasterMesh:
    """A renderable triangle mesh.

    vertices: float ``[V, 3]`` (world); faces: long ``[F, 3]``.
    corner_colors: optional float ``[F, 3, 3]`` in [0, 1] (vertex / face / material base colours).
    corner_uvs: optional float ``[F, 3, 2]`` (OpenGL convention: v = 0 is the bottom of the image).
    face_texture: optional long ``[F]``: index into ``textures`` or -1 for none.
    textures: list of float ``[Ht, Wt, 3]`` images in [0, 1], row 0 = top.
    vertex_normals: optional float ``[V, 3]``; face normals are used when absent.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    corner_colors: Optional[torch.Tensor] = None
    corner_uvs: Optional[torch.Tensor] = None
    face_texture: Optional[torch.Tensor] = None
    textures: List[torch.Tensor] = field(default_factory=list)
    vertex_normals: Optional[torch.Tensor] = None

    def __post_init__(self):
        v, f = self.vertices, self.faces
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"RasterMesh.vertices must be [V, 3], got {tuple(v.shape)}")
        if f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"RasterMesh.faces must be [F, 3], got {tuple(f.shape)}")
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= v.shape[0]):
            raise ValueError(f"RasterMesh.faces index out of range [0, {v.shape[0]})")
        n = f.shape[0]
        for name, shape in (("corner_colors", (n, 3, 3)), ("corner_uvs", (n, 3, 2))):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"RasterMesh.{name} must be {shape}, got {tuple(t.shape)}")
        if self.face_texture is not None and tuple(self.face_texture.shape) != (n,):
            raise ValueError(f"RasterMesh.face_texture must be [{n}], got {tuple(self.face_texture.shape)}")
        if self.face_texture is not None and self.corner_uvs is None and bool((self.face_texture >= 0).any()):
            raise ValueError("RasterMesh: textured faces need corner_uvs")

    def to(self, device) -> "RasterMesh":
        def mv(t):
            return None if t is None else t.to(device)
        return replace(self, vertices=self.vertices.to(device), faces=self.faces.to(device),
                       corner_colors=mv(self.corner_colors), corner_uvs=mv(self.corner_uvs),
                       face_texture=mv(self.face_texture), textures=[t.to(device) for t in self.textures],
                       vertex_normals=mv(self.vertex_normals))


def _to_screen(vertices: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor,
               height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns camera-space vertices ``[B, V, 3]`` and pixel coordinates ``sx, sy`` ``[B, V]``."""
    rot, trans = extrinsics[:, :3, :3], extrinsics[:, :3, 3]
    v_cam = torch.einsum("bij,vj->bvi", rot, vertices) + trans[:, None, :]  # [B, V, 3]
    z = v_cam[..., 2].clamp_min(1e-12)
    sx = (intrinsics[:, 0, 0, None] * v_cam[..., 0] / z + intrinsics[:, 0, 2, None]) * width
    sy = (intrinsics[:, 1, 1, None] * v_cam[..., 1] / z + intrinsics[:, 1, 2, None]) * height
    return v_cam, sx, sy


def _visibility(sx, sy, zc, faces, height, width, near, max_candidates, zbuf, view_offset):
    """Pass 1 for a group of views: updates ``zbuf`` (long ``[B_all * H * W]``) in place.

    sx, sy, zc: ``[b, V]`` screen x, y and camera z of this group's views; faces ``[F, 3]``.
    """
    nf = faces.shape[0]
    fx, fy, fz = sx[:, faces], sy[:, faces], zc[:, faces]  # [b, F, 3] each
    valid = (fz > near).all(-1)
    # Edge-function coefficients relative to corner 0: b_k(p) = A_k dx + B_k dy + C_k.
    x0, y0 = fx[..., 0], fy[..., 0]
    ex1, ey1 = fx[..., 1] - x0, fy[..., 1] - y0
    ex2, ey2 = fx[..., 2] - x0, fy[..., 2] - y0
    area = ex1 * ey2 - ex2 * ey1  # twice the signed area, [b, F]
    valid &= area.abs() > 1e-10
    xmin = torch.ceil(fx.amin(-1) - 0.5).clamp(0, width - 1)
    xmax = torch.floor(fx.amax(-1) - 0.5).clamp(-1, width - 1)
    ymin = torch.ceil(fy.amin(-1) - 0.5).clamp(0, height - 1)
    ymax = torch.floor(fy.amax(-1) - 0.5).clamp(-1, height - 1)
    bw = (xmax - xmin + 1).clamp_min(0)
    bh = (ymax - ymin + 1).clamp_min(0)
    counts = (bw * bh * valid).long().reshape(-1)  # [b * F]
    pairs = counts.nonzero().squeeze(1)
    if pairs.numel() == 0:
        return
    counts = counts[pairs]
    inv_area = 1.0 / area.reshape(-1)[pairs]
    # b1 = (dx*ey2 - dy*ex2)/area, b2 = (ex1*dy - ey1*dx)/area, b0 = 1 - b1 - b2.
    coef = torch.stack([
        x0.reshape(-1)[pairs], y0.reshape(-1)[pairs],
        ey2.reshape(-1)[pairs] * inv_area, -ex2.reshape(-1)[pairs] * inv_area,
        -ey1.reshape(-1)[pairs] * inv_area, ex1.reshape(-1)[pairs] * inv_area,
        xmin.reshape(-1)[pairs], ymin.reshape(-1)[pairs], bw.reshape(-1)[pairs],
    ], 1)  # [P, 9]
    iz = (1.0 / fz).reshape(-1, 3)[pairs]  # [P, 3] inverse depths of the corners
    view = pairs // nf + view_offset
    face = pairs % nf
    budget = max(int(max_candidates), height * width)
    ends = torch.cumsum(counts, 0)
    start_pair = 0
    num_pairs = pairs.numel()
    while start_pair < num_pairs:
        base = int(ends[start_pair - 1]) if start_pair > 0 else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + budget, device=ends.device), right=True))
        stop = max(stop, start_pair + 1)
        sl = slice(start_pair, stop)
        cnt = counts[sl]
        rep = torch.repeat_interleave(torch.arange(stop - start_pair, device=cnt.device), cnt)  # [N]
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(rep.numel(), device=cnt.device) - first.index_select(0, rep)
        c = coef[sl].index_select(0, rep)  # [N, 9]
        w = c[:, 8].long()
        px = c[:, 6].long() + local % w
        py = c[:, 7].long() + local // w
        dx = px.to(c.dtype) + 0.5 - c[:, 0]
        dy = py.to(c.dtype) + 0.5 - c[:, 1]
        b1 = c[:, 2] * dx + c[:, 3] * dy
        b2 = c[:, 4] * dx + c[:, 5] * dy
        b0 = 1.0 - b1 - b2
        eps = -1e-6
        inside = (b0 >= eps) & (b1 >= eps) & (b2 >= eps)
        izc = iz[sl].index_select(0, rep)
        inv_z = b0 * izc[:, 0] + b1 * izc[:, 1] + b2 * izc[:, 2]
        inside &= inv_z > 0
        depth = (1.0 / inv_z[inside]).float()
        sel = rep[inside]
        pix = (view[sl].index_select(0, sel) * height + py[inside]) * width + px[inside]
        key = (depth.view(torch.int32).long() << 32) | face[sl].index_select(0, sel)
        zbuf.scatter_reduce_(0, pix, key, reduce="amin")
        start_pair = stop


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, extrinsics: torch.Tensor,
              intrinsics: torch.Tensor, height: int, width: int, near: float = 1e-3,
              max_candidates: int = 1 << 22, max_pairs: int = 1 << 22) -> Fragments:
    """Rasterises one mesh into ``B`` views.

    vertices: float ``[V, 3]`` world positions; faces: long ``[F, 3]``.
    extrinsics: ``[B, 4, 4]`` OpenCV world-to-camera; intrinsics: ``[B, 3, 3]`` normalised.
    ``max_candidates`` bounds the candidate pixels held at once (about 100 bytes each);
    ``max_pairs`` bounds the (view, triangle) pairs set up at once.
    """
    if extrinsics.ndim != 3 or extrinsics.shape[1:] != (4, 4):
        raise ValueError(f"rasterize: extrinsics must be [B, 4, 4], got {tuple(extrinsics.shape)}")
    if intrinsics.shape != (extrinsics.shape[0], 3, 3):
        raise ValueError(f"rasterize: intrinsics must be [B, 3, 3], got {tuple(intrinsics.shape)}")
    if height <= 0 or width <= 0:
        raise ValueError(f"rasterize: bad resolution {height}x{width}")
    device = vertices.device
    faces = faces.to(device=device, dtype=torch.long)
    extrinsics = extrinsics.to(device=device, dtype=vertices.dtype)
    intrinsics = intrinsics.to(device=device, dtype=vertices.dtype)
    nb = extrinsics.shape[0]
    v_cam, sx, sy = _to_screen(vertices, extrinsics, intrinsics, height, width)
    zbuf = torch.full((nb * height * width,), _INT64_MAX, dtype=torch.long, device=device)
    if faces.shape[0] > 0:
        group = max(1, int(max_pairs) // faces.shape[0])
        with torch.no_grad():
            for s in range(0, nb, group):
                e = min(nb, s + group)
                _visibility(sx[s:e].detach(), sy[s:e].detach(), v_cam[s:e, :, 2].detach(), faces,
                            height, width, near, max_candidates, zbuf, s)
    hit = zbuf != _INT64_MAX
    face_id = torch.where(hit, zbuf & 0xFFFFFFFF, torch.full_like(zbuf, -1))
    # Pass 2: differentiable perspective-correct barycentrics of the winning triangles.
    idx = hit.nonzero().squeeze(1)
    f = face_id[idx]
    view = idx // (height * width)
    py = (idx // width) % height
    px = idx % width
    corners = faces[f]  # [N, 3]
    csx, csy = sx[view[:, None], corners], sy[view[:, None], corners]  # [N, 3]
    cz = v_cam[view[:, None], corners, 2]  # [N, 3]
    qx = px.to(vertices.dtype) + 0.5
    qy = py.to(vertices.dtype) + 0.5
    e1x, e1y = csx[:, 1] - csx[:, 0], csy[:, 1] - csy[:, 0]
    e2x, e2y = csx[:, 2] - csx[:, 0], csy[:, 2] - csy[:, 0]
    dx, dy = qx - csx[:, 0], qy - csy[:, 0]
    area = e1x * e2y - e2x * e1y
    b1 = (dx * e2y - dy * e2x) / area
    b2 = (e1x * dy - e1y * dx) / area
    screen_bary = torch.stack([1.0 - b1 - b2, b1, b2], 1)  # [N, 3]
    persp = screen_bary / cz
    inv_depth = persp.sum(1, keepdim=True)
    bary_hit = persp / inv_depth  # [N, 3]
    bary = torch.zeros(nb * height * width, 3, dtype=vertices.dtype, device=device)
    depth = torch.zeros(nb * height * width, dtype=vertices.dtype, device=device)
    bary = bary.index_put((idx,), bary_hit)
    depth = depth.index_put((idx,), 1.0 / inv_depth[:, 0])
    return Fragments(face_id=face_id.reshape(nb, height, width), bary=bary.reshape(nb, height, width, 3),
                     depth=depth.reshape(nb, height, width), mask=hit.reshape(nb, height, width))


def interpolate(attr: torch.Tensor, frags: Fragments, faces: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Interpolates per-corner ``[F, 3, C]`` or per-vertex ``[V, C]`` (with ``faces``) attributes to
    ``[B, H, W, C]`` (zeros where no triangle is visible)."""
    if attr.ndim == 2:
        if faces is None:
            raise ValueError("interpolate: per-vertex attributes [V, C] need faces")
        attr = attr[faces]  # [F, 3, C]
    if attr.ndim != 3 or attr.shape[1] != 3:
        raise ValueError(f"interpolate: attributes must be [F, 3, C] or [V, C], got {tuple(attr.shape)}")
    fid = frags.face_id.clamp_min(0)
    vals = attr[fid]  # [B, H, W, 3, C]
    out = (frags.bary.unsqueeze(-1).to(attr.dtype) * vals).sum(-2)
    return out * frags.mask.unsqueeze(-1).to(out.dtype)


# Directions towards the lights (world, Z up) and intensities; "camera" is a headlight.
DEFAULT_LIGHTS: Sequence[Tuple[object, float]] = (
    ("camera", 0.45),
    ((4.0, 1.0, 6.0), 0.35),
    ((0.0, 0.0, 1.0), 0.15),
)


def _sample_textures(mesh: RasterMesh, face: torch.Tensor, bary: torch.Tensor) -> Optional[torch.Tensor]:
    """Texture colour ``[N, 3]`` of N covered pixels (ones where untextured), or None without textures.

    face: long ``[N]`` visible triangle per pixel; bary: ``[N, 3]`` its barycentrics.
    """
    if mesh.face_texture is None or not mesh.textures:
        return None
    uv = (bary.unsqueeze(-1) * mesh.corner_uvs[face].to(bary.dtype)).sum(1)  # [N, 2]
    tex_id = mesh.face_texture[face]
    out = torch.ones(face.shape[0], 3, dtype=bary.dtype, device=bary.device)
    for k, tex in enumerate(mesh.textures):
        sel = (tex_id == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        t = uv[sel]
        t = t - torch.floor(t)  # repeat wrapping
        grid = torch.stack([t[:, 0] * 2 - 1, (1 - t[:, 1]) * 2 - 1], -1).reshape(1, 1, -1, 2)
        img = tex[..., :3].permute(2, 0, 1).unsqueeze(0).to(bary.dtype)  # [1, 3, Ht, Wt]
        smp = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[sel] = smp.reshape(3, -1).t()
    return out


def render_mesh(mesh: RasterMesh, extrinsics: torch.Tensor, intrinsics: torch.Tensor, resolution: int,
                ssaa: int = 1, lights: Sequence[Tuple[object, float]] = DEFAULT_LIGHTS,
                ambient: float = 0.3, near: float = 1e-3, max_candidates: int = 1 << 22,
                outputs: Sequence[str] = ("rgba", "depth", "normal", "mask")) -> Dict[str, torch.Tensor]:
    """Renders ``B`` square views of a mesh.

    Returns a dict of ``rgba`` float ``[B, R, R, 4]`` in [0, 1] with straight (non-premultiplied)
    alpha and a transparent background, ``depth`` ``[B, R, R]`` (camera z, 0 where empty),
    ``normal`` ``[B, R, R, 3]`` (world, facing the camera) and ``mask`` ``[B, R, R]`` (coverage).
    Shading: ``albedo * min(1, ambient + sum_k I_k max(0, n . l_k))``. With ``ssaa = s`` the views
    are rendered at ``s * R`` and box-filtered in premultiplied space. ``outputs`` picks the buffers
    to return (fewer is faster).
    """
    unknown = set(outputs) - {"rgba", "depth", "normal", "mask"}
    if unknown:
        raise ValueError(f"render_mesh: unknown outputs {sorted(unknown)}")
    if ssaa < 1:
        raise ValueError(f"render_mesh: ssaa must be >= 1, got {ssaa}")
    res = resolution * ssaa
    verts = mesh.vertices
    frags = rasterize(verts, mesh.faces, extrinsics, intrinsics, res, res, near=near,
                      max_candidates=max_candidates)
    dtype, device = verts.dtype, verts.device
    nb = frags.mask.shape[0]
    ext = extrinsics.to(device=device, dtype=dtype)
    # Shade only the covered pixels: N of them.
    idx = frags.mask.reshape(-1).nonzero().squeeze(1)  # [N]
    face = frags.face_id.reshape(-1)[idx]
    bary = frags.bary.reshape(-1, 3)[idx]  # [N, 3]
    view = idx // (res * res)

    def interp(corner_attr):  # [F, 3, C] -> [N, C]
        return (bary.unsqueeze(-1) * corner_attr[face].to(dtype)).sum(1)

    albedo = torch.ones(idx.shape[0], 3, dtype=dtype, device=device)
    if mesh.corner_colors is not None:
        albedo = albedo * interp(mesh.corner_colors)
    tex = _sample_textures(mesh, face, bary)
    if tex is not None:
        albedo = albedo * tex
    # Normals (world), flipped towards the camera: triangles are two-sided.
    if mesh.vertex_normals is not None:
        normal = interp(mesh.vertex_normals[mesh.faces])
    else:
        tri = verts[mesh.faces[face]]  # [N, 3, 3]
        normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    normal = F.normalize(normal, dim=-1)
    cam_pos = -torch.einsum("bji,bj->bi", ext[:, :3, :3], ext[:, :3, 3])  # [B, 3] camera centres
    world = interp(verts[mesh.faces])  # [N, 3]
    to_cam = F.normalize(cam_pos[view] - world, dim=-1)
    flip = torch.where((normal * to_cam).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(dtype)
    normal = normal * flip
    shade = torch.full_like(albedo[:, :1], ambient)
    for direction, intensity in lights:
        if isinstance(direction, str) and direction == "camera":
            ldir = to_cam
        else:
            ldir = F.normalize(torch.tensor(direction, dtype=dtype, device=device), dim=0)
        shade = shade + intensity * (normal * ldir).sum(-1, keepdim=True).clamp_min(0)
    rgb_hit = (albedo * shade.clamp(max=1.0)).clamp(0, 1)

    def dense(vals):  # [N, C] -> [B, r, r, C], zeros where empty
        out = torch.zeros(nb * res * res, vals.shape[1], dtype=dtype, device=device)
        return out.index_put((idx,), vals).reshape(nb, res, res, vals.shape[1])

    maskf = frags.mask.to(dtype).unsqueeze(-1)  # [B, r, r, 1]

    def pool(x):  # [B, r, r, C] -> [B, R, R, C]
        return F.avg_pool2d(x.permute(0, 3, 1, 2), ssaa).permute(0, 2, 3, 1) if ssaa > 1 else x

    alpha = pool(maskf)
    cov = alpha.clamp_min(1e-8)
    result: Dict[str, torch.Tensor] = {}
    if "rgba" in outputs:
        rgb = pool(dense(rgb_hit))  # premultiplied by coverage
        if ssaa > 1:
            rgb = torch.where(alpha > 0, rgb / cov, torch.zeros_like(alpha)).clamp(0, 1)  # straight alpha
        result["rgba"] = torch.cat([rgb, alpha], -1)
    if "depth" in outputs:
        result["depth"] = (pool(frags.depth.unsqueeze(-1) * maskf) / cov)[..., 0] if ssaa > 1 else frags.depth
    if "normal" in outputs:
        result["normal"] = F.normalize(pool(dense(normal)), dim=-1)
    if "mask" in outputs:
        result["mask"] = alpha[..., 0]
    return result
