"""The ledger of a dataset root: ``metadata.csv``, per-rank record files and their merging.

Files (reference DATA.md sections 1-2):

* ``metadata.csv``: one row per asset, ``sha256`` first. Written atomically (temp file + ``os.replace``).
* ``<stage>_<rank>.csv``: pending records of one rank of one stage: ``sha256`` plus the stage's
  columns (``rendered``; ``voxelized, num_voxels``; ``cond_rendered``; ``feature_<m>``; ...;
  ``downloaded`` records carry ``local_path``). One line is appended per finished asset with a
  single ``write`` while holding the ledger lock; a line without its final newline (a killed
  writer) is ignored by the reader.
* ``failed_<stage>_<rank>.csv``: ``sha256, reason`` of every asset the stage could not process.
* ``warnings_<stage>_<rank>.csv``: ``sha256, warning`` (e.g. a missing texture); informational.
* ``merged_records/<unix_ts>_<name>``: record files after they were merged.

Merging follows DATA.md section 2: ``downloaded`` records overwrite or left-join ``local_path``;
other records overwrite cells of existing columns only (non-missing values win). Flag columns of
the model directories under ``features/``, ``latents/``, ``ss_latents/`` and ``cond_features/`` (and
of any ``feature_*``, ``latent_*``, ``ss_latent_*``, ``cond_feature_*`` record) are created as False. A merge moves the record
file away *before* reading it, under the lock, so a rank that appends later starts a new file and
nothing is lost.

The lock is ``<root>/.ledger.lock`` held with ``fcntl.flock``; the OS releases it when a process
dies, so a killed run never leaves a stale lock. (Without ``fcntl``, e.g. on Windows, locking is off:
run one process per root there.)
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import re
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; documented above
    fcntl = None

__all__ = [
    "BASE_FLAGS",
    "ledger_lock",
    "read_metadata",
    "write_metadata",
    "normalize_columns",
    "append_record",
    "append_failure",
    "append_warning",
    "read_records",
    "read_failures",
    "merge_records",
    "ensure_flag_columns",
    "scan_from_file",
    "statistics_text",
    "shard",
]

BASE_FLAGS = ("rendered", "voxelized", "cond_rendered")
MODEL_FLAG_DIRS = (("feature_", "features"), ("latent_", "latents"), ("ss_latent_", "ss_latents"),
                   ("cond_feature_", "cond_features"))
_RECORD_RE = re.compile(r"^(?P<stage>.+)_(?P<rank>\d+)\.csv$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_flag(col: str) -> bool:
    return col in BASE_FLAGS or any(col.startswith(p) for p, _ in MODEL_FLAG_DIRS)


@contextlib.contextmanager
def ledger_lock(root: str) -> Iterator[None]:
    """Exclusive lock over the ledger files of ``root`` (blocks until free)."""
    os.makedirs(root, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(os.path.join(root, ".ledger.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def normalize_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Puts ``sha256`` first and gives flag columns bool and ``num_voxels`` int dtype."""
    if "sha256" not in df.columns:
        raise ValueError(f"metadata has no 'sha256' column (columns: {list(df.columns)})")
    df = df.copy()
    df["sha256"] = df["sha256"].astype(str)
    for col in df.columns:
        if _is_flag(col):
            df[col] = df[col].map(lambda x: x is True or str(x) == "True").astype(bool)
    if "num_voxels" in df.columns:
        df["num_voxels"] = pd.to_numeric(df["num_voxels"], errors="coerce").fillna(0).astype("int64")
    df = df.infer_objects()
    return df[["sha256"] + [c for c in df.columns if c != "sha256"]]


def read_metadata(root: str, required: bool = True) -> Optional[pd.DataFrame]:
    """Reads ``<root>/metadata.csv`` (normalised), or None / a clear error if it is absent."""
    path = os.path.join(root, "metadata.csv")
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path} does not exist: run `python -m dataset_toolkits.build_metadata "
                                    f"<source> --output_dir {root}` first")
        return None
    df = pd.read_csv(path, dtype={"sha256": str, "local_path": str, "file_identifier": str, "captions": str})
    if df["sha256"].duplicated().any():
        dup = df["sha256"][df["sha256"].duplicated()].iloc[0]
        raise ValueError(f"{path}: duplicate sha256 {dup}")
    return normalize_columns(df)


def write_metadata(root: str, df: pd.DataFrame) -> None:
    """Writes ``<root>/metadata.csv`` atomically."""
    path = os.path.join(root, "metadata.csv")
    tmp = f"{path}.tmp-{os.getpid()}"
    normalize_columns(df).to_csv(tmp, index=False)
    os.replace(tmp, path)


def _append_line(path: str, header: Sequence[str], values: Sequence) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, "rb") as f:  # a killed writer may have left a partial line: end it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                buf.write("\n")
    if new:
        writer.writerow(header)
    writer.writerow(["" if v is None else v for v in values])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


