"""CLIP text encoders: the real CLIP ViT-L/14 text tower (via ``transformers``) and a tiny random one.

Both share one interface (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): ``tokenize(texts) -> LongTensor [B, 77]`` (padded to 77, truncated) and
``forward(texts) -> last_hidden_state [B, 77, width]``. Only ``input_ids`` are passed to the model, no
attention mask, as TRELLIS does.

    >>> enc = load_clip_text("tiny")             # random init, no transformers needed
    >>> enc(["a chair", ""]).shape               # [2, 77, 64]

The real model loads from a local Hugging Face directory (``openai/clip-vit-large-patch14`` layout:
``config.json``, weights, tokenizer files), given explicitly or found as
``$TRELLIS_WEIGHTS_DIR/clip-vit-large-patch14``. It needs the optional extra ``text``
(``pip install trellis-train[text]``).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from trellis.encoders.weights import resolve_weight_path

MAX_LENGTH = 77
HF_DIR = "clip-vit-large-patch14"


class HFCLIPTextEncoder(nn.Module):
    """``transformers.CLIPTextModel`` + its tokenizer, loaded from a local directory, eval, fp32."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        try:
            from transformers import AutoTokenizer, CLIPTextModel
        except ImportError as e:
            raise ImportError(
                "the CLIP text encoder needs the 'transformers' package: pip install 'trellis-train[text]' "
                "(or use the 'tiny' text encoder)") from e
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(path), local_files_only=True).eval()
        self.width = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """list of B str -> input_ids LongTensor [B, 77]."""
        return self.tokenizer(texts, max_length=MAX_LENGTH, padding="max_length", truncation=True,
                              return_tensors="pt").input_ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        """list of B str -> last_hidden_state [B, 77, width]."""
        ids = self.tokenize(texts).to(next(self.model.parameters()).device)
        return self.model(input_ids=ids).last_hidden_state


class TinyTextEncoder(nn.Module):
    """A small causal text transformer with CLIP's interface, random-initialised from a seed.

    Tokens: UTF-8 bytes (0..255), BOS = 256, EOS = 257; sequences are ``BOS, bytes[:75], EOS`` padded with
    EOS to 77 (CLIP pads with its end token too). Blocks are pre-norm with a causal mask and a final
    LayerNorm, like CLIP's text tower.
    """

    BOS, EOS, VOCAB = 256, 257, 258

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, seed: int = 0):
        super().__init__()
        self.width = width
        self.token_embedding = nn.Embedding(self.VOCAB, width)
        self.position_embedding = nn.Parameter(torch.zeros(MAX_LENGTH, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.ModuleList([_clone(layer) for _ in range(depth)])
        self.final_layer_norm = nn.LayerNorm(width)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sorted(self.named_parameters()):
                if "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self.eval()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """list of B str -> LongTensor [B, 77]."""
        if isinstance(texts, str):
            raise TypeError("tokenize expects a list of strings, got one str")
        ids = torch.full((len(texts), MAX_LENGTH), self.EOS, dtype=torch.long)
        for i, text in enumerate(texts):
            body = list(text.encode("utf-8"))[: MAX_LENGTH - 2]
            ids[i, : len(body) + 1] = torch.tensor([self.BOS] + body, dtype=torch.long)
        return ids

    def forward(self, texts: list[str]) -> torch.Tensor:
        """list of B str -> last_hidden_state [B, 77, width]."""
        ids = self.tokenize(texts).to(self.position_embedding.device)
        x = self.token_embedding(ids) + self.position_embedding  # [B, 77, C]
        causal = torch.triu(torch.full((MAX_LENGTH, MAX_LENGTH), float("-inf"), device=x.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, src_mask=causal)
        return self.final_layer_norm(x)


def _clone(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer)


def load_clip_text(model: str = "openai/clip-vit-large-patch14", weights: str | os.PathLike | None = None,
                   seed: int = 0) -> nn.Module:
    """``tiny``: a TinyTextEncoder from ``seed``. Otherwise the Hugging Face CLIP text model from the local
    directory ``weights`` (or ``$TRELLIS_WEIGHTS_DIR/clip-vit-large-patch14``); a hub id is never fetched."""
    if model == "tiny":
        return TinyTextEncoder(seed=seed)
    path = resolve_weight_path(
        weights, candidates=[HF_DIR, model.split("/")[-1]], what=f"CLIP text weights for {model}",
        hint="a local copy of the Hugging Face repository openai/clip-vit-large-patch14 (config.json, "
             "model weights, tokenizer files)",
    )
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP text weights for {model}: {path} is not a directory (expected a Hugging "
                                f"Face model directory with config.json and tokenizer files)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP text weights for {model}: {path / 'config.json'} is missing")
    return HFCLIPTextEncoder(path)

