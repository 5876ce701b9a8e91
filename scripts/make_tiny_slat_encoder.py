"""Writes a random-initialised tiny ``SLatEncoder`` in the release format, for the flow demo.

The SLat VAE cannot be trained here yet (its decoders and renderers have not landed), so the flow demo
encodes the tiny DINOv2 features with a random encoder: the latents are meaningless but have the right
layout, which is all the flow demo needs to show the pipeline end to end.

    python scripts/make_tiny_slat_encoder.py --out weights/slat_enc --in_channels 64
"""

from __future__ import annotations

import argparse

import torch

from trellis.models import save_pretrained
from trellis.registry import MODELS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--in_channels", type=int, default=64, help="feature channels (the tiny DINOv2 gives 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    spec = {"resolution": 64, "in_channels": args.in_channels, "model_channels": 64, "latent_channels": 8,
            "num_blocks": 2, "num_heads": 4, "attn_mode": "swin", "window_size": 8, "use_fp16": False}
    torch.manual_seed(args.seed)
    model = MODELS.get("SLatEncoder")(**spec)
    save_pretrained(model, "SLatEncoder", spec, args.out)
    print(f"wrote {args.out}.json + {args.out}.safetensors")


if __name__ == "__main__":
    main()
