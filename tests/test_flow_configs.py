"""The 8 original generation configs, shrunk (model width/depth, tiny conditioners), pass
``train.py --tryrun`` on a demo root; the tiny demo configs train a step."""

import glob
import json
import os
import sys

import pytest
from test_flow_demo_data import SLAT_MODEL, SS_MODEL, write_flow_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402

GENERATION = sorted(glob.glob(os.path.join(REPO, "configs", "generation", "*.json")))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_flow_root(str(tmp_path_factory.mktemp("flow_cfg_root")), num=8)


def shrink(cfg: dict) -> list[str]:
    """--set overrides that make a released config CPU-sized."""
    m = "models.denoiser.args"
    sets = [f"{m}.model_channels=64", f"{m}.num_blocks=2", f"{m}.num_heads=4", f"{m}.cond_channels=64"]
    sparse = cfg["models"]["denoiser"]["name"].endswith("SLatFlowModel")
    if sparse:
        sets += [f"{m}.io_block_channels=[16]", f"dataset.args.latent_model=\"{SLAT_MODEL}\""]
    else:
        sets += [f"dataset.args.latent_model=\"{SS_MODEL}\""]
    targs = cfg["trainer"]["args"]
    if "image_cond_model" in targs:
        sets += ["trainer.args.image_cond_model=\"tiny\"", "dataset.args.image_size=28"]
    if "text_cond_model" in targs:
        sets += ["trainer.args.text_cond_model=\"tiny\""]
    split = targs.get("batch_split", 1)
    sets += ["trainer.args.fp16_mode=null", f"trainer.args.batch_size_per_gpu={2 * split}",
             "trainer.args.num_workers=0"]
    return [a for s in sets for a in ("--set", s)]


@pytest.mark.parametrize("path", GENERATION, ids=[os.path.basename(p)[:-5] for p in GENERATION])
def test_generation_config_tryrun(path, root, tmp_path, capsys):
    assert len(GENERATION) == 8
    with open(path) as f:
        cfg = json.load(f)
    out = str(tmp_path / "run")
    code = train.main(["--config", path, "--output_dir", out, "--data_dir", root, "--tryrun", "--device", "cpu",
                       *shrink(cfg)])
    text = capsys.readouterr()
    assert code == 0, text.err[-3000:]
    assert "tryrun OK" in text.out
    assert not os.path.exists(out)  # tryrun writes nothing


@pytest.mark.parametrize("name", ["ss_flow_img_tiny", "slat_flow_txt_tiny"])
def test_demo_configs_train(name, root, tmp_path, capsys):
    out = str(tmp_path / "run")
    code = train.main(["--config", os.path.join(REPO, "configs", "demo", f"{name}.json"), "--output_dir", out,
                       "--data_dir", root, "--device", "cpu", "--ckpt", "none",
                       "--set", "trainer.args.max_steps=2", "--set", "trainer.args.i_sample=0",
                       "--set", "trainer.args.num_workers=0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert os.path.isfile(os.path.join(out, "ckpts", "denoiser_step0000002.pt"))
