"""Resumable samplers: the documented order, per-rank split, state round trip, exact resume, balance."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from trellis.datasets.components import SampleKey, balanced_groups, sample_rng
from trellis.datasets.samplers import BalancedResumableSampler, ResumableSampler


class Toy(Dataset):
    """Sample i = (i, a random draw keyed by the sample key); ``loads`` = a fixed pseudo-random size."""

    def __init__(self, n):
        self.n = n
        self.loads = [int(x) for x in np.random.default_rng(1).integers(1, 100, n)]

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return torch.tensor([int(key), int(sample_rng(key).integers(1 << 30))])


def test_order_padding_and_rank_split():
    ds = Toy(7)
    s0, s1 = ResumableSampler(ds, 0, 2, seed=3), ResumableSampler(ds, 1, 2, seed=3)
    g = torch.Generator()
    g.manual_seed(3)
    perm = torch.randperm(7, generator=g).tolist()
    padded = perm + perm[:1]
    assert list(s0) == padded[0::2] and list(s1) == padded[1::2]
    assert s0.per_rank == 4 and len(s0) == 4
    keys = list(s1)
    assert all(isinstance(k, SampleKey) and k.epoch == 0 and k.seed == 3 for k in keys)
    s0.set_epoch(1)
    assert list(s0) != padded[0::2] and all(k.epoch == 1 for k in s0)
    with pytest.raises(ValueError):
        ResumableSampler(ds, 2, 2)


def test_state_round_trip_and_exact_resume():
    ds = Toy(23)
    full = ResumableSampler(ds, seed=5)
    loader = DataLoader(ds, batch_size=4, sampler=full, drop_last=True)
    stream = []
    for _ in range(3):  # three epochs of 5 batches (drop_last)
        stream += [b.tolist() for b in loader]
        full.set_epoch(full.epoch + 1)
    # a run that stops after 7 batches (epoch 1, 2 batches in) and resumes in a fresh sampler
    part = ResumableSampler(ds, seed=5)
    taken = 0
    for _ in range(7):
        part.advance(4)
        taken += 1
        if part.idx + 4 > part.per_rank:  # the loader would drop the tail: the epoch ends
            part.set_epoch(part.epoch + 1)
    state = part.state_dict()
    assert state == {"epoch": 1, "idx": 8}
    resumed = ResumableSampler(ds, seed=5)
    resumed.load_state_dict(state)
    rest = []
    loader = DataLoader(ds, batch_size=4, sampler=resumed, drop_last=True)
    while len(rest) < len(stream) - taken:
        rest += [b.tolist() for b in loader]
        resumed.set_epoch(resumed.epoch + 1)
    assert rest == stream[taken:]  # same indices and the same per-sample random draws


def test_advance_rolls_over_epoch():
    s = ResumableSampler(Toy(5), seed=0)
    s.advance(3)
    assert s.state_dict() == {"epoch": 0, "idx": 3}
    s.advance(2)
    assert s.state_dict() == {"epoch": 1, "idx": 0}


def test_sample_keys_survive_worker_processes():
    ds = Toy(8)
    s = ResumableSampler(ds, seed=2)
    s.set_epoch(4)
    main = [b.tolist() for b in DataLoader(ds, batch_size=2, sampler=s)]
    workers = [b.tolist() for b in DataLoader(ds, batch_size=2, sampler=s, num_workers=2)]
    assert main == workers
    again = [[int(i), int(sample_rng(SampleKey(i, 4, 2)).integers(1 << 30))] for i in s.epoch_indices(4)]
    assert [x for b in main for x in b] == again


def test_balanced_sampler_splits_each_global_batch():
    ds = Toy(30)
    W, B = 3, 4
    samplers = [BalancedResumableSampler(ds, B, r, W, seed=1) for r in range(W)]
    lists = [s.epoch_indices(0) for s in samplers]
    assert all(len(x) == 8 and s.per_rank == 8 for x, s in zip(lists, samplers))  # 30 -> 2 chunks of 12
    order = samplers[0].padded_order(0)
    for c in range(2):
        chunk = order[c * 12:(c + 1) * 12]
        groups = balanced_groups([ds.loads[i] for i in chunk], W, equal_size=True)
        for r in range(W):
            assert lists[r][c * B:(c + 1) * B] == [chunk[j] for j in groups[r]]
        loads = [sum(ds.loads[i] for i in lists[r][c * B:(c + 1) * B]) for r in range(W)]
        assert max(loads) - min(loads) <= max(ds.loads[i] for i in chunk)
    s = samplers[1]
    s.load_state_dict({"epoch": 0, "idx": 5})
    assert [int(k) for k in s] == lists[1][5:]
    with pytest.raises(TypeError, match="loads"):
        BalancedResumableSampler(list(range(5)), 2)