def _clean(text: str) -> str:
    return " | ".join(str(text).splitlines()).strip()[:2000]


def append_record(root: str, stage: str, rank: int, sha256: str, values: Dict[str, object],
                  columns: Sequence[str]) -> None:
    """Appends one record ``sha256, <columns>`` to ``<root>/<stage>_<rank>.csv``."""
    missing = [c for c in columns if c not in values]
    if missing:
        raise ValueError(f"record of stage {stage!r} for {sha256} lacks columns {missing}")
    with ledger_lock(root):
        _append_line(os.path.join(root, f"{stage}_{rank}.csv"), ["sha256", *columns],
                     [sha256, *[values[c] for c in columns]])


def append_failure(root: str, stage: str, rank: int, sha256: str, reason: str) -> None:
    """Appends ``sha256, reason`` to ``<root>/failed_<stage>_<rank>.csv``."""
    with ledger_lock(root):
        _append_line(os.path.join(root, f"failed_{stage}_{rank}.csv"), ["sha256", "reason"],
                     [sha256, _clean(reason)])


def append_warning(root: str, stage: str, rank: int, sha256: str, warning: str) -> None:
    """Appends ``sha256, warning`` to ``<root>/warnings_<stage>_<rank>.csv``."""
    with ledger_lock(root):
        _append_line(os.path.join(root, f"warnings_{stage}_{rank}.csv"), ["sha256", "warning"],
                     [sha256, _clean(warning)])


def _convert(values: List[str]):
    if all(v in ("True", "False") for v in values):
        return [v == "True" for v in values]
    try:
        nums = [float(v) for v in values]
    except ValueError:
        return [v if v != "" else None for v in values]
    if all(n.is_integer() and "." not in v and "e" not in v.lower() for n, v in zip(nums, values)):
        return [int(n) for n in nums]
    return nums


def read_records(path: str) -> pd.DataFrame:
    """Reads a record / failure file, dropping an unterminated last line, rows with the wrong number
    of fields and rows whose sha256 is not 64 hex digits (all signs of a killed writer)."""
    with open(path, "r", encoding="utf-8", newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return pd.DataFrame(columns=["sha256"])
    header, body = rows[0], rows[1:]
    if not header or header[0] != "sha256":
        raise ValueError(f"{path}: record file must start with a 'sha256' header, got {header}")
    body = [r for r in body if len(r) == len(header) and _SHA_RE.match(r[0])]
    cols = {h: [r[i] for r in body] for i, h in enumerate(header)}
    data = {h: (_convert(v) if h != "sha256" and h not in ("reason", "warning", "local_path") else v)
            for h, v in cols.items()}
    return pd.DataFrame(data, columns=header)


def read_failures(root: str, stage: str, kind: str = "failed") -> pd.DataFrame:
    """All ``<kind>_<stage>_<rank>.csv`` rows of a root (kind: ``failed`` or ``warnings``)."""
    files = sorted(glob.glob(os.path.join(root, f"{kind}_{stage}_*.csv")))
    files = [f for f in files if _RECORD_RE.match(os.path.basename(f)[len(kind) + 1:])
             and _RECORD_RE.match(os.path.basename(f)[len(kind) + 1:]).group("stage") == stage]
    frames = [read_records(f) for f in files]
    if not frames:
        return pd.DataFrame(columns=["sha256", "reason" if kind == "failed" else "warning"])
    return pd.concat(frames, ignore_index=True)


def ensure_flag_columns(root: str, df: pd.DataFrame, extra: Iterable[str] = ()) -> pd.DataFrame:
    """DATA.md 2 step 3: creates missing flag columns (False) and ``num_voxels`` (0)."""
    df = df.copy()
    names = list(BASE_FLAGS)
    for prefix, sub in MODEL_FLAG_DIRS:
        d = os.path.join(root, sub)
        if os.path.isdir(d):
            names += [prefix + m for m in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, m))]
    names += [e for e in extra if _is_flag(e)]
    for n in names:
        if n not in df.columns:
            df[n] = False
    if "num_voxels" not in df.columns:
        df["num_voxels"] = 0
    return df


def _pending_record_files(root: str) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for path in sorted(glob.glob(os.path.join(root, "*.csv"))):
        name = os.path.basename(path)
        m = _RECORD_RE.match(name)
        if not m or name.startswith(("failed_", "warnings_")):
            continue
        out.setdefault(m.group("stage"), []).append(path)
    return out


