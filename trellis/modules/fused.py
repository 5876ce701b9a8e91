"""Fused regions of the transformer blocks, compiled one region at a time.

The sparse SLat flow model cannot go through ``torch.compile`` as a whole (the ``SparseTensor``
caches do not survive dynamo). What it compiles instead are the stretches of each
``ModulatedSparseTransformerCrossBlock`` between its two attentions, as pure-tensor functions of
``feats [N, C]``, the row-to-batch map ``batch_ids [N]``, the per-batch modulation ``[B, 6C]`` and
the block's parameters (passed in, so all 24 blocks share one graph per segment):

* ``_block_pre``: adaLN modulation, LN1 + modulation, the qkv projection, the q/k RMS norm;
* ``_block_mid``: output projection + gated residual, LN2, the cross-attention's q, k, v projections;
* ``_block_post``: output projection + residual, LN3 + modulation, the MLP, gated residual.

Per block the host then makes three compiled calls and three compiled backward calls, where the
block's modules made a dozen module calls, autograd nodes and small kernels each way: with the
SLat config's ``batch_split: 4`` the step is bound by that host work (docs/PERFORMANCE_flow.md).
The attentions run in between, uncompiled. Per-batch vectors are broadcast to the voxels by
:class:`PerBatchRows` (a gather whose backward is a one-hot GEMM segment sum: deterministic, no
atomics), inside the graphs, never materialised as ``[N, 6C]`` in the forward.
:func:`rms_norm_heads` / :func:`rms_norm_qk` are the same for ``MultiHeadRMSNorm`` in other modules.

Modes (per module, see :func:`set_fused`; the default follows the environment variable
``TRELLIS_FUSED``, read at every call):

* ``"off"`` (``TRELLIS_FUSED`` unset, ``0``): the modules run their original code.
* ``"eager"`` (``TRELLIS_FUSED=eager``): the fused functions, not compiled. Their expressions are
  the modules' own in the same order: the forward is bit-for-bit the original. A reference for
  tests and the CPU.
* ``"compile"`` (``TRELLIS_FUSED=1``): the fused functions through ``torch.compile`` (their
  autograd too). Rows and batch size are marked dynamic (the widths stay static), so varying token
  counts and batch sizes reuse one graph.

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

from trellis.modules.norm import layer_norm32

__all__ = [
    "FUSED_MODES",
    "FusedRegionsMixin",
    "FusedSetting",
    "PerBatchRows",
    "env_fused_mode",
    "fused_kernels",
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
def _segment_sum(v: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``out[b] = sum of v[i] over the rows i with ids[i] == b``: ``one_hot(ids).T @ v``, ``[B, K]``."""
    one_hot = (ids[:, None] == torch.arange(batch_size, device=ids.device)[None, :]).to(v.dtype)  # [N, B]
    return one_hot.t() @ v  # [B, N] @ [N, K] -> [B, K]


