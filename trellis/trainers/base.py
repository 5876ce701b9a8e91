"""The training engine: one loop with components, shared by every TRELLIS trainer.

A trainer subclass implements two hooks:

* ``training_losses(**micro_batch) -> (loss_terms, status)``: ``loss_terms["loss"]`` is optimised;
  every other scalar in either dict is logged (averaged over steps and ranks).
* ``run_snapshot(batch) -> {name: {"value": tensor, "type": "image" | "sample"}}``: pictures for
  visual monitoring; ``"sample"`` values are turned into images by ``dataset.visualize_sample``.

Everything else lives here: DDP (applied from outside the models), gradient accumulation over
``batch_split`` micro-batches, precision (``fp16_mode``), clipping, EMA, LR schedule, checkpoints
(complete and atomic; resume is exact), logging, snapshots, ``tryrun`` and ``profile``.
See reference TRAINING.md sections 2-8 for the original semantics this keeps.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from trellis.datasets.base import DatasetError, FailedSample
from trellis.datasets.samplers import ResumableSampler
from trellis.registry import ELASTIC_CONTROLLERS, GRAD_CLIPPERS, LR_SCHEDULERS, OPTIMIZERS
from trellis.trainers.checkpointing import CheckpointMixin
from trellis.trainers.logger import MetricAccumulator, RunLogger
from trellis.trainers.precision import AmpPolicy, make_policy
from trellis.trainers.snapshot import SnapshotMixin
from trellis.trainers.tools import ToolsMixin
from trellis.utils import dist as tdist
from trellis.utils.dist import DistInfo


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNGs for one (step, rank): training randomness is a function of these
    alone, so a resumed run draws exactly what an uninterrupted run draws."""
    return (seed * 1_000_003 + step * 4099 + rank * 7919) % (2 ** 63 - 1)


def fault_injection_step(rank: int) -> int:
    """Tests only: ``TRELLIS_FAULT_AT_STEP=N`` fails step N (raises; ``TRELLIS_FAULT_KIND=kill``:
    SIGKILL), on rank ``TRELLIS_FAULT_RANK`` only if set, and only before the first elastic restart
    if ``TRELLIS_FAULT_ONCE=1``. Returns N, or 0 for no fault."""
    step = int(os.environ.get("TRELLIS_FAULT_AT_STEP", "0"))
    if "TRELLIS_FAULT_RANK" in os.environ and int(os.environ["TRELLIS_FAULT_RANK"]) != rank:
        return 0
    if os.environ.get("TRELLIS_FAULT_ONCE") == "1" and tdist.restart_count() > 0:
        return 0
    return step


def has_samples(batch: dict) -> bool:
    """Whether a collated batch still holds data (a tensor or SparseTensor besides ``_`` bookkeeping)."""
    return any(isinstance(v, torch.Tensor) or hasattr(v, "feats") for k, v in batch.items() if not k.startswith("_"))


def _optimizer_args(name: str, args: dict, params: list[torch.Tensor]) -> dict:
    """``args`` plus ``fused=True`` for Adam / AdamW when every parameter is a CUDA float tensor and the
    config chose neither ``fused`` nor ``foreach``: one kernel per parameter group instead of a
    dozen multi-tensor passes (the same update and the same state dict)."""
    if (name in ("Adam", "AdamW") and "fused" not in args and "foreach" not in args and params
            and all(p.is_cuda and p.is_floating_point() for p in params)):
        return {**args, "fused": True}
    return dict(args)


def compile_model(model: nn.Module, compile_kwargs: dict) -> nn.Module:
    """The trainer's ``compile``: ``torch.compile(model)``, or for a model that declares fused regions
    (a ``compile_fused_regions`` method) those regions compiled in place and the model returned."""
    hook = getattr(model, "compile_fused_regions", None)
    if callable(hook):
        hook(**compile_kwargs)
        return model
    return torch.compile(model, **compile_kwargs)


