"""Build or update ``metadata.csv`` of a dataset root and merge the stages' pending records.

    python -m dataset_toolkits.build_metadata local --input assets/demo --output_dir data/demo
    python -m dataset_toolkits.build_metadata ABO --output_dir data/abo [--from_file] [--field all]

Procedure (reference DATA.md section 2): load ``metadata.csv`` or the source's metadata (the
``local`` source also adds files that appeared in its folder since the last run); merge
``downloaded_*`` then the stage record files; create missing flag columns; with ``--from_file``, set
still-False flags from outputs found on disk; write ``metadata.csv`` and ``statistics.txt`` (both
atomically); print counts per stage, including recorded failures.
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd

from dataset_toolkits import ledger
from dataset_toolkits.datasets import SOURCES, get_source


def build(args: argparse.Namespace) -> pd.DataFrame:
    source = get_source(args.source)
    root = args.output_dir
    os.makedirs(root, exist_ok=True)
    with ledger.ledger_lock(root):
        meta = ledger.read_metadata(root, required=False)
        if meta is None:
            meta = ledger.normalize_columns(source.get_metadata(args))
        elif args.source == "local" and getattr(args, "input", None):
            fresh = source.get_metadata(args).set_index("sha256")
            known = meta["sha256"].isin(fresh.index)
            meta.loc[known, "local_path"] = fresh.loc[meta.loc[known, "sha256"], "local_path"].to_numpy()
            new = fresh[~fresh.index.isin(meta["sha256"])].reset_index()
            if len(new):
                meta = pd.concat([meta, new], ignore_index=True)
        meta, merged = ledger.merge_records(root, meta)
        for stage, n in merged.items():
            print(f"merged {n} {stage} records")
        if args.from_file:
            meta = ledger.scan_from_file(root, meta, [f.strip() for f in args.field.split(",")])
        ledger.write_metadata(root, meta)
        text = ledger.statistics_text(root, meta)
        tmp = os.path.join(root, f"statistics.txt.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(root, "statistics.txt"))
    print(text, end="")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=SOURCES, help="asset source")
    parser.add_argument("--output_dir", required=True, help="dataset root")
    parser.add_argument("--from_file", action="store_true", help="set flags from outputs found on disk")
    parser.add_argument("--field", default="all",
                        help="with --from_file: comma list of flags to scan (rendered, voxelized, ...) or all")
    name = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    if name in SOURCES:
        get_source(name).add_args(parser)
    args = parser.parse_args(argv)
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
