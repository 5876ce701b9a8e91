"""Shared code of the TRELLIS-500K subset sources (ObjaverseXL, ABO, 3D-FUTURE, HSSD, Toys4k).

The original toolkit fetches ``<Subset>.csv`` from the Hugging Face dataset
``JeffreyXiang/TRELLIS-500K`` and downloads the assets. This toolkit never downloads: put the CSV in
the dataset root (or pass ``--subset_csv``) and the assets under ``<root>/raw/`` with ``local_path``
filled in (a ``downloaded_<rank>.csv`` record file or a ``local_path`` column in the CSV).
"""

from __future__ import annotations

import argparse
import os

import pandas as pd

from dataset_toolkits.stage import AssetError

HF_URL = "https://huggingface.co/datasets/JeffreyXiang/TRELLIS-500K/resolve/main/{name}.csv"
SOURCE_COLUMNS = ("sha256", "file_identifier", "aesthetic_score", "captions")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subset_csv", default=None,
                        help="path of the released subset CSV (default: <output_dir>/<subset>.csv)")


def read_subset_csv(csv_name: str, args: argparse.Namespace) -> pd.DataFrame:
    """Reads the subset CSV named ``csv_name`` (e.g. ``ABO``) from ``--subset_csv`` or the root."""
    path = getattr(args, "subset_csv", None) or os.path.join(args.output_dir, f"{csv_name}.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"subset CSV not found: {path}. This toolkit does not download; fetch "
            f"{HF_URL.format(name=csv_name)} yourself and pass --subset_csv or put it in --output_dir")
    df = pd.read_csv(path, dtype={"sha256": str, "file_identifier": str, "captions": str})
    missing = [c for c in ("sha256", "file_identifier") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (columns: {list(df.columns)})")
    return df


def asset_path(root: str, row: dict) -> str:
    """``<root>/<local_path>``; an asset without ``local_path`` has not been downloaded."""
    local = row.get("local_path")
    if not isinstance(local, str) or not local:
        raise AssetError("no local_path: asset not downloaded")
    path = local if os.path.isabs(local) else os.path.join(root, local)
    if not os.path.exists(path):
        raise AssetError(f"local_path does not exist: {path}")
    return path
