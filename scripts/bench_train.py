"""Benchmark: full-size flow-model training steps on one GPU (BENCHMARKING.md conventions).

Configs ``ss_flow_img_dit_L_16l8_fp16`` and ``slat_flow_img_dit_L_64l8p2_fp16`` at their batch
sizes (8 per GPU; SLat in 4 balanced micro-batches), ``fp16_mode`` inflat_all and bf16. One step is
``Trainer.run_step`` of the flow CFG trainer: keyed t / noise / CFG dropout, forward, backward,
adaptive clipping, AdamW, EMA. Synthetic inputs already on the GPU: SS latents [8, 8, 16^3]; SLat
= 8 objects, each the union of 3 superellipsoid shells on 64^3 (~15.8k voxels); condition tokens
[8, 1374, 1024] (the DINOv2 encoder is not timed). No elastic checkpointing (as the original's
reference numbers). CUDA events after warm-up, median of the repetitions. Three timings: each step
alone (events around one step, synchronised after it), and pipelined (events around blocks of
``--pipe_block`` steps with no synchronisation inside, as ``Trainer.run`` runs them: the host queues
the next step while the GPU finishes the last; per-step time = block time / block length), and the
model forward + backward alone (``Trainer.forward_backward``: no clipping, optimizer or EMA; the
conditions of the original's reference numbers).

Model FLOPs = 3 x forward (linear 2 x rows x in x out; sparse conv 2 x active pairs x C_in x C_out;
attention 4 L^2 C self, 4 L L_cond C cross); MFU against the bf16 matmul peak measured in the run.

    python scripts/bench_train.py [--which ss,slat] [--modes inflat_all,bf16] [--steps 8] [--compile ss:bf16,slat:inflat_all]

``--compile WHICH:MODE`` runs that pair again with the trainer's ``compile=True``: the dense SS model
is compiled whole, the sparse SLat model compiles its fused element-wise regions instead
(``trellis.modules.fused``; it cannot be compiled whole). ``TRELLIS_FUSED=eager|1`` in the environment
also switches the fused regions on in the plain runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_common import bf16_peak_tflops, copy_bandwidth_tbs, gpu_kernels  # noqa: E402

from trellis.datasets.structured_latent import SLat  # noqa: E402
from trellis.modules.sparse import SparseTensor  # noqa: E402
from trellis.registry import MODELS, TRAINERS  # noqa: E402
from trellis.utils.dist import DistInfo  # noqa: E402

CONFIGS = {"ss": "ss_flow_img_dit_L_16l8_fp16", "slat": "slat_flow_img_dit_L_64l8p2_fp16"}
L_COND, C_COND = 1374, 1024


# ---------------------------------------------------------------------------------------------- data
def superellipsoid_object(rng: np.random.Generator, res: int = 64) -> np.ndarray:
    """uint8 [N, 3]: the union of 3 random superellipsoid surface shells (each shell = voxels inside
    with at least one empty 6-neighbour; BENCHMARKING.md), about 15-16k voxels."""
    axis = np.arange(res, dtype=np.float64)
    g = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)  # [R, R, R, 3]
    union = np.zeros((res,) * 3, dtype=bool)
    for _ in range(3):
        c = res * rng.uniform(0.4, 0.6, 3)
        r = res * rng.uniform(0.25, 0.40, 3)
        p = rng.uniform(2, 4)
        inside = (np.abs((g - c) / r) ** p).sum(-1) <= 1
        pad = np.pad(inside, 1)
        six = np.ones_like(inside)
        for ax in range(3):
            for sh in (-1, 1):
                six &= np.roll(pad, sh, axis=ax)[1:-1, 1:-1, 1:-1]
        union |= inside & ~six
    return np.argwhere(union).astype(np.uint8)


class SyntheticLatents(torch.utils.data.Dataset):
    """In-memory samples: ``x_0`` dense [8,16,16,16] or sparse (coords, feats), and ``cond`` tokens."""

    def __init__(self, sparse: bool, num: int = 8, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.sparse = sparse
        self.items = []
        for i in range(num):
            cond = torch.from_numpy(rng.standard_normal((L_COND, C_COND)).astype(np.float32))
            if sparse:
                coords = torch.from_numpy(superellipsoid_object(rng).astype(np.int32))
                feats = torch.from_numpy(rng.standard_normal((len(coords), 8)).astype(np.float32))
                self.items.append({"coords": coords, "feats": feats, "cond": cond, "_index": i})
            else:
                x = torch.from_numpy(rng.standard_normal((8, 16, 16, 16)).astype(np.float32))
                self.items.append({"x_0": x, "cond": cond, "_index": i})
        self.loads = [len(it["coords"]) for it in self.items] if sparse else [1] * num

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return dict(self.items[i])

    def collate_fn(self, batch: list, split_size: int | None = None):
        if self.sparse:
            return SLat.collate_fn(batch, split_size)
        return torch.utils.data.default_collate(batch)


# --------------------------------------------------------------------------------------------- FLOPs
def _pairs(coords: torch.Tensor) -> int:
    """Active (input, output) pairs of a 3x3x3 submanifold conv over coords [N, 4] (b, x, y, z)."""
    c = coords.long()
    s = 2 ** 11
    key = ((c[:, 0] * s + c[:, 1] + 1) * s + c[:, 2] + 1) * s + c[:, 3] + 1
    keys = torch.sort(key).values
    total = 0
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dz in (-1, 0, 1):
                q = key + (dx * s + dy) * s + dz
                idx = torch.searchsorted(keys, q).clamp(max=keys.numel() - 1)
                total += int((keys[idx] == q).sum())
    return total


def _dit_block_flops(L: int, C: int, L_cond: int, C_cond: int, mlp: float) -> float:
    """Forward FLOPs of one modulated cross block over one sequence of L tokens."""
    linear = 2 * L * C * (3 * C + C + C + C + 2 * int(mlp * C)) + 2 * L_cond * C_cond * 2 * C + 2 * C * 6 * C
    attn = 4 * L * L * C + 4 * L * L_cond * C
    return float(linear + attn)


def ss_flops(args: dict, batch: int) -> float:
    r, p, C = args["resolution"], args["patch_size"], args["model_channels"]
    L = (r // p) ** 3
    per = args["num_blocks"] * _dit_block_flops(L, C, L_COND, C_COND, args["mlp_ratio"])
    per += 2 * L * args["in_channels"] * p ** 3 * C * 2
    return 3 * batch * per


def slat_flops(args: dict, x: SparseTensor) -> float:
    """Forward x 3 for the L layout (one io stage): fine res-block, down res-block, DiT, up + fine blocks."""
    C, io = args["model_channels"], args["io_block_channels"][0]
    n_io = args["num_io_res_blocks"]
    fine = x.coords
    coarse = torch.unique(torch.cat([fine[:, :1], fine[:, 1:] // 2], 1), dim=0)
    nf, nc = fine.shape[0], coarse.shape[0]
    pf, pc = _pairs(fine), _pairs(coarse)
    f = 2 * nf * args["in_channels"] * io + 2 * nf * io * args["out_channels"]  # in / out layers
    f += (n_io - 1) * 2 * (2 * pf * io * io)  # plain input blocks at fine
    f += 2 * pc * io * C + 2 * pc * C * C + 2 * nc * io * C  # down block (convs at coarse, skip linear)
    counts = torch.bincount(coarse[:, 0].long()).tolist()
    f += args["num_blocks"] * sum(_dit_block_flops(L, C, L_COND, C_COND, args["mlp_ratio"]) for L in counts)
    f += 2 * pf * (2 * C) * io + 2 * pf * io * io + 2 * nf * 2 * C * io  # up block (cat skip) at fine
    f += (n_io - 1) * (2 * pf * (2 * io) * io + 2 * pf * io * io + 2 * nf * 2 * io * io)  # plain out blocks
    return 3.0 * f


# --------------------------------------------------------------------------------------------- bench
def find_syncs(trainer, fresh) -> list[str]:
    """Runs one step with CUDA sync debugging on; returns the synchronising calls, most frequent first,
    each with the innermost frames of this repository that led to it."""
    import traceback
    import warnings
    from collections import Counter

    seen: Counter = Counter()
    old = warnings.showwarning

    def hook(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if ROOT in f.filename and "bench_train" not in f.filename]
        where = " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in frames[::-1][:3])
        seen[f"{str(message)[:60]} @ {where or filename + ':' + str(lineno)}"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run_step(fresh())
            trainer.drain_checks()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    return [f"{n}x {k}" for k, n in seen.most_common()]


KINDS = (  # kernel name pieces -> kind, first match wins
    ("attention", ("attention", "sdpa", "flash", "fmha", "_attn", "compute_dot_do_o", "convert_dq")),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "splitk")),
    ("optimizer / EMA / clipping", ("multi_tensor_apply", "foreach", "adam", "lerp")),
    ("sparse conv", ("conv",)),
    ("compiled element-wise (Triton)", ("triton_",)),
)


def _kernel_events(prof):
    """(name, kind, GPU ms, (start, end)) of every GPU kernel of a profile (``bench_common.gpu_kernels``)."""
    for ev in gpu_kernels(prof):
        name = ev.name.lower()
        kind = next((k for k, keys in KINDS if any(p in name for p in keys)), "other")
        yield ev.name, kind, ev.device_time_total / 1e3, (ev.time_range.start, ev.time_range.end)


def kernel_table(prof, rows: int) -> str:
    """The ``rows`` kernels of one profiled step with the most GPU time, by name (no host ops)."""
    per = {}
    for name, kind, ms, _ in _kernel_events(prof):
        tot, n, _k = per.get(name, (0.0, 0, kind))
        per[name] = (tot + ms, n + 1, kind)
    lines = [f"{'GPU ms':>9s} {'calls':>6s} {'us/call':>8s}  {'kind':12s} kernel"]
    for name, (tot, n, kind) in sorted(per.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{tot:9.2f} {n:6d} {1e3 * tot / n:8.1f}  {kind.split()[0]:12s} {name[:140]}")
    return "\n".join(lines) + "\n"


def kernel_kinds(prof, gaps: int = 8) -> str:
    """GPU time of one profiled step by kernel kind, how much of the step's span the GPU was idle, and
    the ``gaps`` longest idle stretches with the kernels on either side (where the GPU waited for the
    host)."""
    sums, spans, count = {}, [], 0
    for name, kind, ms, span in _kernel_events(prof):
        sums[kind] = sums.get(kind, 0.0) + ms
        spans.append((span[0], span[1], name))
        count += 1
    if not spans:
        return "no GPU events\n"
    spans.sort()
    busy, cur_s, cur_e, last = 0.0, spans[0][0], spans[0][1], spans[0][2]
    idle = []  # (us, offset from the first kernel in us, kernel before, kernel after)
    for a, b, name in spans[1:]:
        if a > cur_e:
            busy += cur_e - cur_s
            idle.append((a - cur_e, cur_e - spans[0][0], last, name))
            cur_s, cur_e = a, b
        elif b <= cur_e:
            continue
        else:
            cur_e = b
        last = name
    busy += cur_e - cur_s
    wall = (spans[-1][1] - spans[0][0]) / 1e3
    lines = [f"{'kind':34s} {'GPU ms':>9s} {'share':>7s}"]
    total = sum(sums.values())
    for k, v in sorted(sums.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:34s} {v:9.2f} {100 * v / total:6.1f}%")
    lines.append(f"{'kernels':34s} {count:9d}")
    lines.append(f"{'first kernel start to last end':34s} {wall:9.2f} ms; GPU busy {busy / 1e3:.2f} ms, "
                 f"idle {wall - busy / 1e3:.2f} ms")
    if idle:
        bins = ((0, 5), (5, 50), (50, float("inf")))
        lines.append("idle stretches by length: " + "; ".join(
            f"{lo:g}-{hi:g} us: {sum(1 for g in idle if lo <= g[0] < hi)} ({sum(g[0] for g in idle if lo <= g[0] < hi) / 1e3:.2f} ms)"
            for lo, hi in bins).replace("-inf us", "+ us"))
    if idle and gaps:
        lines.append(f"the {min(gaps, len(idle))} longest of {len(idle)} idle stretches "
                     "(us; at ms into the step; after kernel -> before kernel):")
        for us, at, before, after in sorted(idle, reverse=True)[:gaps]:
            lines.append(f"  {us:9.1f} us at {at / 1e3:8.2f} ms  {before[:60]} -> {after[:60]}")
    return "\n".join(lines) + "\n"


def inductor_bandwidth_summary(path: str, copy_tbs: float) -> str:
    """Sums a ``torch._inductor.config.profile_bandwidth`` report (one section per call of a compiled
    graph, one line per kernel launch: ms, GB, GB/s, name) over the last call of each graph: the
    compiled element-wise kernels of one forward + backward. Their bytes are Inductor's count of what
    each kernel must read and write; at the copy rate ``copy_tbs`` that traffic takes the memory-bound
    least time, beside the kernels' own time (each benchmarked alone)."""
    sections, cur = {}, None
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("TRITON KERNELS BANDWIDTH INFO ("):
                cur = line[line.index("(") + 1:line.rindex(")")]
                sections[cur] = []  # a later call of the same graph replaces the earlier one
            elif line.startswith("SUMMARY") or line.startswith("===="):
                cur = None
            elif cur is not None and line.strip():
                parts = [p.strip() for p in line.split("\t") if p.strip()]
                ms, gb = float(parts[0].removesuffix("ms")), float(parts[1].removesuffix("GB"))
                sections[cur].append((ms, gb, parts[-1]))
    if not sections:
        return f"no Inductor bandwidth sections in {path}\n"
    lines = [f"{'graph':>5s} {'launches':>8s} {'kernel ms':>10s} {'GB':>8s} {'TB/s':>6s} {'ms at copy rate':>16s}"]
    tot_ms = tot_gb = 0.0
    for i, calls in enumerate(sections.values()):
        ms, gb = sum(c[0] for c in calls), sum(c[1] for c in calls)
        tot_ms, tot_gb = tot_ms + ms, tot_gb + gb
        lines.append(f"{i:5d} {len(calls):8d} {ms:10.2f} {gb:8.2f} {gb / ms if ms else 0:6.2f} {gb / copy_tbs:16.2f}")
    lines.append(f"{'all':>5s} {sum(len(c) for c in sections.values()):8d} {tot_ms:10.2f} {tot_gb:8.2f} "
                 f"{tot_gb / tot_ms if tot_ms else 0:6.2f} {tot_gb / copy_tbs:16.2f}")
    lines.append(f"(copy rate {copy_tbs:.2f} TB/s; GB / (TB/s) = ms)")
    return "\n".join(lines) + "\n"


