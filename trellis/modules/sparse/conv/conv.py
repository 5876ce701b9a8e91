"""``SparseConv3d`` and ``SparseInverseConv3d`` modules.

Parameters live in a child ``conv`` so the state-dict keys are ``<module>.conv.weight``
``(out, kx, ky, kz, in)`` and ``<module>.conv.bias`` ``(out,)``, the layout of spconv 2.x and of the
released TRELLIS checkpoints (reference README 2.1). Output coordinates are defined in
``kernel_map``'s docstring.

Kernel size 1 reproduces spconv's 1x1x1 shortcut (reference README 2.1): the effective op is
``y = x @ W.reshape(in, out) + b`` (a reinterpretation of the stored memory, not ``x @ W[:,0,0,0,:].T``).

The backend is resolved per call (``trellis.backends.sparse_conv_backend()``, env ``SPARSE_BACKEND``):
``torch`` (gather-GEMM-scatter), ``triton`` (implicit GEMM, CUDA), ``spconv``, or ``auto``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from trellis.backends import BackendError, has_module, sparse_conv_backend
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.conv.kernel_map import KernelMap, strided_map, submanifold_map
from trellis.modules.sparse.conv.torch_backend import conv_torch

__all__ = ["SparseConv3d", "SparseInverseConv3d", "sparse_conv_features", "resolve_conv_backend"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"SparseConv3d: {name} must be an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def resolve_conv_backend(x: SparseTensor) -> str:
    """``torch``, ``triton`` or ``spconv`` for this input (``auto``: ``triton`` for CUDA fp16 / bf16 / fp32
    when Triton is importable, else ``torch``)."""
    name = sparse_conv_backend()
    if name == "auto":
        fast = x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "triton" if fast and has_module("triton") else "torch"
    if name == "triton" and x.device.type != "cuda":
        raise BackendError(f"SPARSE_BACKEND=triton needs CUDA tensors; got a tensor on {x.device}")
    if name == "triton" and not has_module("triton"):
        raise BackendError("SPARSE_BACKEND=triton but the package 'triton' is not importable")
    return name


def sparse_conv_features(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, backend: str) -> torch.Tensor:
    """``[N_in, C_in]`` feats, ``[K, C_in, C_out]`` weight -> ``[N_out, C_out]`` with the given backend."""
    if backend == "torch":
        return conv_torch(feats, weight, kmap)
    if backend == "triton":
        from trellis.modules.sparse.conv.triton_conv import conv_triton

        return conv_triton(feats, weight, kmap)
    raise BackendError(f"sparse_conv_features: unknown backend {backend!r}")


def _match_dtypes(feats: torch.Tensor, weight: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    dev = feats.device.type
    if torch.is_autocast_enabled(dev) if hasattr(torch, "get_autocast_dtype") else torch.is_autocast_enabled():
        dt = torch.get_autocast_dtype(dev) if hasattr(torch, "get_autocast_dtype") else torch.get_autocast_gpu_dtype()
        return feats.to(dt), weight.to(dt)
    if feats.dtype != weight.dtype:
        raise TypeError(f"{who}: input dtype {feats.dtype} does not match weight dtype {weight.dtype}")
    return feats, weight


class SparseConvParams(nn.Module):
    """Holds ``weight (out, kx, ky, kz, in)`` and ``bias (out,)`` (the child named ``conv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int], bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, *kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * math.prod(kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class _SparseConvBase(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, dilation, padding, bias, indice_key):
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"{type(self).__name__}: channels must be positive, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _triple(kernel_size, "kernel_size")
        self.stride = _triple(stride, "stride")
        self.dilation = _triple(dilation, "dilation")
        self.padding = None if padding is None else _triple(padding, "padding")
        self.indice_key = indice_key
        self.conv = SparseConvParams(self.in_channels, self.out_channels, self.kernel_size, bias)

    def _weight_kio(self) -> torch.Tensor:
        """``(out, kx, ky, kz, in)`` -> ``[K, in, out]``."""
        w = self.conv.weight
        return w.reshape(self.out_channels, -1, self.in_channels).permute(1, 2, 0)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.conv.bias is None else y + self.conv.bias.to(y.dtype)

    def _check_input(self, x: object) -> SparseTensor:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} expects a SparseTensor, got {type(x).__name__}")
        if x.feats.ndim != 2 or x.feats.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected feats [N, {self.in_channels}], got {list(x.feats.shape)}"
            )
        return x

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, padding={self.padding}")


