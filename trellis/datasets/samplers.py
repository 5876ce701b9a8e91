"""Resumable distributed samplers.

The order of samples is a function of ``(seed, epoch)`` alone: every rank computes the same
permutation and takes its own stride of it. The state ``{epoch, idx}`` counts the samples this rank
has *consumed* in the current epoch (the trainer advances it when it takes a batch, not when a
loader prefetches one), so a run resumed from a checkpoint continues with exactly the next sample.

Both samplers yield ``SampleKey`` indices (plain ``int`` subclasses carrying ``(epoch, seed)``), from which
the datasets key their per-sample randomness (random view, caption choice): the same position of the same
epoch gives the same sample after a resume, in any loader worker.
"""

from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import Sampler

from trellis.datasets.components import SampleKey, balanced_groups


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

    def padded_order(self, epoch: int) -> list[int]:
        """The whole epoch's order, all ranks together, padded by repeating its head to a multiple of W."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.per_rank * self.world_size
        return (order * (total // n + 1))[:total]

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of ``epoch`` (before skipping ``idx``)."""
        return self.padded_order(epoch)[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        return (SampleKey(i, epoch, self.seed) for i in self.epoch_indices(epoch)[self.idx:])

    def advance(self, num_samples: int) -> None:
        """Records ``num_samples`` consumed by the trainer; rolls over to the next epoch at its end."""
        self.idx += int(num_samples)
        if self.idx >= self.per_rank:
            self.set_epoch(self.epoch + 1)

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


class BalancedResumableSampler(ResumableSampler):
    """DATA.md 7.5: like ``ResumableSampler``, but every global batch (``batch_size * world_size``
    consecutive indices of the padded epoch order; an incomplete tail is dropped) is split between the
    ranks by the greedy load balancing of ``balanced_groups(loads, world_size, equal_size=True)``; rank
    ``r`` takes group ``r`` in assignment order. Needs ``dataset.loads`` (e.g. voxel counts).
    """

    def __init__(self, dataset: Sized, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        if not hasattr(dataset, "loads"):
            raise TypeError(f"BalancedResumableSampler: {type(dataset).__name__} has no 'loads' attribute")
        if len(dataset.loads) != len(dataset):
            raise ValueError(f"BalancedResumableSampler: {len(dataset.loads)} loads for {len(dataset)} samples")
        if batch_size <= 0:
            raise ValueError(f"BalancedResumableSampler: batch_size must be positive, got {batch_size}")
        super().__init__(dataset, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size

    @property
    def per_rank(self) -> int:
        padded = -(-len(self.dataset) // self.world_size) * self.world_size
        return padded // (self.batch_size * self.world_size) * self.batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        order = self.padded_order(epoch)
        chunk = self.batch_size * self.world_size
        loads = self.dataset.loads
        mine: list[int] = []
        for start in range(0, len(order) - chunk + 1, chunk):
            idx = order[start:start + chunk]
            groups = balanced_groups([loads[i] for i in idx], self.world_size, equal_size=True)
            mine.extend(idx[j] for j in groups[self.rank])
        return mine
