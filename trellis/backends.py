"""Backend selection for sparse convolution and attention.

Each *kind* of backend has a fixed set of valid names, a default, and an environment variable that
overrides any configured choice (the original TRELLIS variable names are kept):

=============== ====================== ==========================================================
kind            env var                names (default first)
=============== ====================== ==========================================================
``sparse_conv`` ``SPARSE_BACKEND``     ``auto``, ``torch``, ``triton``, ``spconv``
``attn``        ``ATTN_BACKEND``       ``sdpa``, ``flash_attn``, ``xformers``, ``naive``
``sparse_attn`` ``SPARSE_ATTN_BACKEND`` ``auto``, ``sdpa``, ``flash_attn``, ``xformers``, ``naive``
=============== ====================== ==========================================================

Resolution order, done at every call (never cached at import): the environment variable if set and
non-empty, else the value configured with :func:`set_backend` / :func:`use_backend`, else the
default. An unknown name is an error that lists the valid ones. Capability checks
(:func:`has_triton`, :func:`has_spconv`, ...) import lazily and never touch CUDA at import time.

Sparse conv names: ``torch`` is the pure-PyTorch gather-GEMM-scatter reference (CPU and GPU);
``triton`` the implicit-GEMM Triton kernels (CUDA only); ``spconv`` the spconv 2.x library;
``auto`` picks ``triton`` for CUDA tensors when Triton is importable and ``torch`` otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Iterator

__all__ = [
    "BackendError",
    "get_backend",
    "set_backend",
    "use_backend",
    "backend_choices",
    "add_backend_choices",
    "sparse_conv_backend",
    "attn_backend",
    "sparse_attn_backend",
    "has_module",
    "has_triton",
    "has_spconv",
    "has_flash_attn",
    "has_xformers",
    "cuda_available",
]


class BackendError(RuntimeError):
    """An unknown backend name, or a backend that cannot run here."""


_ENV = {"sparse_conv": "SPARSE_BACKEND", "attn": "ATTN_BACKEND", "sparse_attn": "SPARSE_ATTN_BACKEND"}
_CHOICES: dict[str, list[str]] = {
    "sparse_conv": ["auto", "torch", "triton", "spconv"],
    "attn": ["sdpa", "flash_attn", "xformers", "naive"],
    "sparse_attn": ["auto", "sdpa", "flash_attn", "xformers", "naive"],
}
_CONFIGURED: dict[str, str | None] = {k: None for k in _CHOICES}


def _check_kind(kind: str) -> None:
    if kind not in _CHOICES:
        raise BackendError(f"unknown backend kind {kind!r}; known kinds: {', '.join(sorted(_CHOICES))}")


def backend_choices(kind: str) -> list[str]:
    """Valid names of ``kind`` (default first)."""
    _check_kind(kind)
    return list(_CHOICES[kind])


def add_backend_choices(kind: str, *names: str, env_var: str | None = None) -> None:
    """Adds valid names to ``kind`` (creating the kind if new, with its env var). Default unchanged."""
    if kind not in _CHOICES:
        if not names:
            raise BackendError(f"add_backend_choices: new kind {kind!r} needs at least one name")
        _CHOICES[kind] = []
        _CONFIGURED[kind] = None
        if env_var:
            _ENV[kind] = env_var
    for n in names:
        if n not in _CHOICES[kind]:
            _CHOICES[kind].append(n)


def _validate(kind: str, name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in _CHOICES[kind]:
        raise BackendError(
            f"{source}: unknown {kind} backend {name!r}; valid: {', '.join(_CHOICES[kind])}"
        )
    return name


def get_backend(kind: str) -> str:
    """The backend name for ``kind``: env var, else configured value, else the default."""
    _check_kind(kind)
    env = _ENV.get(kind)
    if env is not None:
        value = os.environ.get(env, "").strip()
        if value:
            return _validate(kind, value, f"environment variable {env}")
    if _CONFIGURED[kind] is not None:
        return _CONFIGURED[kind]
    return _CHOICES[kind][0]


def set_backend(kind: str, name: str | None) -> None:
    """Configures the backend of ``kind`` (``None`` restores the default). The env var still wins."""
    _check_kind(kind)
    _CONFIGURED[kind] = None if name is None else _validate(kind, name, f"set_backend({kind!r})")


@contextlib.contextmanager
def use_backend(kind: str, name: str) -> Iterator[None]:
    """Context manager: configures ``kind`` to ``name`` inside the block (the env var still wins)."""
    _check_kind(kind)
    old = _CONFIGURED[kind]
    set_backend(kind, name)
    try:
        yield
    finally:
        _CONFIGURED[kind] = old


def sparse_conv_backend() -> str:
    return get_backend("sparse_conv")


def attn_backend() -> str:
    return get_backend("attn")


def sparse_attn_backend() -> str:
    return get_backend("sparse_attn")


# ---------------------------------------------------------------------- capability checks
def has_module(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def has_triton() -> bool:
    """Triton importable and a CUDA device present (Triton kernels here are CUDA only)."""
    return has_module("triton") and cuda_available()


def has_spconv() -> bool:
    return has_module("spconv")


def has_flash_attn() -> bool:
    return has_module("flash_attn")


def has_xformers() -> bool:
    return has_module("xformers")


def require_module(name: str, backend: str, hint: str = "") -> object:
    """Imports ``name`` for ``backend`` or raises a :class:`BackendError` saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise BackendError(
            f"backend {backend!r} needs the package {name!r}, which is not importable ({e}). {hint}".strip()
        ) from e