def bench(which: str, mode: str, steps: int, device: torch.device, compile_model: bool | dict,
          profile_dir: str | None = None, pipe_block: int = 4, pipe_reps: int = 5, find: bool = False,
          batch_split: int | None = None, fresh_coords: bool = False, profile_rows: int = 40,
          bandwidth_pass: bool = False) -> dict:
    with open(os.path.join(ROOT, "configs", "generation", CONFIGS[which] + ".json")) as f:
        cfg = json.load(f)
    spec = cfg["models"]["denoiser"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = MODELS.get(spec["name"])(**spec["args"])
    sparse = which == "slat"
    dataset = SyntheticLatents(sparse)
    targs = dict(cfg["trainer"]["args"])
    for k in ("image_cond_model", "elastic"):
        targs.pop(k, None)
    if batch_split:
        targs["batch_split"] = batch_split
    targs.update(fp16_mode=mode, i_log=0, i_sample=0, i_save=0, i_print=0, i_ddpcheck=0, num_workers=0,
                 compile=compile_model)
    name = "SparseFlowMatchingCFGTrainer" if sparse else "FlowMatchingCFGTrainer"
    with tempfile.TemporaryDirectory() as out:
        trainer = TRAINERS.get(name)({"denoiser": model}, dataset, output_dir=out, dist=DistInfo(device=device),
                                     **targs)
        route = ("regions" if hasattr(model, "compile_fused_regions") else "whole") if compile_model else "none"
        collate = trainer.collate_fn() or dataset.collate_fn
        batch = trainer.to_device(trainer.check_failed(collate([dataset[i] for i in range(8)])))

        def fresh():
            if not isinstance(batch, list):
                return dict(batch)
            out = [dict(mb) for mb in batch]
            if fresh_coords:  # new SparseTensors, empty caches: kernel maps, windows, plans built again
                for mb in out:
                    x = mb["x_0"]
                    mb["x_0"] = SparseTensor(x.feats, x.coords.clone(), shape=x.shape)
            return out

        if bandwidth_pass:  # Inductor's per-kernel bandwidth report (see --inductor_bandwidth): no timing
            # one pass (it compiles, then reports): the report looks up every launch's kernel name
            # through the garbage collector, seconds per pass
            trainer.policy.zero_grad()
            trainer.forward_backward(fresh())
            torch.cuda.synchronize()
            return {}
        x_all = SLat.collate_fn([dataset[i] for i in range(8)])["x_0"] if sparse else None
        flops = slat_flops(spec["args"], x_all) if sparse else ss_flops(spec["args"], 8)
        for i in range(3):
            trainer.step = i
            trainer.run_step(fresh())
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats(device)

        def timed(run) -> float:  # seconds of run(fresh batch) between CUDA events, synchronised after
            b = fresh()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run(b)
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) / 1e3

        times = []
        for i in range(steps):
            trainer.step = 3 + i
            times.append(timed(trainer.run_step))
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        # Model forward + backward only (the conditions of the original's reference numbers): the
        # same micro-batches, no clipping, optimizer or EMA.
        fb_times = []
        for _ in range(steps):
            trainer.policy.zero_grad()
            fb_times.append(timed(trainer.forward_backward))
        trainer.drain_checks()
        # Pipelined: blocks of steps between two events, no host sync inside a block, as in
        # Trainer.run (the step never waits for the GPU, so the host queues step n+1 while the GPU
        # still runs step n). Per-step time = block time / block length; median over the blocks.
        piped, host, wait = [], [], []
        drain = trainer.drain_checks
        waited = [0.0]

        def timed_drain():  # host time spent waiting for the GPU (the previous step's loss check)
            w0 = time.perf_counter()
            drain()
            waited[0] += time.perf_counter() - w0

        trainer.drain_checks = timed_drain
        for r in range(pipe_reps):
            waited[0] = 0.0
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            h0 = time.perf_counter()
            for j in range(pipe_block):
                trainer.step = 3 + steps + r * pipe_block + j
                trainer.run_step(fresh())
            host.append((time.perf_counter() - h0) / pipe_block)
            wait.append(waited[0] / pipe_block)
            e.record()
            torch.cuda.synchronize()
            piped.append(s.elapsed_time(e) / 1e3 / pipe_block)
        trainer.drain_checks = drain
        trainer.drain_checks()
        syncs = find_syncs(trainer, fresh) if find else None
        if profile_dir:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.run_step(fresh())
                torch.cuda.synchronize()
            stem = os.path.join(profile_dir, f"profile_{which}_{mode}{'_compile' if compile_model else ''}")
            # GPU time per kernel, and host time per op (what a launch-bound step spends its time on)
            for sort, suffix in (("cuda_time_total", ""), ("self_cpu_time_total", "_host")):
                table = prof.key_averages().table(sort_by=sort, row_limit=profile_rows, max_name_column_width=70)
                with open(f"{stem}{suffix}.txt", "w") as f:
                    f.write(table)
            with open(f"{stem}_kinds.txt", "w") as f:
                f.write(kernel_kinds(prof))
            with open(f"{stem}_kernels.txt", "w") as f:
                f.write(kernel_table(prof, profile_rows))
    t = statistics.median(times)
    t_fb = statistics.median(fb_times)
    tp = statistics.median(piped) if piped else float("nan")
    tokens = x_all.feats.shape[0] if sparse else 8 * (spec["args"]["resolution"] // spec["args"]["patch_size"]) ** 3
    del trainer, model
    torch.cuda.empty_cache()
    label = mode + {"none": "", "whole": "+compile", "regions": "+compile(fused regions)"}[route]
    if isinstance(compile_model, dict) and compile_model:
        label += json.dumps(compile_model, separators=(",", ":"))
    if batch_split:
        label += f"+batch_split={batch_split}"
    if fresh_coords and sparse:
        label += "+fresh_coords"
    if os.environ.get("SPARSE_ATTN_BACKEND") and sparse:
        label += f"+SPARSE_ATTN_BACKEND={os.environ['SPARSE_ATTN_BACKEND']}"
    if route == "none" and sparse and os.environ.get("TRELLIS_FUSED", ""):
        label += f"+TRELLIS_FUSED={os.environ['TRELLIS_FUSED']}"
    return {"config": CONFIGS[which], "mode": label, "step_ms": t * 1e3,
            "spread_ms": (max(times) - min(times)) * 1e3, "step_ms_pipelined": tp * 1e3,
            "fwd_bwd_ms": t_fb * 1e3, "fwd_bwd_spread_ms": (max(fb_times) - min(fb_times)) * 1e3,
            "pipelined_spread_ms": (max(piped) - min(piped)) * 1e3 if piped else float("nan"),
            # host time to queue one step. Not a verdict on its own: a GPU-bound host also blocks, in
            # launches once the CUDA launch queue is full, so this is close to the step time either way
            "host_ms_pipelined": statistics.median(host) * 1e3 if host else float("nan"),
            # of which waiting for the GPU in the step's own finite-loss check; the rest is host work
            # (Python, launches) and waits at synchronising calls
            "host_wait_ms_pipelined": statistics.median(wait) * 1e3 if wait else float("nan"),
            "syncs": syncs, "steps_per_s": 1 / t, "tokens_per_s": tokens / t,
            "tokens": tokens, "peak_gib": peak, "tflop_step": flops / 1e12, "warm_s": warm_s,
            "compile_route": route, "trellis_fused_env": os.environ.get("TRELLIS_FUSED", "")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", default="ss,slat")
    ap.add_argument("--modes", default="inflat_all,bf16", help="plain (uncompiled) runs; 'none' for only the --compile runs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", default="",
                    help="comma list of which:mode pairs to also run with the trainer's compile=True, e.g. "
                         "ss:bf16,slat:inflat_all (SLat: its fused regions are compiled, not the whole model)")
    ap.add_argument("--compile_kwargs", default="",
                    help='torch.compile kwargs (JSON) for the --compile runs, e.g. \'{"mode": "max-autotune-no-cudagraphs"}\'')
    ap.add_argument("--pipe_block", type=int, default=4, help="steps per pipelined block (no host sync inside)")
    ap.add_argument("--pipe_reps", type=int, default=5, help="pipelined blocks (median); 0 skips the pipelined timing")
    ap.add_argument("--batch_split", type=int, default=None,
                    help="override the config's batch_split (micro-batches per step; the batch stays 8)")
    ap.add_argument("--fresh_coords", action="store_true",
                    help="SLat: every step gets new SparseTensors (no cached kernel maps, windows or attention "
                         "plans), as in training where every batch is new")
    ap.add_argument("--find_syncs", action="store_true",
                    help="run one more step with torch.cuda.set_sync_debug_mode and list the synchronising calls")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--profile_dir", default=None, help="write a kernel table of one profiled step per run here")
    ap.add_argument("--profile_rows", type=int, default=40, help="rows of the --profile_dir tables")
    ap.add_argument("--inductor_bandwidth", default=None, metavar="FILE",
                    help="instead of timing: run each --compile pair's forward + backward with Inductor's "
                         "per-kernel bandwidth report written to FILE (torch._inductor.config.profile_bandwidth; "
                         "every kernel benchmarked alone, results not usable) and print its sums: the "
                         "compiled element-wise kernels' traffic and its time at the measured copy rate")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA device")
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = bf16_peak_tflops(device)
    print(f"card: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
          f"bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    runs = [(w, m, False) for w in args.which.split(",") for m in args.modes.split(",") if m and m != "none"]
    ckw = json.loads(args.compile_kwargs) if args.compile_kwargs else True
    runs += [(p.split(":")[0], p.split(":")[1], ckw) for p in args.compile.split(",") if p]
    if args.inductor_bandwidth:
        import torch._inductor.config as inductor_config

        copy_tbs = copy_bandwidth_tbs(device)
        inductor_config.profile_bandwidth = True
        inductor_config.profile_bandwidth_regex = ""
        # no benchmark harness in the generated modules: torch 2.11 calls it without its arguments when
        # a bandwidth report file is set (and the report needs no harness)
        inductor_config.benchmark_harness = False
        # The report names each launch's kernel by searching the garbage collector's referrers, on every
        # launch (tens of ms each, minutes per step): once per kernel object is enough.
        from torch._inductor.runtime import triton_heuristics

        find_names, names = triton_heuristics._find_names, {}

        def cached_names(obj):
            if id(obj) not in names:
                names[id(obj)] = find_names(obj)
            return names[id(obj)]

        triton_heuristics._find_names = cached_names
        for which, mode, comp in runs:
            if not comp:
                continue
            inductor_config.profile_bandwidth_output = path = f"{args.inductor_bandwidth}.{which}_{mode}"
            if os.path.exists(path):
                os.remove(path)  # Inductor appends
            bench(which, mode, 1, device, comp, batch_split=args.batch_split, bandwidth_pass=True)
            print(f"# {CONFIGS[which]} {mode}+compile: Inductor kernels of one forward + backward ({path})")
            print(inductor_bandwidth_summary(path, copy_tbs), flush=True)
        return
    rows = []
    for which, mode, comp in runs:
        r = bench(which, mode, args.steps, device, comp, args.profile_dir, args.pipe_block, args.pipe_reps,
                  args.find_syncs, args.batch_split, args.fresh_coords, args.profile_rows)
        r["mfu"] = r["tflop_step"] / (r["step_ms"] / 1e3) / peak
        r["mfu_fwd_bwd"] = r["tflop_step"] / (r["fwd_bwd_ms"] / 1e3) / peak
        r["mfu_pipelined"] = r["tflop_step"] / (r["step_ms_pipelined"] / 1e3) / peak
        rows.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(device), "peak_tflops": peak, "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name(device)}, bf16 peak {peak:.0f} TFLOP/s")
    print("| config | fp16_mode | step (ms) | steps/s | tokens/s | TFLOP/step | MFU | pipelined step (ms) | "
          "pipelined MFU | fwd+bwd only (ms) | fwd+bwd MFU | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['mode']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} "
              f"| {r['tflop_step']:.1f} | {100 * r['mfu']:.1f}% | {r['step_ms_pipelined']:.1f} "
              f"| {100 * r['mfu_pipelined']:.1f}% | {r['fwd_bwd_ms']:.1f} | {100 * r['mfu_fwd_bwd']:.1f}% "
              f"| {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
