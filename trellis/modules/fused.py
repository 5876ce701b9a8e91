"""Fused element-wise regions of the transformer blocks, compiled one region at a time.

The sparse SLat flow model cannot go through ``torch.compile`` as a whole (the ``SparseTensor``
caches do not survive dynamo), yet a third of its training step is element-wise work around the
matmuls and the attention: float32 LayerNorms, the adaLN modulation gathered per voxel, gated
residuals, the q/k RMS norm. This module offers that work as small pure-tensor functions on
``feats [N, C]`` plus the row-to-batch map ``batch_ids [N]`` and per-batch vectors ``[B, C]``:

* :func:`add_layer_norm`: ``res = x + gate[b] * h`` (or ``x + h``, or just ``x``), then
  ``y = LN(res)`` (statistics in float32, optional affine) ``* (1 + scale[b]) + shift[b]``;
* :func:`gated_residual`: ``x + gate[b] * h``;
* :func:`rms_norm_heads`: the per-head q/k RMS norm of ``MultiHeadRMSNorm``; :func:`rms_norm_qk`
  both of an attention's norms in one region.

The per-voxel rows ``v[batch_ids]`` are gathered inside the region, never materialised as
``[N, 6C]``. The first two are ``torch.autograd.Function``\\ s with a hand-written backward whose
per-batch gradients are segment sums over each batch item's rows, done as a one-hot GEMM
(``[B, N] @ [N, C]``; deterministic, no atomics). Their forward and backward bodies are plain tensor
functions, run eagerly or through ``torch.compile`` (which fuses each into one or two kernels); the
RMS norm is compiled with its autograd.

Modes (per module, see :func:`set_fused`; the default follows the environment variable
``TRELLIS_FUSED``, read at every call):

* ``"off"`` (``TRELLIS_FUSED`` unset, ``0``): the modules run their original code.
* ``"eager"`` (``TRELLIS_FUSED=eager``): the fused functions, not compiled. The forward is
  bit-for-bit the original maths; the gradients are the same up to rounding (float32 throughout).
  A reference for tests and the CPU.
* ``"compile"`` (``TRELLIS_FUSED=1``): the fused functions through ``torch.compile``. Rows and batch
  size are marked dynamic (the channel width stays static), so varying token counts reuse one graph.

Inside a whole-model ``torch.compile`` (the dense models) the modules always run their original
code and let the outer compile fuse it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FUSED_MODES",
    "FusedRegionsMixin",
    "FusedSetting",
    "add_layer_norm",
    "env_fused_mode",
    "fused_kernels",
    "gated_residual",
    "rms_norm_heads",
    "rms_norm_qk",
    "segment_sum",
    "set_fused",
]

FUSED_MODES = ("off", "eager", "compile")
_ENV = "TRELLIS_FUSED"
_ENV_VALUES = {"": "off", "0": "off", "off": "off", "false": "off", "no": "off",
               "1": "compile", "on": "compile", "true": "compile", "yes": "compile", "compile": "compile",
               "eager": "eager"}


def env_fused_mode() -> str:
    """The mode named by ``TRELLIS_FUSED`` (read now): ``"off"``, ``"eager"`` or ``"compile"``."""
    raw = os.environ.get(_ENV, "").strip().lower()
    if raw not in _ENV_VALUES:
        raise ValueError(f"{_ENV}={raw!r}: expected one of 0/1/off/on/eager/compile")
    return _ENV_VALUES[raw]


@dataclasses.dataclass(frozen=True)
class FusedSetting:
    """A module's fused mode and, for ``"compile"``, the ``torch.compile`` kwargs (sorted items)."""

    mode: str = "off"
    compile_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.mode not in FUSED_MODES:
            raise ValueError(f"fused mode must be one of {FUSED_MODES}, got {self.mode!r}")


