"""DINOv2 vision transformer with register tokens, in plain PyTorch.

Architecture: Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision", with the
register tokens of Darcet et al. 2023, "Vision Transformers Need Registers". TRELLIS uses the
``dinov2_vitl14_reg`` model (ViT-L/14, width 1024, 24 blocks, 16 heads, 4 registers) at 518x518, i.e. a
37x37 patch grid, and reads the tokens *before* the final LayerNorm (``x_prenorm``).

Module names follow the official torch-hub checkpoint (``dinov2_vitl14_reg4_pretrain.pth``), so that file
loads with ``strict=True`` and no renaming:

    cls_token [1,1,D]  register_tokens [1,R,D]  mask_token [1,D]  pos_embed [1,1+G*G,D]
    patch_embed.proj.{weight [D,3,P,P], bias [D]}
    blocks.<i>.norm1.{weight,bias}  blocks.<i>.attn.qkv.{weight [3D,D], bias}  blocks.<i>.attn.proj.{weight,bias}
    blocks.<i>.ls1.gamma [D]  blocks.<i>.norm2.{weight,bias}  blocks.<i>.mlp.fc1/fc2.{weight,bias}  blocks.<i>.ls2.gamma
    norm.{weight,bias}

A local Hugging Face ``Dinov2WithRegistersModel`` directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) is converted to these names on load; ``transformers`` is not needed.

    >>> vit = load_dinov2("tiny")              # random init, deterministic, for tests and demos
    >>> out = vit(torch.rand(2, 3, 518, 518))  # out["x_prenorm"]: [2, 1 + 4 + 37*37, 64]
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trellis.encoders.weights import resolve_weight_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    """Shape of one ViT of the DINOv2 family."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    img_size: int = 518  # size the stored position embedding was trained for (grid img_size // patch_size)
    num_register_tokens: int = 4
    layer_norm_eps: float = 1e-6


PRESETS: dict[str, ViTConfig] = {
    "dinov2_vitl14_reg": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "dinov2_vitb14_reg": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "dinov2_vits14_reg": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    # Same structure (patch 14, 518 input, 4 registers, 37x37 grid), small width: tests and the CPU demo.
    "tiny": ViTConfig(embed_dim=64, depth=2, num_heads=4),
}

OFFICIAL_FILES = {
    "dinov2_vitl14_reg": "dinov2_vitl14_reg4_pretrain.pth",
    "dinov2_vitb14_reg": "dinov2_vitb14_reg4_pretrain.pth",
    "dinov2_vits14_reg": "dinov2_vits14_reg4_pretrain.pth",
}
HF_DIRS = {
    "dinov2_vitl14_reg": "dinov2-with-registers-large",
    "dinov2_vitb14_reg": "dinov2-with-registers-base",
    "dinov2_vits14_reg": "dinov2-with-registers-small",
}


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B, (H/P)*(W/P), D], patches in row-major order."""
        x = self.proj(x)  # [B, D, H/P, W/P]
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)  # [B,T,3,H,D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B,H,T,D/H]
        out = F.scaled_dot_product_attention(q, k, v)  # [B,H,T,D/H]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: x += ls1(attn(norm1 x)); x += ls2(mlp(norm2 x))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2ViT(nn.Module):
    """DINOv2 ViT with registers. ``forward(images)`` takes ImageNet-normalised images [B,3,H,W]
    (H, W multiples of the patch size) and returns a dict:

    - ``x_prenorm`` [B, 1 + R + gh*gw, D]: tokens after the last block, before the final norm
      (CLS, then R registers, then patches row-major);
    - ``x_norm`` [B, 1 + R + gh*gw, D]: the same after the final LayerNorm;
    - ``grid`` (gh, gw): the patch grid.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept for strict loading
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.cfg.num_register_tokens

    def interpolate_pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Position embedding for a gh x gw patch grid: [1, 1 + gh*gw, D]. The stored patch embedding is a
        square G x G grid; a different grid is resized bicubically (antialiased), as the reference model
        does for its register variants (no interpolation offset)."""
        pos = self.pos_embed
        n = pos.shape[1] - 1
        g = int(math.isqrt(n))
        if g * g != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        if (gh, gw) == (g, g):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, D, G, G]
        patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", antialias=True)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)  # [1, gh*gw, D]
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, images: torch.Tensor) -> dict:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DINOv2 expects images [B,3,H,W], got {tuple(images.shape)}")
        B, _, H, W = images.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"DINOv2 input size {H}x{W} is not a multiple of the patch size {p}")
        gh, gw = H // p, W // p
        x = self.patch_embed(images)  # [B, gh*gw, D]
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # [B, 1 + gh*gw, D]
        x = x + self.interpolate_pos_embed(gh, gw)
        x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)  # [B, 1+R+gh*gw, D]
        for block in self.blocks:
            x = block(x)
        return {"x_prenorm": x, "x_norm": self.norm(x), "grid": (gh, gw)}

    def patch_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-norm patch tokens as a feature map: [B,3,H,W] -> [B, D, H/P, W/P] (registers and CLS dropped)."""
        out = self.forward(images)
        gh, gw = out["grid"]
        patches = out["x_prenorm"][:, self.num_prefix_tokens:]  # [B, gh*gw, D]
        return patches.transpose(1, 2).reshape(images.shape[0], -1, gh, gw)  # [B, D, gh, gw]


