"""Checkpoint files with the original TRELLIS names, written atomically.

Layout of ``<output_dir>/ckpts/`` at step ``s``::

    <model>_step%07d.pt            model state dict (fp32 master values, buffers as in the model)
    <model>_ema<rate>_step%07d.pt  the same with EMA values, one file per rate
    misc_step%07d.pt               optimizer, precision (loss scale / scaler), clipper, LR scheduler,
                                   elastic controller, data-sampler position, RNG of every rank, step

``misc`` is written last: a step counts as saved only once its misc file exists, so a crash while
writing leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import torch

from trellis.utils.io import atomic_torch_save

_MISC_RE = re.compile(r"misc_step(\d{7,})\.pt$")


class CheckpointError(RuntimeError):
    pass


def ckpt_dir(root: str) -> str:
    return os.path.join(root, "ckpts")


def model_file(root: str, key: str, step: int) -> str:
    return os.path.join(ckpt_dir(root), f"{key}_step{step:07d}.pt")


def ema_file(root: str, key: str, rate: float, step: int) -> str:
    return os.path.join(ckpt_dir(root), f"{key}_ema{rate}_step{step:07d}.pt")


def misc_file(root: str, step: int) -> str:
    return os.path.join(ckpt_dir(root), f"misc_step{step:07d}.pt")


def saved_steps(root: str) -> list[int]:
    """Steps with a complete checkpoint (a misc file) under ``root/ckpts``, ascending."""
    steps = []
    for path in glob.glob(os.path.join(ckpt_dir(root), "misc_step*.pt")):
        m = _MISC_RE.search(os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_latest(root: str) -> int | None:
    steps = saved_steps(root)
    return steps[-1] if steps else None


def resolve_ckpt(load_dir: str, ckpt: str) -> int | None:
    """``--ckpt`` value -> step to load (None = start fresh)."""
    if ckpt == "none":
        return None
    if ckpt == "latest":
        return find_latest(load_dir)
    try:
        step = int(ckpt)
    except ValueError:
        raise CheckpointError(f"--ckpt must be 'latest', 'none' or a step number, got {ckpt!r}") from None
    if not os.path.isfile(misc_file(load_dir, step)):
        have = saved_steps(load_dir)
        raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir(load_dir)} "
                              f"(saved steps: {have if have else 'none'})")
    return step


def load_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def load_state_dict_strict(model: torch.nn.Module, state: dict, path: str) -> None:
    """Strict load with a readable error (missing / unexpected keys, shape mismatches) naming ``path``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:3]})")
        raise CheckpointError(f"{path} does not fit the model ({'; '.join(parts)}); "
                              "is it a checkpoint of another config?")
    model.load_state_dict(state, strict=True)


def save_atomic(obj: Any, path: str) -> None:
    atomic_torch_save(obj, path)


def remove_old(root: str, keep_last: int | None) -> list[int]:
    """Deletes every file of all but the newest ``keep_last`` complete checkpoints; returns removed steps."""
    if not keep_last or keep_last < 1:
        return []
    steps = saved_steps(root)
    old = steps[:-keep_last]
    for step in old:
        os.remove(misc_file(root, step))  # first: the step stops counting as complete
        for path in glob.glob(os.path.join(ckpt_dir(root), f"*_step{step:07d}.pt")):
            os.remove(path)
    return old
