"""Config grammar: registries, strict argument checking with suggestions, overrides, the 12 originals."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from trellis.config import ConfigError, apply_overrides, parse_override, validate_config
from trellis.registry import MODELS, OPTIMIZERS, RegistryError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_trainer_key_suggests_closest(tiny_config):
    _, cfg, _ = tiny_config
    cfg["trainer"]["args"]["lambda_kll"] = 1e-3
    with pytest.raises(ConfigError, match=r"trainer\.args\.lambda_kll: unknown key; did you mean 'lambda_kl'\?"):
        validate_config(cfg)


def test_unknown_base_trainer_key_is_checked_through_kwargs(tiny_config):
    _, cfg, _ = tiny_config
    cfg["trainer"]["args"]["lr_sheduler"] = None
    with pytest.raises(ConfigError, match="did you mean 'lr_scheduler'"):
        validate_config(cfg)


def test_missing_required_model_arg(tiny_config):
    _, cfg, _ = tiny_config
    del cfg["models"]["encoder"]["args"]["channels"]
    with pytest.raises(ConfigError, match=r"models\.encoder\.args\.channels: missing required argument"):
        validate_config(cfg)


def test_unknown_class_lists_known_names(tiny_config):
    _, cfg, _ = tiny_config
    cfg["models"]["decoder"]["name"] = "SparseStructureDecodr"
    with pytest.raises(ConfigError, match=r"models\.decoder\.name: unknown model 'SparseStructureDecodr'\. "
                                          r"Did you mean 'SparseStructureDecoder'"):
        validate_config(cfg)


def test_nested_specs_are_checked(tiny_config):
    _, cfg, _ = tiny_config
    cfg["trainer"]["args"]["optimizer"] = {"name": "AdamW", "args": {"lr": 1e-3, "betas2": [0.9, 0.99]}}
    with pytest.raises(ConfigError, match=r"trainer\.args\.optimizer\.args\.betas2: unknown key; did you mean 'betas'"):
        validate_config(cfg)
    cfg["trainer"]["args"]["optimizer"] = {"name": "Adamw", "args": {}}
    with pytest.raises(ConfigError, match="Did you mean 'AdamW'"):
        validate_config(cfg)
    cfg["trainer"]["args"]["optimizer"] = {"name": "AdamW", "args": {}}
    cfg["trainer"]["args"]["grad_clip"] = {"name": "AdaptiveGradClipper", "args": {"max_norms": 1.0}}
    with pytest.raises(ConfigError, match="did you mean 'max_norm'"):
        validate_config(cfg)
    cfg["trainer"]["args"]["grad_clip"] = 1.0
    cfg["trainer"]["args"]["lr_scheduler"] = {"name": "LinearWarmupLRScheduler", "args": {"warmup_steps": 10}}
    validate_config(cfg)


def test_every_torch_optimizer_and_scheduler_resolves():
    import torch

    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "LBFGS"):
        assert OPTIMIZERS.get(name) is getattr(torch.optim, name)
    with pytest.raises(RegistryError, match="Known: .*AdamW"):
        OPTIMIZERS.get("Nope")


def test_overrides_parse_json_else_string():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=hello") == (["a"], "hello")
    cfg = apply_overrides({"trainer": {"args": {"max_steps": 1}}}, ["trainer.args.max_steps=7", "trainer.args.new.x=1"])
    assert cfg["trainer"]["args"] == {"max_steps": 7, "new": {"x": 1}}
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.json"))),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_shipped_configs_validate_or_say_not_implemented(path):
    with open(path) as f:
        cfg = json.load(f)
    try:
        validate_config(cfg)
    except ConfigError as e:
        assert "not implemented yet" in str(e), str(e)


def test_original_configs_are_verbatim():
    ref = "/work/shared/reference/configs"
    if not os.path.isdir(ref):
        pytest.skip("reference configs not present")
    for src in glob.glob(os.path.join(ref, "*", "*.json")):
        dst = os.path.join(ROOT, "configs", os.path.relpath(src, ref))
        with open(src) as a, open(dst) as b:
            assert a.read() == b.read(), dst


def test_ss_vae_original_config_validates():
    with open(os.path.join(ROOT, "configs", "vae", "ss_vae_conv3d_16l8_fp16.json")) as f:
        validate_config(json.load(f))


def test_train_py_reports_config_errors_cleanly(tmp_path, tiny_config, voxel_root):
    path, cfg, write = tiny_config
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", path, "--output_dir", out,
                        "--data_dir", voxel_root, "--set", "trainer.args.lambda_kll=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "trainer.args.lambda_kll: unknown key; did you mean 'lambda_kl'?" in r.stderr
    assert "Traceback" not in r.stderr
    assert not os.path.exists(out)


def test_registry_not_implemented_is_distinct():
    from trellis.registry import NotImplementedYet, Registry

    reg = Registry("thing", {"Ghost": "trellis.does_not_exist:Ghost"})
    with pytest.raises(NotImplementedYet, match="not implemented yet"):
        reg.get("Ghost")
    assert "SparseStructureEncoder" in MODELS.names()
