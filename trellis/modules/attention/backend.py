"""Choice of attention backend, read from the environment at every call (never at import).

Environment variables (kept from the original TRELLIS; resolved by ``trellis.backends.get_backend``, so
``trellis.backends.use_backend("sparse_attn", ...)`` works too, the env var winning):
- ``ATTN_BACKEND``: dense attention (``[B, L, H, d]``).
- ``SPARSE_ATTN_BACKEND``: variable-length attention (sparse full / windowed / serialized / cross).

Values:
- ``torch`` (aliases ``sdpa``, ``naive``): pure PyTorch on ``F.scaled_dot_product_attention``; runs on
  CPU and GPU; the reference every other backend is tested against. Default on CPU.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.9).
- ``flash_attn``: the ``flash-attn`` package (CUDA, fp16/bf16).
- ``xformers``: the ``xformers`` package (CUDA).
  Dense attention knows ``torch``, ``flash_attn`` and ``xformers``; the varlen-only names fall back to SDPA.
- ``triton``: this framework's Triton flash-attention kernel for gathered variable-length sequences
  (``trellis.modules.attention.triton_varlen``; CUDA, needs ``triton``).
- ``torch_seq``: one unpadded ``F.scaled_dot_product_attention`` call per sequence
  (``trellis.modules.attention.per_sequence``), so each long sequence gets PyTorch's fastest dense
  kernel (cuDNN on Hopper); CPU and GPU, variable-length only.
- ``auto`` or unset: the fastest one available for the call (CPU: ``torch``; CUDA, 16-bit
  self-attention over at most ``PER_SEQUENCE_MAX_SEQS`` sequences of mean length at least
  ``PER_SEQUENCE_MIN_MEAN_LEN``: ``torch_seq``; otherwise ``triton`` when Triton is installed, else
  flash-attn, ``torch_varlen``, xformers).

A backend that is requested explicitly but cannot run the call raises ``trellis.backends.BackendError``
(a ``RuntimeError``) saying why.
"""

from __future__ import annotations

import importlib.util

import torch

from trellis.backends import BackendError, add_backend_choices, get_backend

__all__ = ["BACKENDS", "requested_backend", "select_backend", "backend_unavailable_reason"]

BACKENDS = ("torch", "torch_varlen", "flash_attn", "xformers", "triton", "torch_seq")
# ``auto`` runs self-attention over at most this many sequences of at least this mean length as one
# SDPA call per sequence (``torch_seq``). Cross-attention to 1374 condition tokens stays on Triton
# (faster there); measured in docs/PERFORMANCE_attention.md
PER_SEQUENCE_MAX_SEQS = 64
PER_SEQUENCE_MIN_MEAN_LEN = 1024
_ALIASES = {"sdpa": "torch", "naive": "torch"}
# Registers this module's names with the framework-wide backend table (no CUDA query here).
add_backend_choices("attn", "torch", "auto")
add_backend_choices("sparse_attn", "torch", "torch_varlen", "triton", "torch_seq")


def requested_backend(sparse: bool) -> str:
    """The backend asked for (``'auto'`` when nothing is set); see ``trellis.backends.get_backend``.

    ``sparse`` selects the ``sparse_attn`` kind (``SPARSE_ATTN_BACKEND``), else ``attn``
    (``ATTN_BACKEND``). ``sdpa`` and ``naive`` both mean the pure-PyTorch ``torch`` path.
    """
    name = get_backend("sparse_attn" if sparse else "attn")
    name = _ALIASES.get(name, name)
    if name == "auto":
        return name
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return name


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _has_torch_varlen() -> bool:
    if not _has_module("torch.nn.attention.varlen"):
        return False
    from torch.nn.attention import varlen

    return hasattr(varlen, "varlen_attn")


def backend_unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, varlen: bool) -> str | None:
    """None when ``name`` can run on this device / dtype, else a readable reason."""
    if name == "torch":
        return None
    if name == "torch_seq":
        return None if varlen else "attention backend 'torch_seq' only does variable-length attention"
    if device.type != "cuda":
        return f"attention backend '{name}' needs CUDA tensors, got device {device}"
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "torch_varlen":
        if not varlen:
            return "attention backend 'torch_varlen' only does variable-length attention"
        if not _has_torch_varlen():
            return f"attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch {torch.__version__})"
        if not half:
            return f"attention backend 'torch_varlen' needs float16/bfloat16 inputs, got {dtype}"
        return None
    if name == "flash_attn":
        if not _has_module("flash_attn"):
            return "attention backend 'flash_attn' requested but the flash-attn package is not installed"
        if not half:
            return f"attention backend 'flash_attn' needs float16/bfloat16 inputs, got {dtype}"
        return None
    if name == "xformers":
        if not _has_module("xformers"):
            return "attention backend 'xformers' requested but the xformers package is not installed"
        return None
    if name == "triton":
        if not varlen:
            return "attention backend 'triton' only does variable-length attention"
        if not _has_module("triton"):
            return "attention backend 'triton' requested but the triton package is not installed"
        return None
    raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")


def _few_long_sequences(plan) -> bool:
    """True for self-attention over at most ``PER_SEQUENCE_MAX_SEQS`` sequences of mean length at
    least ``PER_SEQUENCE_MIN_MEAN_LEN``."""
    if plan is None or not plan.self_attention or not 0 < plan.num_seqs <= PER_SEQUENCE_MAX_SEQS:
        return False
    return plan.num_q >= PER_SEQUENCE_MIN_MEAN_LEN * plan.num_seqs


def select_backend(
    device: torch.device, dtype: torch.dtype, varlen: bool, sparse: bool, plan=None
) -> str:
    """Resolves the backend for one call: the requested one (checked) or the fastest available.

    ``plan`` (a ``VarlenPlan``, optional) lets ``auto`` pick by the sequence lengths."""
    name = requested_backend(sparse)
    if name != "auto":
        reason = backend_unavailable_reason(name, device, dtype, varlen)
        if reason is not None:
            raise BackendError(reason)
        return name
    if device.type != "cuda" or not varlen:
        return "torch"  # dense: SDPA picks flash / cuDNN / efficient kernels itself
    if dtype in (torch.float16, torch.bfloat16) and _few_long_sequences(plan):
        return "torch_seq"  # a few long sequences: cuDNN's dense kernel on each beats the varlen kernels
    # Triton first: short windows (no padding, rows gathered in place) and, with the 16-bit / d <= 64
    # blocks, long sequences too (SLat flow L step 3.5% faster than with FlashAttention-2 varlen on an
    # H200; docs/PERFORMANCE_flow.md)
    order = ["triton", "flash_attn", "torch_varlen", "xformers"]
    for cand in order:
        if backend_unavailable_reason(cand, device, dtype, varlen) is None:
            return cand
    return "torch"
