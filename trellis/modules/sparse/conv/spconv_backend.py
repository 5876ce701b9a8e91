"""spconv 2.x backend (``SPARSE_BACKEND=spconv``), imported lazily.

Our module keeps its parameters (``conv.weight (out, kx, ky, kz, in)``, the spconv layout); an
spconv module object is built once per our module, outside the module tree (no duplicate state-dict
keys), and given the same ``Parameter`` objects. spconv's index maps are kept in the sparse tensor's
spatial cache (``"spconv_indice_dict"``) so they are reused across layers, and so that a
``SparseInverseConv3d`` finds the map of its strided conv by ``indice_key``.

Output rows of strided spconv convs are in spconv's order, not the ``(b, x, y, z)`` order of the
torch backend; compare backends after sorting rows.
"""

from __future__ import annotations

from typing import Any

import torch

from trellis.backends import require_module
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.conv.kernel_map import spatial_shape_of

__all__ = ["spconv_conv"]


def _spconv() -> Any:
    return require_module("spconv.pytorch", "spconv", "Install it with `pip install spconv-cu12x` (GPU) "
                          "or `pip install spconv` (CPU), or use SPARSE_BACKEND=torch.")


def _module_for(layer: Any) -> Any:
    mod = layer.__dict__.get("_spconv_module")
    if mod is not None:
        return mod
    sp = _spconv()
    kind = type(layer).__name__
    key = layer.indice_key
    if kind == "SparseInverseConv3d":
        mod = sp.SparseInverseConv3d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                     bias=layer.conv.bias is not None, indice_key=key)
    elif layer.submanifold:
        mod = sp.SubMConv3d(layer.in_channels, layer.out_channels, layer.kernel_size, dilation=layer.dilation,
                            bias=layer.conv.bias is not None,
                            indice_key=key or f"subm:{layer.kernel_size}:{layer.dilation}")
    else:
        mod = sp.SparseConv3d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding or 0, dilation=layer.dilation,
                              bias=layer.conv.bias is not None, indice_key=key)
    object.__setattr__(layer, "_spconv_module", mod)  # not a registered child
    return mod


def spconv_conv(layer: Any, x: SparseTensor) -> SparseTensor:
    """Runs ``layer`` (our ``SparseConv3d`` / ``SparseInverseConv3d``) on ``x`` through spconv."""
    sp = _spconv()
    mod = _module_for(layer)
    mod.weight = layer.conv.weight
    mod.bias = layer.conv.bias
    mod.train(layer.training)
    indice_dict = x.get_spatial_cache("spconv_indice_dict")
    if indice_dict is None:
        indice_dict = {}
        x.register_spatial_cache("spconv_indice_dict", indice_dict)
    t = sp.SparseConvTensor(x.feats, x.coords, spatial_shape_of(x), x.batch_size, indice_dict=indice_dict)
    out = mod(t)
    if out.indices is x.coords or (out.indices.shape == x.coords.shape and type(layer).__name__ == "SparseConv3d"
                                   and layer.submanifold):
        return x.replace(out.features)
    if type(layer).__name__ == "SparseInverseConv3d":
        fine = x.get_spatial_cache(f"spconv_fine:{layer.indice_key}")
        if fine is not None and torch.equal(fine[0], out.indices):
            return SparseTensor(out.features, fine[0], shape=[out.batch_size], spatial_cache=fine[1])
        return SparseTensor(out.features, out.indices, shape=[out.batch_size])
    cache = {"spconv_indice_dict": dict(out.indice_dict), "spatial_shape": list(out.spatial_shape),
             f"spconv_fine:{layer.indice_key}": (x.coords, x.get_spatial_cache())}
    return SparseTensor(out.features, out.indices, shape=[out.batch_size], spatial_cache=cache)
