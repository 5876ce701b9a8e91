"""Base class of the datasets over the TRELLIS data layout (one or several roots).

Each root holds a ``metadata.csv`` indexed by ``sha256``. A dataset applies its filters to each root
in order, recording a *funnel* (rows left after each filter), and keeps ``(root, sha256)`` instances.

Broken assets are never silently replaced by other samples: ``__getitem__`` returns a
``FailedSample`` naming the asset and the reason, the collate drops it from the batch and lists it
under ``batch["_failed"]``, and the trainer logs and counts it and stops once more than
``max_bad_fraction`` of the dataset has failed.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch.utils.data import Dataset, default_collate


class DatasetError(RuntimeError):
    pass


@dataclass
class FailedSample:
    root: str
    sha256: str
    reason: str

    def __str__(self) -> str:
        return f"{self.sha256} in {self.root}: {self.reason}"


# Errors that mean "this asset's files are broken", as opposed to a bug in the code.
ASSET_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, pd.errors.ParserError)


def read_metadata(root: str) -> pd.DataFrame:
    """Reads ``<root>/metadata.csv`` with clear errors for a missing, empty or malformed file."""
    if not os.path.isdir(root):
        raise DatasetError(f"data dir not found: {root}")
    path = os.path.join(root, "metadata.csv")
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found (build it with: python -m dataset_toolkits.build_metadata ...)")
    try:
        df = pd.read_csv(path, dtype={"sha256": str})
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is malformed: {e}") from None
    if "sha256" not in df.columns:
        raise DatasetError(f"{path} has no 'sha256' column (columns: {list(df.columns)})")
    if df["sha256"].isna().any():
        raise DatasetError(f"{path}: {int(df['sha256'].isna().sum())} row(s) have an empty sha256")
    return df.set_index("sha256", drop=False)


def bool_column(df: pd.DataFrame, column: str, path: str) -> pd.Series:
    """A stage flag column as booleans (missing column = nothing done)."""
    if column not in df.columns:
        return pd.Series(False, index=df.index)
    col = df[column]
    if col.dtype == bool:
        return col
    mapped = col.map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    return mapped.astype(bool)


class StandardDatasetBase(Dataset):
    """Roots (comma-separated) -> filtered ``(root, sha256)`` instances.

    Subclasses implement ``filter_metadata(df) -> (df, [(filter name, rows left), ...])`` and
    ``get_instance(root, sha256) -> dict``.

    Args:
        roots: one data root, or several joined with commas.
        max_bad_fraction: the trainer stops once more than this fraction of the dataset has failed to load.
    """

    value_range = (0, 1)

    def __init__(self, roots: str, max_bad_fraction: float = 0.01):
        self.roots = [r for r in (roots.split(",") if isinstance(roots, str) else roots) if r]
        if not self.roots:
            raise DatasetError("no data root given (--data_dir)")
        self.max_bad_fraction = max_bad_fraction
        self.metadata: dict[str, pd.DataFrame] = {}
        self.funnel: list[tuple[str, str, int]] = []  # (root, filter, rows left)
        self.instances: list[tuple[str, str]] = []
        for root in self.roots:
            df = read_metadata(root)
            self.funnel.append((root, "metadata.csv", len(df)))
            df, stats = self.filter_metadata(df)
            self.funnel.extend((root, name, n) for name, n in stats)
            self.metadata[root] = df
            self.instances.extend((root, sha) for sha in df["sha256"])
        if not self.instances:
            raise DatasetError(f"{type(self).__name__}: no usable sample after filtering:\n{self.describe_funnel()}")

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        return metadata, []

    def get_instance(self, root: str, sha256: str) -> dict[str, Any]:
        raise NotImplementedError

    def describe_funnel(self) -> str:
        return "\n".join(f"  {root}: {name:<28s} {n:>8d} rows" for root, name, n in self.funnel)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, Any] | FailedSample:
        root, sha = self.instances[index]
        try:
            sample = self.get_instance(root, sha)
        except ASSET_ERRORS as e:
            return FailedSample(root, sha, f"{type(e).__name__}: {e}")
        if isinstance(sample, dict):
            sample["_index"] = int(index)  # keys per-sample randomness in the trainer
        return sample

    @staticmethod
    def collate_fn(batch: list[Any]) -> dict[str, Any]:
        """Default stacking of the good samples; failed ones listed under ``_failed``."""
        failed = [b for b in batch if isinstance(b, FailedSample)]
        good = [b for b in batch if not isinstance(b, FailedSample)]
        out: dict[str, Any] = default_collate(good) if good else {}
        out["_failed"] = failed
        return out

    def visualize_sample(self, sample: Any) -> torch.Tensor:
        raise NotImplementedError


def aesthetic_filter(df: pd.DataFrame, min_aesthetic_score: float | None) -> pd.DataFrame:
    """Keeps rows with ``aesthetic_score >= min`` where the column exists (rows without a score drop)."""
    if min_aesthetic_score is None or "aesthetic_score" not in df.columns:
        return df
    return df[pd.to_numeric(df["aesthetic_score"], errors="coerce") >= min_aesthetic_score]


def flag_filter(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows whose stage flag ``column`` is true (a missing column keeps nothing)."""
    return df[bool_column(df, column, "metadata.csv").to_numpy()]


def captions_filter(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with a ``captions`` cell (a missing column keeps nothing)."""
    return df[df["captions"].notna().to_numpy()] if "captions" in df.columns else df.iloc[:0]


def num_voxels_filter(df: pd.DataFrame, max_num_voxels: int) -> pd.DataFrame:
    """Rows with ``num_voxels <= max_num_voxels`` (a missing column keeps nothing)."""
    if "num_voxels" not in df.columns:
        return df.iloc[:0]
    return df[(pd.to_numeric(df["num_voxels"], errors="coerce") <= max_num_voxels).to_numpy()]


def standard_filters(df: pd.DataFrame, flag: str, min_aesthetic_score: float | None,
                     max_num_voxels: int | None = None) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
    """The filter chain every TRELLIS dataset applies, in order: the stage ``flag``; ``aesthetic_score >=
    min_aesthetic_score`` (where the column exists; None skips it); ``num_voxels <= max_num_voxels``
    (when given). Returns the rows left and the funnel ``[(filter, rows left), ...]``."""
    stats = []
    df = flag_filter(df, flag)
    stats.append((flag, len(df)))
    if min_aesthetic_score is not None:
        df = aesthetic_filter(df, min_aesthetic_score)
        stats.append((f"aesthetic_score >= {min_aesthetic_score}", len(df)))
    if max_num_voxels is not None:
        df = num_voxels_filter(df, max_num_voxels)
        stats.append((f"num_voxels <= {max_num_voxels}", len(df)))
    return df, stats
