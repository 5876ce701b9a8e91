"""Training logs: losses averaged over steps *and ranks*, written by rank 0 to TensorBoard
(``tb_logs/``), a JSON-lines file (``log.jsonl``), the original ``log.txt`` (``<step>: <json>``) and,
when installed and asked for, Weights & Biases.

Per-step values stay on the device (no host sync per step); ``flush`` reduces them once per
``i_log`` steps.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import torch

from trellis.utils import dist as tdist


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class MetricAccumulator:
    """Sums of scalar metrics (tensors or floats) and their counts, reduced over ranks on demand."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, Any]) -> None:
        for k, v in flatten(metrics).items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().reshape(())
            elif not isinstance(v, (int, float)):
                continue
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Mean of every metric over steps and ranks (a key counts only where present). Collective."""
        keys = sorted(set().union(*tdist.all_gather_object(sorted(self.sums))))
        vec = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
        for i, k in enumerate(keys):
            if k in self.sums:
                s = self.sums[k]
                vec[2 * i] = s.to(device, torch.float64) if isinstance(s, torch.Tensor) else float(s)
                vec[2 * i + 1] = self.counts[k]
        vec = tdist.all_reduce_sum(vec).cpu()
        self.sums, self.counts = {}, defaultdict(int)
        return {k: (vec[2 * i] / vec[2 * i + 1]).item() for i, k in enumerate(keys) if vec[2 * i + 1] > 0}


class RunLogger:
    """Writes reduced metrics; every method is a no-op on ranks other than 0."""

    def __init__(self, output_dir: str, enabled: bool, wandb_config: dict | None = None,
                 run_config: dict | None = None):
        self.enabled = enabled
        self.output_dir = output_dir
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(output_dir, "tb_logs"))
        if wandb_config is not None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("trainer.args.wandb is set but wandb is not installed "
                                   "(pip install wandb, or remove the key)") from None
            self._wandb = wandb.init(config=run_config, dir=output_dir, **wandb_config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if math.isfinite(v)}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        line = json.dumps({"step": step, **metrics})
        with open(os.path.join(self.output_dir, "log.jsonl"), "a") as f:
            f.write(line + "\n")
        with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
            f.write(f"{step}: {json.dumps(metrics)}\n")
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
