"""The engine on CUDA: every precision mode trains a few steps of the tiny SS VAE, resumes exactly,
and inflat_all keeps the fp16 torso with fp32 masters (run by scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from test_engine import load_models, run_inprocess

from trellis.trainers import checkpoint as ckpt

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mode", ["inflat_all", "amp", "bf16", None])
def test_precision_modes_train_and_resume_on_cuda(tmp_path, voxel_root, tiny_config, mode):
    path, cfg, write = tiny_config
    # deterministic: cuDNN's timed algorithm choice and its atomics differ between runs (more so when
    # other processes share the GPU, as in gpu_check); Adam turns any difference in a near-zero
    # gradient into a whole step of lr, so the resumed run is compared bitwise.
    cfg["trainer"]["args"].update(max_steps=4, i_save=2, fp16_mode=mode, deterministic=True)
    use_fp16 = mode == "inflat_all"
    for key in ("encoder", "decoder"):
        cfg["models"][key]["args"]["use_fp16"] = use_fp16
    write()
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--config", path, "--data_dir", voxel_root, "--device", "cuda"]
    assert run_inprocess(*args, "--output_dir", full) == 0
    assert run_inprocess(*args, "--output_dir", part, "--set", "trainer.args.max_steps=2") == 0
    assert run_inprocess(*args, "--output_dir", part) == 0
    a, b = load_models(full, 4), load_models(part, 4)
    for key in a:
        for name in a[key]:
            assert a[key][name].dtype == torch.float32 or not a[key][name].is_floating_point()
            assert torch.isfinite(a[key][name]).all(), name
            torch.testing.assert_close(a[key][name], b[key][name], atol=0, rtol=0)
    misc = torch.load(ckpt.misc_file(full, 4), weights_only=False)
    if mode == "inflat_all":
        # The first steps at 2^20 overflow fp16 on CUDA (an H200 skipped three): each skip lowers the
        # scale by one, each applied step raises it by 1e-3. The resumed run must carry the same state.
        log_scale = misc["precision"]["log_scale"]
        assert 10.0 < log_scale <= 20.0 + 4e-3
        resumed = torch.load(ckpt.misc_file(part, 4), weights_only=False)["precision"]["log_scale"]
        assert resumed == pytest.approx(log_scale, abs=1e-9)
    if mode == "amp":
        assert "scaler" in misc["precision"]


def test_adam_is_fused_on_cuda_unless_the_config_chooses():
    from trellis.trainers.base import _optimizer_args

    cuda = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
    assert _optimizer_args("AdamW", {"lr": 1e-4}, cuda) == {"lr": 1e-4, "fused": True}
    assert _optimizer_args("AdamW", {"foreach": True}, cuda) == {"foreach": True}  # the config's choice wins
    assert _optimizer_args("SGD", {}, cuda) == {}