def set_fused(module: nn.Module, mode: str | None = "compile", **compile_kwargs: Any) -> int:
    """Sets the fused mode of every sub-module of ``module`` that has fused regions (those with a
    ``fused_setting`` attribute); ``mode=None`` returns them to following ``TRELLIS_FUSED``.

    ``compile_kwargs`` go to ``torch.compile`` of each region (e.g. ``backend="eager"``); the
    default is ``dynamic=None`` with the row and batch dims marked dynamic. Returns how many
    sub-modules were set. Parameters and state-dict keys are untouched.
    """
    if mode is not None and mode not in FUSED_MODES:
        raise ValueError(f"set_fused: mode must be one of {FUSED_MODES} or None, got {mode!r}")
    setting = None if mode is None else FusedSetting(mode, tuple(sorted(compile_kwargs.items())))
    count = 0
    for m in module.modules():
        if hasattr(m, "fused_setting"):
            m.fused_setting = setting
            count += 1
    return count


class FusedRegionsMixin:
    """For models that are not compiled whole: ``compile_fused_regions`` compiles their fused
    element-wise regions instead. The trainer's ``compile`` argument calls it when a model has it."""

    def compile_fused_regions(self, **compile_kwargs: Any) -> int:
        """``set_fused(self, "compile", **compile_kwargs)``; returns the number of fused modules."""
        return set_fused(self, "compile", **compile_kwargs)


