"""Resolution changes of a ``SparseTensor``: pooling down, copying up, subdividing.

* ``SparseDownsample(f)``: coarse coords ``(b, x//f, y//f, z//f)``, ordered by ``(b, x, y, z)``
  ascending; each coarse feature is ``sum(children) / (n_children + 1)``. The ``+ 1`` reproduces the
  reference's ``scatter_reduce(mean, include_self=True)`` on a zero tensor (reference README 3.8),
  which the released weights absorbed.
* ``SparseUpsample(f)``: each fine voxel of the matching downsample (same set and row order) copies
  its parent's features. The pairing goes through the spatial cache: the downsample registers
  ``"upsample_{f}"`` in the coarse tensor's cache, and the fine tensor gets back its own cache.
* ``SparseSubdivide``: every voxel ``p`` becomes ``2p + (dx, dy, dz)``, children in the order
  (0,0,0), (0,0,1), (0,1,0), ..., (1,1,1) (z fastest), rows voxel-major; features copied
  (reference README 3.7).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from trellis.modules.sparse.basic import SparseTensor
from trellis.utils.device import to_device_async

__all__ = ["SparseDownsample", "SparseUpsample", "SparseSubdivide", "coords_key", "COORD_BITS"]

COORD_BITS = 11  # each of x, y, z must be < 2**11 in packed keys


def coords_key(coords: torch.Tensor) -> torch.Tensor:
    """Packs ``[N, 4]`` ``(b, x, y, z)`` with ``0 <= x, y, z < 2048`` into ``[N]`` int64 keys whose
    order is the lexicographic ``(b, x, y, z)`` order."""
    c = coords.long()
    s = COORD_BITS
    return (((c[:, 0] << s | c[:, 1]) << s | c[:, 2]) << s) | c[:, 3]


def key_coords(key: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`coords_key`: ``[N]`` int64 -> ``[N, 4]`` int32."""
    s, m = COORD_BITS, (1 << COORD_BITS) - 1
    return torch.stack([key >> (3 * s), (key >> (2 * s)) & m, (key >> s) & m, key & m], 1).int()


def _factor3(factor: int | Sequence[int], who: str) -> tuple[int, int, int]:
    f = (factor,) * 3 if isinstance(factor, int) else tuple(int(v) for v in factor)
    if len(f) != 3 or any(v < 1 for v in f):
        raise ValueError(f"{who}: factor must be a positive int or 3 positive ints, got {factor!r}")
    return f  # type: ignore[return-value]


def _check(x: object, who: str) -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{who} expects a SparseTensor, got {type(x).__name__}")
    return x


class SparseDownsample(nn.Module):
    """Pools voxels into cells of ``factor``; see the module docstring for the exact mean."""

    def __init__(self, factor: int | Sequence[int]):
        super().__init__()
        self.factor = _factor3(factor, "SparseDownsample")

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check(input, "SparseDownsample")
        key_name = f"downsample_{self.factor}"
        down = x.get_spatial_cache(key_name)
        if down is None:
            f = to_device_async(torch.tensor(self.factor, dtype=torch.int32), x.device)  # no host sync
            coarse = x.coords.clone()
            coarse[:, 1:] = torch.div(coarse[:, 1:], f, rounding_mode="floor")
            uniq, inverse = torch.unique(coords_key(coarse), sorted=True, return_inverse=True)  # [M], [N]
            counts = torch.bincount(inverse, minlength=uniq.numel())  # [M]
            down = {"coords": key_coords(uniq), "inverse": inverse, "counts": counts, "cache": {}}
            x.register_spatial_cache(key_name, down)
            down["cache"][f"upsample_{self.factor}"] = {
                "coords": x.coords, "inverse": inverse, "cache": x.get_spatial_cache(),
                "batch_size": x.batch_size,
            }
        inverse, counts = down["inverse"], down["counts"]
        feats = x.feats.float() if x.dtype in (torch.float16, torch.bfloat16) else x.feats
        sums = feats.new_zeros(counts.numel(), *feats.shape[1:]).index_add_(0, inverse, feats)  # [M, C]
        denom = (counts + 1).to(sums.dtype).reshape(-1, *([1] * (feats.ndim - 1)))
        out_feats = (sums / denom).to(x.dtype)
        return SparseTensor(out_feats, down["coords"], shape=[x.batch_size], spatial_cache=down["cache"])


class SparseUpsample(nn.Module):
    """Copies coarse features back to the fine voxels of the matching ``SparseDownsample(factor)``."""

    def __init__(self, factor: int | Sequence[int]):
        super().__init__()
        self.factor = _factor3(factor, "SparseUpsample")

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check(input, "SparseUpsample")
        up = x.get_spatial_cache(f"upsample_{self.factor}")
        if up is None:
            raise ValueError(
                f"SparseUpsample(factor={self.factor}): the input was not produced by a "
                f"SparseDownsample with the same factor (no 'upsample_{self.factor}' entry in its cache)"
            )
        feats = x.feats[up["inverse"]]  # [N_fine, C]
        return SparseTensor(feats, up["coords"], shape=[up["batch_size"]], spatial_cache=up["cache"])


class SparseSubdivide(nn.Module):
    """Splits each voxel into its 8 children at twice the resolution (features copied)."""

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check(input, "SparseSubdivide")
        child = x.get_spatial_cache("subdivide")
        if child is None:
            k = torch.arange(8, device=x.device)
            offsets = torch.stack([torch.zeros_like(k), (k >> 2) & 1, (k >> 1) & 1, k & 1], 1).int()  # [8, 4]
            parent = x.coords.clone()
            parent[:, 1:] *= 2
            coords = (parent[:, None, :] + offsets[None]).reshape(-1, 4)  # [N, 8, 4] -> [8N, 4]
            child = {"coords": coords, "cache": {}}
            x.register_spatial_cache("subdivide", child)
        N = x.feats.shape[0]
        feats = x.feats[:, None].expand(N, 8, *x.feats.shape[1:]).reshape(N * 8, *x.feats.shape[1:])
        return SparseTensor(feats, child["coords"], shape=[x.batch_size], spatial_cache=child["cache"])
