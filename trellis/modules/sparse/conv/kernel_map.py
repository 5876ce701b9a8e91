"""Kernel maps of sparse 3D convolutions, built by sorting packed coordinate keys.

A kernel map relates output rows to input rows per kernel offset. Its primary form is a neighbour
table ``nbr [N_out, K]`` int32: ``nbr[o, k]`` is the input row that kernel offset ``k`` reads for
output row ``o``, or ``-1``. Offset ``k = (i * ky + j) * kz + l`` is kernel index ``(i, j, l)``;
weights are stored ``(out, kx, ky, kz, in)`` so ``weight[:, i, j, l, :]`` belongs to offset ``k``.

Definitions (the same as spconv's):

* **Submanifold** (stride 1, ``padding=None``; odd kernel): outputs are the input sites; kernel
  index ``(i, j, l)`` reads the input at ``(x + (i - kx//2) d, y + (j - ky//2) d, z + (l - kz//2) d)``
  (a cross-correlation; inactive sites are zero).
* **Strided / padded** (``stride > 1`` or an explicit ``padding``): with per-axis input extent ``D``
  (the ``"spatial_shape"`` cache entry if present, else ``max(coords) + 1`` over the batch), the
  output extent is ``(D + 2p - d (k - 1) - 1) // s + 1``; output site ``o`` reads the input at
  ``o * s - p + (i, j, l) * d``, and ``o`` exists iff at least one input of its own batch item
  lies in its window. Output rows are ordered by ``(b, x, y, z)`` ascending.
* **Inverse** of a strided conv: the transposed map (outputs are the strided conv's input sites).

Neighbours are looked up within the same batch item only. Coordinates must lie in ``[0, 2048)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.spatial import COORD_BITS, coords_key, key_coords

__all__ = ["KernelMap", "submanifold_map", "strided_map", "kernel_offsets", "spatial_shape_of"]

Triple = tuple[int, int, int]


@dataclass
class KernelMap:
    """Neighbour table ``nbr [N_out, K]`` (int32, -1 = none) from ``n_in`` input rows."""

    nbr: torch.Tensor
    n_in: int
    kernel_size: Triple
    symmetric: bool = False  # submanifold: the transposed map is nbr with offsets reversed
    _pairs: tuple | None = field(default=None, repr=False)
    _transposed: KernelMap | None = field(default=None, repr=False)
    _extra: dict = field(default_factory=dict, repr=False)

    @property
    def n_out(self) -> int:
        return self.nbr.shape[0]

    @property
    def volume(self) -> int:
        return self.nbr.shape[1]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Active pairs grouped by offset: ``(in_idx [P], out_idx [P], bounds)`` (int64), offset ``k``
        owning ``bounds[k]:bounds[k + 1]`` (a Python list, so slicing needs no device sync)."""
        if self._pairs is None:
            nbr_t = self.nbr.T  # [K, N_out]
            k_idx, out_idx = torch.nonzero(nbr_t >= 0, as_tuple=True)  # sorted by k, then out
            in_idx = nbr_t[k_idx, out_idx].long()
            counts = torch.bincount(k_idx, minlength=self.volume)
            bounds = [0] + torch.cumsum(counts, 0).tolist()
            self._pairs = (in_idx, out_idx, bounds)
        return self._pairs

    @property
    def num_pairs(self) -> int:
        return self.pairs()[2][-1]

    def transposed(self) -> KernelMap:
        """The map from outputs back to inputs: ``nbr_t [N_in, K]`` with ``nbr_t[i, k] = o``."""
        if self._transposed is None:
            if self.symmetric:
                nbr_t = self.nbr.flip(1).contiguous()
            else:
                in_idx, out_idx, bounds = self.pairs()
                counts = torch.tensor([bounds[k + 1] - bounds[k] for k in range(self.volume)], device=self.nbr.device)
                k_idx = torch.repeat_interleave(torch.arange(self.volume, device=self.nbr.device), counts)
                nbr_t = torch.full((self.n_in, self.volume), -1, dtype=torch.int32, device=self.nbr.device)
                nbr_t[in_idx, k_idx] = out_idx.int()
            self._transposed = KernelMap(nbr_t, self.n_out, self.kernel_size, self.symmetric)
            self._transposed._transposed = self
        return self._transposed


def kernel_offsets(kernel_size: Triple, device: torch.device) -> torch.Tensor:
    """``[K, 3]`` int64 kernel indices ``(i, j, l)`` in offset order (``l`` fastest)."""
    grid = list(itertools.product(*(range(k) for k in kernel_size)))
    return torch.tensor(grid, dtype=torch.long, device=device).reshape(-1, 3)


def spatial_shape_of(x: SparseTensor) -> list[int]:
    """Per-axis extent: the ``"spatial_shape"`` cache entry, else ``max(coords) + 1``."""
    shape = x.get_spatial_cache("spatial_shape")
    if shape is None:
        if x.coords.shape[0] == 0:
            return [0, 0, 0]
        shape = (x.coords[:, 1:].max(0).values.long() + 1).tolist()
        x.register_spatial_cache("spatial_shape", shape)
    return list(shape)