# ---------------------------------------------------------------------------------------------
# Pure tensor functions. Each public entry point has its own top-level function (its own code
# object), so each gets its own dynamo cache and recompile budget.
# ---------------------------------------------------------------------------------------------
def _residual(x: torch.Tensor, h: torch.Tensor | None, gate: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    if h is None:
        return x
    if gate is None:
        return x + h
    return x + gate[ids] * h  # the same values and rounding as x + gate_rows * h


def _norm(res: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
          shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float):
    """``LayerNorm32`` (float32 statistics, output cast back) then the adaLN modulation."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y, mean, rstd = torch.native_layer_norm(res.float(), (res.shape[-1],), w, b, eps)  # = F.layer_norm
    y = y.to(res.dtype)
    if scale is not None:
        y = y * (1 + scale)[ids] + shift[ids]  # (1 + scale)[ids] == 1 + scale[ids], element by element
    return y, mean, rstd


def _segment_sum(v: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``out[b] = sum of v[i] over the rows i with ids[i] == b``: ``one_hot(ids).T @ v``, ``[B, K]``."""
    one_hot = (ids[:, None] == torch.arange(batch_size, device=ids.device)[None, :]).to(v.dtype)  # [N, B]
    return one_hot.t() @ v  # [B, N] @ [N, K] -> [B, K]


def segment_sum(v: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic segment sum of the rows of ``v [N, K]`` by ``ids [N]`` into ``[batch_size, K]``."""
    return _segment_sum(v, ids, batch_size)


def _add_norm_backward(g_res, g_y, res, h, gate, ids, mean, rstd, weight, shift, scale, x_dtype):
    """Gradients of :func:`_residual` + :func:`_norm`, all arithmetic in float32.

    Returns ``(g_x, g_h, g_gate, g_weight, g_bias, g_shift, g_scale)`` (None where not applicable).
    """
    gy = g_y.float()
    xhat = (res.float() - mean) * rstd  # [N, C]
    g_shift = g_scale = g_weight = g_bias = None
    if scale is not None:  # modulated LN has no affine (checked by add_layer_norm)
        B = scale.shape[0]
        g_n = gy * (1 + scale)[ids].float()
        g_shift = _segment_sum(g_y.to(shift.dtype), ids, B)
        g_scale = _segment_sum((gy * xhat).to(scale.dtype), ids, B)
    else:
        g_n = gy
    if weight is not None:
        g_weight = (g_n * xhat).sum(0).to(weight.dtype)
        g_bias = g_n.sum(0).to(weight.dtype)
        g_xhat = g_n * weight.float()
    else:
        g_xhat = g_n
    g_x = rstd * (g_xhat - g_xhat.mean(-1, keepdim=True) - xhat * (g_xhat * xhat).mean(-1, keepdim=True))
    if g_res is not None:
        g_x = g_x + g_res.float()
    g_h = g_gate = None
    if h is not None:
        if gate is None:
            g_h = g_x.to(h.dtype)
        else:
            g_h = (g_x * gate[ids].float()).to(h.dtype)
            g_gate = _segment_sum((g_x * h.float()).to(gate.dtype), ids, gate.shape[0])
    return g_x.to(x_dtype), g_h, g_gate, g_weight, g_bias, g_shift, g_scale


# Forward / backward bodies, one per use in the block (each its own code object, see above).
def _modnorm_fwd(x, ids, shift, scale, eps):
    """LN + modulation (no residual input)."""
    return _norm(x, ids, None, None, shift, scale, eps)


def _modnorm_bwd(g_y, x, ids, mean, rstd, shift, scale):
    return _add_norm_backward(None, g_y, x, None, None, ids, mean, rstd, None, shift, scale, x.dtype)


def _gated_add_norm_fwd(x, h, gate, ids, weight, bias, eps):
    """Gated residual + affine LN."""
    res = _residual(x, h, gate, ids)
    y, mean, rstd = _norm(res, ids, weight, bias, None, None, eps)
    return res, y, mean, rstd


def _gated_add_norm_bwd(g_res, g_y, res, h, gate, ids, mean, rstd, weight, x_dtype):
    return _add_norm_backward(g_res, g_y, res, h, gate, ids, mean, rstd, weight, None, None, x_dtype)


def _add_modnorm_fwd(x, h, ids, shift, scale, eps):
    """Residual + LN + modulation."""
    res = _residual(x, h, None, ids)
    y, mean, rstd = _norm(res, ids, None, None, shift, scale, eps)
    return res, y, mean, rstd


def _add_modnorm_bwd(g_res, g_y, res, h, ids, mean, rstd, shift, scale, x_dtype):
    return _add_norm_backward(g_res, g_y, res, h, None, ids, mean, rstd, None, shift, scale, x_dtype)


def _add_norm_fwd(x, h, gate, ids, weight, bias, shift, scale, eps):
    """Any other combination."""
    res = _residual(x, h, gate, ids)
    y, mean, rstd = _norm(res, ids, weight, bias, shift, scale, eps)
    return res, y, mean, rstd


def _add_norm_bwd(g_res, g_y, res, h, gate, ids, mean, rstd, weight, shift, scale, x_dtype):
    return _add_norm_backward(g_res, g_y, res, h, gate, ids, mean, rstd, weight, shift, scale, x_dtype)


def _gated_residual_fwd(x, h, gate, ids):
    return x + gate[ids] * h


def _gated_residual_bwd(g, h, gate, ids):
    gf = g.float()
    g_h = (gf * gate[ids].float()).to(h.dtype)
    g_gate = _segment_sum((gf * h.float()).to(gate.dtype), ids, gate.shape[0])
    return g_h, g_gate


def _rms_norm_qk(q, k, gamma_q, gamma_k, scale: float):
    return _rms_norm_heads(q, gamma_q, scale), _rms_norm_heads(k, gamma_k, scale)


def _rms_norm_heads(x, gamma, scale: float):
    return (F.normalize(x.float(), dim=-1) * gamma.float() * scale).to(x.dtype)  # MultiHeadRMSNorm's maths


_BODIES = {
    "modnorm_fwd": _modnorm_fwd, "modnorm_bwd": _modnorm_bwd,
    "gated_add_norm_fwd": _gated_add_norm_fwd, "gated_add_norm_bwd": _gated_add_norm_bwd,
    "add_modnorm_fwd": _add_modnorm_fwd, "add_modnorm_bwd": _add_modnorm_bwd,
    "add_norm_fwd": _add_norm_fwd, "add_norm_bwd": _add_norm_bwd,
    "gated_residual_fwd": _gated_residual_fwd, "gated_residual_bwd": _gated_residual_bwd,
    "rms_norm_heads": _rms_norm_heads, "rms_norm_qk": _rms_norm_qk,
}


class _Kernels:
    """The bodies of one setting: the plain functions, or each wrapped in ``torch.compile``."""

    def __init__(self, setting: FusedSetting):
        self.setting = setting
        self.compiled = setting.mode == "compile"
        kwargs = dict(setting.compile_kwargs)
        for name, fn in _BODIES.items():
            setattr(self, name, torch.compile(fn, **kwargs) if self.compiled else fn)

    def mark_rows(self, *tensors: torch.Tensor | None) -> None:
        """Marks dim 0 (rows N, or batch B) of each tensor dynamic for the compiled bodies."""
        if not self.compiled:
            return
        for t in tensors:
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 0)


_KERNELS: dict[tuple[str, str], _Kernels] = {}


def _kernels_for(setting: FusedSetting) -> _Kernels:
    key = (setting.mode, repr(setting.compile_kwargs))  # kwargs may hold unhashable values (options={...})
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _Kernels(setting)
    return k


def fused_kernels(module: nn.Module) -> _Kernels | None:
    """The fused bodies ``module`` should use now, or None for its original code: its own
    ``fused_setting`` if set, else ``TRELLIS_FUSED``; always None inside a whole-model compile."""
    if torch.compiler.is_compiling():  # first: nothing below is traced by an outer compile
        return None
    setting = getattr(module, "fused_setting", None)
    if setting is None:
        mode = env_fused_mode()
        if mode == "off":
            return None
        setting = FusedSetting(mode)
    if setting.mode == "off":
        return None
    return _kernels_for(setting)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------------------------
class _AddNorm(torch.autograd.Function):
    """``(res, y)`` of :func:`add_layer_norm`; only ``y`` when there is no residual input ``h``."""

    @staticmethod
    def forward(ctx, x, h, gate, ids, weight, bias, shift, scale, eps, kern):
        ctx.set_materialize_grads(False)
        kern.mark_rows(x, h, ids, gate, shift, scale)
        with _no_autocast(x.device):
            if h is None:
                y, mean, rstd = kern.modnorm_fwd(x, ids, shift, scale, eps)
                res = x
            elif gate is not None and weight is not None and scale is None:
                res, y, mean, rstd = kern.gated_add_norm_fwd(x, h, gate, ids, weight, bias, eps)
            elif gate is None and weight is None and scale is not None:
                res, y, mean, rstd = kern.add_modnorm_fwd(x, h, ids, shift, scale, eps)
            else:
                res, y, mean, rstd = kern.add_norm_fwd(x, h, gate, ids, weight, bias, shift, scale, eps)
        ctx.kern = kern
        ctx.has_h = h is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(res, h, gate, ids, mean, rstd, weight, shift, scale)
        if h is None:
            return y
        return res, y

    @staticmethod
    def backward(ctx, *grads):
        res, h, gate, ids, mean, rstd, weight, shift, scale = ctx.saved_tensors
        kern = ctx.kern
        g_res, g_y = (grads if ctx.has_h else (None, grads[0]))
        if g_y is None:  # y unused: only the residual sum carries gradient
            if g_res is None:
                return (None,) * 10
            g_y = torch.zeros_like(res, dtype=torch.float32)
        kern.mark_rows(g_res, g_y, res, h, ids, mean, rstd, gate, shift, scale)
        with _no_autocast(res.device):
            if not ctx.has_h:
                grads = kern.modnorm_bwd(g_y, res, ids, mean, rstd, shift, scale)
            elif gate is not None and weight is not None and scale is None:
                grads = kern.gated_add_norm_bwd(g_res, g_y, res, h, gate, ids, mean, rstd, weight, ctx.x_dtype)
            elif gate is None and weight is None and scale is not None:
                grads = kern.add_modnorm_bwd(g_res, g_y, res, h, ids, mean, rstd, shift, scale, ctx.x_dtype)
            else:
                grads = kern.add_norm_bwd(g_res, g_y, res, h, gate, ids, mean, rstd, weight, shift, scale,
                                          ctx.x_dtype)
        g_x, g_h, g_gate, g_w, g_b, g_shift, g_scale = grads
        return g_x, g_h, g_gate, None, g_w, g_b, g_shift, g_scale, None, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, gate, ids, kern):
        kern.mark_rows(x, h, ids, gate)
        with _no_autocast(x.device):
            out = kern.gated_residual_fwd(x, h, gate, ids)
        ctx.kern = kern
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(h, gate, ids)
        return out

    @staticmethod
    def backward(ctx, g):
        h, gate, ids = ctx.saved_tensors
        kern = ctx.kern
        kern.mark_rows(g, h, ids, gate)
        with _no_autocast(g.device):
            g_h, g_gate = kern.gated_residual_bwd(g, h, gate, ids)
        return g.to(ctx.x_dtype), g_h, g_gate, None, None


def _check_rows(name: str, x: torch.Tensor, ids: torch.Tensor, *per_batch: torch.Tensor | None) -> None:
    if x.dim() != 2 or ids.shape != (x.shape[0],):
        raise ValueError(f"{name}: expected x [N, C] and batch_ids [N], got {tuple(x.shape)} and {tuple(ids.shape)}")
    sizes = {tuple(v.shape) for v in per_batch if v is not None}
    if len(sizes) > 1 or any(len(s) != 2 or s[1] != x.shape[1] for s in sizes):
        raise ValueError(f"{name}: per-batch vectors must all be [B, {x.shape[1]}], got {sorted(sizes)}")


def add_layer_norm(x: torch.Tensor, batch_ids: torch.Tensor, kern: _Kernels, *, h: torch.Tensor | None = None,
                   gate: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, eps: float = 1e-6):
    """Residual sum and LayerNorm with adaLN modulation, fused.

    ``res = x`` (``h`` None), ``x + h`` (``gate`` None) or ``x + gate[batch_ids] * h``; then
    ``y = LN(res)`` over the last dim in float32 (affine ``weight``/``bias`` optional), cast to
    ``res.dtype``, then ``* (1 + scale[batch_ids]) + shift[batch_ids]`` when ``scale`` is given.

    Args: ``x``, ``h`` ``[N, C]``; ``batch_ids`` ``[N]`` int64 (rows of a batch item contiguous);
    ``gate``, ``shift``, ``scale`` ``[B, C]``; ``weight``, ``bias`` ``[C]``; ``kern`` from
    :func:`fused_kernels`. Returns ``y``, or ``(res, y)`` when ``h`` is given.
    """
    _check_rows("add_layer_norm", x, batch_ids, gate, shift, scale)
    if (shift is None) != (scale is None):
        raise ValueError("add_layer_norm: give both shift and scale, or neither")
    if (weight is None) != (bias is None):
        raise ValueError("add_layer_norm: give both weight and bias, or neither")
    if weight is not None and scale is not None:
        raise ValueError("add_layer_norm: affine LN together with the adaLN modulation is not supported")
    if h is None and (gate is not None or weight is not None):
        raise ValueError("add_layer_norm: without h only the modulated (non-affine) LN is fused")
    if h is None and scale is None:
        raise ValueError("add_layer_norm: nothing to fuse (no h and no modulation)")
    return _AddNorm.apply(x, h, gate, batch_ids, weight, bias, shift, scale, float(eps), kern)


def gated_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, batch_ids: torch.Tensor,
                   kern: _Kernels) -> torch.Tensor:
    """``x + gate[batch_ids] * h`` fused; ``x``, ``h`` ``[N, C]``, ``gate`` ``[B, C]``."""
    _check_rows("gated_residual", x, batch_ids, gate)
    if h.shape != x.shape:
        raise ValueError(f"gated_residual: h {tuple(h.shape)} must match x {tuple(x.shape)}")
    return _GatedResidual.apply(x, h, gate, batch_ids, kern)


def rms_norm_heads(x: torch.Tensor, gamma: torch.Tensor, scale: float, kern: _Kernels) -> torch.Tensor:
    """``MultiHeadRMSNorm``'s ``F.normalize(x.float(), dim=-1) * gamma * scale`` cast back, as one
    region (autograd by ``torch.compile`` in the compiled mode). ``x [N, H, d]``, ``gamma [H, d]``."""
    kern.mark_rows(x)
    return kern.rms_norm_heads(x, gamma, scale)


def rms_norm_qk(q: torch.Tensor, k: torch.Tensor, gamma_q: torch.Tensor, gamma_k: torch.Tensor, scale: float,
                kern: _Kernels) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_heads` of ``q`` and of ``k`` as one region (one compiled call and one compiled
    backward instead of two each: the host time of a region call is what a small micro-batch waits on)."""
    kern.mark_rows(q, k)
    return kern.rms_norm_qk(q, k, gamma_q, gamma_k, scale)