def merge_records(root: str, df: pd.DataFrame) -> Tuple[pd.DataFrame, Dict[str, int]]:
    """DATA.md 2 steps 2-4 (call while holding :func:`ledger_lock`). Returns the updated metadata and
    the number of merged rows per stage. Unknown stages (no matching column, not a model flag) are
    left in place."""
    df = normalize_columns(df).set_index("sha256", drop=False)
    pending = _pending_record_files(root)
    df = ensure_flag_columns(root, df, extra=pending.keys())
    merged_dir = os.path.join(root, "merged_records")
    counts: Dict[str, int] = {}
    order = ["downloaded"] + [s for s in BASE_FLAGS] + sorted(s for s in pending if s not in BASE_FLAGS and s != "downloaded")
    for stage in order:
        if stage not in pending or (stage != "downloaded" and stage not in df.columns):
            continue
        os.makedirs(merged_dir, exist_ok=True)
        frames = []
        for path in pending[stage]:
            dest = os.path.join(merged_dir, f"{int(time.time())}_{os.path.basename(path)}")
            if os.path.exists(dest):  # merged twice within one second
                dest = os.path.join(merged_dir, f"{int(time.time())}_{time.time_ns()}_{os.path.basename(path)}")
            os.replace(path, dest)  # move first: later appends start a new file
            frames.append(read_records(dest))
        rec = pd.concat(frames, ignore_index=True).drop_duplicates("sha256", keep="last").set_index("sha256")
        rec = rec[rec.index.isin(df.index)]
        cols = [c for c in rec.columns if c in df.columns or (stage == "downloaded" and c == "local_path")]
        for col in cols:
            vals = rec[col].dropna()
            if col not in df.columns:
                df[col] = None
            df[col] = df[col].astype(object)  # normalize_columns restores the dtypes
            df.loc[vals.index, col] = vals.to_numpy(dtype=object)
        counts[stage] = len(rec)
    return normalize_columns(df.reset_index(drop=True)), counts


def scan_from_file(root: str, df: pd.DataFrame, fields: Sequence[str] = ("all",)) -> pd.DataFrame:
    """DATA.md 2 step 5: sets still-False flags from the outputs found on disk."""
    from trellis.utils.ply import PlyError, read_voxel_ply

    df = ensure_flag_columns(root, df).copy()
    want = set(fields)

    def on(name: str) -> bool:
        return "all" in want or name in want

    for i, sha in df["sha256"].items():
        if on("rendered") and not df.at[i, "rendered"]:
            df.at[i, "rendered"] = os.path.exists(os.path.join(root, "renders", sha, "transforms.json"))
        if on("voxelized") and df.at[i, "rendered"] and not df.at[i, "voxelized"]:
            path = os.path.join(root, "voxels", f"{sha}.ply")
            if os.path.exists(path):
                try:
                    df.at[i, "num_voxels"] = len(read_voxel_ply(path))
                    df.at[i, "voxelized"] = True
                except PlyError as e:
                    print(f"[from_file] ignoring unreadable {path}: {e}")
        if on("cond_rendered") and not df.at[i, "cond_rendered"]:
            df.at[i, "cond_rendered"] = os.path.exists(os.path.join(root, "renders_cond", sha, "transforms.json"))
        for prefix, sub in MODEL_FLAG_DIRS:
            for col in [c for c in df.columns if c.startswith(prefix)]:
                if prefix == "latent_" and col.startswith("ss_latent_"):
                    continue
                if not on(col) or df.at[i, col]:
                    continue
                if prefix == "cond_feature_":  # condition tokens (encode_cond): of the captions, or the views
                    text = col.startswith("cond_feature_text_")
                    need = bool(pd.notna(df.at[i, "captions"])) if text and "captions" in df.columns else (
                        not text and df.at[i, "cond_rendered"])
                    ext = "npy"
                else:
                    need, ext = df.at[i, "voxelized"] and (prefix == "ss_latent_" or df.at[i, "rendered"]), "npz"
                if need and os.path.exists(os.path.join(root, sub, col[len(prefix):], f"{sha}.{ext}")):
                    df.at[i, col] = True
    return df


def statistics_text(root: str, df: pd.DataFrame) -> str:
    """Human-readable counts per stage, including failures recorded and not since resolved."""
    lines = ["Statistics:", f"  - Number of assets: {len(df)}"]
    if "local_path" in df.columns:
        lines.append(f"  - Number of assets downloaded: {int(df['local_path'].notna().sum())}")
    flags = [c for c in df.columns if _is_flag(c)]
    for col in flags:
        lines.append(f"  - Number of assets {col}: {int(df[col].sum())}")
        fails = read_failures(root, col)
        if len(fails):
            pending = set(fails["sha256"]) - set(df.loc[df[col], "sha256"])
            lines.append(f"      failed (not done): {len(pending)}")
    if "num_voxels" in df.columns and df.get("voxelized", pd.Series(dtype=bool)).any():
        nv = df.loc[df["voxelized"], "num_voxels"]
        lines.append(f"  - num_voxels: min {nv.min()}, mean {nv.mean():.0f}, max {nv.max()}")
    return "\n".join(lines) + "\n"


def shard(df: pd.DataFrame, rank: int, world_size: int) -> pd.DataFrame:
    """Rows ``[len*rank//world_size, len*(rank+1)//world_size)`` of ``df``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad sharding: rank {rank} of world_size {world_size}")
    n = len(df)
    return df.iloc[n * rank // world_size: n * (rank + 1) // world_size]
