"""The training engine end to end on tiny SS-VAE runs (CPU): exact resume, checkpoints, DDP,
precision, clipping, tryrun, profile, auto_retry, bad input."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trellis.trainers import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")


def train(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, env=e)


def run_inprocess(*args: str) -> int:
    sys.path.insert(0, ROOT)
    import train as train_module

    return train_module.main(list(args))


def load_models(run_dir: str, step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {k: torch.load(ckpt.model_file(run_dir, k, step), weights_only=True) for k in ("encoder", "decoder")}


def assert_same_state(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if exact:
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
            else:
                torch.testing.assert_close(a[key][name], b[key][name], atol=atol, rtol=1e-4, msg=f"{key}.{name}")


def test_exact_resume_is_bitwise_identical(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    cfg["trainer"]["args"]["max_steps"] = 6
    cfg["trainer"]["args"]["i_save"] = 3
    write()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert run_inprocess("--config", path, "--output_dir", full, "--data_dir", voxel_root) == 0
    # Same run, stopped after step 3, then resumed (latest by default).
    assert run_inprocess("--config", path, "--output_dir", part, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=3") == 0
    assert ckpt.find_latest(part) == 3
    assert run_inprocess("--config", path, "--output_dir", part, "--data_dir", voxel_root) == 0
    assert_same_state(load_models(full, 6), load_models(part, 6))
    for k in ("encoder", "decoder"):
        a = torch.load(ckpt.ema_file(full, k, 0.9, 6), weights_only=True)
        b = torch.load(ckpt.ema_file(part, k, 0.9, 6), weights_only=True)
        assert all(torch.equal(a[n], b[n]) for n in a)
    ma = torch.load(ckpt.misc_file(full, 6), weights_only=False)
    mb = torch.load(ckpt.misc_file(part, 6), weights_only=False)
    assert ma["data_sampler"] == mb["data_sampler"]
    assert np.array_equal(ma["grad_clip"]["grad_norm"], mb["grad_clip"]["grad_norm"])
    # The run directory holds what train.py promises.
    for name in ("command.txt", "config.json", "encoder_model_summary.txt", "decoder_model_summary.txt", "log.jsonl"):
        assert os.path.isfile(os.path.join(full, name)), name
    assert glob.glob(os.path.join(full, "tb_logs", "events.out.tfevents.*"))
    with open(os.path.join(full, "log.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert all("loss/loss" in e and "status/iou" in e for e in entries)


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, voxel_root, tiny_config, monkeypatch):
    path, cfg, write = tiny_config
    out = str(tmp_path / "run")
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=2") == 0
    before = load_models(out, 2)

    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # die in the middle of writing the second file of step 4
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(10)
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=4") == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.find_latest(out) == 2
    assert not glob.glob(os.path.join(out, "ckpts", "*.tmp-*")), "temporary files left behind"
    assert_same_state(before, load_models(out, 2))
    # and the run resumes from it
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=3") == 0
    assert ckpt.find_latest(out) == 3


def test_keep_last_retention(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    cfg["trainer"]["args"].update(max_steps=4, i_save=1, keep_last=2)
    write()
    out = str(tmp_path / "run")
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root) == 0
    assert ckpt.saved_steps(out) == [3, 4]
    assert not glob.glob(os.path.join(out, "ckpts", "*_step0000001.pt"))


def test_ddp_two_processes_match_one_process(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    # SGD: the weights after two steps differ exactly by lr x (gradient differences); Adam would
    # amplify float-rounding noise on parameters whose gradient is ~0 (zero-initialised convs).
    cfg["trainer"]["args"].update(max_steps=2, i_save=2, batch_split=1, grad_clip=None,
                                  optimizer={"name": "SGD", "args": {"lr": 0.1}})
    cfg["trainer"]["args"].pop("batch_size_per_gpu")
    cfg["trainer"]["args"]["batch_size"] = 4
    write()
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = train("--config", path, "--output_dir", one, "--data_dir", voxel_root, "--device", "cpu")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = train("--config", path, "--output_dir", two, "--data_dir", voxel_root, "--device", "cpu",
               "--num_gpus", "2", "--master_port", "29517")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert_same_state(load_models(one, 2), load_models(two, 2), exact=False, atol=1e-6)


def test_fp16_loss_scale_halves_and_skips_on_overflow():
    from trellis.trainers.precision import InflatAllPolicy

    p16 = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    p32 = torch.nn.Parameter(torch.ones(2))
    policy = InflatAllPolicy([p16, p32], torch.device("cpu"), scale_growth=0.5)
    opt = torch.optim.SGD(policy.master_params, lr=0.1)
    assert policy.log_scale == 20.0
    # A clean step: grads are unscaled, the step applies, the scale grows.
    policy.zero_grad()
    policy.backward((p16.float().sum() + p32.sum()) * 1e-3)
    norm, ok = policy.unscale_and_clip(None)
    assert ok
    torch.testing.assert_close(policy.master_params[0].grad, torch.full((3,), 1e-3))
    policy.step(opt)
    policy.update(ok)
    assert policy.log_scale == 20.5
    torch.testing.assert_close(p16.float(), torch.full((3,), 1 - 1e-4), atol=1e-3, rtol=0)
    # Overflow: the scaled fp16 grad becomes inf -> skip and halve.
    before = [m.detach().clone() for m in policy.master_params]
    policy.zero_grad()
    policy.backward(p16.float().sum() * 1e4)
    norm, ok = policy.unscale_and_clip(None)
    assert not ok
    policy.update(ok)
    assert policy.log_scale == 19.5
    assert all(torch.equal(b, m.detach()) for b, m in zip(before, policy.master_params))


def test_adaptive_clipper_percentile():
    from trellis.trainers.utils import AdaptiveGradClipper

    clip = AdaptiveGradClipper(max_norm=10.0, clip_percentile=50, buffer_size=4)
    p = torch.nn.Parameter(torch.zeros(1))
    norms = []
    for g in [1.0, 2.0, 3.0, 4.0, 100.0]:
        p.grad = torch.tensor([g])
        norms.append(float(clip([p])))
    assert norms == [1.0, 2.0, 3.0, 4.0, 100.0]  # pre-clip norms are returned
    # After 4 norms the threshold is the median of [1, 2, 3, 4] = 2.5; the 5th grad is clipped to it.
    assert p.grad.item() == pytest.approx(2.5, rel=1e-4)
    assert clip.threshold == pytest.approx(float(np.percentile([100.0, 2, 3, 4], 50)))
    state = clip.state_dict()
    clip2 = AdaptiveGradClipper(max_norm=10.0, clip_percentile=50, buffer_size=4)
    clip2.load_state_dict(state)
    assert clip2.threshold == clip.threshold
    # The threshold never exceeds max_norm.
    capped = AdaptiveGradClipper(max_norm=1.0, clip_percentile=50, buffer_size=1)
    p.grad = torch.tensor([5.0])
    capped([p])
    assert capped.threshold == 1.0


def test_tryrun_writes_nothing(tmp_path, voxel_root, tiny_config):
    path, _, _ = tiny_config
    out = str(tmp_path / "never")
    r = train("--config", path, "--output_dir", out, "--data_dir", voxel_root, "--tryrun")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tryrun OK" in r.stdout
    assert "SparseStructureEncoder" in r.stdout and "voxelized" in r.stdout
    assert not os.path.exists(out)


def test_profile_writes_trace(tmp_path, voxel_root, tiny_config):
    path, _, _ = tiny_config
    out = str(tmp_path / "prof")
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root, "--profile") == 0
    traces = glob.glob(os.path.join(out, "profile", "*.pt.trace.json*"))
    assert traces, os.listdir(os.path.join(out, "profile"))
    assert not ckpt.saved_steps(out)


def test_auto_retry_exit_codes(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    out = str(tmp_path / "retry")
    # A worker that always crashes after its first checkpoint: retries resume, then give up non-zero.
    env = {"TRELLIS_FAULT_AT_STEP": "3"}
    r = train("--config", path, "--output_dir", out, "--data_dir", voxel_root, "--auto_retry", "2",
              "--set", "trainer.args.max_steps=6", env=env)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("relaunching from the newest checkpoint") == 2
    assert "giving up after 2 retries" in r.stderr
    assert ckpt.find_latest(out) == 2
    # Without the crash the same command succeeds (resuming from step 2) and exits 0.
    r = train("--config", path, "--output_dir", out, "--data_dir", voxel_root, "--auto_retry", "2",
              "--set", "trainer.args.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ckpt.find_latest(out) == 6
    # A config error is not retried.
    r = train("--config", path, "--output_dir", out, "--data_dir", voxel_root, "--auto_retry", "2",
              "--set", "trainer.args.lambda_kll=1")
    assert r.returncode == 2
    assert "relaunching" not in r.stderr


def test_checkpoint_from_another_config_is_rejected(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    out = str(tmp_path / "run")
    assert run_inprocess("--config", path, "--output_dir", out, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=2") == 0
    r = train("--config", path, "--output_dir", out, "--data_dir", voxel_root,
              "--set", "models.encoder.args.channels=[4,16]", "--set", "trainer.args.max_steps=3")
    assert r.returncode == 2
    assert "encoder_step0000002.pt does not fit the model" in r.stderr
    assert ckpt.find_latest(out) == 2


def test_finetune_ckpt_lists_mismatched_keys(tmp_path, voxel_root, tiny_config, capsys):
    path, cfg, write = tiny_config
    src = str(tmp_path / "src")
    assert run_inprocess("--config", path, "--output_dir", src, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=2") == 0
    cfg["models"]["encoder"]["args"]["latent_channels"] = 2  # encoder out_layer.2 changes shape
    cfg["models"]["decoder"]["args"]["latent_channels"] = 2  # decoder input_layer changes shape
    cfg["trainer"]["args"]["finetune_ckpt"] = {"encoder": ckpt.model_file(src, "encoder", 2),
                                               "decoder": ckpt.model_file(src, "decoder", 2)}
    cfg["trainer"]["args"]["max_steps"] = 1
    write()
    assert run_inprocess("--config", path, "--output_dir", str(tmp_path / "ft"), "--data_dir", voxel_root,
                         "--tryrun") == 0
    out = capsys.readouterr().out
    assert "shape mismatch (kept init): out_layer.2.weight" in out
    assert "shape mismatch (kept init): input_layer.weight" in out
    assert "finetune: encoder" in out and "tryrun OK" in out


def test_compile_option_wraps_from_outside(tmp_path, voxel_root, tiny_config):
    path, cfg, write = tiny_config
    cfg["trainer"]["args"]["max_steps"] = 2
    write()
    plain, compiled = str(tmp_path / "plain"), str(tmp_path / "compiled")
    assert run_inprocess("--config", path, "--output_dir", plain, "--data_dir", voxel_root) == 0
    # The eager backend exercises the wrapping (dynamo tracing) without a C++ toolchain run.
    assert run_inprocess("--config", path, "--output_dir", compiled, "--data_dir", voxel_root,
                         "--set", 'trainer.args.compile={"backend": "eager"}') == 0
    a, b = load_models(plain, 2), load_models(compiled, 2)
    assert all(not k.startswith("_orig_mod") for k in b["encoder"])  # plain state-dict keys
    assert_same_state(a, b, exact=False, atol=1e-6)



def test_optimizer_args_keep_cpu_optimizers_unfused():
    from trellis.trainers.base import _optimizer_args

    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert _optimizer_args("AdamW", {"lr": 1e-4}, cpu) == {"lr": 1e-4}


def test_nonfinite_step_is_skipped_on_device_by_a_fused_adamw():
    """The sync-free skip: a fused AdamW gets ``found_inf`` and leaves weights and state alone."""
    from trellis.trainers.precision import _takes_found_inf, step_unless_nonfinite

    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert _takes_found_inf(opt) and not _takes_found_inf(torch.optim.AdamW([p], lr=0.1, foreach=False))
    p.grad = torch.full((4,), 0.5)
    step_unless_nonfinite(opt, torch.tensor(True))
    after_one = p.detach().clone()
    assert not torch.equal(after_one, torch.ones(4))
    state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad = torch.full((4,), float("nan"))
    step_unless_nonfinite(opt, torch.tensor(False))
    assert torch.equal(p.detach(), after_one)
    assert all(torch.equal(state[k], v) for k, v in opt.state[p].items())
    assert not hasattr(opt, "found_inf")
    # and a non-fused optimizer is skipped on the host
    q = torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([q], lr=1.0)
    q.grad = torch.ones(2)
    step_unless_nonfinite(sgd, torch.tensor(False))
    assert torch.equal(q.detach(), torch.ones(2))
    step_unless_nonfinite(sgd, torch.tensor(True))
    assert torch.equal(q.detach(), torch.zeros(2))
