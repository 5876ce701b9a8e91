"""Flow trainers on tiny models and a synthetic data root: every original name trains a few steps,
per-sample randomness is keyed, CFG dropout, snapshots, loud errors."""

import copy
import os

import pytest
import torch
from test_flow_demo_data import SLAT_MODEL, SS_MODEL, write_flow_root

from trellis.config import build_dataset, build_models, validate_config
from trellis.datasets.base import DatasetError
from trellis.datasets.samplers import BalancedResumableSampler
from trellis.models import save_pretrained
from trellis.registry import TRAINERS

SS_DENOISER = {"name": "SparseStructureFlowModel", "args": {
    "resolution": 16, "in_channels": 8, "out_channels": 8, "model_channels": 32, "cond_channels": 64,
    "num_blocks": 1, "num_heads": 2, "patch_size": 4, "qk_rms_norm": True, "use_fp16": False}}
SLAT_DENOISER = {"name": "ElasticSLatFlowModel", "args": {
    "resolution": 64, "in_channels": 8, "out_channels": 8, "model_channels": 32, "cond_channels": 64,
    "num_blocks": 1, "num_heads": 2, "patch_size": 2, "num_io_res_blocks": 1, "io_block_channels": [8],
    "qk_rms_norm": True, "use_fp16": False}}
BASE_ARGS = {"max_steps": 3, "batch_size_per_gpu": 4, "batch_split": 2, "fp16_mode": None, "num_workers": 0,
             "optimizer": {"name": "AdamW", "args": {"lr": 1e-3}}, "ema_rate": [0.9], "i_print": 0,
             "i_log": 0, "i_sample": 0, "i_save": 0, "sample_steps": 2, "snapshot_samples": 2,
             "t_schedule": {"name": "logitNormal", "args": {"mean": 1.0, "std": 1.0}}}

# (trainer, sparse, dataset, conditioning args)
CASES = [
    ("ImageConditionedFlowMatchingCFGTrainer", False, "ImageConditionedSparseStructureLatent",
     {"image_cond_model": "tiny"}),
    ("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
     {"text_cond_model": "tiny"}),
    ("ImageConditionedSparseFlowMatchingCFGTrainer", True, "ImageConditionedSLat", {"image_cond_model": "tiny"}),
    ("TextConditionedSparseFlowMatchingCFGTrainer", True, "TextConditionedSLat", {"text_cond_model": "tiny"}),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_flow_root(str(tmp_path_factory.mktemp("flow_root")), num=8)


def config(trainer, sparse, dataset, extra=None, **targs):
    ds_args = {"latent_model": SLAT_MODEL if sparse else SS_MODEL, "min_aesthetic_score": 4.5}
    if dataset.startswith("Image"):
        ds_args["image_size"] = 28
    if sparse:
        ds_args["normalization"] = {"mean": [0.5] * 8, "std": [2.0] * 8}
    args = dict(BASE_ARGS, **(extra or {}), **targs)
    return {"models": {"denoiser": copy.deepcopy(SLAT_DENOISER if sparse else SS_DENOISER)},
            "dataset": {"name": dataset, "args": ds_args}, "trainer": {"name": trainer, "args": args}}


def build(cfg, root, out):
    validate_config(cfg)
    torch.manual_seed(0)
    models, dataset = build_models(cfg), build_dataset(cfg, root)
    return TRAINERS.get(cfg["trainer"]["name"])(models, dataset, output_dir=str(out), **cfg["trainer"]["args"])


@pytest.mark.parametrize("name,sparse,dataset,extra", CASES)
def test_conditioned_trainers_train_and_snapshot(name, sparse, dataset, extra, root, tmp_path):
    tr = build(config(name, sparse, dataset, extra), root, tmp_path)
    before = [p.detach().clone() for p in tr.models["denoiser"].parameters()]
    data = tr.batches()
    for _ in range(2):
        tr._seed_step()
        m = tr.run_step(next(data))
        tr.step += 1
        assert torch.isfinite(torch.as_tensor(m["loss/loss"]))
        assert any(k.startswith("loss/bin_") and k.endswith("/mse") for k in m)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, tr.models["denoiser"].parameters()))
    assert changed > 0
    if sparse:
        assert isinstance(tr.sampler, BalancedResumableSampler)
        assert tr.collate_fn().keywords == {"split_size": 2}
    batch = next(iter(tr.snapshot_batches(2)))
    out = tr.run_snapshot(batch)
    assert out["sample"]["value"].shape == out["sample_gt"]["value"].shape
    assert out["sample"]["value"].shape[:2] == (2, 3)
    assert ("image" in out) == name.startswith("Image")