def _check_range(x: SparseTensor, who: str) -> None:
    if x.coords.shape[0] and int(x.coords[:, 1:].max()) >= (1 << COORD_BITS):
        raise ValueError(f"{who}: coordinates must be < {1 << COORD_BITS}")


def _lookup(sorted_keys: torch.Tensor, perm: torch.Tensor, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Row index of each query key in the sorted input keys, or -1 (same shape as ``query``)."""
    if sorted_keys.numel() == 0:
        return torch.full_like(query, -1, dtype=torch.int32)
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=sorted_keys.numel() - 1)
    found = valid & (sorted_keys[pos] == query)
    return torch.where(found, perm[pos], torch.full_like(pos, -1)).int()


def _pack(b: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
    """``b [...]`` and ``xyz [..., 3]`` (int64, in range) -> packed keys ``[...]``."""
    s = COORD_BITS
    return (((b << s | xyz[..., 0]) << s | xyz[..., 1]) << s) | xyz[..., 2]


def submanifold_map(x: SparseTensor, kernel_size: Triple, dilation: Triple) -> KernelMap:
    """Submanifold map (outputs = inputs), cached in ``x``'s spatial cache."""
    key = f"conv_subm:{kernel_size}:{dilation}"
    kmap = x.get_spatial_cache(key)
    if kmap is not None:
        return kmap
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"submanifold sparse conv needs odd kernel sizes, got {kernel_size}")
    _check_range(x, "SparseConv3d")
    dev = x.device
    keys = coords_key(x.coords)  # [N]
    sorted_keys, perm = torch.sort(keys)
    centre = torch.tensor([k // 2 for k in kernel_size], device=dev)
    delta = (kernel_offsets(kernel_size, dev) - centre) * torch.tensor(dilation, device=dev)  # [K, 3]
    c = x.coords.long()
    q = c[None, :, 1:] + delta[:, None, :]  # [K, N, 3]
    valid = ((q >= 0) & (q < (1 << COORD_BITS))).all(-1)  # [K, N]
    qkey = _pack(c[None, :, 0].expand(q.shape[:2]), q.clamp(0, (1 << COORD_BITS) - 1))
    nbr = _lookup(sorted_keys, perm, qkey, valid).T.contiguous()  # [K, N] -> [N, K]
    kmap = KernelMap(nbr, x.coords.shape[0], kernel_size, symmetric=True)
    x.register_spatial_cache(key, kmap)
    return kmap


def strided_map(
    x: SparseTensor, kernel_size: Triple, stride: Triple, padding: Triple, dilation: Triple
) -> tuple[KernelMap, torch.Tensor, list[int]]:
    """Map of a strided or padded conv: ``(kmap, out_coords [M, 4] int32, out_spatial_shape)``.
    Cached in ``x``'s spatial cache."""
    key = f"conv_strided:{kernel_size}:{stride}:{padding}:{dilation}"
    hit = x.get_spatial_cache(key)
    if hit is not None:
        return hit
    _check_range(x, "SparseConv3d")
    dev = x.device
    in_shape = spatial_shape_of(x)
    out_shape = [
        (D + 2 * p - d * (k - 1) - 1) // s + 1
        for D, k, s, p, d in zip(in_shape, kernel_size, stride, padding, dilation)
    ]
    if any(v <= 0 for v in out_shape):
        raise ValueError(f"SparseConv3d: input extent {in_shape} too small for kernel {kernel_size} "
                         f"with padding {padding} and dilation {dilation}")
    s_t = torch.tensor(stride, device=dev)
    kd = kernel_offsets(kernel_size, dev) * torch.tensor(dilation, device=dev)  # [K, 3]
    c = x.coords.long()
    num = c[None, :, 1:] + torch.tensor(padding, device=dev) - kd[:, None, :]  # [K, N, 3]
    o = torch.div(num, s_t, rounding_mode="floor")
    valid = ((num >= 0) & (o * s_t == num) & (o < torch.tensor(out_shape, device=dev))).all(-1)  # [K, N]
    k_idx, in_idx = torch.nonzero(valid, as_tuple=True)  # [P], [P]
    okey = _pack(c[in_idx, 0], o[k_idx, in_idx])  # [P]
    uniq, out_idx = torch.unique(okey, sorted=True, return_inverse=True)  # [M], [P]
    nbr = torch.full((uniq.numel(), kd.shape[0]), -1, dtype=torch.int32, device=dev)
    nbr[out_idx, k_idx] = in_idx.int()
    kmap = KernelMap(nbr, x.coords.shape[0], kernel_size, symmetric=False)
    result = (kmap, key_coords(uniq), out_shape)
    x.register_spatial_cache(key, result)
    return result
