"""Flow samplers: small stateless functions over a model callable (reference TRAINING.md 12).

A *model function* is ``model_fn(x, t) -> v``: ``x`` a dense ``[B, ...]`` tensor or a
``SparseTensor``, ``t`` the unit time (a Python float in [0, 1]), ``v`` the velocity, same type and
shape as ``x``. ``denoiser_fn`` turns a TRELLIS flow model and its condition into one (it applies the
flow object's ``model_time``: the model sees ``1000 t``); ``classifier_free_guidance`` wraps two of them.

    flow = RectifiedFlow(sigma_min=1e-5)
    fn = classifier_free_guidance(denoiser_fn(model, cond, flow), denoiser_fn(model, null, flow),
                                  strength=3.0, interval=(0.5, 1.0))
    x_0 = sample_euler(fn, noise, steps=25, rescale_t=3.0, flow=flow).samples

Euler integration of the probability-flow ODE ``dx/dt = v`` from t = 1 to t = 0 (Liu et al. 2023,
"Flow Straight and Fast"; Lipman et al. 2023). Guidance: Ho & Salimans 2022; guidance interval:
Kynkaanniemi et al. 2024.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

from trellis.modules.rectified_flow import RectifiedFlow
from trellis.modules.sparse import SparseTensor

__all__ = ["ModelFn", "SampleResult", "euler_time_grid", "sample_euler", "denoiser_fn",
           "classifier_free_guidance", "repeat_condition"]

Field = Union[torch.Tensor, SparseTensor]
ModelFn = Callable[[Field, float], Field]


def euler_time_grid(steps: int, rescale_t: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 to 0: ``t_j = 1 - j / steps``, then ``t' = s t / (1 + (s - 1) t)``
    with ``s = rescale_t`` (s > 1 spends more steps near t = 1)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not rescale_t > 0:
        raise ValueError(f"rescale_t must be positive, got {rescale_t}")
    s = float(rescale_t)
    ts = [1.0 - j / steps for j in range(steps + 1)]
    ts = [s * t / (1.0 + (s - 1.0) * t) for t in ts]
    ts[0], ts[-1] = 1.0, 0.0
    return ts


@dataclass
class SampleResult:
    """``samples``: x at t = 0; ``pred_x0`` / ``pred_eps``: the flow's estimates at each step
    (only with ``return_trajectory``)."""

    samples: Field
    pred_x0: list[Field] = field(default_factory=list)
    pred_eps: list[Field] = field(default_factory=list)


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: Field, steps: int, rescale_t: float = 1.0,
                 flow: RectifiedFlow | None = None, return_trajectory: bool = False,
                 callback: Callable[[int, float, Field], None] | None = None) -> SampleResult:
    """Euler steps ``x <- x - (t - t_prev) v(x, t)`` over :func:`euler_time_grid`; ends exactly at t = 0.

    Args:
        model_fn: ``(x, t) -> v``.
        x: the noise at t = 1 (dense ``[B, ...]`` or ``SparseTensor``).
        steps: number of model evaluations (per guidance branch).
        rescale_t: time-grid warp (1: uniform).
        flow: the flow object for the side outputs (default ``RectifiedFlow()``).
        return_trajectory: also keep ``pred_x0`` and ``pred_eps`` of every step.
        callback: ``callback(step_index, t, x)`` after each step.
    """
    flow = flow or RectifiedFlow()
    ts = euler_time_grid(steps, rescale_t)
    result = SampleResult(samples=x)
    for i, (t, t_prev) in enumerate(zip(ts[:-1], ts[1:])):
        v = model_fn(x, t)
        if return_trajectory:
            result.pred_x0.append(flow.x0_from(x, t, v))
            result.pred_eps.append(flow.eps_from(x, t, v))
        x = x - (t - t_prev) * v
        if callback is not None:
            callback(i, t_prev, x)
    result.samples = x
    return result


def repeat_condition(cond: Any, batch_size: int) -> Any:
    """A batch-1 condition tensor repeated to ``batch_size`` (other batch sizes must match)."""
    if not isinstance(cond, torch.Tensor):
        return cond
    if cond.shape[0] == batch_size:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(batch_size, *cond.shape[1:])
    raise ValueError(f"condition has batch size {cond.shape[0]}, expected 1 or {batch_size}")


def denoiser_fn(model: Callable[..., Field], cond: Any, flow: RectifiedFlow | None = None,
                **model_kwargs: Any) -> ModelFn:
    """``(x, t) -> model(x, 1000 t [B] float32, cond, **model_kwargs)`` (a batch-1 ``cond`` is repeated)."""
    flow = flow or RectifiedFlow()

    def fn(x: Field, t: float) -> Field:
        b = x.batch_size if isinstance(x, SparseTensor) else x.shape[0]
        t_model = flow.model_time(t, batch_size=b, device=x.device)
        return model(x, t_model, repeat_condition(cond, b), **model_kwargs)

    return fn


def classifier_free_guidance(cond_fn: ModelFn, uncond_fn: ModelFn, strength: float,
                             interval: tuple[float, float] | None = None) -> ModelFn:
    """``v = (1 + w) v_cond - w v_uncond`` with ``w = strength``, from two separate evaluations.

    With ``interval = (lo, hi)`` guidance applies only where ``lo <= t <= hi`` (t as the sampler passes
    it, i.e. after ``rescale_t``); elsewhere ``v = v_cond`` from a single evaluation. ``strength == 0``
    is exactly the conditional model.
    """
    w = float(strength)
    if interval is not None:
        lo, hi = (float(v) for v in interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")

    def fn(x: Field, t: float) -> Field:
        v_cond = cond_fn(x, t)
        if w == 0.0 or (interval is not None and not lo <= t <= hi):
            return v_cond
        v_uncond = uncond_fn(x, t)
        return (1.0 + w) * v_cond - w * v_uncond

    return fn
