"""Train a TRELLIS model: ``python train.py --config CONFIG --output_dir DIR --data_dir ROOTS``.

Runs as one process, spawns one process per local GPU (``--num_gpus``), or runs under ``torchrun``
(RANK / LOCAL_RANK / WORLD_SIZE are detected). See TRAINING.md.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment config (JSON)")
    p.add_argument("--output_dir", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--load_dir", default="", help="resume from this run directory (default: output_dir)")
    p.add_argument("--ckpt", default="latest", help="'latest' (default), 'none', or a step number")
    p.add_argument("--data_dir", default="./data/", help="data root(s), comma-separated")
    p.add_argument("--auto_retry", type=int, default=0,
                   help="relaunch from the newest checkpoint up to N times after a failure")
    p.add_argument("--tryrun", action="store_true", help="check config, data and one forward/backward; write nothing")
    p.add_argument("--profile", action="store_true", help="trace a few training steps into output_dir/profile and exit")
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--node_rank", type=int, default=0)
    p.add_argument("--num_gpus", type=int, default=-1,
                   help="processes on this node: -1 = every visible GPU (1 on the CPU)")
    p.add_argument("--master_addr", default="localhost")
    p.add_argument("--master_port", default="12345")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config leaf, e.g. --set trainer.args.max_steps=3 (value parsed as JSON)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from trellis import launch

    if args.auto_retry > 0 and not args.tryrun and not launch.is_worker():
        return launch.supervise(argv, args)
    try:
        cfg = launch.prepare_config(args)
    except launch.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return launch.launch(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
