"""Benchmark: data-parallel scaling on the GPUs of one host (torchrun, NCCL), docs/SCALING.md.

For each GPU count N (``--gpus 1,2,4``) the driver starts ``torchrun --standalone --nproc_per_node N``
on this file; every rank builds the real trainer (DDP from the engine, the real DataLoader path with
``Trainer.batches()``), runs ``--warmup`` steps, then times ``--steps`` steps between two
``synchronize + barrier`` (wall clock of the whole loop body: data, forward, backward, all-reduce,
clipping, AdamW, EMA). Weak scaling: the per-GPU batch is the config's, so the global batch grows
with N. Efficiency(N) = samples/s(N) / (N x samples/s(1)).

Models: the SS VAE (``configs/vae/ss_vae_conv3d_16l8_fp16.json`` on synthetic voxels written by
``scripts/make_demo_voxels.py``) and the SS flow L (``configs/generation/ss_flow_img_dit_L_16l8_fp16.json``
with ``FlowMatchingCFGTrainer`` and synthetic condition tokens [1374, 1024] from
made on access; the DINOv2 encoder is not part of the step). With N > 1 each model runs
twice: DDP as configured by default (``TRELLIS_DDP_BUCKET_MB`` / ``TRELLIS_DDP_GRAD_VIEW`` unset) and
``tuned`` (25 MB buckets, gradients as bucket views).

    python scripts/bench_scaling.py --gpus 1,2,4 [--which vae,flow] [--steps 15] [--json OUT/scaling.json]
    python scripts/bench_scaling.py --device cpu --gpus 1,2 --tiny     # smoke test of the script (gloo)

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 is set for the workers unless already set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

CONFIGS = {
    "vae": ("configs/vae/ss_vae_conv3d_16l8_fp16.json", "configs/demo/ss_vae_tiny.json"),
    "flow": ("configs/generation/ss_flow_img_dit_L_16l8_fp16.json", "configs/demo/ss_flow_img_tiny.json"),
}
VARIANTS = {"default": {}, "tuned": {"TRELLIS_DDP_BUCKET_MB": "25", "TRELLIS_DDP_GRAD_VIEW": "1"}, "no_comm": {}}


# ------------------------------------------------------------------------------------------ worker
class FlowLatents(torch.utils.data.Dataset):
    """Synthetic SS-flow samples made on access: ``x_0`` float32 [C, R, R, R] (normal, seeded by the
    index), ``cond`` float32 [L, C_cond] from a pool of 8 token sets; 4096 samples (long epochs)."""

    def __init__(self, channels: int, resolution: int, cond_len: int, cond_channels: int, num: int = 4096):
        g = torch.Generator().manual_seed(0)
        self.pool = [torch.randn(cond_len, cond_channels, generator=g) for _ in range(8)]
        self.shape = (channels, resolution, resolution, resolution)
        self.num = num

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(int(i))
        return {"x_0": torch.randn(self.shape, generator=g), "cond": self.pool[int(i) % 8], "_index": int(i)}

    @staticmethod
    def collate_fn(batch: list[dict]) -> dict:
        return torch.utils.data.default_collate(batch)


def build_trainer(which: str, info, data_root: str, out: str, tiny: bool, num_workers: int):
    from trellis.config import build_dataset, build_models
    from trellis.registry import TRAINERS

    with open(os.path.join(ROOT, CONFIGS[which][int(tiny)])) as f:
        cfg = json.load(f)
    targs = dict(cfg["trainer"]["args"])
    targs.update(i_log=0, i_sample=0, i_save=0, i_print=0, i_ddpcheck=0, num_workers=num_workers)
    if info.device.type == "cpu":
        targs["fp16_mode"] = None
    torch.manual_seed(0)
    models = build_models(cfg)
    if which == "vae":
        cfg["dataset"]["args"]["min_aesthetic_score"] = None
        dataset = build_dataset(cfg, data_root)
        name = cfg["trainer"]["name"]
    else:
        args = cfg["models"]["denoiser"]["args"]
        dataset = FlowLatents(args["in_channels"], args["resolution"], 16 if tiny else 1374, args["cond_channels"])
        targs.pop("image_cond_model", None)
        name = "FlowMatchingCFGTrainer"
    return TRAINERS.get(name)(models, dataset, output_dir=out, dist=info, **targs)


def sync(device: torch.device) -> None:
    from trellis.utils import dist as tdist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tdist.barrier()


def one_step(trainer, data, no_comm: bool = False) -> float:
    """The loop body of ``Trainer.run``; returns the seconds spent waiting for the batch. ``no_comm``:
    every DDP model skips its gradient all-reduce (timing only: the ranks' weights drift apart)."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    trainer._seed_step()
    t = time.perf_counter()
    batch = next(data)
    wait = time.perf_counter() - t
    with contextlib.ExitStack() as stack:
        if no_comm:
            for m in trainer.training_models.values():
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        trainer.run_step(batch)
    trainer.step += 1
    return wait


def measure(which: str, variant: str, info, args: argparse.Namespace) -> dict:
    for k in ("TRELLIS_DDP_BUCKET_MB", "TRELLIS_DDP_GRAD_VIEW"):
        os.environ.pop(k, None)
    os.environ.update(VARIANTS[variant])
    dev = info.device
    steps = args.flow_steps if which == "flow" else args.steps
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(which, info, args.data_root, out, args.tiny, args.num_workers)
        data = trainer.batches()
        no_comm = variant == "no_comm"
        for _ in range(args.warmup):
            one_step(trainer, data, no_comm)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        sync(dev)
        t0 = time.perf_counter()
        waits = [one_step(trainer, data, no_comm) for _ in range(steps)]
        sync(dev)
        elapsed = time.perf_counter() - t0
        per_gpu = trainer.batch_size_per_gpu
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else 0.0
        del data, trainer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    step_s = elapsed / steps
    return {"model": which, "variant": variant, "gpus": info.world_size, "batch_per_gpu": per_gpu,
            "global_batch": per_gpu * info.world_size, "step_ms": step_s * 1e3,
            "samples_per_s": per_gpu * info.world_size / step_s, "data_wait_ms": 1e3 * sum(waits) / len(waits),
            "peak_gib": peak}


def all_reduce_bandwidth(dev: torch.device, mib: int = 256) -> dict:
    """Bus bandwidth (GB/s) of an fp16 all-reduce of ``mib`` MiB, median of 10 (nccl-tests' busbw)."""
    import statistics

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {"model": "allreduce", "gpus": 1, "busbw_gbs": None}
    x = torch.ones(mib * 2 ** 19, dtype=torch.float16, device=dev)
    times = []
    for i in range(13):
        sync(dev)
        t = time.perf_counter()
        dist.all_reduce(x)
        sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    t = statistics.median(times)
    return {"model": "allreduce", "gpus": world, "mib": mib, "ms": t * 1e3,
            "busbw_gbs": x.numel() * 2 * 2 * (world - 1) / world / t / 1e9}


def worker(args: argparse.Namespace) -> None:
    from trellis.utils import dist as tdist
    from trellis.utils.dist import DistInfo

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if args.device == "cuda":
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank, world, local, local_world, dev)
    tdist.init_process_group(info, "127.0.0.1", 0)
    rows = []
    if rank == 0 or world > 1:
        rows.append(all_reduce_bandwidth(dev))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    variants = ["default"] + (["tuned"] if world > 1 else []) + (["no_comm"] if 1 < world == args.max_gpus else [])
    try:
        for which in args.which.split(","):
            for variant in variants:
                t = time.perf_counter()
                row = measure(which, variant, info, args)
                row["wall_s"] = time.perf_counter() - t
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    finally:
        if rank == 0:
            with open(args.result, "w") as f:
                json.dump(rows, f)
        tdist.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--which", default="vae,flow")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (SS VAE)")
    ap.add_argument("--flow_steps", type=int, default=10, help="timed steps (SS flow L)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--num_workers", type=int, default=3)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny demo configs (smoke test)")
    ap.add_argument("--json", default=None, help="write every row here")
    ap.add_argument("--launch_timeout", type=int, default=240, help="seconds per torchrun launch")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data_root", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max_gpus", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # gloo can abort in the interpreter's shutdown after a clean run
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scaling.py needs CUDA devices (or --device cpu for a smoke test)")
    from make_demo_voxels import write_dataset

    counts = [int(n) for n in args.gpus.split(",")]
    if args.device == "cuda":
        have = torch.cuda.device_count()
        counts = [n for n in counts if n <= have]
        print(f"cards: {have} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRELLIS_DIST_TIMEOUT="120")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "voxels")
        t = time.perf_counter()
        write_dataset(root, 16 if args.tiny else 512, seed=0, resolution=64)
        print(f"voxel data written in {time.perf_counter() - t:.1f} s", flush=True)
        for n in counts:
            result = os.path.join(tmp, f"rows{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   os.path.abspath(__file__), "--worker", "--data_root", root, "--result", result,
                   "--which", args.which, "--steps", str(args.steps), "--flow_steps", str(args.flow_steps),
                   "--warmup", str(args.warmup), "--max_gpus", str(max(counts)),
                   "--num_workers", str(args.num_workers), "--device", args.device] + (["--tiny"] if args.tiny else [])
            t = time.perf_counter()
            try:
                r = subprocess.run(cmd, env=env, timeout=args.launch_timeout, capture_output=True, text=True)
                code, text = r.returncode, r.stdout + r.stderr
            except subprocess.TimeoutExpired as e:
                code, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            print(f"--- {n} GPU(s): exit {code} in {time.perf_counter() - t:.0f} s", flush=True)
            if code != 0:
                print(text[-4000:], flush=True)
            if os.path.isfile(result):
                with open(result) as f:
                    rows += json.load(f)
            else:  # the rows rank 0 printed before the launch failed
                rows += [json.loads(line) for line in text.splitlines() if line.startswith('{"model"')]
            for r in rows:
                if r["gpus"] == n:
                    print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    for r in rows:
        if r["model"] == "allreduce" and r.get("busbw_gbs"):
            print(f"all-reduce {r['mib']} MiB fp16 on {r['gpus']} GPUs: {r['ms']:.2f} ms, bus bandwidth "
                  f"{r['busbw_gbs']:.0f} GB/s")
    rows = [r for r in rows if r["model"] != "allreduce"] + [r for r in rows if r["model"] == "allreduce"]
    base = {(r["model"]): r["samples_per_s"] for r in rows if r["gpus"] == 1 and r["model"] != "allreduce"}
    print("| model | GPUs | DDP | global batch | step (ms) | samples/s | efficiency | data wait (ms) | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] == "allreduce":
            continue
        b = base.get(r["model"])
        r["efficiency"] = r["samples_per_s"] / (r["gpus"] * b) if b else None
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] is not None else "-"
        print(f"| {r['model']} | {r['gpus']} | {r['variant']} | {r['global_batch']} | {r['step_ms']:.1f} | "
              f"{r['samples_per_s']:.1f} | {eff} | {r['data_wait_ms']:.1f} | {r['peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
