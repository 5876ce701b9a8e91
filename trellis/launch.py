"""Process launch for ``train.py``: one process, one per local GPU (spawned), ``torchrun`` (one or
several nodes, elastic restarts), nodes started by hand (``--num_nodes/--node_rank/--master_addr/
--master_port``); the ``--auto_retry`` supervisor; the run directory's ``command.txt``,
``config.json`` and model summaries. See docs/SCALING.md.

Every worker ends with an exit code: 0 on success, 2 for a user error (config, data, checkpoint,
ranks started with different configs: one readable line, no traceback unless ``TRELLIS_DEBUG=1``),
1 for anything else, including a failed rendezvous or a lost rank, which are named. A failed rank
makes the whole job exit non-zero; ``torchrun`` and ``torch.multiprocessing.spawn`` stop the other
ranks, and timeouts (``TRELLIS_RDZV_TIMEOUT`` at start-up, ``TRELLIS_DIST_TIMEOUT`` for
collectives) bound any wait. After an elastic restart or a SLURM requeue the run resumes from the
newest checkpoint of ``--output_dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import traceback

import torch

from trellis.config import (
    ConfigError,
    apply_overrides,
    build_dataset,
    build_models,
    load_config,
    validate_config,
)
from trellis.datasets.base import DatasetError
from trellis.registry import TRAINERS, RegistryError
from trellis.trainers.checkpoint import CheckpointError, find_latest, resolve_ckpt
from trellis.utils import dist as tdist
from trellis.utils.dist import DistInfo
from trellis.utils.io import atomic_write_json, atomic_write_text

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, RegistryError, ValueError, FileNotFoundError)
WORKER_ENV = "TRELLIS_WORKER"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def prepare_config(args: argparse.Namespace) -> dict:
    cfg = apply_overrides(load_config(args.config), args.overrides)
    validate_config(cfg)
    return cfg


def torchrun_layout() -> tuple[int, int, int, int] | None:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment, if present."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local, local_world


def pick_device(args: argparse.Namespace) -> str:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_layout_flags(args: argparse.Namespace, device: str) -> int:
    """Validates ``--num_nodes/--node_rank/--num_gpus/--master_port``; returns processes on this node."""
    if args.num_nodes < 1:
        raise ConfigError(f"--num_nodes must be at least 1, got {args.num_nodes}")
    if not 0 <= args.node_rank < args.num_nodes:
        raise ConfigError(f"--node_rank must be in [0, {args.num_nodes}) for --num_nodes {args.num_nodes}, "
                          f"got {args.node_rank}")
    if not str(args.master_port).isdigit() or not 0 < int(args.master_port) < 65536:
        raise ConfigError(f"--master_port must be a port number, got {args.master_port!r}")
    nproc = args.num_gpus if args.num_gpus > 0 else (torch.cuda.device_count() if device == "cuda" else 1)
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--num_gpus {nproc}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return nproc


def launch(args: argparse.Namespace, cfg: dict) -> int:
    try:
        device = pick_device(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = torchrun_layout()
    if layout is not None:
        return worker(layout, device, args, cfg)
    try:
        nproc = check_layout_flags(args, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = nproc * args.num_nodes
    if world == 1:
        return worker((0, 1, 0, 1), device, args, cfg)
    import torch.multiprocessing as mp

    try:
        mp.spawn(_spawn_entry, args=(nproc, world, device, args, cfg), nprocs=nproc, join=True)
    except mp.ProcessExitedException as e:
        print(f"error: rank {args.node_rank * nproc + e.error_index} exited with code {e.exit_code}; "
              "the job is stopped", file=sys.stderr)
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"error: a rank failed: {e}", file=sys.stderr)
        return 1
    return 0


def _spawn_entry(local_rank: int, nproc: int, world: int, device: str, args: argparse.Namespace, cfg: dict) -> None:
    code = worker((args.node_rank * nproc + local_rank, world, local_rank, nproc), device, args, cfg)
    if code:
        sys.exit(code)


def worker(layout: tuple[int, int, int, int], device: str, args: argparse.Namespace, cfg: dict) -> int:
    """Runs one rank; returns its exit code. A rank of a multi-process job ends its process here with
    ``os._exit`` once everything is closed: torch's gloo backend can abort (SIGABRT) in the
    interpreter's shutdown after a clean run, which torchrun would count as a failure."""
    code = _worker(layout, device, args, cfg)
    if layout[1] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _worker(layout: tuple[int, int, int, int], device: str, args: argparse.Namespace, cfg: dict) -> int:
    rank, world, local, local_world = layout
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores, do not oversubscribe
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    info = DistInfo(rank, world, local, local_world, dev)
    try:
        tdist.init_process_group(info, args.master_addr, int(args.master_port))
        if info.distributed:
            tdist.check_same_job(info, job_fingerprint(cfg))
        run(info, args, cfg)
        return 0
    except tdist.DistributedError as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return 1
    except USER_ERRORS as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        if os.environ.get("TRELLIS_DEBUG") == "1":
            traceback.print_exc()
        return 2
    except Exception as e:  # noqa: BLE001 - report which rank failed, then exit non-zero
        if info.distributed and tdist.is_comm_failure(e):
            print(tdist.explain_comm_failure(info, e), file=sys.stderr, flush=True)
            if os.environ.get("TRELLIS_DEBUG") == "1":
                traceback.print_exc()
            return 1
        traceback.print_exc()
        print(f"[rank {rank}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        tdist.destroy_process_group()


def code_fingerprint() -> str:
    """sha256 of the ``trellis`` package's Python sources (paths and contents)."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def job_fingerprint(cfg: dict) -> dict[str, str]:
    """What must be equal on every rank: the resolved config, the package version and its code."""
    from trellis import __version__

    config = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"config": config, "version": __version__, "code": code_fingerprint()}


def run(info: DistInfo, args: argparse.Namespace, cfg: dict) -> None:
    targs = dict(cfg["trainer"].get("args", {}))
    torch.manual_seed(int(targs.get("seed", 0)))  # same initial weights on every rank and every run
    dataset = build_dataset(cfg, args.data_dir)
    models = build_models(cfg)
    load_dir, which = args.load_dir or args.output_dir, args.ckpt
    if tdist.restart_count() > 0 and find_latest(args.output_dir) is not None:
        # An elastic restart (torchrun --max-restarts) or a SLURM requeue continues this run.
        load_dir, which = args.output_dir, "latest"
    step = resolve_ckpt(load_dir, which)
    if info.distributed:
        steps = tdist.all_gather_object(step)
        if len(set(steps)) > 1:
            raise CheckpointError(f"the ranks found different checkpoints to resume from in {load_dir} "
                                  f"(step per rank: {steps}); the run directory must be on a filesystem "
                                  "that every node shares")
    if not args.tryrun and info.is_main:
        write_run_files(args, cfg, models)
    trainer_cls = TRAINERS.get(cfg["trainer"]["name"])
    trainer = trainer_cls(models, dataset, output_dir=args.output_dir, load_dir=load_dir, step=step,
                          dist=info, **targs)
    if args.tryrun:
        trainer.tryrun()
    elif args.profile:
        trainer.profile()
    else:
        trainer.run()


def model_summary(model: torch.nn.Module) -> str:
    lines = [f"{type(model).__name__}", ""]
    for name, p in model.named_parameters():
        frozen = "" if p.requires_grad else "\t(frozen)"
        lines.append(f"{name}\t{list(p.shape)}\t{str(p.dtype).replace('torch.', '')}\t{p.numel()}{frozen}")
    for name, b in model.named_buffers():
        lines.append(f"{name}\t{list(b.shape)}\t{str(b.dtype).replace('torch.', '')}\t{b.numel()}\t(buffer)")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines += ["", f"Total parameters: {total:,}", f"Trainable parameters: {trainable:,}"]
    return "\n".join(lines) + "\n"


def write_run_files(args: argparse.Namespace, cfg: dict, models: dict[str, torch.nn.Module]) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, "command.txt"), " ".join(sys.argv) + "\n")
    atomic_write_json(os.path.join(args.output_dir, "config.json"), cfg)
    for key, model in models.items():
        atomic_write_text(os.path.join(args.output_dir, f"{key}_model_summary.txt"), model_summary(model))


def _strip_flag(argv: list[str], flag: str, has_value: bool = True) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == flag:
            skip = has_value
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out


def supervise(argv: list[str], args: argparse.Namespace) -> int:
    """Runs the training as a child process and relaunches it from the newest checkpoint after a
    failure, up to ``--auto_retry`` times. User errors (exit code 2) are not retried."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    base = _strip_flag(argv, "--auto_retry")
    env = dict(os.environ, **{WORKER_ENV: "1"})
    code = 1
    for attempt in range(args.auto_retry + 1):
        cmd = list(base)
        if attempt > 0 and find_latest(args.output_dir) is not None:
            cmd = _strip_flag(_strip_flag(cmd, "--ckpt"), "--load_dir") + ["--ckpt", "latest", "--load_dir", args.output_dir]
        code = subprocess.call([sys.executable, script, *cmd], env=env)
        if code == 0:
            return 0
        if code == 2:
            print("auto_retry: not retrying a configuration or data error", file=sys.stderr)
            return code
        if attempt < args.auto_retry:
            print(f"auto_retry: attempt {attempt + 1} failed with exit code {code}; relaunching from the newest "
                  f"checkpoint ({args.auto_retry - attempt} retries left)", file=sys.stderr, flush=True)
    print(f"auto_retry: giving up after {args.auto_retry} retries (last exit code {code})", file=sys.stderr)
    return code if code > 0 else 1
