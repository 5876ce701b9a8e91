"""Export a training checkpoint to the release format that ``trellis.models.from_pretrained`` loads.

    python -m trellis.export --run_dir outputs/demo --model decoder --out weights/ss_dec_demo
    python -m trellis.export --run_dir RUN --model denoiser --step 100000 --ema_rate 0.9999 --out weights/x

writes ``<out>.json`` (``{"name", "args"}`` of the model in the run's ``config.json``) and
``<out>.safetensors`` (the EMA weights by default, when the run has them; persistent buffers
included), both atomically. The model is rebuilt and the weights loaded strictly first, so a
checkpoint that does not fit its config is an error, not a broken release.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from trellis.models import save_pretrained
from trellis.registry import MODELS
from trellis.trainers import checkpoint as ckpt


def export(run_dir: str, model_key: str, out: str, step: str | int = "latest", ema_rate: float | None = None,
           use_ema: bool = True) -> str:
    """Returns the path of the checkpoint file that was exported."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: is {run_dir} a training run directory?")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if model_key not in cfg.get("models", {}):
        raise KeyError(f"{cfg_path}: no model {model_key!r} (models: {list(cfg.get('models', {}))})")
    resolved = ckpt.resolve_ckpt(run_dir, str(step))
    if resolved is None:
        raise ckpt.CheckpointError(f"no checkpoint in {ckpt.ckpt_dir(run_dir)}")
    spec = cfg["models"][model_key]
    path = ckpt.model_file(run_dir, model_key, resolved)
    if use_ema:
        rates = cfg["trainer"]["args"].get("ema_rate", 0.9999)
        rates = rates if isinstance(rates, list) else [rates]
        rate = ema_rate if ema_rate is not None else rates[0]
        ema_path = ckpt.ema_file(run_dir, model_key, float(rate), resolved)
        if os.path.isfile(ema_path):
            path = ema_path
        elif ema_rate is not None:
            raise FileNotFoundError(f"{ema_path} not found")
    state = ckpt.load_file(path)
    model = MODELS.get(spec["name"])(**spec.get("args", {}))
    ckpt.load_state_dict_strict(model, state, path)
    save_pretrained(model, spec["name"], spec.get("args", {}), out, state_dict=model.state_dict())
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--model", required=True, help="model key in the run's config (encoder, decoder, denoiser, ...)")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--step", default="latest", help="'latest' or a step number")
    ap.add_argument("--ema_rate", type=float, default=None, help="EMA rate to export (default: the first)")
    ap.add_argument("--no_ema", action="store_true", help="export the raw (non-EMA) weights")
    args = ap.parse_args(argv)
    try:
        src = export(args.run_dir, args.model, args.out, args.step, args.ema_rate, not args.no_ema)
    except (FileNotFoundError, KeyError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {src} -> {args.out}.json + {args.out}.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
