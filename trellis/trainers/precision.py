"""Precision policies (``fp16_mode``): how the loss is scaled, where master weights live, and
whether a step is applied.

All policies share one protocol, used by the trainer's step:

    with policy.autocast(): loss = ...          # forward
    policy.backward(loss)                       # per micro-batch
    grad_norm, ok = policy.unscale_and_clip(clip_fn)   # once per step
    policy.step(optimizer, ok)                  # optimizer over policy.master_params, skipped unless ok
    policy.update(ok)                           # loss-scale bookkeeping

``ok`` is a boolean tensor on the device, so that a step never waits for the GPU: with a fused
Adam / AdamW (the default on CUDA) the skip happens inside the optimizer kernel through its
``found_inf`` input; any other optimizer reads ``ok`` on the host first (one synchronisation).

* ``inflat_all`` (TRELLIS default): models keep their fp16 torso; fp32 master copies of every
  trainable parameter; the loss is multiplied by ``2 ** log_scale`` (start 20), ``log_scale`` grows
  by ``fp16_scale_growth`` per clean step and drops by 1 on overflow, which skips the step.
  fp32 parameters are their own masters (no copy).
* ``amp``: fp16 autocast and ``torch.amp.GradScaler``; models in fp32.
* ``bf16``: bf16 autocast, no scaler; models in fp32 (new).
* ``None``/``"fp32"``: plain fp32.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from trellis.trainers.utils import total_grad_norm

ClipFn = Callable[[list[torch.Tensor]], torch.Tensor]


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    return total_grad_norm([p.grad for p in params if p.grad is not None])


def _takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam / AdamW (and optimizers like them) skip their update on device when ``found_inf`` is set."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, ok: torch.Tensor | bool) -> None:
    """``optimizer.step()`` if ``ok``; without a host sync when the optimizer takes ``found_inf``."""
    if isinstance(ok, torch.Tensor) and _takes_found_inf(optimizer):
        optimizer.found_inf = (~ok).float().reshape(())  # read by the fused kernels, as GradScaler does
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(ok):
        optimizer.step()


class PrecisionPolicy:
    name = "fp32"
    autocast_dtype: torch.dtype | None = None

    def __init__(self, params: list[nn.Parameter], device: torch.device):
        self.params = params
        self.device = device
        self.master_params: list[torch.Tensor] = params

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for p in self.master_params:
            p.grad = None

    def unscale_and_clip(self, clip_fn: ClipFn | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Makes master grads true (unscaled) fp32 grads, clips them, returns (pre-clip norm, finite),
        both tensors on the device."""
        norm = clip_fn(self.master_params) if clip_fn is not None else _total_norm(self.master_params)
        return norm, torch.isfinite(norm)

    def step(self, optimizer: torch.optim.Optimizer, ok: torch.Tensor | bool = True) -> None:
        step_unless_nonfinite(optimizer, ok)

    def update(self, applied: torch.Tensor | bool) -> None:
        """Nothing to update; skipped steps show in the ``status/skipped_step`` metric."""

    def log_values(self) -> dict[str, float | torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def masters_from_params(self) -> None:
        """Re-derives master weights after the model parameters were loaded."""


class BF16Policy(PrecisionPolicy):
    name = "bf16"
    autocast_dtype = torch.bfloat16


class InflatAllPolicy(PrecisionPolicy):
    """fp16 torso + fp32 masters + dynamic power-of-two loss scale (TRELLIS ``inflat_all``)."""

    name = "inflat_all"

    def __init__(self, params: list[nn.Parameter], device: torch.device, scale_growth: float = 1e-3,
                 initial_log_scale: float = 20.0):
        super().__init__(params, device)
        self.scale_growth = scale_growth
        # float64 on the device: updated there every step without a host sync
        self._log_scale = torch.tensor(float(initial_log_scale), dtype=torch.float64, device=device)
        # fp32 params are their own masters; low-precision ones get an fp32 copy.
        self.master_params = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
                              for p in params]
        self._low = [(p, m) for p, m in zip(params, self.master_params) if m is not p]

    @property
    def log_scale(self) -> float:
        """The current ``log2`` of the loss scale (waits for the device)."""
        return float(self._log_scale)

    @log_scale.setter
    def log_scale(self, value: float) -> None:
        self._log_scale = torch.tensor(float(value), dtype=torch.float64, device=self.device)

    def masters_from_params(self) -> None:
        for p, m in self._low:
            m.data.copy_(p.data.float())

    def backward(self, loss: torch.Tensor) -> None:
        (loss * torch.exp2(self._log_scale).to(loss.dtype)).backward()

    def unscale_and_clip(self, clip_fn: ClipFn | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv = torch.exp2(-self._log_scale).float()
        for p, m in self._low:
            m.grad = None if p.grad is None else p.grad.float().mul_(inv)
        own = [p.grad for p, m in zip(self.params, self.master_params) if m is p and p.grad is not None]
        if own:
            torch._foreach_mul_(own, inv)
        # Overflow test: the clip functions return the norm of every grad before clipping (which
        # could turn inf into nan or zero); clipping a non-finite step only spoils grads that are
        # skipped anyway.
        return super().unscale_and_clip(clip_fn)

    def step(self, optimizer: torch.optim.Optimizer, ok: torch.Tensor | bool = True) -> None:
        step_unless_nonfinite(optimizer, ok)
        if self._low:
            torch._foreach_copy_([p.data for p, _ in self._low], [m.data for _, m in self._low])

    def update(self, applied: torch.Tensor | bool) -> None:
        applied = torch.as_tensor(applied, device=self._log_scale.device)
        self._log_scale = torch.where(applied, self._log_scale + self.scale_growth, self._log_scale - 1.0)

    def log_values(self) -> dict[str, float | torch.Tensor]:
        return {"log_scale": self._log_scale}

    def state_dict(self) -> dict:
        return {"log_scale": self.log_scale}

    def load_state_dict(self, state: dict) -> None:
        self.log_scale = float(state["log_scale"])


class AmpPolicy(PrecisionPolicy):
    """fp16 autocast with ``torch.amp.GradScaler`` (models in fp32)."""

    name = "amp"
    autocast_dtype = torch.float16

    def __init__(self, params: list[nn.Parameter], device: torch.device):
        super().__init__(params, device)
        self.scaler = torch.amp.GradScaler(device.type)
        self._optimizer: torch.optim.Optimizer | None = None

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_and_clip(self, clip_fn: ClipFn | None) -> tuple[torch.Tensor, bool]:
        assert self._optimizer is not None, "AmpPolicy.bind(optimizer) was not called"
        self.scaler.unscale_(self._optimizer)
        return super().unscale_and_clip(clip_fn)  # GradScaler.step decides (it skips on inf itself)

    def step(self, optimizer: torch.optim.Optimizer, ok: torch.Tensor | bool = True) -> None:
        self.scaler.step(optimizer)

    def update(self, applied: torch.Tensor | bool) -> None:
        self.scaler.update()

    def log_values(self) -> dict[str, float | torch.Tensor]:
        scale = self.scaler._get_scale_async() if self.scaler.is_enabled() else None
        return {"scale": scale if scale is not None else float(self.scaler.get_scale())}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])


FP16_MODES = {None: PrecisionPolicy, "fp32": PrecisionPolicy, "bf16": BF16Policy,
              "inflat_all": InflatAllPolicy, "amp": AmpPolicy}


def check_fp16_mode(mode: str | None, device: torch.device) -> None:
    if mode not in FP16_MODES:
        raise ValueError(f"trainer.args.fp16_mode: unknown value {mode!r}; choose one of "
                         "'inflat_all', 'amp', 'bf16', null")
    if device.type == "cpu" and mode in ("inflat_all", "amp"):
        raise ValueError(
            f"trainer.args.fp16_mode={mode!r} needs a CUDA device; on the CPU use fp32 or bf16: "
            "--set trainer.args.fp16_mode=null (or \"bf16\")")


def make_policy(mode: str | None, params: list[nn.Parameter], device: torch.device,
                scale_growth: float) -> PrecisionPolicy:
    check_fp16_mode(mode, device)
    if mode == "inflat_all":
        return InflatAllPolicy(params, device, scale_growth)
    return FP16_MODES[mode](params, device)
