"""LinearMemoryController: ratio rule, linear fit, block checkpointing, state, CPU no-op."""

import math

import pytest
import torch

from trellis.models.structured_latent_flow import ElasticSLatFlowModel
from trellis.trainers.elastic import LinearMemoryController


class FakeProbe:
    """Peak memory = k * input_size * ratio + b of the model's *current* checkpointing state."""

    def __init__(self, model, k=1e-3, b=2.0):
        self.model, self.k, self.b = model, k, b
        self.peak = 0.0

    def reset(self):
        self.peak = 0.0

    def observe(self, n):
        ratio = getattr(self.model, "_elastic_exact_ratio", 1.0)
        self.peak = self.k * n * ratio + self.b

    def peak_gib(self):
        return self.peak


def tiny_elastic(blocks=4):
    return ElasticSLatFlowModel(resolution=64, in_channels=8, model_channels=32, cond_channels=16, out_channels=8,
                                num_blocks=blocks, num_heads=2, patch_size=2, num_io_res_blocks=1,
                                io_block_channels=[8])


def run_micro(ctrl, probe, n):
    with ctrl.record():
        ctrl.set_input_size(n)
        probe.observe(n)


def test_cpu_is_a_noop():
    model = tiny_elastic()
    ctrl = LinearMemoryController()
    ctrl.attach({"denoiser": model}, torch.device("cpu"))
    assert not ctrl.enabled
    with ctrl.record():
        assert ctrl.set_input_size(1000) == 1.0
    assert ctrl.log() == {} and all(not b.use_checkpoint for b in model.blocks)


def test_ratio_fit_and_checkpointing():
    model = tiny_elastic(blocks=4)
    probe = FakeProbe(model)
    ctrl = LinearMemoryController(buffer_size=50, update_every=10, target_ratio=0.5, available_memory=10.0,
                                  max_mem_ratio_start=0.3)
    ctrl.attach({"denoiser": model}, torch.device("cpu"), probe=probe)
    seen = []
    with ctrl.record():
        exact = ctrl.set_input_size(4000)
        seen.append([b.use_checkpoint for b in model.blocks])
        probe.observe(4000)
    # before any fit: r = U(0,1) * 0.3, so at least ceil(0.7 * 4) + 1 = 4 blocks are checkpointed
    assert seen[0] == [True, True, True, True] and exact == pytest.approx(1 - 3 / 4)
    assert all(not b.use_checkpoint for b in model.blocks)  # reset after the micro-batch
    log = ctrl.log()
    assert log["input_size"] == 4000 and log["memory"] == pytest.approx(1e-3 * 4000 * exact + 2.0)
    for i in range(9):
        run_micro(ctrl, probe, 1000 + 500 * i)
    # 10 records: refit, max ratio +0.1
    assert ctrl.params[0] == pytest.approx(1e-3, rel=1e-6) and ctrl.params[1] == pytest.approx(2.0, rel=1e-6)
    assert ctrl.max_mem_ratio == pytest.approx(0.4)
    # with a fit: r = clip((10 * 0.5 - 2) / (1e-3 * n), 0, max_ratio)
    assert ctrl.mem_ratio_for(30000) == pytest.approx(0.1)
    assert ctrl.mem_ratio_for(1000) == pytest.approx(0.4)
    c = min(math.ceil((1 - 0.1) * 4) + 1, 4)
    with ctrl.record():
        exact = ctrl.set_input_size(30000)
        assert sum(b.use_checkpoint for b in model.blocks) == c
        probe.observe(30000)
    assert exact == pytest.approx(1 - (c - 1) / 4)


def test_state_dict_resumes_exactly():
    model = tiny_elastic()
    probe = FakeProbe(model)
    kw = dict(buffer_size=20, update_every=5, available_memory=10.0)
    a = LinearMemoryController(**kw)
    a.attach({"m": model}, torch.device("cpu"), probe=probe)
    for n in (100, 200, 300, 400, 500, 600, 700):
        run_micro(a, probe, n)
    b = LinearMemoryController(**kw)
    b.attach({"m": model}, torch.device("cpu"), probe=probe)
    b.load_state_dict(a.state_dict())
    assert [a.mem_ratio_for(n) for n in (1000, 5000)] == [b.mem_ratio_for(n) for n in (1000, 5000)]
    assert b.params == a.params and b.num_records == a.num_records and b.max_mem_ratio == a.max_mem_ratio
    # the original's state (params only) loads too
    c = LinearMemoryController(**kw)
    c.load_state_dict({"params": (0.5, 1.0)})
    assert c.params == (0.5, 1.0)


def test_models_must_agree_on_input_size():
    model = tiny_elastic()
    ctrl = LinearMemoryController(available_memory=10.0)
    ctrl.attach({"m": model}, torch.device("cpu"), probe=FakeProbe(model))
    with pytest.raises(RuntimeError, match="different input sizes"):
        with ctrl.record():
            ctrl.set_input_size(10)
            ctrl.set_input_size(11)


@pytest.mark.gpu
def test_controller_records_cuda_memory_in_a_sparse_training_step(tmp_path):
    """On CUDA the controller measures real peaks through a flow trainer step and checkpoints blocks."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))
    import bench_train

    from trellis.registry import TRAINERS
    from trellis.utils.dist import DistInfo

    bench_train.L_COND, bench_train.C_COND = 7, 16
    ds = bench_train.SyntheticLatents(True, num=4)
    dev = torch.device("cuda", 0)
    model = tiny_elastic(blocks=4)
    tr = TRAINERS.get("SparseFlowMatchingCFGTrainer")(
        {"denoiser": model}, ds, output_dir=str(tmp_path), dist=DistInfo(device=dev), max_steps=3,
        batch_size_per_gpu=4, batch_split=2, fp16_mode="bf16", num_workers=0,
        elastic={"name": "LinearMemoryController", "args": {"update_every": 2, "max_mem_ratio_start": 0.5}})
    assert tr.elastic.enabled
    batch = tr.to_device(tr.collate_fn()([ds[i] for i in range(4)]))
    m = tr.run_step([dict(mb) for mb in batch])
    assert m["elastic/memory"] > 0 and 0 < m["elastic/mem_ratio"] <= 1
    assert m["elastic/input_size"] == pytest.approx(sum(len(ds[i]["coords"]) for i in range(4)) / 2)
    assert tr.elastic.num_records == 2 and tr.elastic.max_mem_ratio == pytest.approx(0.6)
