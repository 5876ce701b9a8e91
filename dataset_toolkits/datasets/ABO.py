"""The ABO subset of TRELLIS-500K: metadata from the released ``ABO.csv`` (local file only)."""

from __future__ import annotations

import argparse

import pandas as pd

from dataset_toolkits.datasets._subset import add_args, asset_path
from dataset_toolkits.datasets._subset import read_subset_csv as _read

__all__ = ["add_args", "get_metadata", "asset_path"]


def get_metadata(args: argparse.Namespace) -> pd.DataFrame:
    return _read("ABO", args)
