"""SparseTensor container: layout, arithmetic, batch indexing, dense, cache, checks."""

from __future__ import annotations

import pytest
import torch

from trellis.modules.sparse import SparseTensor, sparse_cat, sparse_unbind


def make(batch_counts=(3, 0, 2, 4), C=5, seed=0, res=6):
    g = torch.Generator().manual_seed(seed)
    coords = []
    for b, n in enumerate(batch_counts):
        flat = torch.randperm(res**3, generator=g)[:n]
        xyz = torch.stack([flat // (res * res), (flat // res) % res, flat % res], 1)
        coords.append(torch.cat([torch.full((n, 1), b), xyz], 1))
    coords = torch.cat(coords).int()
    feats = torch.randn(coords.shape[0], C, generator=g)
    return SparseTensor(feats, coords, shape=[len(batch_counts), C])


def test_layout_shape_and_batch_ids():
    x = make()
    assert x.shape == torch.Size([4, 5])
    assert x.batch_size == 4
    assert x.layout == [slice(0, 3), slice(3, 3), slice(3, 5), slice(5, 9)]
    assert x.batch_counts.tolist() == [3, 0, 2, 4]
    assert x.coords.dtype == torch.int32


def test_inferred_batch_size_and_int64_coords():
    c = torch.tensor([[0, 0, 0, 0], [2, 1, 1, 1]], dtype=torch.int64)
    x = SparseTensor(torch.zeros(2, 3), c)
    assert x.batch_size == 3 and x.coords.dtype == torch.int32
    assert x.layout == [slice(0, 1), slice(1, 1), slice(1, 2)]


def test_cheap_checks():
    with pytest.raises(ValueError, match="rows"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer"):
        SparseTensor(torch.zeros(3, 2), torch.zeros(3, 4))


def test_debug_invariants(monkeypatch):
    unsorted = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    SparseTensor(torch.zeros(2, 1), unsorted)  # not checked without SPARSE_DEBUG
    monkeypatch.setenv("SPARSE_DEBUG", "1")
    with pytest.raises(ValueError, match="grouped by batch"):
        SparseTensor(torch.zeros(2, 1), unsorted)
    with pytest.raises(ValueError, match="duplicate"):
        SparseTensor(torch.zeros(2, 1), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="non-negative"):
        SparseTensor(torch.zeros(1, 1), torch.tensor([[0, -1, 2, 3]]))
    make()  # valid tensors pass


def test_arithmetic():
    x = make()
    y = x.replace(torch.randn_like(x.feats))
    torch.testing.assert_close((x + y).feats, x.feats + y.feats)
    torch.testing.assert_close((x - 2.0).feats, x.feats - 2.0)
    torch.testing.assert_close((3.0 * x).feats, 3.0 * x.feats)
    torch.testing.assert_close((1.0 / (x * x + 1)).feats, 1.0 / (x.feats**2 + 1))
    torch.testing.assert_close((-x).feats, -x.feats)
    per_batch = torch.randn(4, 5)
    expect = torch.cat([x.feats[s] * per_batch[b] for b, s in enumerate(x.layout)])
    torch.testing.assert_close((x * per_batch).feats, expect)
    torch.testing.assert_close((per_batch + x).feats, torch.cat(
        [x.feats[s] + per_batch[b] for b, s in enumerate(x.layout)]))
    with pytest.raises(ValueError, match="different coordinates"):
        _ = x + make(seed=1)
    with pytest.raises(ValueError, match="batch size"):
        _ = x * torch.randn(3, 5)


def test_replace_shares_cache_and_device_moves():
    x = make()
    x.register_spatial_cache("k", 123)
    y = x.replace(x.feats * 2)
    assert y.get_spatial_cache("k") == 123
    assert x.half().get_spatial_cache("k") == 123
    assert x.half().dtype == torch.float16
    assert x.detach().get_spatial_cache("k") == 123
    z = x.replace(x.feats, x.coords.clone())
    assert z.get_spatial_cache("k") is None


def test_dense():
    x = make()
    d = x.dense()
    assert d.shape == (4, 5, *(x.coords[:, 1:].max(0).values + 1).tolist())
    c = x.coords.long()
    torch.testing.assert_close(d[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]], x.feats)
    assert d.abs().sum() == pytest.approx(x.feats.abs().sum().item(), rel=1e-5)


def test_batch_indexing_and_unbind_and_cat():
    x = make()
    x2 = x[2]
    assert x2.batch_size == 1 and (x2.coords[:, 0] == 0).all()
    torch.testing.assert_close(x2.feats, x.feats[3:5])
    x02 = x[[0, 3]]
    torch.testing.assert_close(x02.feats, torch.cat([x.feats[0:3], x.feats[5:9]]))
    assert x02.coords[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    torch.testing.assert_close(x02.coords[:, 1:], torch.cat([x.coords[0:3, 1:], x.coords[5:9, 1:]]))
    assert x[-1].feats.shape[0] == 4
    with pytest.raises(IndexError):
        x[4]
    parts = sparse_unbind(x, 0)
    assert [p.feats.shape[0] for p in parts] == [3, 0, 2, 4]
    back = sparse_cat(parts, 0)
    torch.testing.assert_close(back.feats, x.feats)
    assert torch.equal(back.coords, x.coords) and back.batch_size == 4
    wide = sparse_cat([x, x * 2], dim=-1)
    assert wide.shape == torch.Size([4, 10])
    a, b = sparse_unbind(x.reshape(5, 1).replace(torch.randn(9, 2, 3)), 1)
    assert a.feats.shape == (9, 3)
