"""Choice of attention backend, read from the environment at every call (never at import).

Environment variables (kept from the original TRELLIS):
- ``ATTN_BACKEND``: dense attention and, unless overridden, sparse attention.
- ``SPARSE_ATTN_BACKEND``: sparse (variable-length / windowed) attention; wins over ``ATTN_BACKEND``.

Values:
- ``torch`` (aliases ``sdpa``, ``naive``): pure PyTorch on ``F.scaled_dot_product_attention``; runs on
  CPU and GPU; the reference every other backend is tested against. Default on CPU.
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, torch >= 2.9).
- ``flash_attn``: the ``flash-attn`` package (CUDA, fp16/bf16).
- ``xformers``: the ``xformers`` package (CUDA).
- ``triton``: this framework's Triton flash-attention kernel for gathered variable-length sequences
  (``trellis.modules.attention.triton_varlen``; CUDA, needs ``triton``).
- ``auto`` or unset: the fastest one available for the call (CPU: ``torch``).

A backend that is requested explicitly but cannot run the call raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["BACKENDS", "requested_backend", "select_backend", "backend_unavailable_reason"]

BACKENDS = ("torch", "torch_varlen", "flash_attn", "xformers", "triton")
_ALIASES = {"sdpa": "torch", "naive": "torch", "flash-attn": "flash_attn", "flash_attn_2": "flash_attn"}


def requested_backend(sparse: bool) -> str:
    """The backend named by the environment (``'auto'`` when unset). Raises on an unknown name."""
    name = ""
    var = ""
    for var in (("SPARSE_ATTN_BACKEND", "ATTN_BACKEND") if sparse else ("ATTN_BACKEND",)):
        name = os.environ.get(var, "").strip().lower()
        if name:
            break
    if not name or name == "auto":
        return "auto"
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"{var}={os.environ[var]!r}: unknown attention backend; known: auto, {', '.join(BACKENDS)}")
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


def select_backend(
    device: torch.device, dtype: torch.dtype, varlen: bool, sparse: bool, max_len: int | None = None
) -> str:
    """Resolves the backend for one call: the requested one (checked) or the fastest available.

    ``max_len`` is the longest sequence of a variable-length call; short sequences (windows) prefer
    the Triton kernel, which packs no padding and gathers rows in place.
    """
    name = requested_backend(sparse)
    if name != "auto":
        reason = backend_unavailable_reason(name, device, dtype, varlen)
        if reason is not None:
            raise RuntimeError(reason)
        return name
    if device.type != "cuda" or not varlen:
        return "torch"  # dense: SDPA picks flash / cuDNN / efficient kernels itself
    order = ["flash_attn", "torch_varlen", "triton", "xformers"]
    if max_len is not None and max_len <= 1024:
        order = ["triton"] + [n for n in order if n != "triton"]
    for cand in order:
        if backend_unavailable_reason(cand, device, dtype, varlen) is None:
            return cand
    return "torch"
