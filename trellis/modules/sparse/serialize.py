"""Space-filling-curve orders of voxel coordinates (z-order / Morton and Hilbert).

``encode_seq(coords, mode, depth)`` returns one sortable int64 code per row. For ``[N, 4]``
``(b, x, y, z)`` coords the batch index occupies the bits above the ``3 * depth`` curve bits, so
sorting the codes groups rows by batch item and orders each item along the curve. Within each bit
triplet x is the most significant axis, then y, then z.

The Hilbert code uses Skilling's transpose algorithm (J. Skilling, "Programming the Hilbert curve",
AIP Conf. Proc. 707, 2004), vectorised over rows with a loop over the ``depth`` bits only.
"""

from __future__ import annotations

import torch

__all__ = ["encode_seq", "z_order_encode", "hilbert_encode"]


def _split(coords: torch.Tensor, depth: int, who: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    if coords.ndim != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"{who}: coords must be [N, 3] (x, y, z) or [N, 4] (b, x, y, z), got {list(coords.shape)}")
    if not 1 <= depth <= 20:
        raise ValueError(f"{who}: depth must be in [1, 20], got {depth}")
    c = coords.long()
    b = c[:, 0] if c.shape[1] == 4 else None
    xyz = [c[:, -3], c[:, -2], c[:, -1]]
    if c.shape[0] > 0 and (int(c[:, -3:].min()) < 0 or int(c[:, -3:].max()) >= (1 << depth)):
        raise ValueError(f"{who}: x, y, z must lie in [0, 2**{depth}) for depth={depth}")
    return b, xyz


def _interleave(axes: list[torch.Tensor], depth: int) -> torch.Tensor:
    """Bit interleave: bit i of axes[0], axes[1], axes[2] -> bits 3i+2, 3i+1, 3i of the code."""
    code = torch.zeros_like(axes[0])
    for i in range(depth):
        for a, v in enumerate(axes):
            code |= ((v >> i) & 1) << (3 * i + 2 - a)
    return code


def z_order_encode(coords: torch.Tensor, depth: int = 10) -> torch.Tensor:
    """Morton code ``[N]`` int64 of ``[N, 3|4]`` coords (batch in the high bits)."""
    b, xyz = _split(coords, depth, "z_order_encode")
    code = _interleave(xyz, depth)
    return code if b is None else code | (b << (3 * depth))


def hilbert_encode(coords: torch.Tensor, depth: int = 10) -> torch.Tensor:
    """Hilbert code ``[N]`` int64 of ``[N, 3|4]`` coords (batch in the high bits)."""
    b, xyz = _split(coords, depth, "hilbert_encode")
    X = [v.clone() for v in xyz]
    n = 3
    q = 1 << (depth - 1)
    while q > 1:  # inverse undo of the excess work
        p = q - 1
        for i in range(n):
            hit = (X[i] & q) != 0
            t = (X[0] ^ X[i]) & p
            X0_hit = X[0] ^ p
            X0_miss = X[0] ^ t
            Xi_miss = X[i] ^ t
            if i == 0:
                X[0] = torch.where(hit, X0_hit, X[0])  # (t is 0 for i == 0)
            else:
                X[i] = torch.where(hit, X[i], Xi_miss)
                X[0] = torch.where(hit, X0_hit, X0_miss)
        q >>= 1
    for i in range(1, n):  # Gray encode
        X[i] = X[i] ^ X[i - 1]
    t = torch.zeros_like(X[0])
    q = 1 << (depth - 1)
    while q > 1:
        t = torch.where((X[n - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    X = [v ^ t for v in X]
    code = _interleave(X, depth)
    return code if b is None else code | (b << (3 * depth))


def encode_seq(coords: torch.Tensor, mode: str = "z_order", depth: int = 10) -> torch.Tensor:
    """Sortable int64 code per row of ``coords`` (``[N, 3]`` or ``[N, 4]``) along ``mode``'s curve.

    ``mode``: ``'z_order'`` or ``'hilbert'``. ``depth``: bits per axis (coords in ``[0, 2**depth)``).
    """
    if mode == "z_order":
        return z_order_encode(coords, depth)
    if mode == "hilbert":
        return hilbert_encode(coords, depth)
    raise ValueError(f"encode_seq: unknown mode {mode!r}; valid: 'z_order', 'hilbert'")
