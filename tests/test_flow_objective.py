"""The rectified-flow object and the samplers: identities, schedules, per-bin logging, Euler, CFG."""

import math

import pytest
import torch

from trellis.modules.rectified_flow import RectifiedFlow, TimeSchedule, per_sample_mse, t_bins
from trellis.modules.sparse import SparseTensor
from trellis.pipelines.samplers import (
    classifier_free_guidance,
    denoiser_fn,
    euler_time_grid,
    sample_euler,
)


def sparse(n_per=(5, 3), c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.cat([torch.cat([torch.full((n, 1), b), torch.randint(0, 64, (n, 3), generator=g)], 1)
                        for b, n in enumerate(n_per)]).int()
    return SparseTensor(torch.randn(coords.shape[0], c, generator=g, dtype=torch.float64), coords)


@pytest.mark.parametrize("sigma_min", [0.0, 1e-5, 0.1])
def test_identities_dense(sigma_min):
    flow = RectifiedFlow(sigma_min)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, 4, generator=g,
                                                                                           dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 0.999], dtype=torch.float64)
    xt = flow.x_t(x0, t, eps)
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.x0_from(xt, t, v), x0)
    torch.testing.assert_close(flow.eps_from(xt, t, v), eps)
    # the velocity target is d x_t / d t
    h = 1e-6
    fd = (flow.x_t(x0, t + h, eps) - flow.x_t(x0, t - h, eps)) / (2 * h)
    torch.testing.assert_close(fd, v.to(fd.dtype), rtol=1e-6, atol=1e-6)
    # endpoints: data at t=0 (plus sigma_min noise), pure noise at t=1
    torch.testing.assert_close(flow.x_t(x0, 0.0, eps), x0 + sigma_min * eps)
    torch.testing.assert_close(flow.x_t(x0, 1.0, eps), eps)


def test_identities_sparse_match_dense_per_item():
    flow = RectifiedFlow(1e-5)
    x0 = sparse()
    eps = x0.replace(torch.randn_like(x0.feats))
    t = torch.tensor([0.2, 0.9])
    xt = flow.x_t(x0, t, eps)
    assert isinstance(xt, SparseTensor) and xt.coords is x0.coords
    for b, sl in enumerate(x0.layout):
        ref = flow.x_t(x0.feats[sl], float(t[b]), eps.feats[sl])
        torch.testing.assert_close(xt.feats[sl], ref)
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.x0_from(xt, t, v).feats, x0.feats)
    torch.testing.assert_close(flow.eps_from(xt, t, v).feats, eps.feats)