class SparseConv3d(_SparseConvBase):
    """Sparse 3D convolution: submanifold at stride 1 with ``padding=None``, strided otherwise.

    Args:
        in_channels, out_channels: feature widths.
        kernel_size, stride, dilation: int or 3 ints.
        padding: ``None`` (submanifold at stride 1, 0 when strided) or int / 3 ints (regular conv).
        bias: learnable bias.
        indice_key: names the map that ``SparseInverseConv3d(indice_key=...)`` inverts (strided convs);
            submanifold maps are cached per coordinate set automatically.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1,
                 padding: int | Sequence[int] | None = None, bias: bool = True, indice_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, padding, bias, indice_key)
        self.submanifold = self.stride == (1, 1, 1) and self.padding is None
        self.is_1x1 = self.kernel_size == (1, 1, 1)
        if self.is_1x1 and self.stride != (1, 1, 1):
            raise ValueError("SparseConv3d: kernel_size 1 with stride > 1 is not supported "
                             "(spconv's 1x1x1 path ignores the stride)")

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = self._check_input(input)
        if self.is_1x1 and (self.padding is None or self.padding == (0, 0, 0)):
            feats, w = _match_dtypes(x.feats, self.conv.weight, "SparseConv3d")
            y = feats @ w.reshape(self.in_channels, self.out_channels)  # spconv 1x1x1 quirk
            return x.replace(self._add_bias(y))
        backend = resolve_conv_backend(x)
        if backend == "spconv":
            from trellis.modules.sparse.conv.spconv_backend import spconv_conv

            return spconv_conv(self, x)
        feats, w = _match_dtypes(x.feats, self._weight_kio(), "SparseConv3d")
        if self.submanifold:
            kmap = submanifold_map(x, self.kernel_size, self.dilation)
            return x.replace(self._add_bias(sparse_conv_features(feats, w, kmap, backend)))
        padding = self.padding or (0, 0, 0)
        kmap, out_coords, out_shape = strided_map(x, self.kernel_size, self.stride, padding, self.dilation)
        cache_key = f"conv_out:{self.kernel_size}:{self.stride}:{padding}:{self.dilation}"
        out_cache = x.get_spatial_cache(cache_key)
        if out_cache is None:
            out_cache = {"spatial_shape": out_shape}
            x.register_spatial_cache(cache_key, out_cache)
        out_cache[f"conv_inverse:{self.indice_key}"] = {
            "kmap": kmap, "coords": x.coords, "cache": x.get_spatial_cache(), "batch_size": x.batch_size,
            "kernel_size": self.kernel_size,
        }
        y = self._add_bias(sparse_conv_features(feats, w, kmap, backend))
        return SparseTensor(y, out_coords, shape=[x.batch_size], spatial_cache=out_cache)


class SparseInverseConv3d(_SparseConvBase):
    """Inverse of the strided ``SparseConv3d`` with the same ``indice_key``: outputs are that conv's
    input sites, and each (input, output, offset) pair of its map is used in reverse, i.e. the
    transposed convolution evaluated at those sites."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1, bias: bool = True,
                 indice_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, None, bias, indice_key)

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = self._check_input(input)
        backend = resolve_conv_backend(x)
        if backend == "spconv":
            from trellis.modules.sparse.conv.spconv_backend import spconv_conv

            return spconv_conv(self, x)
        inv = x.get_spatial_cache(f"conv_inverse:{self.indice_key}")
        if inv is None:
            raise ValueError(
                f"SparseInverseConv3d(indice_key={self.indice_key!r}): the input was not produced by a strided "
                f"SparseConv3d with the same indice_key"
            )
        if inv["kernel_size"] != self.kernel_size:
            raise ValueError(f"SparseInverseConv3d: kernel_size {self.kernel_size} does not match the strided "
                             f"conv's {inv['kernel_size']} (indice_key={self.indice_key!r})")
        feats, w = _match_dtypes(x.feats, self._weight_kio(), "SparseInverseConv3d")
        y = self._add_bias(sparse_conv_features(feats, w, inv["kmap"].transposed(), backend))
        return SparseTensor(y, inv["coords"], shape=[inv["batch_size"]], spatial_cache=inv["cache"])
