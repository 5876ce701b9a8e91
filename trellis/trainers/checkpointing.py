"""Checkpoint save/load for the trainer: complete (models as fp32 masters, EMA, optimizer, precision,
clipper, scheduler, elastic controller, data position and RNG of every rank), atomic (``misc`` last),
and resumable on another number of ranks. File names: ``trellis.trainers.checkpoint``."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from trellis.trainers import checkpoint as ckpt
from trellis.utils import dist as tdist


class CheckpointMixin:
    """Adds ``save()`` and ``load(load_dir, step)`` to the ``Trainer``."""

    def _model_state(self, key: str, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict with every trainable param replaced by ``values`` (fp32, contiguous)."""
        model = self.models[key]
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for name, p in model.named_parameters():
            if id(p) in index:
                state[name] = values[index[id(p)]].detach().float().cpu().clone()
        return state

    def rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> None:
        """Writes the checkpoint of ``self.step`` (collective; rank 0 writes)."""
        if hasattr(self, "drain_checks"):
            self.drain_checks()  # never checkpoint past a non-finite loss
        rng = tdist.all_gather_object(self.rng_state())
        data_states = tdist.all_gather_object(self.data_state)
        if self.dist.is_main:
            root, step = self.output_dir, self.step
            for key in self.models:
                ckpt.save_atomic(self._model_state(key, self.policy.master_params), ckpt.model_file(root, key, step))
                for rate, ema in self.ema_params.items():
                    ckpt.save_atomic(self._model_state(key, ema), ckpt.ema_file(root, key, rate, step))
            misc = {
                "step": step,
                "optimizer": self.optimizer.state_dict(),
                "precision": {"mode": self.fp16_mode, **self.policy.state_dict()},
                "data_sampler": self.data_state,
                "data_sampler_per_rank": data_states,
                "rng": rng,
                "world_size": self.dist.world_size,
                "bad_samples": sorted(self._bad_samples),
            }
            if self.lr_scheduler is not None:
                misc["lr_scheduler"] = self.lr_scheduler.state_dict()
            if hasattr(self.clipper, "state_dict"):
                misc["grad_clip"] = self.clipper.state_dict()
            if self.elastic is not None:
                misc["elastic_controller"] = self.elastic.state_dict()
            ckpt.save_atomic(misc, ckpt.misc_file(root, step))  # last: marks the step complete
            ckpt.remove_old(root, self.keep_last)
        tdist.barrier()

    def load(self, load_dir: str, step: int) -> None:
        """Resumes everything saved by ``save`` at ``step`` from ``load_dir``."""
        for key, model in self.models.items():
            path = ckpt.model_file(load_dir, key, step)
            state = ckpt.load_file(path)
            ckpt.load_state_dict_strict(model, state, path)
            self._set_masters_from_state(key, state, self.policy.master_params)
        for rate, ema in self.ema_params.items():
            for key in self.models:
                path = ckpt.ema_file(load_dir, key, rate, step)
                self._set_masters_from_state(key, ckpt.load_file(path), ema)
        misc_path = ckpt.misc_file(load_dir, step)
        misc = ckpt.load_file(misc_path)
        saved_mode = misc.get("precision", {}).get("mode", self.fp16_mode)
        if saved_mode != self.fp16_mode:
            print(f"note: checkpoint was trained with fp16_mode={saved_mode!r}, continuing with {self.fp16_mode!r}")
        else:
            self.policy.load_state_dict(misc["precision"])
        try:
            self.optimizer.load_state_dict(misc["optimizer"])
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"{misc_path}: optimizer state does not fit this config: {e}") from None
        if self.lr_scheduler is not None and "lr_scheduler" in misc:
            self.lr_scheduler.load_state_dict(misc["lr_scheduler"])
        if hasattr(self.clipper, "load_state_dict") and "grad_clip" in misc:
            self.clipper.load_state_dict(misc["grad_clip"])
        if self.elastic is not None and "elastic_controller" in misc:
            self.elastic.load_state_dict(misc["elastic_controller"])
        per_rank = misc.get("data_sampler_per_rank")
        same_layout = misc.get("world_size", 1) == self.dist.world_size and per_rank
        self.data_state = dict(per_rank[self.dist.rank] if same_layout else
                               self._rescale_data_state(misc["data_sampler"], int(misc.get("world_size", 1)), misc_path))
        if same_layout:
            rng = misc["rng"][self.dist.rank]
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self._bad_samples = set(misc.get("bad_samples", []))
        self.step = int(misc["step"])
        if self.dist.is_main:
            print(f"resumed from {load_dir} at step {self.step}")

    def _rescale_data_state(self, state: dict, old_world: int, path: str) -> dict:
        """Data position saved by ``old_world`` ranks -> this world size. Every rank has consumed
        ``idx`` samples of its share, so ``idx * old_world`` samples of the epoch's global order are
        done; a different world size continues from the same global position."""
        done = int(state["idx"]) * old_world
        if done % self.dist.world_size:
            raise ckpt.CheckpointError(
                f"{path}: {done} samples of epoch {state['epoch']} were consumed on {old_world} rank(s); that does "
                f"not split evenly over {self.dist.world_size} ranks (resume on a world size that divides it)")
        if self.dist.is_main:
            print(f"note: resuming a {old_world}-rank checkpoint on {self.dist.world_size} rank(s) "
                  f"(epoch {state['epoch']}, {done} samples done)")
        return {"epoch": int(state["epoch"]), "idx": done // self.dist.world_size}

    def _set_masters_from_state(self, key: str, state: dict, targets: list[torch.Tensor]) -> None:
        index = {id(p): i for i, p in enumerate(self.params)}
        for name, p in self.models[key].named_parameters():
            if id(p) in index:
                targets[index[id(p)]].data.copy_(state[name].float())
