"""Seconds per asset of the toolkit's geometry stages on the shipped demo assets.

    python scripts/bench_toolkit.py [--device cpu|cuda] [--num_views 150] [--resolution 512] [--ssaa 2]
        [--cond_views 24] [--cond_resolution 1024] [--limit N]
        [--stages render,voxelize,render_cond,extract_feature] [--feature_model dinov2_vitl14_reg]

``extract_feature`` runs the real-size DINOv2 ViT-L/14-reg with random weights (the timing does not
depend on the values; nothing is downloaded); ``--feature_model tiny`` uses the small test ViT.

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

from dataset_toolkits import build_metadata, extract_feature, ledger, render, render_cond, voxelize
from dataset_toolkits.stage import run_stage

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo")


def random_dinov2_weights(model: str, folder: str) -> str:
    """Writes a random-initialised checkpoint of ``model`` in the official key layout; returns its path."""
    from trellis.encoders.dinov2 import PRESETS, DinoV2ViT, init_random

    path = os.path.join(folder, f"{model}_random.pth")
    torch.save(init_random(DinoV2ViT(PRESETS[model])).state_dict(), path)
    return path


def feature_breakdown(root: str, sha: str, model: str, weights: str | None, batch: int, dev: str, tf32: bool) -> str:
    """Where extract_feature's time goes for one asset: decoding + resizing its views on the thread pool
    alone, then the ViT alone over the decoded views (synchronised), in seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from trellis.datasets.components import load_transforms
    from trellis.encoders.dinov2 import normalize_images

    render_dir = os.path.join(root, "renders", sha)
    paths = [os.path.join(render_dir, f["file_path"]) for f in load_transforms(render_dir)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        views = list(pool.map(extract_feature.load_view, paths))
    decode = time.perf_counter() - t0
    vit, device = extract_feature._setup(model, weights, dev, tf32)
    images = torch.stack(views)

    def forward() -> None:
        with torch.no_grad():
            for i in range(0, len(views), batch):
                vit.patch_grid(normalize_images(images[i:i + batch].to(device)))
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward()  # warm-up
    t0 = time.perf_counter()
    forward()
    return f"decode+resize {decode:.2f} s ({len(paths)} views), ViT {time.perf_counter() - t0:.2f} s"


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
    p.add_argument("--feature_model", default="dinov2_vitl14_reg")
    p.add_argument("--feature_batch", type=int, default=16, help="views per ViT forward")
    p.add_argument("--fp32", action="store_true",
                   help="extract_feature in full fp32 as the original (default: TensorFloat-32 on CUDA)")
    p.add_argument("--tf32", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old command lines
    args = p.parse_args()
    stages = args.stages.split(",")
    dev = render.resolve_device(args.device)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as root:
        build_metadata.main(["local", "--input", DEMO, "--output_dir", root])
        shas = ledger.read_metadata(root)["sha256"].tolist()[: args.limit]
        weights = None
        if "extract_feature" in stages and args.feature_model != "tiny":
            weights = random_dinov2_weights(args.feature_model, root)
        jobs = {
            "extract_feature": extract_feature.make_stage(args.feature_model, weights, args.feature_batch, device=dev,
                                                          tf32=not args.fp32),
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
            if key == "render":
                what = f"views {args.num_views}, res {args.resolution}, ssaa {args.ssaa}"
            elif key == "render_cond":
                what = f"views {args.cond_views}, res {args.cond_resolution}, ssaa {args.ssaa}"
            elif key == "extract_feature":
                what = (f"model {args.feature_model}, views rendered above, batch {args.feature_batch}"
                        f"{', fp32' if args.fp32 else (', tf32' if dev.startswith('cuda') else '')}")
            else:
                what = "64^3"
            print(f"RESULT {key}: {per:.2f} s/asset over {n} assets (first asset {first:.2f} s); {what}")
            if key == "extract_feature":
                print("  breakdown (last asset): " + feature_breakdown(
                    root, shas[-1], args.feature_model, weights, args.feature_batch, dev, not args.fp32))


if __name__ == "__main__":
    main()