def test_model_time_and_bad_input():
    flow = RectifiedFlow()
    assert torch.equal(flow.model_time(torch.tensor([0.5, 1.0])), torch.tensor([500.0, 1000.0]))
    assert torch.equal(flow.model_time(0.25, batch_size=3), torch.full((3,), 250.0))
    with pytest.raises(ValueError, match="sigma_min"):
        RectifiedFlow(1.5)
    with pytest.raises(ValueError, match="batch size"):
        flow.x_t(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown schedule"):
        RectifiedFlow(t_schedule={"name": "cosine", "args": {}})
    with pytest.raises(ValueError, match="std"):
        TimeSchedule("logitNormal", {"mean": 0.0, "std": 0.0})


def test_t_schedules_are_the_documented_transforms():
    ln = TimeSchedule("logitNormal", {"mean": 1.0, "std": 0.5})
    gens = [torch.Generator().manual_seed(i) for i in range(50)]
    t = ln.sample(gens)
    ref = [1 / (1 + math.exp(-(1.0 + 0.5 * float(torch.randn((), generator=torch.Generator().manual_seed(i))))))
           for i in range(50)]
    torch.testing.assert_close(t, torch.tensor(ref, dtype=torch.float32))
    u = TimeSchedule("uniform").sample([torch.Generator().manual_seed(i) for i in range(200)])
    assert u.min() >= 0 and u.max() < 1 and 0.4 < float(u.mean()) < 0.6
    big = TimeSchedule("logitNormal", {"mean": 1.0, "std": 1.0}).sample([None] * 4000)
    assert abs(float(torch.logit(big.double()).mean()) - 1.0) < 0.1  # logit(t) ~ N(1, 1)


def test_per_sample_mse_and_bins():
    x, y = sparse(), sparse(seed=1)
    y = x.replace(y.feats[: x.feats.shape[0]])
    per = per_sample_mse(x, y)
    for b, sl in enumerate(x.layout):
        torch.testing.assert_close(per[b], (x.feats[sl] - y.feats[sl]).pow(2).mean().float())
    per = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t = torch.tensor([0.05, 0.07, 0.55, 0.999, 1.0])
    bins = t_bins(per, t)
    assert set(bins) == {"bin_0", "bin_5", "bin_9"}  # t = 1 falls outside, as the original
    assert float(bins["bin_0"]["mse"]) == 1.5 and float(bins["bin_9"]["mse"]) == 4.0


def test_time_grid():
    assert euler_time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    s = 3.0
    grid = euler_time_grid(5, s)
    for j, tj in enumerate(grid):
        t = 1 - j / 5
        assert tj == pytest.approx(s * t / (1 + (s - 1) * t))
    assert grid[0] == 1.0 and grid[-1] == 0.0
    with pytest.raises(ValueError):
        euler_time_grid(0)


@pytest.mark.parametrize("rescale_t", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_euler_is_exact_on_straight_paths(kind, rescale_t):
    """A point-mass data distribution at c has the exact velocity (x - c)/t (sigma_min = 0) and straight
    trajectories, so Euler lands on c from any noise with any grid."""
    flow = RectifiedFlow(0.0)
    noise = sparse() if kind == "sparse" else torch.randn(2, 3, 4, dtype=torch.float64)
    c = noise * 0.0 + 0.7

    def model_fn(x, t):
        return (x - c) / t

    out = sample_euler(model_fn, noise, steps=7, rescale_t=rescale_t, flow=flow, return_trajectory=True)
    got = out.samples.feats if kind == "sparse" else out.samples
    torch.testing.assert_close(got, torch.full_like(got, 0.7))
    assert len(out.pred_x0) == 7
    first = out.pred_x0[0].feats if kind == "sparse" else out.pred_x0[0]
    torch.testing.assert_close(first, torch.full_like(first, 0.7))


def test_euler_with_a_real_denoiser_passes_1000t():
    seen = []

    def model(x, t, cond):
        seen.append((t.clone(), cond.shape))
        return torch.zeros_like(x)

    x = torch.randn(3, 2)
    out = sample_euler(denoiser_fn(model, torch.ones(1, 5, 4)), x, steps=2, rescale_t=1.0).samples
    assert torch.equal(out, x)
    assert torch.equal(seen[0][0], torch.full((3,), 1000.0)) and torch.equal(seen[1][0], torch.full((3,), 500.0))
    assert seen[0][1] == (3, 5, 4)  # a batch-1 condition is repeated


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_cfg_and_interval(kind):
    calls = {"c": 0, "u": 0}
    x = sparse() if kind == "sparse" else torch.randn(2, 3, dtype=torch.float64)

    def cond_fn(x, t):
        calls["c"] += 1
        return x * 2.0

    def uncond_fn(x, t):
        calls["u"] += 1
        return x * 0.5

    fn = classifier_free_guidance(cond_fn, uncond_fn, strength=3.0)
    v = fn(x, 0.3)
    want = (1 + 3.0) * 2.0 - 3.0 * 0.5
    got, ref = (v.feats, x.feats) if kind == "sparse" else (v, x)
    torch.testing.assert_close(got, ref * want)
    fn = classifier_free_guidance(cond_fn, uncond_fn, strength=3.0, interval=(0.5, 1.0))
    calls.update(c=0, u=0)
    v_out = fn(x, 0.3)  # outside: the conditional model alone, one evaluation
    v_in = fn(x, 0.5)  # the bound is inside
    assert calls == {"c": 2, "u": 1}
    torch.testing.assert_close(v_out.feats if kind == "sparse" else v_out, ref * 2.0)
    torch.testing.assert_close(v_in.feats if kind == "sparse" else v_in, ref * want)
    calls.update(c=0, u=0)
    classifier_free_guidance(cond_fn, uncond_fn, strength=0.0)(x, 0.7)
    assert calls == {"c": 1, "u": 0}
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(cond_fn, uncond_fn, 1.0, interval=(0.8, 0.2))
