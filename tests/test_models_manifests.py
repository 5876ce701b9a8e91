"""State-dict parity with the released TRELLIS models: ordered (name, shape, dtype) of every tensor.

Each model is built on the meta device from its manifest's args (exactly as ``train.py`` builds it)
and compared to ``reference/manifests/<config>.<key>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trellis.registry import MODELS

MANIFESTS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "manifests"
if not MANIFESTS.is_dir():  # layout used when the repo sits beside shared/
    MANIFESTS = Path("/work/shared/reference/manifests")

NAMES = [
    "ss_flow_img_dit_L_16l8_fp16.denoiser",
    "ss_flow_txt_dit_B_16l8_fp16.denoiser",
    "ss_flow_txt_dit_L_16l8_fp16.denoiser",
    "ss_flow_txt_dit_XL_16l8_fp16.denoiser",
    "slat_flow_img_dit_L_64l8p2_fp16.denoiser",
    "slat_flow_txt_dit_B_64l8p2_fp16.denoiser",
    "slat_flow_txt_dit_L_64l8p2_fp16.denoiser",
    "slat_flow_txt_dit_XL_64l8p2_fp16.denoiser",
    "slat_vae_enc_dec_gs_swin8_B_64l8_fp16.encoder",
]


def _load(name: str) -> dict:
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"reference manifest not available: {path}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_matches_manifest(name: str) -> None:
    manifest = _load(name)
    cls = MODELS.get(manifest["class"])
    with torch.device("meta"):
        model = cls(**manifest["args"])
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    want = [list(row) for row in manifest["state_dict"]]
    assert [r[0] for r in got] == [r[0] for r in want], "state-dict key order differs"
    assert got == want
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == manifest["total_params"]
    assert [n for n, _ in model.named_buffers()] == manifest["buffers_in_state_dict"]


@pytest.mark.parametrize("name", ["slat_flow_txt_dit_B_64l8p2_fp16.denoiser", "slat_vae_enc_dec_gs_swin8_B_64l8_fp16.encoder"])
def test_elastic_and_base_class_share_the_state_dict(name: str) -> None:
    manifest = _load(name)
    elastic = MODELS.get(manifest["class"])
    base = MODELS.get(manifest["class"].removeprefix("Elastic"))
    assert issubclass(elastic, base) and elastic is not base
    with torch.device("meta"):
        a = elastic(**manifest["args"]).state_dict()
        b = base(**manifest["args"]).state_dict()
    assert [(k, v.shape, v.dtype) for k, v in a.items()] == [(k, v.shape, v.dtype) for k, v in b.items()]
