"""``SparseTensor``: a plain container for batched sparse voxel features.

A sparse tensor holds

* ``feats``  ``[N, C, ...]`` features, one row per active voxel,
* ``coords`` ``[N, 4]`` int32 ``(batch, x, y, z)``, rows of one batch item contiguous and batch items
  in increasing order (reference README 2.7),
* a *spatial cache*: a ``dict`` keyed by strings holding everything that depends only on the
  coordinates (batch layout, kernel maps, window partitions, down/up maps). Tensors that share
  coordinates share the cache object: ``replace(feats)`` keeps it, so a kernel map is built once per
  coordinate set.

It holds no backend object and does no backend dispatch. Per-batch operations are vectorised over
the batch index column (no Python loop over the batch).

Cheap checks (row counts, ``[N, 4]`` coords, same device, integer coords) always run. Expensive
invariants (batch sorted and contiguous, coords non-negative, no duplicate rows) run when the
environment variable ``SPARSE_DEBUG=1`` is set; it is read at every construction.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

__all__ = ["SparseTensor", "sparse_cat", "sparse_unbind", "sparse_debug_enabled"]


def sparse_debug_enabled() -> bool:
    """True when ``SPARSE_DEBUG`` is set to a true value (read at call time)."""
    return os.environ.get("SPARSE_DEBUG", "0").strip().lower() in ("1", "true", "yes", "on")


def _check_invariants(coords: torch.Tensor, batch_size: int | None) -> None:
    """Full invariant check (``SPARSE_DEBUG=1``): sorted, contiguous batches; non-negative; unique."""
    if coords.shape[0] == 0:
        return
    b = coords[:, 0].long()
    if bool((coords < 0).any()):
        raise ValueError("SparseTensor.coords: coordinates must be non-negative")
    if bool((b[1:] < b[:-1]).any()):
        raise ValueError("SparseTensor.coords: rows must be grouped by batch index in increasing order")
    if batch_size is not None and int(b.max()) >= batch_size:
        raise ValueError(f"SparseTensor.coords: batch index {int(b.max())} >= batch size {batch_size}")
    c = coords.long()
    key = (((c[:, 0] * 2048 + c[:, 1]) * 2048 + c[:, 2]) * 2048) + c[:, 3]
    if torch.unique(key).numel() != key.numel():
        raise ValueError("SparseTensor.coords: duplicate (batch, x, y, z) rows")


class SparseTensor:
    """Batched sparse voxel features.

    Args:
        feats: ``[N, C, ...]`` features.
        coords: ``[N, 4]`` integer ``(batch, x, y, z)``; converted to int32. Rows grouped by batch.
        shape: optional ``torch.Size([B, C, ...])``; gives the batch size explicitly (trailing empty
            batch items). Default: ``B = max(batch) + 1``.
        spatial_cache: optional cache dict to share (tensors with the same coords); internal.
    """

    __slots__ = ("feats", "coords", "_batch_size", "_cache")

    def __init__(
        self,
        feats: torch.Tensor,
        coords: torch.Tensor,
        shape: Sequence[int] | None = None,
        layout: list[slice] | None = None,
        spatial_cache: dict[str, Any] | None = None,
    ):
        if not isinstance(feats, torch.Tensor) or not isinstance(coords, torch.Tensor):
            raise TypeError(
                f"SparseTensor: feats and coords must be tensors, got {type(feats).__name__}, "
                f"{type(coords).__name__}"
            )
        if coords.ndim != 2 or coords.shape[1] != 4:
            raise ValueError(f"SparseTensor.coords: expected shape [N, 4], got {list(coords.shape)}")
        if feats.ndim < 1 or feats.shape[0] != coords.shape[0]:
            raise ValueError(
                f"SparseTensor: feats has {feats.shape[0] if feats.ndim else 0} rows but coords has "
                f"{coords.shape[0]} (feats {list(feats.shape)}, coords {list(coords.shape)})"
            )
        if feats.device != coords.device:
            raise ValueError(f"SparseTensor: feats on {feats.device} but coords on {coords.device}")
        if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
            raise TypeError(f"SparseTensor.coords: expected an integer dtype, got {coords.dtype}")
        if coords.dtype != torch.int32:
            coords = coords.to(torch.int32)
        self.feats = feats
        self.coords = coords
        self._batch_size = int(shape[0]) if shape is not None else None
        self._cache = spatial_cache if spatial_cache is not None else {}
        if layout is not None:
            self._cache.setdefault("layout", list(layout))
            if self._batch_size is None:
                self._batch_size = len(layout)
        if sparse_debug_enabled():
            _check_invariants(coords, self._batch_size)

    # ------------------------------------------------------------------ cache
    def get_spatial_cache(self, key: str | None = None) -> Any:
        """The cached value for ``key`` (``None`` if absent), or the whole cache dict for ``key=None``."""
        if key is None:
            return self._cache
        return self._cache.get(key)

    def register_spatial_cache(self, key: str, value: Any) -> None:
        """Stores ``value`` under ``key``; visible to every tensor sharing these coordinates."""
        if not isinstance(key, str):
            raise TypeError(f"SparseTensor.register_spatial_cache: key must be a str, got {type(key).__name__}")
        self._cache[key] = value

    # ------------------------------------------------------------------ batch structure
    @property
    def batch_size(self) -> int:
        if self._batch_size is None:
            bs = self._cache.get("batch_size")
            if bs is None:
                bs = int(self.coords[:, 0].max()) + 1 if self.coords.shape[0] > 0 else 0
                self._cache["batch_size"] = bs
            self._batch_size = bs
        return self._batch_size

    @property
    def batch_ids(self) -> torch.Tensor:
        """``[N]`` int64 batch index of each row (cached)."""
        key = "batch_ids"
        ids = self._cache.get(key)
        if ids is None:
            ids = self.coords[:, 0].long()
            self._cache[key] = ids
        return ids

    @property
    def batch_counts(self) -> torch.Tensor:
        """``[B]`` int64 number of rows of each batch item (cached)."""
        key = f"batch_counts_{self.batch_size}"
        counts = self._cache.get(key)
        if counts is None:
            counts = torch.bincount(self.batch_ids, minlength=self.batch_size)
            if counts.numel() > self.batch_size:
                raise ValueError(
                    f"SparseTensor: coords contain batch index {counts.numel() - 1} >= batch size {self.batch_size}"
                )
            self._cache[key] = counts
        return counts

    @property
    def layout(self) -> list[slice]:
        """One ``slice`` of rows per batch item (computed once per coordinate set, vectorised)."""
        key = f"layout_{self.batch_size}"
        layout = self._cache.get(key)
        if layout is None:
            layout = self._cache.get("layout")
            if layout is None or len(layout) != self.batch_size:
                ends = torch.cumsum(self.batch_counts, 0).tolist()
                starts = [0] + ends[:-1]
                layout = [slice(s, e) for s, e in zip(starts, ends)]
            self._cache[key] = layout
        return layout

    @property
    def shape(self) -> torch.Size:
        """``torch.Size([B, C, ...])``."""
        return torch.Size([self.batch_size, *self.feats.shape[1:]])

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def requires_grad(self) -> bool:
        return self.feats.requires_grad

    def dim(self) -> int:
        return self.feats.dim()

    def __len__(self) -> int:
        """Number of batch items."""
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"SparseTensor(shape={list(self.shape)}, voxels={self.coords.shape[0]}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # ------------------------------------------------------------------ construction
    def replace(self, feats: torch.Tensor, coords: torch.Tensor | None = None) -> SparseTensor:
        """A tensor with new ``feats`` (same row count). Same coords keep the shared cache."""
        if coords is None or coords is self.coords:
            out = SparseTensor.__new__(SparseTensor)
            if feats.ndim < 1 or feats.shape[0] != self.coords.shape[0]:
                raise ValueError(
                    f"SparseTensor.replace: feats has {feats.shape[0] if feats.ndim else 0} rows, "
                    f"expected {self.coords.shape[0]}"
                )
            if feats.device != self.coords.device:
                raise ValueError(f"SparseTensor.replace: feats on {feats.device} but coords on {self.coords.device}")
            out.feats = feats
            out.coords = self.coords
            out._batch_size = self._batch_size
            out._cache = self._cache
            return out
        return SparseTensor(feats, coords)

    def _with(self, feats: torch.Tensor, coords: torch.Tensor, cache: dict | None) -> SparseTensor:
        out = SparseTensor.__new__(SparseTensor)
        out.feats, out.coords, out._batch_size, out._cache = feats, coords, self._batch_size, cache
        if out._cache is None:
            out._cache = {}
        return out

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """Like ``Tensor.to``: dtype applies to feats only; a device change drops the cache."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return self._with(feats, self.coords, self._cache)
        return self._with(feats, self.coords.to(feats.device, non_blocking=bool(kwargs.get("non_blocking"))), None)

    def type(self, dtype: torch.dtype) -> SparseTensor:
        return self.replace(self.feats.type(dtype))

    def half(self) -> SparseTensor:
        return self.replace(self.feats.half())

    def float(self) -> SparseTensor:
        return self.replace(self.feats.float())

    def bfloat16(self) -> SparseTensor:
        return self.replace(self.feats.bfloat16())

    def cpu(self) -> SparseTensor:
        return self.to("cpu")

    def cuda(self, device: int | str | torch.device | None = None) -> SparseTensor:
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    def detach(self) -> SparseTensor:
        return self.replace(self.feats.detach())

    def clone(self) -> SparseTensor:
        return self.replace(self.feats.clone())

    def reshape(self, *shape: int) -> SparseTensor:
        """Reshapes the feature dims: ``x.reshape(H, D)`` gives feats ``[N, H, D]``."""
        return self.replace(self.feats.reshape(self.feats.shape[0], *shape))

    # ------------------------------------------------------------------ arithmetic
    def _operand(self, other: Any, op: str) -> Any:
        if isinstance(other, SparseTensor):
            if other.coords is not self.coords and (
                other.coords.shape != self.coords.shape or not torch.equal(other.coords, self.coords)
            ):
                raise ValueError(f"SparseTensor {op}: operands have different coordinates")
            return other.feats
        if isinstance(other, torch.Tensor) and other.ndim == self.feats.ndim and other.ndim > 0:
            # per-batch operand [B, ...] broadcast to the rows of each batch item
            if other.shape[0] != self.batch_size:
                raise ValueError(
                    f"SparseTensor {op}: per-batch operand has shape {list(other.shape)}, expected "
                    f"leading dim {self.batch_size} (batch size)"
                )
            return other.to(self.device)[self.batch_ids]
        return other

    def __neg__(self) -> SparseTensor:
        return self.replace(-self.feats)

    def __add__(self, other: Any) -> SparseTensor:
        return self.replace(self.feats + self._operand(other, "+"))

    def __radd__(self, other: Any) -> SparseTensor:
        return self.replace(self._operand(other, "+") + self.feats)

    def __sub__(self, other: Any) -> SparseTensor:
        return self.replace(self.feats - self._operand(other, "-"))

    def __rsub__(self, other: Any) -> SparseTensor:
        return self.replace(self._operand(other, "-") - self.feats)

    def __mul__(self, other: Any) -> SparseTensor:
        return self.replace(self.feats * self._operand(other, "*"))

    def __rmul__(self, other: Any) -> SparseTensor:
        return self.replace(self._operand(other, "*") * self.feats)

    def __truediv__(self, other: Any) -> SparseTensor:
        return self.replace(self.feats / self._operand(other, "/"))

    def __rtruediv__(self, other: Any) -> SparseTensor:
        return self.replace(self._operand(other, "/") / self.feats)

    # ------------------------------------------------------------------ views
    def dense(self, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Dense ``[B, C, X, Y, Z]`` (feats must be ``[N, C]``); empty sites are zero.

        ``spatial_shape`` defaults to ``max(coords) + 1`` per axis.
        """
        if self.feats.ndim != 2:
            raise ValueError(f"SparseTensor.dense: feats must be [N, C], got {list(self.feats.shape)}")
        if spatial_shape is None:
            if self.coords.shape[0] == 0:
                raise ValueError("SparseTensor.dense: empty tensor needs an explicit spatial_shape")
            spatial_shape = (self.coords[:, 1:].max(0).values + 1).tolist()
        X, Y, Z = (int(s) for s in spatial_shape)
        B, C = self.batch_size, self.feats.shape[1]
        out = self.feats.new_zeros(B, X, Y, Z, C)
        c = self.coords.long()
        out[c[:, 0], c[:, 1], c[:, 2], c[:, 3]] = self.feats
        return out.permute(0, 4, 1, 2, 3).contiguous()  # [B, X, Y, Z, C] -> [B, C, X, Y, Z]

    def __getitem__(self, idx: int | Sequence[int] | torch.Tensor | slice) -> SparseTensor:
        """Batch indexing: ``x[i]`` (one item, batch index 0), ``x[[0, 2]]``, ``x[1:3]`` (re-indexed)."""
        B = self.batch_size
        if isinstance(idx, int):
            if not -B <= idx < B:
                raise IndexError(f"SparseTensor: batch index {idx} out of range for batch size {B}")
            idx = [idx % B]
        elif isinstance(idx, slice):
            idx = list(range(B))[idx]
        elif isinstance(idx, torch.Tensor):
            if idx.dtype == torch.bool:
                idx = torch.nonzero(idx).flatten()
            idx = idx.flatten().tolist()
        idx = [int(i) % B if -B <= int(i) < B else _raise_index(int(i), B) for i in idx]
        sel = torch.tensor(idx, dtype=torch.long, device=self.device)
        counts = self.batch_counts[sel]  # [K]
        starts = (torch.cumsum(self.batch_counts, 0) - self.batch_counts)[sel]  # [K]
        new_b = torch.repeat_interleave(torch.arange(len(idx), device=self.device), counts)  # [M]
        offs = torch.arange(new_b.numel(), device=self.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        rows = starts[new_b] + offs  # [M] source rows, item by item
        coords = self.coords[rows].clone()
        coords[:, 0] = new_b.to(torch.int32)
        return SparseTensor(self.feats[rows], coords, shape=[len(idx)])

    def unbind(self, dim: int = 0) -> list[SparseTensor]:
        return sparse_unbind(self, dim)


def _raise_index(i: int, B: int) -> int:
    raise IndexError(f"SparseTensor: batch index {i} out of range for batch size {B}")


def sparse_cat(inputs: Sequence[SparseTensor], dim: int = 0) -> SparseTensor:
    """Concatenates sparse tensors.

    ``dim=0``: along the batch (batch indices offset; the result has a fresh cache).
    ``dim>=1`` or negative: along a feature dim; all inputs must share coords (cache kept from the first).
    """
    if len(inputs) == 0:
        raise ValueError("sparse_cat: empty input list")
    if dim == 0:
        feats, coords, offset = [], [], 0
        for x in inputs:
            c = x.coords.clone()
            c[:, 0] += offset
            offset += x.batch_size
            feats.append(x.feats)
            coords.append(c)
        return SparseTensor(torch.cat(feats, 0), torch.cat(coords, 0), shape=[offset])
    first = inputs[0]
    fdim = dim if dim > 0 else first.feats.ndim + dim
    if fdim <= 0 or fdim >= first.feats.ndim:
        raise ValueError(f"sparse_cat: dim {dim} out of range for feats of shape {list(first.feats.shape)}")
    feats = [first.feats] + [first._operand(x, "cat") for x in inputs[1:]]
    return first.replace(torch.cat(feats, fdim))


def sparse_unbind(input: SparseTensor, dim: int = 0) -> list[SparseTensor]:
    """``dim=0``: one single-item tensor per batch item. Else unbinds a feature dim (same coords)."""
    if dim == 0:
        return [input[i] for i in range(input.batch_size)]
    fdim = dim if dim > 0 else input.feats.ndim + dim
    if fdim <= 0 or fdim >= input.feats.ndim:
        raise ValueError(f"sparse_unbind: dim {dim} out of range for feats of shape {list(input.feats.shape)}")
    return [input.replace(f) for f in input.feats.unbind(fdim)]
