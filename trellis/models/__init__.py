"""TRELLIS model classes (resolved lazily by name through ``trellis.registry.MODELS``) and the
release-format loader.

Release format: ``<name>.json`` holding ``{"name": <class>, "args": {...}}`` beside
``<name>.safetensors`` holding the state dict (persistent buffers included). ``from_pretrained``
builds the class and loads the tensors strictly, casting each to the parameter's dtype.
"""

from __future__ import annotations

import json
import os

import torch

from trellis.registry import MODELS


def _stem(path: str) -> str:
    for ext in (".json", ".safetensors"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def from_pretrained(path: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Loads ``<path>.json`` + ``<path>.safetensors`` (``path`` with or without an extension)."""
    from safetensors.torch import load_file

    from trellis.trainers.checkpoint import load_state_dict_strict

    stem = _stem(path)
    cfg_path, weights_path = stem + ".json", stem + ".safetensors"
    for p in (cfg_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"from_pretrained: {p} not found (a release is <name>.json + <name>.safetensors)")
    with open(cfg_path) as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{cfg_path}: expected {{'name': <class>, 'args': {{...}}}}")
    model = MODELS.get(spec["name"])(**spec.get("args", {}))
    load_state_dict_strict(model, load_file(weights_path), weights_path)
    return model.to(device).eval()


def save_pretrained(model: torch.nn.Module, name: str, args: dict, path: str,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Writes the release format (atomically): ``<path>.json`` and ``<path>.safetensors``."""
    from safetensors.torch import save_file

    from trellis.utils.io import atomic_path, atomic_write_json

    stem = _stem(path)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(stem + ".safetensors") as tmp:
        save_file(state, tmp)
    atomic_write_json(stem + ".json", {"name": name, "args": args})
