"""The sparse-structure VAE: state-dict parity with the release, maths, and the release format."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from trellis.models import from_pretrained, save_pretrained
from trellis.models.sparse_structure_vae import (
    SparseStructureDecoder,
    SparseStructureEncoder,
    pixel_shuffle_3d,
)

MANIFESTS = "/work/shared/reference/manifests"


@pytest.mark.parametrize("key,cls", [("encoder", SparseStructureEncoder), ("decoder", SparseStructureDecoder)])
def test_state_dict_matches_release_manifest(key, cls):
    path = os.path.join(MANIFESTS, f"ss_vae_conv3d_16l8_fp16.{key}.json")
    if not os.path.isfile(path):
        pytest.skip("reference manifests not present")
    with open(path) as f:
        m = json.load(f)
    with torch.device("meta"):
        model = cls(**m["args"])
    got = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert got == m["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == m["total_params"]


def test_pixel_shuffle_channel_order():
    x = torch.randn(2, 3 * 8, 4, 5, 6)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (2, 3, 8, 10, 12)
    for c, a, b, e in [(0, 0, 0, 0), (1, 1, 0, 1), (2, 1, 1, 1), (2, 0, 1, 0)]:
        torch.testing.assert_close(y[:, c, a::2, b::2, e::2], x[:, c * 8 + a * 4 + b * 2 + e])


def tiny_models(use_fp16=False):
    enc = SparseStructureEncoder(1, 4, 1, [8, 16], num_res_blocks_middle=1, use_fp16=use_fp16)
    dec = SparseStructureDecoder(1, 4, 1, [16, 8], num_res_blocks_middle=1, use_fp16=use_fp16)
    return enc, dec


def test_shapes_and_posterior():
    torch.manual_seed(0)
    enc, dec = tiny_models()
    x = (torch.rand(2, 1, 16, 16, 16) > 0.7).float()
    z, mean, logvar = enc(x, sample_posterior=True, return_raw=True)
    assert z.shape == mean.shape == logvar.shape == (2, 4, 8, 8, 8)
    assert not torch.equal(z, mean)
    assert torch.equal(enc(x), mean)
    assert dec(mean).shape == (2, 1, 16, 16, 16)


def test_resblock_and_layer_maths_match_functional_oracle():
    torch.manual_seed(0)
    enc, _ = tiny_models()
    for p in enc.parameters():  # non-trivial values everywhere (conv2 is zero-initialised)
        torch.nn.init.normal_(p, std=0.1)
    x = (torch.rand(1, 1, 16, 16, 16) > 0.7).float()

    def ln(h, norm):  # LayerNorm over channels
        return F.layer_norm(h.movedim(1, -1), (h.shape[1],), norm.weight, norm.bias, 1e-5).movedim(-1, 1)

    def res(h, b):
        y = F.conv3d(F.silu(ln(h, b.norm1)), b.conv1.weight, b.conv1.bias, padding=1)
        y = F.conv3d(F.silu(ln(y, b.norm2)), b.conv2.weight, b.conv2.bias, padding=1)
        return y + h

    h = F.conv3d(x, enc.input_layer.weight, enc.input_layer.bias, padding=1)
    h = res(h, enc.blocks[0])
    h = F.conv3d(h, enc.blocks[1].conv.weight, enc.blocks[1].conv.bias, stride=2)
    h = res(h, enc.blocks[2])
    h = res(h, enc.middle_block[0])
    h = F.conv3d(F.silu(ln(h, enc.out_layer[0])), enc.out_layer[2].weight, enc.out_layer[2].bias, padding=1)
    torch.testing.assert_close(enc(x), h[:, :4], atol=1e-5, rtol=1e-5)


def test_fp16_torso_dtypes_and_conversion():
    enc, _ = tiny_models(use_fp16=True)
    assert enc.blocks[0].conv1.weight.dtype == torch.float16
    assert enc.blocks[0].norm1.weight.dtype == torch.float32
    assert enc.input_layer.weight.dtype == torch.float32
    x = (torch.rand(1, 1, 16, 16, 16) > 0.7).float()
    y16 = enc(x)
    assert y16.dtype == torch.float32
    enc.convert_to_fp32()
    assert enc.blocks[0].conv1.weight.dtype == torch.float32
    torch.testing.assert_close(enc(x), y16, atol=2e-2, rtol=2e-2)


def test_release_format_round_trip(tmp_path):
    enc, _ = tiny_models(use_fp16=True)
    args = {"in_channels": 1, "latent_channels": 4, "num_res_blocks": 1, "channels": [8, 16],
            "num_res_blocks_middle": 1, "use_fp16": True}
    save_pretrained(enc, "SparseStructureEncoder", args, str(tmp_path / "ss_enc"))
    loaded = from_pretrained(str(tmp_path / "ss_enc"))
    for (k, a), (k2, b) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"missing\.json not found"):
        from_pretrained(str(tmp_path / "missing"))


def test_export_from_training_run(tmp_path, voxel_root, tiny_config):
    from test_engine import run_inprocess

    from trellis.export import main as export_main

    path, _, _ = tiny_config
    run = str(tmp_path / "run")
    assert run_inprocess("--config", path, "--output_dir", run, "--data_dir", voxel_root,
                         "--set", "trainer.args.max_steps=2") == 0
    out = str(tmp_path / "release" / "dec")
    assert export_main(["--run_dir", run, "--model", "decoder", "--out", out]) == 0
    model = from_pretrained(out)
    ema = torch.load(os.path.join(run, "ckpts", "decoder_ema0.9_step0000002.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k].to(v.dtype)), k
    assert export_main(["--run_dir", run, "--model", "nope", "--out", out]) == 2
