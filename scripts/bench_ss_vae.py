"""Benchmark: full-size SS VAE training steps on one GPU (configs/vae/ss_vae_conv3d_16l8_fp16.json).

Times ``Trainer.run_step`` (forward, backward, clipping, optimizer, EMA; data already on the GPU)
at batch 4 per GPU with ``fp16_mode`` inflat_all and bf16, with CUDA events after warm-up, median of
the repetitions (see BENCHMARKING.md). Prints the card, steps/s and peak memory.

    python scripts/bench_ss_vae.py [--steps 20] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_common import bf16_peak_tflops, cuda_time_ms  # noqa: E402
from make_demo_voxels import write_dataset  # noqa: E402

from trellis.config import build_dataset, build_models  # noqa: E402
from trellis.registry import TRAINERS  # noqa: E402
from trellis.utils.dist import DistInfo  # noqa: E402


def bench(mode: str, batch: int, steps: int, data_root: str, device: torch.device) -> dict:
    with open(os.path.join(ROOT, "configs", "vae", "ss_vae_conv3d_16l8_fp16.json")) as f:
        cfg = json.load(f)
    targs = dict(cfg["trainer"]["args"], fp16_mode=mode, batch_size_per_gpu=batch, i_log=0, i_sample=0,
                 i_save=0, i_print=0, num_workers=2)
    cfg["dataset"]["args"]["min_aesthetic_score"] = None
    torch.manual_seed(0)
    models = build_models(cfg)
    dataset = build_dataset(cfg, data_root)
    with tempfile.TemporaryDirectory() as out:
        trainer = TRAINERS.get(cfg["trainer"]["name"])(models, dataset, output_dir=out, dist=DistInfo(device=device),
                                                       **targs)
        data = trainer.batches()
        batches = [next(data) for _ in range(4)]
        torch.cuda.reset_peak_memory_stats(device)
        step = iter(range(10 ** 9))  # cycles through the four batches

        def one_step() -> None:
            trainer.run_step(batches[next(step) % len(batches)])

        t = cuda_time_ms(one_step, reps=steps, warmup=3) / 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return {"mode": mode, "batch": batch, "step_ms": t * 1e3, "steps_per_s": 1 / t, "samples_per_s": batch / t,
            "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_ss_vae.py needs a CUDA device")
    device = torch.device("cuda", 0)
    print(f"card: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
          f"bf16 matmul peak {bf16_peak_tflops(device):.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as root:
        write_dataset(root, 16, seed=0)
        rows = [bench(mode, args.batch, args.steps, root, device) for mode in ("inflat_all", "bf16")]
    print("| fp16_mode | batch/GPU | step (ms) | steps/s | samples/s | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | "
              f"{r['samples_per_s']:.1f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
