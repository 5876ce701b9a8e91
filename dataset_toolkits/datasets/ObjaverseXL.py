"""The ObjaverseXL subsets of TRELLIS-500K (``--source sketchfab`` or ``github``): metadata from the
released ``ObjaverseXL_<source>.csv`` (local file only). GitHub assets must be extracted to files
under ``<root>/raw/`` with ``local_path`` pointing at them (the original renders from repository zips).
"""

from __future__ import annotations

import argparse

import pandas as pd

from dataset_toolkits.datasets import _subset
from dataset_toolkits.datasets._subset import asset_path

__all__ = ["add_args", "get_metadata", "asset_path"]


def add_args(parser: argparse.ArgumentParser) -> None:
    _subset.add_args(parser)
    parser.add_argument("--source", default="sketchfab", choices=["sketchfab", "github"],
                        help="ObjaverseXL part")


def get_metadata(args: argparse.Namespace) -> pd.DataFrame:
    return _subset.read_subset_csv(f"ObjaverseXL_{args.source}", args)