def init_random(model: DinoV2ViT, seed: int = 0) -> DinoV2ViT:
    """Deterministic random initialisation (same values on every machine for a seed): linear / conv
    weights and tokens N(0, 0.02), biases 0, norms 1, layer scales 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("gamma"):
                p.fill_(0.1)
            elif ".norm" in name or name.startswith("norm."):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


# ---------------------------------------------------------------------------------------------- loading
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalises an official DINOv2 state dict: strips a ``module.`` / ``backbone.`` prefix and flattens
    chunked block names (``blocks.<chunk>.<i>.`` -> ``blocks.<i>.``)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[_CHUNKED.sub(r"blocks.\1.", k)] = v
    return out


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts a Hugging Face ``Dinov2WithRegistersModel`` state dict to the official key names
    (q, k, v projections concatenated into ``qkv``)."""
    prefix = "dinov2_with_registers."
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    per_layer = {
        "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
        "attention.output.dense": "attn.proj",
    }
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", k)
        if m is None:
            out[k] = v  # unknown key: left for the strict load to report
            continue
        i, rest = int(m.group(1)), m.group(2)
        qm = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if qm is not None:
            qkv.setdefault((i, qm.group(2)), {})[qm.group(1)] = v
            continue
        for hf, ours in per_layer.items():
            if rest.startswith(hf + "."):
                out[f"blocks.{i}.{ours}{rest[len(hf):]}"] = v
                break
            if rest == hf:
                out[f"blocks.{i}.{ours}"] = v
                break
        else:
            out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"Hugging Face DINOv2 layer {i}: attention {kind} is missing {set(parts) ^ {'query', 'key', 'value'}}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _config_from_hf(path: Path) -> ViTConfig:
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("use_swiglu_ffn", False):
        raise ValueError(f"{path}: SwiGLU DINOv2 variants (giant) are not supported")
    return ViTConfig(
        embed_dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        mlp_ratio=cfg.get("mlp_ratio", 4.0), patch_size=cfg.get("patch_size", 14),
        img_size=cfg.get("image_size", 518), num_register_tokens=cfg.get("num_register_tokens", 4),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def load_dinov2(model: str = "dinov2_vitl14_reg", weights: str | os.PathLike | None = None,
                seed: int = 0) -> DinoV2ViT:
    """Builds a DINOv2 ViT in eval mode.

    ``model``: a preset name (``dinov2_vitl14_reg``, ..., or ``tiny`` = random init from ``seed``).
    ``weights``: the official checkpoint file (``.pth`` / ``.safetensors``) or a Hugging Face
    ``Dinov2WithRegistersModel`` directory. Without it the file ``OFFICIAL_FILES[model]`` or the directory
    ``HF_DIRS[model]`` is looked up in ``$TRELLIS_WEIGHTS_DIR``. Loading is strict.
    """
    if model not in PRESETS:
        raise ValueError(f"unknown DINOv2 model {model!r}; known: {', '.join(PRESETS)}")
    if model == "tiny" and weights is None:
        return init_random(DinoV2ViT(PRESETS["tiny"]), seed).eval()
    path = resolve_weight_path(
        weights, candidates=[OFFICIAL_FILES.get(model, ""), HF_DIRS.get(model, "")],
        what=f"DINOv2 weights for {model}",
        hint=f"the official torch-hub checkpoint {OFFICIAL_FILES.get(model, '<file>.pth')} "
             f"(https://dl.fbaipublicfiles.com/dinov2/) or a Hugging Face Dinov2WithRegistersModel directory",
    )
    if path.is_dir():
        cfg = _config_from_hf(path)
        files = [path / "model.safetensors", path / "pytorch_model.bin"]
        found = [f for f in files if f.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this DINOv2 directory")
        sd = hf_to_official(_read_tensors(found[0]))
    else:
        cfg = PRESETS[model]
        sd = official_state_dict(_read_tensors(path))
    vit = DinoV2ViT(cfg)
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: DINOv2 state dict does not match {model}: missing {missing[:8]}"
                       f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{'...' if len(unexpected) > 8 else ''}")
    return vit.eval()


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of [B,3,H,W] images in [0,1]."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
