"""Snapshots: pictures of what the models do, made by every rank together (the original hangs with
more than one GPU because only rank 0 takes part in a collective)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader

from trellis.utils import dist as tdist


class SnapshotMixin:
    """Adds ``snapshot(suffix)`` to a trainer that implements ``run_snapshot(batch)``."""

    snapshot_batch_size = 4

    def run_snapshot(self, batch: Any) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def snapshot_batches(self, num: int):
        """Batches for this rank's share of the snapshot (a fixed order, so every snapshot of a run
        shows the same assets)."""
        g = torch.Generator()
        g.manual_seed(self.seed + 1000 + self.dist.rank)
        loader = DataLoader(self.dataset, batch_size=min(self.snapshot_batch_size, num), shuffle=True,
                            generator=g, num_workers=0, collate_fn=getattr(self.dataset, "collate_fn", None))
        done = 0
        for batch in loader:
            if isinstance(batch, dict):
                batch.pop("_failed", None)
            if done >= num:
                break
            yield self.to_device(batch)
            done += self.snapshot_batch_size

    @torch.no_grad()
    def snapshot(self, suffix: str) -> None:
        """Collective: each rank renders ``ceil(snapshot_samples / W)`` samples, rank 0 saves
        ``samples/<suffix>/<name>_<suffix>.jpg`` grids."""
        from trellis.renderers.voxel_preview import image_grid, save_image

        per_rank = -(-self.snapshot_samples // self.dist.world_size)
        results: dict[str, list[torch.Tensor]] = {}
        kinds: dict[str, str] = {}
        for batch in self.snapshot_batches(per_rank):
            with self.policy.autocast():
                out = self.run_snapshot(batch)
            for name, item in out.items():
                results.setdefault(name, []).append(item["value"].float().cpu())
                kinds[name] = item["type"]
        gathered = tdist.all_gather_object({k: torch.cat(v)[:per_rank] for k, v in results.items()})
        if not self.dist.is_main:
            tdist.barrier()
            return
        out_dir = os.path.join(self.output_dir, "samples", suffix)
        os.makedirs(out_dir, exist_ok=True)
        for name, kind in kinds.items():
            value = torch.cat([g[name] for g in gathered if name in g])[: self.snapshot_samples]
            if kind == "sample":
                images = self.dataset.visualize_sample(value)
            else:
                lo, hi = getattr(self.dataset, "value_range", (0, 1))
                images = [((v - lo) / (hi - lo)).clamp(0, 1) for v in value]
            save_image(image_grid(list(images), ncols=4 if len(images) <= 16 else 8),
                       os.path.join(out_dir, f"{name}_{suffix}.jpg"))
        tdist.barrier()