def segment_sum(v: torch.Tensor, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic segment sum of the rows of ``v [N, K]`` by ``ids [N]`` into ``[batch_size, K]``."""
    return _segment_sum(v, ids, batch_size)


class PerBatchRows(torch.autograd.Function):
    """``v[batch_ids]`` (``[B, K]`` -> ``[N, K]``) whose backward is :func:`segment_sum`.

    The default backward of an index gather scatters with heavily repeated indices (every voxel
    of a batch item hits the same row), which CUDA serialises; on the SLat flow model L it took
    half of the GPU time of a training step. The one-hot GEMM does the same segment sum fast and
    deterministically. Dynamo traces it, so the compiled block segments below use it too.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, batch_ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(batch_ids)
        ctx.batch_size = v.shape[0]
        return v[batch_ids]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (batch_ids,) = ctx.saved_tensors
        return _segment_sum(grad, batch_ids, ctx.batch_size), None  # [B, K]


def _modulated_norm(x, ids, shift, scale, eps: float):
    """``LN(x) * (1 + scale[b]) + shift[b]`` (the block's ``norm1`` / ``norm3`` and adaLN)."""
    return layer_norm32(x, None, None, eps) * (1 + PerBatchRows.apply(scale, ids)) + PerBatchRows.apply(shift, ids)


# The three segments of ``ModulatedSparseTransformerCrossBlock`` around its two attentions (see
# the module docstring). The expressions are the block's ``_forward`` (and its modules'), in the
# same order, so the eager mode is bit for bit the original forward.
def _block_pre(feats, ids, mod, ada_w, ada_b, eps: float, w_qkv, b_qkv, gamma_q, gamma_k, rms_scale: float,
               heads: int):
    """adaLN modulation, LN1 + modulation, qkv projection (+ q/k RMS norm).
    Returns ``(mod6 [B, 6C], qkv [N, 3, H, d])`` or ``(mod6, q, k, v)`` with the RMS norm."""
    mod6 = mod if ada_w is None else F.linear(F.silu(mod), ada_w, ada_b)
    shift, scale = mod6.chunk(6, dim=1)[:2]
    h = _modulated_norm(feats, ids, shift, scale, eps)
    qkv = F.linear(h, w_qkv, b_qkv).view(feats.shape[0], 3, heads, -1)  # [N, 3C] -> [N, 3, H, d]
    if gamma_q is None:
        return mod6, qkv
    q, k, v = qkv.unbind(dim=1)
    return mod6, _rms_norm_heads(q, gamma_q, rms_scale), _rms_norm_heads(k, gamma_k, rms_scale), v


def _block_mid(feats, ids, mod6, attn, w_out, b_out, n2_w, n2_b, eps: float, w_q, b_q, ctx, w_kv, b_kv,
               gamma_q, gamma_k, rms_scale: float, heads: int):
    """Self-attention output projection + gated residual, LN2 (affine), the cross-attention's q and
    (from the context rows ``ctx [M, C_ctx]``) k, v (+ their RMS norm). Returns ``(feats, q, k, v)``."""
    N, C = feats.shape
    gate = mod6.chunk(6, dim=1)[2]
    feats = feats + PerBatchRows.apply(gate, ids) * F.linear(attn.reshape(N, C), w_out, b_out)
    q = F.linear(layer_norm32(feats, n2_w, n2_b, eps), w_q, b_q).view(N, heads, -1)  # [N, C] -> [N, H, d]
    k, v = F.linear(ctx, w_kv, b_kv).view(ctx.shape[0], 2, heads, -1).unbind(dim=1)  # [M, 2C] -> [M, 2, H, d]
    if gamma_q is not None:
        q, k = _rms_norm_heads(q, gamma_q, rms_scale), _rms_norm_heads(k, gamma_k, rms_scale)
    return feats, q, k, v


def _block_post(feats, ids, mod6, attn, w_out, b_out, eps: float, w1, b1, w2, b2):
    """Cross-attention output projection + residual, LN3 + modulation, the MLP (GELU tanh), gated residual."""
    N, C = feats.shape
    shift, scale, gate = mod6.chunk(6, dim=1)[3:]
    feats = feats + F.linear(attn.reshape(N, C), w_out, b_out)
    h = _modulated_norm(feats, ids, shift, scale, eps)
    h = F.linear(F.gelu(F.linear(h, w1, b1), approximate="tanh"), w2, b2)
    return feats + PerBatchRows.apply(gate, ids) * h


def _rms_norm_qk(q, k, gamma_q, gamma_k, scale: float):
    return _rms_norm_heads(q, gamma_q, scale), _rms_norm_heads(k, gamma_k, scale)


def _rms_norm_heads(x, gamma, scale: float):
    return (F.normalize(x.float(), dim=-1) * gamma.float() * scale).to(x.dtype)  # MultiHeadRMSNorm's maths


_BODIES = {
    "rms_norm_heads": _rms_norm_heads, "rms_norm_qk": _rms_norm_qk,
    "block_pre": _block_pre, "block_mid": _block_mid, "block_post": _block_post,
}


def default_compile_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``torch.compile`` kwargs of the regions: the caller's, plus Inductor's ``combo_kernels``
    (independent kernels of a graph launched as one) where the caller names neither ``mode`` nor
    ``options`` and the installed torch has it. With the SLat config's ``batch_split: 4`` the step
    waits on the host's kernel launches; combo kernels cut the host time per step by 14% on an
    H200 (docs/PERFORMANCE_flow.md)."""
    import torch._inductor.config as inductor_config

    if "mode" in kwargs or "options" in kwargs or kwargs.get("backend", "inductor") != "inductor":
        return kwargs
    if getattr(inductor_config, "combo_kernels", None) is None:
        return kwargs
    return {**kwargs, "options": {"combo_kernels": True}}


class _Kernels:
    """The bodies of one setting: the plain functions, or each wrapped in ``torch.compile``."""

    def __init__(self, setting: FusedSetting):
        self.setting = setting
        self.compiled = setting.mode == "compile"
        kwargs = default_compile_kwargs(dict(setting.compile_kwargs))
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
