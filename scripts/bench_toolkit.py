"""Seconds per asset of the toolkit's geometry stages on the shipped demo assets.

    python scripts/bench_toolkit.py [--device cpu|cuda] [--num_views 150] [--resolution 512] [--ssaa 2]
        [--cond_views 24] [--cond_resolution 1024] [--limit N] [--stages render,voxelize,render_cond]

Builds a fresh root in a temp folder, runs each stage in-process (one worker) over the assets and
prints wall-clock seconds per asset (file loading, rendering, PNG encoding and writing included).
The first asset of each stage is also timed alone, to show warm-up (CUDA context, imports).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from dataset_toolkits import build_metadata, ledger, render, render_cond, voxelize
from dataset_toolkits.stage import run_stage

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_views", type=int, default=150)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--ssaa", type=int, default=2)
    p.add_argument("--cond_views", type=int, default=24)
    p.add_argument("--cond_resolution", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="use only the first N assets")
    p.add_argument("--stages", default="render,voxelize,render_cond")
    args = p.parse_args()
    stages = args.stages.split(",")
    dev = render.resolve_device(args.device)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as root:
        build_metadata.main(["local", "--input", DEMO, "--output_dir", root])
        shas = ledger.read_metadata(root)["sha256"].tolist()[: args.limit]
        jobs = {
            "render": render.make_stage("local", args.num_views, args.resolution, device=dev, ssaa=args.ssaa),
            "voxelize": voxelize.make_stage(),
            "render_cond": render_cond.make_stage("local", args.cond_views, args.cond_resolution, device=dev,
                                                  ssaa=args.ssaa),
        }
        for key in stages:
            t0 = time.perf_counter()
            run_stage(jobs[key], root, instances=shas[:1], progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            counts = run_stage(jobs[key], root, instances=shas[1:], progress=False)
            rest = time.perf_counter() - t0
            n = counts["processed"]
            per = rest / max(n, 1)
            print(f"RESULT {key}: {per:.2f} s/asset over {n} assets (first asset {first:.2f} s); "
                  f"views {args.num_views if key == 'render' else args.cond_views if key == 'render_cond' else '-'}, "
                  f"res {args.resolution if key == 'render' else args.cond_resolution if key == 'render_cond' else 64}, "
                  f"ssaa {args.ssaa if key != 'voxelize' else '-'}")


if __name__ == "__main__":
    main()
