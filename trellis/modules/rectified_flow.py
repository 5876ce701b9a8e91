"""The rectified-flow parameterisation of TRELLIS: the ONE object that the training loss and every
sampler use (reference TRAINING.md 9.5 and 12, README 4).

Time ``t`` runs from 0 (data) to 1 (noise). With ``sigma_min`` (1e-5 in every config):

    x_t = (1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps          (Lipman et al. 2023, eq. 20)
    v   = (1 - sigma_min) eps - x_0                                   (d x_t / d t, the model target)

so, given ``x_t`` and a velocity ``v`` at ``t``:

    x_0 = (1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v
    eps = (1 - t) v + x_t

The model receives ``model_time(t) = 1000 t``. Every function works on a dense ``[B, ...]`` tensor
and on a ``SparseTensor`` (per-item ``t`` broadcast over that item's voxels); ``t`` is a float or a
``[B]`` tensor.

The training time distribution (``t_schedule``, as in the configs):

* ``{"name": "uniform", "args": {}}``: ``t ~ U(0, 1)``;
* ``{"name": "logitNormal", "args": {"mean": m, "std": s}}``: ``t = sigmoid(m + s n)``, ``n ~ N(0, 1)``
  (Esser et al. 2024, "Scaling Rectified Flow Transformers"). Configs: m = 1, s = 1.

Draws are per sample from a caller-given ``torch.Generator`` (the trainer keys it by (seed, step,
dataset index)), on the CPU, so ``t`` never depends on the device or on how a batch is split.
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch

from trellis.modules.sparse import SparseTensor
from trellis.utils.device import to_device_async

__all__ = ["RectifiedFlow", "TimeSchedule", "t_bins", "per_sample_mse"]

Field = Union[torch.Tensor, SparseTensor]

TIME_SCALE = 1000.0  # the models are trained on 1000 * t
NUM_BINS = 10  # loss logging: bin = floor(10 t)


class TimeSchedule:
    """The training distribution of ``t``. ``name``: ``uniform`` | ``logitNormal``."""

    def __init__(self, name: str = "logitNormal", args: dict | None = None):
        args = dict(args or {})
        if name == "uniform":
            if args:
                raise ValueError(f"t_schedule.args: 'uniform' takes no arguments, got {sorted(args)}")
        elif name == "logitNormal":
            unknown = set(args) - {"mean", "std"}
            if unknown:
                raise ValueError(f"t_schedule.args: unknown key(s) {sorted(unknown)} for logitNormal (mean, std)")
            args.setdefault("mean", 0.0)
            args.setdefault("std", 1.0)
            if not float(args["std"]) > 0:
                raise ValueError(f"t_schedule.args.std must be positive, got {args['std']}")
        else:
            raise ValueError(f"t_schedule.name: unknown schedule {name!r}; choose 'uniform' or 'logitNormal'")
        self.name = name
        self.args = {k: float(v) for k, v in args.items()}

    @classmethod
    def from_spec(cls, spec: dict | None) -> TimeSchedule:
        """``{"name": ..., "args": {...}}`` (None: the original default, logitNormal(0, 1))."""
        if spec is None:
            return cls("logitNormal", {"mean": 0.0, "std": 1.0})
        if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "args"}:
            raise ValueError(f"t_schedule must be {{'name': ..., 'args': {{...}}}}, got {spec!r}")
        return cls(spec["name"], spec.get("args"))

    def sample_one(self, generator: torch.Generator | None = None) -> float:
        """One draw of ``t`` from a CPU generator (global RNG when None)."""
        if self.name == "uniform":
            return float(torch.rand((), generator=generator))
        n = float(torch.randn((), generator=generator))
        return 1.0 / (1.0 + math.exp(-(self.args["mean"] + self.args["std"] * n)))

    def sample(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``[B]`` float32 on the CPU, item i drawn from ``generators[i]``."""
        return torch.tensor([self.sample_one(g) for g in generators], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"TimeSchedule({self.name!r}, {self.args})"


def _per_item(t: float | torch.Tensor, x: Field) -> float | torch.Tensor:
    """``t`` shaped to broadcast against ``x``: a float stays a float; a ``[B]`` tensor becomes
    ``[B, 1, ..., 1]`` (dense) or ``[N, 1]`` (sparse, gathered by each row's batch id)."""
    if not isinstance(t, torch.Tensor):
        return float(t)
    if t.dim() == 0:
        return t
    dtype = torch.promote_types(_feats(x).dtype, torch.float32)  # never below fp32
    if isinstance(x, SparseTensor):
        if t.shape[0] != x.batch_size:
            raise ValueError(f"t has {t.shape[0]} entries but the SparseTensor has batch size {x.batch_size}")
        return to_device_async(t, x.device, dtype)[x.batch_ids].reshape(-1, *([1] * (x.feats.dim() - 1)))  # [N, 1]
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries but x has batch size {x.shape[0]}")
    return to_device_async(t, x.device, dtype).reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, ..., 1]


