"""DINOv2 / CLIP loaders and the flow conditioners (CPU, tiny random models, no downloads)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trellis.encoders.clip import TinyTextEncoder, load_clip_text
from trellis.encoders.conditioners import ImageConditioner, TextConditioner
from trellis.encoders.dinov2 import (
    PRESETS,
    DinoV2ViT,
    hf_to_official,
    init_random,
    load_dinov2,
    normalize_images,
)


def _official_names_state_dict(cfg, seed=1, chunked=False):
    """A state dict with the official torch-hub key names, built by hand (not from our module)."""
    g = torch.Generator().manual_seed(seed)
    d, p = cfg.embed_dim, cfg.patch_size
    n = (cfg.img_size // p) ** 2
    sd = {
        "cls_token": torch.randn(1, 1, d, generator=g),
        "register_tokens": torch.randn(1, cfg.num_register_tokens, d, generator=g),
        "mask_token": torch.zeros(1, d),
        "pos_embed": torch.randn(1, 1 + n, d, generator=g),
        "patch_embed.proj.weight": torch.randn(d, 3, p, p, generator=g) * 0.02,
        "patch_embed.proj.bias": torch.randn(d, generator=g) * 0.02,
        "norm.weight": torch.rand(d, generator=g) + 0.5,
        "norm.bias": torch.randn(d, generator=g) * 0.1,
    }
    h = int(d * cfg.mlp_ratio)
    for i in range(cfg.depth):
        b = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        sd.update({
            b + "norm1.weight": torch.rand(d, generator=g) + 0.5, b + "norm1.bias": torch.randn(d, generator=g) * 0.1,
            b + "attn.qkv.weight": torch.randn(3 * d, d, generator=g) * 0.05,
            b + "attn.qkv.bias": torch.randn(3 * d, generator=g) * 0.05,
            b + "attn.proj.weight": torch.randn(d, d, generator=g) * 0.05, b + "attn.proj.bias": torch.zeros(d),
            b + "ls1.gamma": torch.rand(d, generator=g),
            b + "norm2.weight": torch.rand(d, generator=g) + 0.5, b + "norm2.bias": torch.zeros(d),
            b + "mlp.fc1.weight": torch.randn(h, d, generator=g) * 0.05, b + "mlp.fc1.bias": torch.zeros(h),
            b + "mlp.fc2.weight": torch.randn(d, h, generator=g) * 0.05, b + "mlp.fc2.bias": torch.zeros(d),
            b + "ls2.gamma": torch.rand(d, generator=g),
        })
    return sd


def _manual_forward(sd, cfg, x):
    """Reference ViT forward written directly on the official-name state dict."""
    d, p, heads = cfg.embed_dim, cfg.patch_size, cfg.num_heads
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1) + sd["pos_embed"]
    t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        qkv = F.linear(y, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        sh = lambda z: z.reshape(B, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        a = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(d // heads), -1) @ sh(v)
        a = F.linear(a.transpose(1, 2).reshape(B, -1, d), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        t = t + a * sd[b + "ls1.gamma"]
        y = F.layer_norm(t, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                     sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + y * sd[b + "ls2.gamma"]
    return t


def test_official_key_names_load_strictly_and_match_reference(tmp_path):
    cfg = PRESETS["tiny"]
    sd = _official_names_state_dict(cfg)
    torch.save(sd, tmp_path / "tiny.pth")
    vit = load_dinov2("tiny", weights=tmp_path / "tiny.pth")
    assert set(vit.state_dict()) == set(sd)
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        out = vit(x)
        ref = _manual_forward(sd, cfg, x)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 37 * 37, 64)
    assert out["grid"] == (37, 37)
    torch.testing.assert_close(out["x_prenorm"], ref, atol=1e-4, rtol=1e-4)


def test_chunked_block_names_and_missing_key_error(tmp_path):
    cfg = PRESETS["tiny"]
    sd = _official_names_state_dict(cfg, chunked=True)
    torch.save(sd, tmp_path / "chunked.pth")
    vit = load_dinov2("tiny", weights=tmp_path / "chunked.pth")
    assert torch.equal(vit.blocks[1].ls2.gamma, sd["blocks.0.1.ls2.gamma"])
    del sd["blocks.0.1.ls2.gamma"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="blocks.1.ls2.gamma"):
        load_dinov2("tiny", weights=tmp_path / "broken.pth")


def test_vitl_preset_has_official_shapes():
    vit = DinoV2ViT(PRESETS["dinov2_vitl14_reg"])
    sd = vit.state_dict()
    assert sd["pos_embed"].shape == (1, 1370, 1024)
    assert sd["register_tokens"].shape == (1, 4, 1024)
    assert sd["blocks.23.mlp.fc1.weight"].shape == (4096, 1024)
    assert not any(k.startswith("blocks.24.") for k in sd)
    assert abs(sum(v.numel() for v in sd.values()) / 1e6 - 304.37) < 0.1


def test_hf_layout_converts_to_official(tmp_path):
    cfg = PRESETS["tiny"]
    sd = _official_names_state_dict(cfg)
    d = cfg.embed_dim
    hf = {
        "embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"], "embeddings.register_tokens": sd["register_tokens"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    }
    for i in range(cfg.depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            hf[h + n + ".weight"], hf[h + n + ".bias"] = sd[b + n + ".weight"], sd[b + n + ".bias"]
        hf[h + "layer_scale1.lambda1"], hf[h + "layer_scale2.lambda1"] = sd[b + "ls1.gamma"], sd[b + "ls2.gamma"]
        hf[h + "attention.output.dense.weight"] = sd[b + "attn.proj.weight"]
        hf[h + "attention.output.dense.bias"] = sd[b + "attn.proj.bias"]
        for j, n in enumerate(("query", "key", "value")):
            hf[h + f"attention.attention.{n}.weight"] = sd[b + "attn.qkv.weight"][j * d:(j + 1) * d]
            hf[h + f"attention.attention.{n}.bias"] = sd[b + "attn.qkv.bias"][j * d:(j + 1) * d]
    conv = hf_to_official({"dinov2_with_registers." + k: v for k, v in hf.items()})
    assert set(conv) == set(sd)
    for k in sd:
        assert torch.equal(conv[k], sd[k]), k
    # a local Hugging Face directory loads through the same conversion
    from safetensors.torch import save_file

    hf_dir = tmp_path / "dinov2-with-registers-tiny"
    hf_dir.mkdir()
    save_file({k: v.contiguous() for k, v in hf.items()}, str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps({
        "hidden_size": d, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads, "mlp_ratio": 4,
        "patch_size": 14, "image_size": 518, "num_register_tokens": 4, "layer_norm_eps": 1e-6}))
    vit = load_dinov2("tiny", weights=hf_dir)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])


def test_tiny_is_deterministic_and_pos_embed_interpolates():
    a, b = load_dinov2("tiny"), load_dinov2("tiny")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    c = init_random(DinoV2ViT(PRESETS["tiny"]), seed=5)
    assert not torch.equal(c.pos_embed, a.pos_embed)
    assert a.interpolate_pos_embed(37, 37) is a.pos_embed
    pe = a.interpolate_pos_embed(16, 16)
    assert pe.shape == (1, 1 + 256, 64)
    grid = a.patch_grid(torch.randn(1, 3, 224, 224))
    assert grid.shape == (1, 64, 16, 16)


def test_missing_weights_error_names_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRELLIS_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_reg4_pretrain.pth"):
        load_dinov2("dinov2_vitl14_reg")
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        load_clip_text()
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dinov2("dinov2_vitl14_reg", weights=tmp_path / "nowhere.pth")


def test_image_conditioner_tiny():
    cond = ImageConditioner("tiny", batch_size=1)
    imgs = torch.rand(2, 3, 518, 518)
    out = cond.encode(imgs)
    assert out.shape == (2, 1374, 64) and out.dtype == torch.float32
    with torch.no_grad():
        raw = cond.model(normalize_images(imgs))["x_prenorm"]
    torch.testing.assert_close(out, F.layer_norm(raw, (64,), eps=1e-5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 1374), atol=1e-5, rtol=0)
    assert torch.equal(cond.null_condition(3), torch.zeros(3, 1374, 64))
    assert not any(p.requires_grad for p in cond.model.parameters())
    with pytest.raises(ValueError, match="518"):
        cond.encode(torch.rand(1, 3, 512, 512))


def test_text_conditioner_tiny():
    cond = TextConditioner("tiny", batch_size=2)
    out = cond.encode(["a red chair", "", "a lamp"])
    assert out.shape == (3, 77, 64)
    null = cond.null_condition(2)
    assert null.shape == (2, 77, 64)
    torch.testing.assert_close(null[0], out[1])
    assert not torch.allclose(out[0], out[1])
    tok = TinyTextEncoder().tokenize(["ab", "x" * 200])
    assert tok.shape == (2, 77)
    assert tok[0, :4].tolist() == [256, 97, 98, 257] and (tok[0, 3:] == 257).all()
    assert tok[1, -1].item() == 257
    with pytest.raises(TypeError):
        cond.encode("a chair")
