"""Trainer tools beside the loop: ``tryrun`` (check everything on one real batch, write nothing),
``profile`` (a torch.profiler trace of real steps) and ``finetune_ckpt`` loading."""

from __future__ import annotations

import os
import resource
from typing import Any

import torch

from trellis.trainers import checkpoint as ckpt


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def peak_memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"peak host memory (RSS) {rss_kib / 2**20:.2f} GiB"


class ToolsMixin:
    def tryrun(self) -> dict[str, Any]:
        """Builds nothing new, writes nothing: loads one real batch, runs one forward and backward of
        the first micro-batch (no optimizer step) and prints a report. Raises on any problem."""
        lines = ["tryrun report", "dataset funnel:"]
        if hasattr(self.dataset, "describe_funnel"):
            lines.append(self.dataset.describe_funnel())
        lines.append(f"  usable samples: {len(self.dataset)}")
        for key, model in self.models.items():
            total, trainable = count_params(model)
            lines.append(f"model {key}: {type(model).__name__}, {total:,} parameters ({trainable:,} trainable)")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._seed_step()
        loader = self.make_loader()
        self.sampler.load_state_dict(self.data_state)
        batch = self.to_device(self.check_failed(next(iter(loader))))
        micro = self.split_batch(batch)
        self.policy.zero_grad()
        self.sample_keys = micro[0].pop("_index", None) if isinstance(micro[0], dict) else None
        with self.policy.autocast():
            terms, status = self.training_losses(**micro[0])
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"tryrun: the loss is not finite ({loss.item()})")
        self.policy.backward(loss / len(micro))
        missing = [self._param_names[id(p)] for p in self.params if p.grad is None]
        if missing:
            lines.append(f"WARNING: {len(missing)} trainable parameter(s) got no gradient, e.g. {missing[:3]}")
        self.policy.zero_grad()
        lines.append("losses: " + ", ".join(f"{k}={float(v.detach()):.5g}" for k, v in terms.items()))
        lines.append(f"batch: {self.batch_size_per_gpu} per rank in {len(micro)} micro-batch(es); " + peak_memory_text(self.device))
        lines.append("tryrun OK")
        if self.dist.is_main:
            print("\n".join(lines), flush=True)
        return {"loss": float(loss.detach()), "missing_grads": missing}

    def profile(self, num_steps: int = 5) -> str:
        """Runs ``num_steps`` real training steps under ``torch.profiler`` (after one wait and one
        warm-up step) and writes a TensorBoard trace into ``output_dir/profile``. Returns the folder."""
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        out = os.path.join(self.output_dir, "profile")
        if self.dist.is_main:
            os.makedirs(out, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        data = self.batches()
        handler = tensorboard_trace_handler(out, worker_name=f"rank{self.dist.rank}")
        with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=num_steps),
                     on_trace_ready=handler, record_shapes=True, profile_memory=True) as prof:
            for _ in range(num_steps + 2):
                self._seed_step()
                self.run_step(next(data))
                self.step += 1
                prof.step()
        if self.dist.is_main:
            print(f"profile trace written to {out} (view: tensorboard --logdir {out})")
        return out

    def load_finetune(self, finetune_ckpt: dict[str, str]) -> None:
        """Initialises models from other weights; keys that are missing, unexpected or of another
        shape are listed and keep their initial values. EMA restarts from the loaded weights."""
        from trellis.config import ConfigError

        for key, path in finetune_ckpt.items():
            if key not in self.models:
                raise ConfigError(f"trainer.args.finetune_ckpt.{key}: no model named {key!r} "
                                  f"(models: {list(self.models)})")
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = ckpt.load_file(path)
            model = self.models[key]
            own = model.state_dict()
            skipped = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
            usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
            model.load_state_dict({**own, **usable}, strict=True)
            if self.dist.is_main:
                print(f"finetune: {key} <- {path}: loaded {len(usable)} tensors")
                for name, keys in (("missing (kept init)", skipped), ("unexpected (ignored)", unexpected),
                                   ("shape mismatch (kept init)", mismatched)):
                    for k in keys:
                        print(f"  {name}: {k}")
        self.policy.masters_from_params()
        for ema in self.ema_params.values():
            for e, m in zip(ema, self.policy.master_params):
                e.data.copy_(m.data)
