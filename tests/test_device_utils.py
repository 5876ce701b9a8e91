"""``to_device_async``: the same result as ``Tensor.to``; on CUDA, without a host sync."""

from __future__ import annotations

import pytest
import torch

from trellis.utils.device import to_device_async


def test_cpu_is_plain_to():
    x = torch.tensor([0.25, 0.5, 1.0])
    y = to_device_async(x, "cpu", torch.float64)
    assert y.dtype == torch.float64 and y.device.type == "cpu"
    torch.testing.assert_close(y, x.double())
    assert to_device_async(x, torch.device("cpu")) is x  # no copy when nothing changes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_is_queued_and_owns_its_source():
    x = torch.arange(1000, dtype=torch.float32)
    torch.cuda._sleep(50_000_000)  # keep the stream busy: a blocking copy would wait for this
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = to_device_async(x, "cuda", torch.float64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x.fill_(-1)  # the pinned staging copy is the copy's source, not x
    assert y.dtype == torch.float64 and y.is_cuda
    torch.testing.assert_close(y.cpu(), torch.arange(1000, dtype=torch.float64))
