"""Generic runner for one toolkit stage over the ledger: ``run_stage`` and shared CLI arguments.

A stage is described by a :class:`Stage`. ``run_stage`` then

1. reads ``metadata.csv`` and keeps the rows the stage can work on (``Stage.select``, e.g. "has a
   ``local_path``" or "is rendered"), optionally restricted to ``instances``;
2. takes this rank's contiguous slice ``[n*r//W, n*(r+1)//W)`` of those rows (the slice does *not*
   depend on which rows are already done, so ranks started at different times agree);
3. per row: skips it when the metadata flag ``Stage.name`` is already True; records and skips it
   when ``Stage.check_done`` finds a complete output on disk; skips it when an earlier run recorded
   a failure (unless ``retry_failed``); otherwise calls ``Stage.process``;
4. appends one record per finished asset to ``<stage>_<rank>.csv`` and one line per failure to
   ``failed_<stage>_<rank>.csv`` (the reason), plus any warnings to ``warnings_<stage>_<rank>.csv``;
5. with ``merge=True`` merges all pending records into ``metadata.csv`` (under the ledger lock) and
   rewrites ``statistics.txt``; prints a summary.

``process(root, row, ctx)`` gets the output root, the metadata row as a dict and the per-worker
context returned by ``Stage.setup()`` (e.g. a loaded model, built once per worker process). It must
write its outputs atomically (temp file or temp dir + ``os.replace``) and return the record values
``{column: value}`` for ``Stage.columns``; it may add ``"_warnings": [str, ...]``. It raises
:class:`AssetError` (or any exception) for a failed asset: the run records the reason and goes on.
``process`` and ``setup`` must be picklable (module-level functions or ``functools.partial``) when
``max_workers > 1``, which runs them in a spawn-started process pool.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import pandas as pd
from tqdm import tqdm

from dataset_toolkits import ledger

__all__ = ["AssetError", "Stage", "run_stage", "add_common_args", "parse_instances", "stage_exit_code"]


class AssetError(RuntimeError):
    """An asset this stage cannot process; the message is the recorded reason."""


@dataclass
class Stage:
    """One toolkit stage. See the module docstring for the contract of each callable."""

    name: str
    columns: Sequence[str]
    process: Callable[[str, Dict[str, Any], Any], Dict[str, Any]]
    select: Optional[Callable[[pd.DataFrame], pd.DataFrame]] = None
    check_done: Optional[Callable[[str, Dict[str, Any]], Optional[Dict[str, Any]]]] = None
    setup: Optional[Callable[[], Any]] = None
    torch_threads: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)


_WORKER_CTX: Any = None


def _init_worker(stage: Stage) -> None:
    global _WORKER_CTX
    if stage.torch_threads:
        import torch

        torch.set_num_threads(stage.torch_threads)
    _WORKER_CTX = stage.setup() if stage.setup is not None else None


def _run_one(stage: Stage, root: str, row: Dict[str, Any], ctx: Any) -> Dict[str, Any]:
    """Returns ``{"ok": values}`` or ``{"error": reason, "trace": str | None}``."""
    try:
        values = stage.process(root, row, ctx)
    except AssetError as e:
        return {"error": str(e) or type(e).__name__, "trace": None}
    except Exception as e:  # recorded as a failure with its reason, never silently dropped
        return {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    if not isinstance(values, dict):
        return {"error": f"stage {stage.name} returned {type(values).__name__}, expected dict", "trace": None}
    return {"ok": values}


def _pool_task(stage: Stage, root: str, row: Dict[str, Any]) -> Dict[str, Any]:
    return _run_one(stage, root, row, _WORKER_CTX)


def run_stage(stage: Stage, root: str, rank: int = 0, world_size: int = 1, max_workers: int = 1,
              instances: Optional[Sequence[str]] = None, retry_failed: bool = False, merge: bool = True,
              progress: bool = True) -> Dict[str, int]:
    """Runs ``stage`` over this rank's share of ``root``. Returns the summary counts:
    ``total`` (rows in this shard), ``already_done``, ``found_on_disk``, ``skipped_failed``,
    ``processed``, ``failed``, ``warnings``."""
    meta = ledger.read_metadata(root)
    if stage.select is not None:
        meta = stage.select(meta)
    if instances is not None:
        wanted = set(instances)
        meta = meta[meta["sha256"].isin(wanted)]
    rows = ledger.shard(meta, rank, world_size).to_dict("records")
    failed_before = set() if retry_failed else set(ledger.read_failures(root, stage.name)["sha256"])
    counts = {"total": len(rows), "already_done": 0, "found_on_disk": 0, "skipped_failed": 0,
              "processed": 0, "failed": 0, "warnings": 0}
    todo: List[Dict[str, Any]] = []
    for row in rows:
        sha = row["sha256"]
        if bool(row.get(stage.name, False)) is True:
            counts["already_done"] += 1
            continue
        found = stage.check_done(root, row) if stage.check_done is not None else None
        if found is not None:
            ledger.append_record(root, stage.name, rank, sha, found, stage.columns)
            counts["found_on_disk"] += 1
            continue
        if sha in failed_before:
            counts["skipped_failed"] += 1
            continue
        todo.append(row)

    def handle(row: Dict[str, Any], result: Dict[str, Any], bar) -> None:
        sha = row["sha256"]
        if "error" in result:
            counts["failed"] += 1
            ledger.append_failure(root, stage.name, rank, sha, result["error"])
            bar.write(f"[{stage.name}] FAILED {sha[:12]}: {result['error']}")
            if result.get("trace"):
                print(result["trace"], file=sys.stderr)
            return
        values = dict(result["ok"])
        for w in values.pop("_warnings", []) or []:
            counts["warnings"] += 1
            ledger.append_warning(root, stage.name, rank, sha, w)
        ledger.append_record(root, stage.name, rank, sha, values, stage.columns)
        counts["processed"] += 1

    bar = tqdm(total=len(todo), desc=f"{stage.name} [rank {rank}/{world_size}]", disable=not progress,
               dynamic_ncols=True)
    try:
        if max_workers <= 1 or len(todo) <= 1:
            ctx = stage.setup() if stage.setup is not None else None
            for row in todo:
                handle(row, _run_one(stage, root, row, ctx), bar)
                bar.update(1)
        else:
            _run_pool(stage, root, todo, max_workers, handle, bar)
    finally:
        bar.close()
    if merge:
        merge_and_report(root)
    print(f"[{stage.name}] rank {rank}/{world_size}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _run_pool(stage, root, todo, max_workers, handle, bar) -> None:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max_workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(stage,)) as pool:
        pending: Dict[cf.Future, Dict[str, Any]] = {}
        it = iter(todo)
        for row in it:  # keep at most 2 tasks per worker in flight
            pending[pool.submit(_pool_task, stage, root, row)] = row
            if len(pending) >= 2 * max_workers:
                break
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                row = pending.pop(fut)
                handle(row, fut.result(), bar)
                bar.update(1)
                nxt = next(it, None)
                if nxt is not None:
                    pending[pool.submit(_pool_task, stage, root, nxt)] = nxt


def merge_and_report(root: str) -> Dict[str, int]:
    """Merges pending records into ``metadata.csv`` and rewrites ``statistics.txt``."""
    with ledger.ledger_lock(root):
        meta = ledger.read_metadata(root)
        meta, merged = ledger.merge_records(root, meta)
        ledger.write_metadata(root, meta)
        text = ledger.statistics_text(root, meta)
        tmp = os.path.join(root, f"statistics.txt.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(root, "statistics.txt"))
    return merged


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments every stage shares (the original toolkit's shape)."""
    parser.add_argument("--output_dir", required=True, help="dataset root (holds metadata.csv)")
    parser.add_argument("--rank", type=int, default=0, help="this process's shard index")
    parser.add_argument("--world_size", type=int, default=1, help="number of shards")
    parser.add_argument("--max_workers", type=int, default=1, help="worker processes (spawned)")
    parser.add_argument("--instances", default=None,
                        help="restrict to these sha256: a comma list or a file with one per line")
    parser.add_argument("--retry_failed", action="store_true", help="retry assets that failed before")
    parser.add_argument("--no_merge", action="store_true",
                        help="leave records pending (run build_metadata later)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def parse_instances(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    if os.path.exists(value):
        with open(value) as f:
            return [line.strip() for line in f if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


def stage_exit_code(counts: Dict[str, int]) -> int:
    """0 unless every asset this run attempted failed (a systematic problem, e.g. a missing tool)."""
    attempted = counts["processed"] + counts["failed"]
    return 1 if attempted > 0 and counts["processed"] == 0 else 0


def run_stage_from_args(stage: Stage, args: argparse.Namespace) -> int:
    """Runs ``stage`` with the arguments of ``add_common_args``; returns the command's exit code."""
    counts = run_stage(stage, args.output_dir, rank=args.rank, world_size=args.world_size,
                       max_workers=args.max_workers, instances=parse_instances(args.instances),
                       retry_failed=args.retry_failed, merge=not args.no_merge, progress=not args.no_progress)
    return stage_exit_code(counts)
