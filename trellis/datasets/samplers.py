"""Resumable distributed samplers.

The order of samples is a function of ``(seed, epoch)`` alone: every rank computes the same
permutation and takes its own stride of it. The state ``{epoch, idx}`` counts the samples this rank
has *consumed* in the current epoch (the trainer advances it when it takes a batch, not when a
loader prefetches one), so a run resumed from a checkpoint continues with exactly the next sample.
"""

from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices for one rank, wrapped to a multiple of ``world_size``.

    Per epoch: ``randperm(len)`` from a generator seeded with ``seed + epoch``; pad by repeating its
    head to ``ceil(len / W) * W``; rank ``r`` takes ``indices[r::W]``; skip the first ``idx``.
    """

    def __init__(self, dataset: Sized, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if len(dataset) == 0:
            raise ValueError("ResumableSampler: the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank {rank} not in [0, {world_size})")
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.idx = 0

    @property
    def per_rank(self) -> int:
        """Samples per rank per epoch (after padding)."""
        return -(-len(self.dataset) // self.world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.per_rank * self.world_size
        order = (order * (total // n + 1))[:total]
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.idx:])

    def __len__(self) -> int:
        return self.per_rank - self.idx

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.idx = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "idx": self.idx}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.idx = int(state["idx"])