def _feats(x: Field) -> torch.Tensor:
    return x.feats if isinstance(x, SparseTensor) else x


def _like(x: Field, value: torch.Tensor) -> Field:
    return x.replace(value) if isinstance(x, SparseTensor) else value


class RectifiedFlow:
    """sigma_min, the time distribution and every identity of the flow (see the module docstring).

    Args:
        sigma_min: noise floor at t = 0.
        t_schedule: ``{"name": "uniform" | "logitNormal", "args": {...}}`` (training only).
    """

    time_scale = TIME_SCALE

    def __init__(self, sigma_min: float = 1e-5, t_schedule: dict | None = None):
        if not 0.0 <= float(sigma_min) < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)
        self.schedule = TimeSchedule.from_spec(t_schedule)

    # ------------------------------------------------------------------ time
    def sample_t(self, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``[B]`` float32 CPU times, one per generator."""
        return self.schedule.sample(generators)

    def model_time(self, t: float | torch.Tensor, batch_size: int | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
        """The model's time input ``1000 t`` as a float32 ``[B]`` tensor (a float ``t`` is repeated)."""
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            return to_device_async(t, device or t.device, torch.float32) * self.time_scale
        if batch_size is None:
            raise ValueError("model_time: give batch_size for a scalar t")
        return torch.full((batch_size,), float(t) * self.time_scale, dtype=torch.float32, device=device)

    def _sigma(self, t: float | torch.Tensor) -> float | torch.Tensor:
        return self.sigma_min + (1.0 - self.sigma_min) * t

    # ------------------------------------------------------------------ identities
    def x_t(self, x_0: Field, t: float | torch.Tensor, eps: Field) -> Field:
        """``(1 - t) x_0 + (sigma_min + (1 - sigma_min) t) eps``; same type and shape as ``x_0``."""
        tt = _per_item(t, x_0)
        return _like(x_0, (1.0 - tt) * _feats(x_0) + self._sigma(tt) * _feats(eps))

    def velocity(self, x_0: Field, eps: Field) -> Field:
        """The regression target ``(1 - sigma_min) eps - x_0``."""
        return _like(x_0, (1.0 - self.sigma_min) * _feats(eps) - _feats(x_0))

    def x0_from(self, x_t: Field, t: float | torch.Tensor, v: Field) -> Field:
        """Data estimate ``(1 - sigma_min) x_t - (sigma_min + (1 - sigma_min) t) v``."""
        tt = _per_item(t, x_t)
        return _like(x_t, (1.0 - self.sigma_min) * _feats(x_t) - self._sigma(tt) * _feats(v))

    def eps_from(self, x_t: Field, t: float | torch.Tensor, v: Field) -> Field:
        """Noise estimate ``(1 - t) v + x_t``."""
        tt = _per_item(t, x_t)
        return _like(x_t, (1.0 - tt) * _feats(v) + _feats(x_t))

    def __repr__(self) -> str:
        return f"RectifiedFlow(sigma_min={self.sigma_min}, t_schedule={self.schedule})"


def per_sample_mse(pred: Field, target: Field) -> torch.Tensor:
    """``[B]`` float32 mean squared error of each batch item (dense: over the item's elements;
    sparse: over that item's voxels and channels)."""
    if isinstance(pred, SparseTensor):
        sq = (pred.feats.float() - _feats(target).float()).pow(2).reshape(pred.feats.shape[0], -1).mean(1)  # [N]
        b = pred.batch_size
        sums = torch.zeros(b, device=sq.device, dtype=torch.float32).index_add_(0, pred.batch_ids, sq)
        return sums / pred.batch_counts.clamp(min=1).to(sums.dtype)
    return (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(1)


def t_bins(per_sample: torch.Tensor, t: torch.Tensor, prefix: str = "bin_", key: str = "mse",
           num_bins: int = NUM_BINS) -> dict[str, dict[str, torch.Tensor]]:
    """Per-t-bin means for logging: bin ``i = floor(num_bins t)`` for t in [0, 1) (t = 1 falls outside,
    as the original's ``digitize``); only non-empty bins appear: ``{"bin_3": {"mse": tensor}}``.

    ``t`` must be a CPU tensor (the trainer draws it there), so this costs no device sync.
    """
    t = t.detach().cpu().double()
    bins = torch.floor(t * num_bins).long().clamp(0, num_bins)  # bin num_bins (t = 1) is not reported
    counts = torch.bincount(bins, minlength=num_bins + 1).tolist()  # host; t is a CPU tensor
    # one scatter-add on the device; the bin ids go over without a host sync
    per_sample = per_sample.detach()
    sums = per_sample.new_zeros(num_bins + 1).index_add_(0, to_device_async(bins, per_sample.device), per_sample)
    out: dict[str, dict[str, Any]] = {}
    for i in range(num_bins):
        if counts[i]:
            out[f"{prefix}{i}"] = {key: sums[i] / counts[i]}
    return out