@pytest.mark.parametrize("sparse", [False, True])
def test_plain_trainers_with_raw_condition_tokens(sparse, tmp_path):
    """FlowMatchingTrainer / SparseFlowMatchingTrainer (and their CFG versions) take the dataset's
    condition tokens as they are."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import bench_train

    bench_train.L_COND, bench_train.C_COND = 5, 64
    ds = bench_train.SyntheticLatents(sparse, num=4)
    from trellis.config import build_models as bm

    for name in (["SparseFlowMatchingTrainer", "SparseFlowMatchingCFGTrainer"] if sparse
                 else ["FlowMatchingTrainer", "FlowMatchingCFGTrainer"]):
        cfg = config(name, sparse, "SLat")
        args = {k: v for k, v in cfg["trainer"]["args"].items()}
        torch.manual_seed(0)
        tr = TRAINERS.get(name)(bm(cfg), ds, output_dir=str(tmp_path), **args)
        batch = tr.collate_fn()([ds[i] for i in range(4)]) if sparse else ds.collate_fn([ds[i] for i in range(4)])
        m = tr.run_step(batch)
        assert torch.isfinite(torch.as_tensor(m["loss/loss"]))


def test_keyed_randomness_does_not_depend_on_the_split(root, tmp_path):
    """The same global batch gives the same t, noise and CFG draws per sample, and the same update,
    whether it runs as 1 or 2 micro-batches."""
    params = []
    for split in (1, 2):
        cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                     {"text_cond_model": "tiny"}, batch_split=split, p_uncond=0.5)
        tr = build(cfg, root, tmp_path / f"s{split}")
        tr._seed_step()
        batch = next(tr.batches())
        if split == 1:
            tr.sample_keys = batch["_index"].clone()
            t_all = tr.flow.sample_t(tr.generators("t", 4))
            n_all = tr.noise_like(batch["x_0"])
        else:
            tr.sample_keys = batch["_index"][2:].clone()
            t_half = tr.flow.sample_t(tr.generators("t", 2))
            n_half = tr.noise_like(batch["x_0"][2:])
        tr.sample_keys = None
        tr.run_step(batch)
        params.append([p.detach().clone() for p in tr.models["denoiser"].parameters()])
    assert torch.equal(t_all[2:], t_half) and torch.equal(n_all[2:], n_half)
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cfg_dropout_uses_the_null_condition(root, tmp_path):
    cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                 {"text_cond_model": "tiny"}, p_uncond=1.0)
    tr = build(cfg, root, tmp_path)
    seen = []
    model = tr.models["denoiser"]
    model.register_forward_hook(lambda m, args, out: seen.append(args[2].detach()))
    tr.run_step(next(tr.batches()))
    null = tr.condition.null(seen[0])
    assert all(torch.equal(c, null) for c in seen)
    tr.cfg_dropout.p_uncond = 0.0
    seen.clear()
    tr.run_step(next(tr.batches()))
    assert not torch.equal(seen[0], tr.condition.null(seen[0]))


def test_snapshot_decodes_ss_latents_with_a_release_decoder(root, tmp_path):
    from trellis.models.sparse_structure_vae import SparseStructureDecoder

    dec_args = dict(out_channels=1, latent_channels=8, num_res_blocks=1, num_res_blocks_middle=1, channels=[8, 4, 4],
                    use_fp16=False)
    torch.manual_seed(0)
    dec = SparseStructureDecoder(**dec_args)
    save_pretrained(dec, "SparseStructureDecoder", dec_args, str(tmp_path / "ss_dec_tiny"))
    cfg = config("ImageConditionedFlowMatchingCFGTrainer", False, "ImageConditionedSparseStructureLatent",
                 {"image_cond_model": "tiny"})
    cfg["dataset"]["args"]["pretrained_ss_dec"] = str(tmp_path / "ss_dec_tiny")
    tr = build(cfg, root, tmp_path / "run")
    assert isinstance(tr.snapshot_decoder(), SparseStructureDecoder)
    tr.i_sample = 1
    tr.snapshot("probe")
    files = sorted(os.listdir(tmp_path / "run" / "samples" / "probe"))
    assert files == ["image_probe.jpg", "sample_gt_probe.jpg", "sample_probe.jpg"]


def test_loud_errors(root, tmp_path, monkeypatch):
    # condition width vs the model
    cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                 {"text_cond_model": "tiny"})
    cfg["models"]["denoiser"]["args"]["cond_channels"] = 48
    with pytest.raises(ValueError, match="cond_channels"):
        build(cfg, root, tmp_path / "a")
    # a missing encoder weight file
    monkeypatch.delenv("TRELLIS_WEIGHTS_DIR", raising=False)
    cfg = config("ImageConditionedFlowMatchingCFGTrainer", False, "ImageConditionedSparseStructureLatent",
                 {"image_cond_model": "dinov2_vitl14_reg"})
    with pytest.raises((FileNotFoundError, ValueError), match="(?i)dinov2"):
        build(cfg, root, tmp_path / "b")
    # a NaN loss names the step, the rank and the samples
    cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                 {"text_cond_model": "tiny"})
    tr = build(cfg, root, tmp_path / "c")
    batch = next(tr.batches())
    batch["x_0"][1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 0 on rank 0 .*#"):
        tr.run_step(batch)
    # an empty sparse micro-batch
    cfg = config("TextConditionedSparseFlowMatchingCFGTrainer", True, "TextConditionedSLat",
                 {"text_cond_model": "tiny"})
    tr = build(cfg, root, tmp_path / "d")
    with pytest.raises(DatasetError, match="x_0"):
        tr.training_losses(cond=["a"])
    # a condition of the wrong batch size
    batch = next(tr.batches())[0]
    batch.pop("_index")
    batch["cond"] = batch["cond"][:1]
    with pytest.raises(ValueError, match="condition of shape"):
        tr.training_losses(**batch)


@pytest.mark.gpu
def test_nan_loss_on_cuda_is_reported_at_the_next_step(root, tmp_path):
    """On CUDA the loss check does not stop the host every step: a non-finite loss is reported at the
    start of the next step (or before a checkpoint), still naming its own step, rank and samples, and
    the optimizer skipped its update meanwhile."""
    from trellis.utils.dist import DistInfo

    cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                 {"text_cond_model": "tiny"})
    validate_config(cfg)
    torch.manual_seed(0)
    models, dataset = build_models(cfg), build_dataset(cfg, root)
    tr = TRAINERS.get(cfg["trainer"]["name"])(models, dataset, output_dir=str(tmp_path),
                                              dist=DistInfo(device=torch.device("cuda")), **cfg["trainer"]["args"])
    data = tr.batches()
    batch = tr.to_device(next(data))
    batch["x_0"][1] = float("nan")
    before = [p.detach().clone() for p in tr.policy.master_params]
    tr.run_step(batch)  # returns: the check is queued
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.master_params))  # update skipped
    tr.step = 1
    with pytest.raises(FloatingPointError, match=r"step 0 on rank 0 .*#"):
        tr.run_step(tr.to_device(next(data)))


def test_forward_backward_is_run_step_without_the_update(root, tmp_path):
    """``forward_backward`` (what bench_train times as "forward + backward only") leaves the
    parameters alone and accumulates the gradients that ``run_step`` then clips and applies: the
    same batch and keys give the same loss and the same gradients."""
    cfg = config("TextConditionedFlowMatchingCFGTrainer", False, "TextConditionedSparseStructureLatent",
                 {"text_cond_model": "tiny"}, batch_split=2, grad_clip=None)
    tr = build(cfg, root, tmp_path / "fb")
    tr._seed_step()
    batch = next(tr.batches())
    model = tr.models["denoiser"]
    before = [p.detach().clone() for p in model.parameters()]
    tr.policy.zero_grad()
    terms = tr.forward_backward(copy.deepcopy(batch))
    grads = [p.grad.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert any(bool(g.abs().sum() > 0) for g in grads)
    m = tr.run_step(copy.deepcopy(batch))
    assert m["loss/loss"] == terms["loss/loss"]
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