class Trainer(CheckpointMixin, SnapshotMixin, ToolsMixin):
    """Base trainer. Config keys are those of the original TRELLIS trainer plus a few new ones.

    Args:
        models: named models (config-key order: their params are optimised in this order).
        dataset: the training dataset.
        output_dir: run directory (``ckpts/``, ``samples/``, ``tb_logs/``, logs).
        load_dir: where to resume from (default: output_dir).
        step: checkpoint step to resume from (None: start fresh, or from ``finetune_ckpt``).
        dist: process layout and device (one CPU process if None).
        max_steps: number of optimizer steps.
        batch_size: global batch size (divided over ranks); or give ``batch_size_per_gpu``.
        batch_size_per_gpu: samples per rank per step.
        batch_split: micro-batches per step (gradient accumulation).
        optimizer: ``{name, args}`` of a ``torch.optim`` class (default AdamW, lr 1e-4).
        lr_scheduler: ``{name, args}`` of a ``torch.optim.lr_scheduler`` class or ``LinearWarmupLRScheduler``.
        elastic: ``{name, args}`` of an elastic memory controller (activation checkpointing on demand).
        grad_clip: a float max norm, or ``{name: AdaptiveGradClipper, args}``.
        ema_rate: EMA rate or list of rates.
        fp16_mode: 'inflat_all' | 'amp' | 'bf16' | None.
        fp16_scale_growth: log2 loss-scale growth per clean step (inflat_all).
        finetune_ckpt: ``{model key: path}`` to initialise from when not resuming.
        log_param_stats: log per-model parameter and gradient norms.
        prefetch_data: move the next batch to the device while the current step runs.
        i_print, i_log, i_sample, i_save, i_ddpcheck: intervals in steps (0 disables).
        keep_last: keep only the newest N checkpoints (None: keep all).
        seed: seed of the data order and of all training randomness.
        num_workers: data-loader worker processes (default: min(4, CPUs per local rank)).
        snapshot_samples: samples per snapshot.
        wandb: kwargs for ``wandb.init`` to also log there (needs wandb installed).
        compile: wrap each trained model in ``torch.compile`` (True, or a dict of its kwargs) from the
            outside; checkpoints, snapshots and state dicts use the plain models. A model with a
            ``compile_fused_regions`` method (the sparse SLat flow model, which dynamo cannot trace
            whole) gets its fused element-wise regions compiled instead (``trellis.modules.fused``).
        deterministic: on CUDA, cuDNN's deterministic convolution algorithms chosen by its heuristics
            (the same ones every run), so that a resumed run repeats an uninterrupted one. The default
            (False) lets cuDNN time its algorithms and keep the fastest; the choice depends on the timing,
            and some of them accumulate with atomics, so runs agree to float tolerance only.
    """

    def __init__(self, models: dict[str, nn.Module], dataset: Any, *, output_dir: str,
                 load_dir: str | None = None, step: int | None = None, dist: DistInfo | None = None,
                 max_steps: int, batch_size: int | None = None, batch_size_per_gpu: int | None = None,
                 batch_split: int = 1, optimizer: dict | None = None, lr_scheduler: dict | None = None,
                 elastic: dict | None = None, grad_clip: float | dict | None = None,
                 ema_rate: float | list[float] = 0.9999, fp16_mode: str | None = "inflat_all",
                 fp16_scale_growth: float = 1e-3, finetune_ckpt: dict | None = None,
                 log_param_stats: bool = False, prefetch_data: bool = True,
                 i_print: int = 1000, i_log: int = 500, i_sample: int = 10000, i_save: int = 10000,
                 i_ddpcheck: int = 10000, keep_last: int | None = None, seed: int = 0,
                 num_workers: int | None = None, snapshot_samples: int = 16, wandb: dict | None = None,
                 compile: bool | dict = False, deterministic: bool = False):
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.models = models
        self.dataset = dataset
        self.output_dir = output_dir
        self.load_dir = load_dir or output_dir
        self.max_steps = max_steps
        self.batch_split = batch_split
        self.fp16_mode = fp16_mode
        self.log_param_stats = log_param_stats
        self.prefetch_data = prefetch_data
        self.i_print, self.i_log, self.i_sample, self.i_save, self.i_ddpcheck = i_print, i_log, i_sample, i_save, i_ddpcheck
        self.keep_last = keep_last
        self.seed = seed
        self.snapshot_samples = snapshot_samples
        self.wandb = wandb
        self.step = 0
        self.sample_keys: torch.Tensor | None = None  # dataset indices of the current micro-batch
        self.batch_size_per_gpu = self._per_gpu_batch(batch_size, batch_size_per_gpu, batch_split)

        if self.device.type == "cuda":
            # fixed-shape convs: time the algorithms and keep the fastest, unless runs must repeat exactly
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cudnn.deterministic = bool(deterministic)
        # Models: precision policy decides the fp16 torso; DDP wraps from outside.
        for model in models.values():
            if fp16_mode != "inflat_all" and getattr(model, "use_fp16", False) and hasattr(model, "convert_to_fp32"):
                model.convert_to_fp32()
            model.to(self.device)
        compile_kwargs = compile if isinstance(compile, dict) else ({} if compile else None)
        self.training_models = {k: self._wrap(m if compile_kwargs is None else compile_model(m, compile_kwargs))
                                for k, m in models.items()}
        self.params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        self._param_names = {id(p): (k, n) for k, m in models.items() for n, p in m.named_parameters()}
        self.policy = make_policy(fp16_mode, self.params, self.device, fp16_scale_growth)

        opt_spec = optimizer or {"name": "AdamW", "args": {"lr": 1e-4, "weight_decay": 0.0}}
        self.optimizer = OPTIMIZERS.get(opt_spec["name"])(
            self.policy.master_params, **_optimizer_args(opt_spec["name"], opt_spec.get("args", {}),
                                                         self.policy.master_params))
        if isinstance(self.policy, AmpPolicy):
            self.policy.bind(self.optimizer)
        self.lr_scheduler = (LR_SCHEDULERS.get(lr_scheduler["name"])(self.optimizer, **lr_scheduler.get("args", {}))
                             if lr_scheduler else None)
        self.grad_clip = grad_clip
        if isinstance(grad_clip, dict):
            self.clipper = GRAD_CLIPPERS.get(grad_clip["name"])(**grad_clip.get("args", {}))
        elif grad_clip is not None:
            self.clipper = lambda params: torch.nn.utils.clip_grad_norm_(params, float(grad_clip), foreach=True)
        else:
            self.clipper = None
        self.elastic = None
        if elastic is not None:
            self.elastic = ELASTIC_CONTROLLERS.get(elastic["name"])(**elastic.get("args", {}))
            self.elastic.attach(self.models, self.device)

        self.ema_rates = [float(r) for r in (ema_rate if isinstance(ema_rate, (list, tuple)) else [ema_rate])]
        self.ema_params = ({r: [p.detach().clone() for p in self.policy.master_params] for r in self.ema_rates}
                           if self.dist.is_main else {})

        self.sampler = self.make_sampler()
        if self.sampler.per_rank < self.batch_size_per_gpu:
            raise DatasetError(f"the dataset has {len(dataset)} samples, fewer than one batch "
                               f"({self.batch_size_per_gpu} per rank x {self.dist.world_size} ranks)")
        self.data_state = {"epoch": 0, "idx": 0}
        self.num_workers = num_workers if num_workers is not None else min(4, max(1, (os.cpu_count() or 1) // self.dist.local_world_size))
        self._bad_samples: set[str] = set()
        self._acc = MetricAccumulator()
        self._pending_checks: list[tuple[Any, int, Callable[[float], str]]] = []
        self._pinned: torch.Tensor | None = None
        self._pinned_next = 0
        self.logger: RunLogger | None = None

        if step is not None:
            self.load(self.load_dir, step)
        elif finetune_ckpt:
            self.load_finetune(finetune_ckpt)

    # ------------------------------------------------------------------ setup helpers
    def _per_gpu_batch(self, batch_size: int | None, per_gpu: int | None, split: int) -> int:
        w = self.dist.world_size
        if (batch_size is None) == (per_gpu is None):
            raise ValueError("trainer.args: give exactly one of batch_size and batch_size_per_gpu")
        if per_gpu is None:
            if batch_size % w:
                raise ValueError(f"trainer.args.batch_size={batch_size} is not divisible by the world size {w}")
            per_gpu = batch_size // w
        if per_gpu < 1 or split < 1 or per_gpu % split:
            raise ValueError(f"trainer.args.batch_size_per_gpu={per_gpu} must be a positive multiple of batch_split={split}")
        return per_gpu

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed or not any(p.requires_grad for p in model.parameters()):
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradient buckets (MB; the original uses 128) and grads as views into them (no copy):
        # TRELLIS_DDP_BUCKET_MB / TRELLIS_DDP_GRAD_VIEW tune the overlap of all-reduce with backward.
        return DistributedDataParallel(model, device_ids=device_ids,
                                       bucket_cap_mb=float(os.environ.get("TRELLIS_DDP_BUCKET_MB", "128")),
                                       gradient_as_bucket_view=os.environ.get("TRELLIS_DDP_GRAD_VIEW", "0") == "1",
                                       find_unused_parameters=False)

    def make_sampler(self) -> ResumableSampler:
        """The training sampler (hook: sparse trainers use a load-balanced one)."""
        return ResumableSampler(self.dataset, self.dist.rank, self.dist.world_size, shuffle=True, seed=self.seed)

    def collate_fn(self) -> Any:
        """The training collate (hook: sparse trainers split into balanced micro-batches)."""
        return getattr(self.dataset, "collate_fn", None)

    def make_loader(self) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(self.seed)
        return DataLoader(
            self.dataset, batch_size=self.batch_size_per_gpu, sampler=self.sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=True, generator=g,
            collate_fn=self.collate_fn(), persistent_workers=self.num_workers > 0,
        )

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator[Any]:
        """Endless batches; ``self.data_state`` always names the next sample not yet consumed."""
        loader = self.make_loader()
        self.sampler.load_state_dict(self.data_state)
        while True:
            for batch in loader:
                if self.data_state["idx"] >= self.epoch_steps() * self.batch_size_per_gpu:
                    break  # the padded tail of the epoch: its length would depend on the world size
                self.data_state = {"epoch": self.sampler.epoch, "idx": self.data_state["idx"] + self.batch_size_per_gpu}
                yield self.to_device(self.check_failed(batch))
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.data_state = {"epoch": self.sampler.epoch, "idx": 0}

    def epoch_steps(self) -> int:
        """Steps per epoch: whole global batches of the dataset (at least one), so that epochs, and
        with them the data order, do not depend on how many ranks share the global batch."""
        per_rank = self.sampler.per_rank // self.batch_size_per_gpu
        return max(1, min(per_rank, len(self.dataset) // (self.batch_size_per_gpu * self.dist.world_size)))

    def check_failed(self, batch: Any) -> Any:
        """Logs and counts assets that failed to load; stops above ``max_bad_fraction``.
        A batch is a dict, or a list of micro-batch dicts (sparse collates)."""
        if isinstance(batch, list):
            for mb in batch:
                self.check_failed(mb)
            return [mb for mb in batch if has_samples(mb)]
        if not isinstance(batch, dict):
            return batch
        failed: list[FailedSample] = batch.pop("_failed", [])
        for f in failed:
            if f.sha256 not in self._bad_samples:
                self._bad_samples.add(f.sha256)
                print(f"[rank {self.dist.rank}] WARNING: skipped broken asset {f}", flush=True)
        limit = getattr(self.dataset, "max_bad_fraction", 0.0) * self.sampler.per_rank
        if len(self._bad_samples) > limit:
            raise DatasetError(f"{len(self._bad_samples)} broken asset(s) on rank {self.dist.rank}, more than "
                               f"max_bad_fraction={getattr(self.dataset, 'max_bad_fraction', 0.0)} of "
                               f"{self.sampler.per_rank}: {sorted(self._bad_samples)[:5]}")
        if failed and not has_samples(batch):
            raise DatasetError(f"every sample of a batch failed to load: {[str(f) for f in failed]}")
        return batch

    def to_device(self, batch: Any) -> Any:
        """Moves tensors to the device; keys starting with ``_`` (bookkeeping) stay on the host."""
        nb = self.device.type == "cuda"
        if isinstance(batch, torch.Tensor) or hasattr(batch, "feats"):
            return batch.to(self.device, non_blocking=nb)
        if isinstance(batch, dict):
            return {k: v if k.startswith("_") else self.to_device(v) for k, v in batch.items()}
        if isinstance(batch, list):
            return [self.to_device(v) for v in batch]
        return batch

    def split_batch(self, batch: Any) -> list[Any]:
        """A dict batch -> ``batch_split`` consecutive slices; a list batch is already micro-batches."""
        if isinstance(batch, list):
            return batch
        n = self.batch_split
        size = next(len(v) if not hasattr(v, "feats") else v.shape[0]
                    for v in batch.values() if isinstance(v, (torch.Tensor, list)) or hasattr(v, "feats"))
        bounds = np.linspace(0, size, n + 1).round().astype(int)
        out = []
        for i in range(n):
            s, e = int(bounds[i]), int(bounds[i + 1])
            if e > s:
                out.append({k: self._slice(v, s, e) for k, v in batch.items()})
        return out

    @staticmethod
    def _slice(v: Any, s: int, e: int) -> Any:
        if isinstance(v, (torch.Tensor, list)):
            return v[s:e]
        if hasattr(v, "feats"):  # SparseTensor: batch indexing renumbers items 0..e-s-1
            return v[list(range(s, e))]
        return v

    # ------------------------------------------------------------------ one step
    def training_losses(self, **batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def randn_like_per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``x`` [B, ...]: item i comes from a generator keyed by
        (seed, step, dataset index of item i), so the draw does not depend on how the global batch
        is spread over ranks and micro-batches (nor on a resume)."""
        keys = self.sample_keys
        if keys is None or len(keys) != x.shape[0]:
            return torch.randn_like(x)
        out = torch.empty_like(x)
        g = torch.Generator(device=x.device)
        for i, k in enumerate(keys.tolist()):
            g.manual_seed(step_seed(self.seed, self.step, 0) ^ (int(k) * 2654435761 % (2 ** 61)))
            out[i] = torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
        return out

    def _seed_step(self) -> None:
        s = step_seed(self.seed, self.step, self.dist.rank)
        torch.manual_seed(s)
        np.random.seed(s % (2 ** 32))
        random.seed(s)

    def check_finite_later(self, value: torch.Tensor, message: Callable[[float], str]) -> None:
        """Raises ``FloatingPointError(message(v))`` if the scalar ``value`` is not finite, without making
        the host wait for the GPU: a CUDA value is copied to pinned memory behind an event and checked at
        the start of the next step, before a checkpoint is written and at the end of the run (a skipped
        optimizer step guards the weights meanwhile: a non-finite loss gives non-finite gradients)."""
        v = value.detach().float().reshape(())
        if v.device.type != "cuda":
            x = float(v)
            if not math.isfinite(x):
                raise FloatingPointError(message(x))
            return
        if self._pinned is None:
            self._pinned = torch.empty(256, dtype=torch.float32, pin_memory=True)
        slot = self._pinned_next % self._pinned.numel()
        self._pinned_next += 1
        self._pinned[slot].copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_checks.append((event, slot, message))

    def drain_checks(self) -> None:
        """Runs the checks queued by ``check_finite_later`` (waits for the events they wait on)."""
        pending, self._pending_checks = self._pending_checks, []
        for event, slot, message in pending:
            event.synchronize()
            x = float(self._pinned[slot])
            if not math.isfinite(x):
                raise FloatingPointError(message(x))

    def forward_backward(self, batch: Any) -> dict[str, Any]:
        """Forward and backward of every micro-batch of ``batch`` (``batch_split``), gradients
        accumulated into the models' ``.grad``; returns the loss terms and status values averaged
        over the micro-batches. No clipping, optimizer or EMA (``run_step`` does those); on its own
        it is what a "forward + backward" benchmark times."""
        micro = self.split_batch(batch)
        acc = MetricAccumulator()
        for i, mb in enumerate(micro):
            self.sample_keys = mb.pop("_index", None) if isinstance(mb, dict) else None
            with contextlib.ExitStack() as stack:
                if i < len(micro) - 1:
                    for m in self.training_models.values():
                        if isinstance(m, DistributedDataParallel):
                            stack.enter_context(m.no_sync())
                if self.elastic is not None:
                    stack.enter_context(self.elastic.record())
                with self.policy.autocast():
                    terms, status = self.training_losses(**mb)
                self.policy.backward(terms["loss"] / len(micro))
            acc.add({"loss": {k: v for k, v in terms.items()}, "status": status})
        return {k: v / c for k, v in acc.sums.items() for c in [acc.counts[k]]}

    def run_step(self, batch: Any) -> dict[str, Any]:
        self.drain_checks()  # the previous step's, long finished on the GPU by now
        self.policy.zero_grad()
        metrics: dict[str, Any] = self.forward_backward(batch)
        # No host synchronisation from here on: `finite` stays on the device (see trainers/precision.py).
        grad_norm, finite = self.policy.unscale_and_clip(self.clipper)
        self.policy.step(self.optimizer, finite)
        self.policy.update(finite)
        metrics["status/grad_norm"] = grad_norm.detach()
        metrics["status/skipped_step"] = (~torch.as_tensor(finite)).float()
        metrics.update(self.policy.log_values())
        if hasattr(self.clipper, "threshold_tensor"):
            metrics["grad_clip/max_norm"] = self.clipper.threshold_tensor
        elif hasattr(self.clipper, "threshold"):
            metrics["grad_clip/max_norm"] = self.clipper.threshold
        elif self.grad_clip is not None:
            metrics["grad_clip"] = float(self.grad_clip)
        if self.lr_scheduler is not None:
            metrics["status/lr"] = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()
        if self.elastic is not None:
            metrics.update({f"elastic/{k}": v for k, v in self.elastic.log().items()})
        for rate, ema in self.ema_params.items():
            torch._foreach_lerp_(ema, [p.detach() for p in self.policy.master_params], 1.0 - rate)
        if self.log_param_stats:
            metrics.update(self.param_stats())
        return metrics

    def param_stats(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, model in self.models.items():
            ps = [p for p in model.parameters() if p.requires_grad]
            out[f"params/{key}/norm"] = torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in ps]))
            gs = [p.grad.float().norm() for p in ps if p.grad is not None]
            if gs:
                out[f"params/{key}/grad_norm"] = torch.linalg.vector_norm(torch.stack(gs))
        return out

    # ------------------------------------------------------------------ the loop
    def prepare_output(self) -> None:
        if self.dist.is_main:
            for sub in ("ckpts", "samples", "tb_logs"):
                os.makedirs(os.path.join(self.output_dir, sub), exist_ok=True)
        self.logger = RunLogger(self.output_dir, self.dist.is_main, self.wandb)
        tdist.barrier()

    def run(self) -> None:
        from tqdm import tqdm

        self.prepare_output()
        resumed = self.step > 0
        if self.i_sample:
            self.snapshot(f"resume_step{self.step:07d}" if resumed else "init")
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
                   desc="train")
        data = self.batches()
        elapsed = 0.0
        fault_step = fault_injection_step(self.dist.rank)  # fault injection for recovery tests
        try:
            while self.step < self.max_steps:
                t0 = time.perf_counter()
                if fault_step and self.step + 1 == fault_step:
                    if os.environ.get("TRELLIS_FAULT_KIND") == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError(f"TRELLIS_FAULT_AT_STEP={fault_step}: injected failure")
                self._seed_step()
                batch = next(data)
                metrics = self.run_step(batch)
                self.step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                metrics["time/step"] = dt
                metrics["time/elapsed"] = elapsed
                self._acc.add(metrics)
                bar.update(1)
                if self.i_print and self.step % self.i_print == 0 and self.dist.is_main:
                    bar.set_postfix(loss=f"{float(metrics['loss/loss']):.4f}", refresh=False)
                if self.i_ddpcheck and self.step % self.i_ddpcheck == 0:
                    self.check_ddp()
                if self.i_sample and self.step % self.i_sample == 0:
                    self.snapshot(f"step{self.step:07d}")
                if self.i_log and self.step % self.i_log == 0:
                    self.flush_logs()
                if self.i_save and self.step % self.i_save == 0:
                    self.save()
            self.drain_checks()
            self.flush_logs()
            if not self.i_save or self.step % self.i_save:
                self.save()
            if self.i_sample:
                self.snapshot("final")
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()

    def flush_logs(self) -> None:
        if not self._acc.sums:
            return
        values = self._acc.reduce(self.device)
        values["data/bad_samples"] = float(tdist.all_reduce_sum(torch.tensor(float(len(self._bad_samples)))).item())
        if self.logger is not None:
            self.logger.write(self.step, values)

    def check_ddp(self) -> None:
        """Asserts that every rank holds the same master weights (cheap checksum)."""
        if not self.dist.distributed:
            return
        s = torch.stack([p.detach().double().sum() for p in self.policy.master_params]).sum().reshape(1)
        sums = tdist.all_gather_object(float(s.item()))
        if len(set(sums)) != 1:
            raise RuntimeError(f"step {self.step}: model weights differ between ranks (checksums {sums})")
