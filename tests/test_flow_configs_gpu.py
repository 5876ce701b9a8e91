"""The 8 original generation configs pass ``train.py --tryrun`` on a GPU with their real-size
denoisers, fp16 modes and batch sizes (run by scripts/gpu_check.sh). Image configs use a DINOv2
ViT-L/14-reg of the real shape with random weights (1374 x 1024 tokens); text configs use the tiny
text encoder (the CLIP tokenizer files cannot be made offline), so their ``cond_channels`` shrink to
its width and only the cross-attention key/value projections change size."""

import glob
import json
import os
import sys

import pytest
import torch
from test_flow_demo_data import SLAT_MODEL, SS_MODEL, write_flow_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402

pytestmark = pytest.mark.gpu
GENERATION = sorted(glob.glob(os.path.join(REPO, "configs", "generation", "*.json")))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_flow_root(str(tmp_path_factory.mktemp("flow_gpu_root")), num=16)


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    from trellis.encoders.dinov2 import PRESETS, DinoV2ViT, init_random

    path = str(tmp_path_factory.mktemp("weights") / "dinov2_vitl14_reg4_pretrain.pth")
    torch.save(init_random(DinoV2ViT(PRESETS["dinov2_vitl14_reg"])).state_dict(), path)
    return path


@pytest.mark.parametrize("path", GENERATION, ids=[os.path.basename(p)[:-5] for p in GENERATION])
def test_generation_config_tryrun_real_size(path, root, dinov2_weights, tmp_path, capsys):
    with open(path) as f:
        cfg = json.load(f)
    sparse = cfg["models"]["denoiser"]["name"].endswith("SLatFlowModel")
    sets = [f"dataset.args.latent_model=\"{SLAT_MODEL if sparse else SS_MODEL}\"", "trainer.args.num_workers=2"]
    if "image_cond_model" in cfg["trainer"]["args"]:
        sets.append(f"trainer.args.image_cond_weights=\"{dinov2_weights}\"")
    else:
        sets += ["trainer.args.text_cond_model=\"tiny\"", "models.denoiser.args.cond_channels=64"]
    out = str(tmp_path / "run")
    code = train.main(["--config", path, "--output_dir", out, "--data_dir", root, "--tryrun", "--device", "cuda",
                       *[a for s in sets for a in ("--set", s)]])
    text = capsys.readouterr()
    assert code == 0, text.err[-3000:]
    assert "tryrun OK" in text.out and "peak GPU memory" in text.out
    assert not os.path.exists(out)
