"""A folder of local 3D files as a source.

``build_metadata local --input FOLDER --output_dir ROOT`` lists every supported file under FOLDER
(recursively; see :data:`dataset_toolkits.mesh_io.SUPPORTED_EXTENSIONS`), hashes it (sha256 of the
file bytes is its id), and records ``file_identifier`` (the path relative to FOLDER, with ``/``) and
``local_path`` (relative to ROOT when the file is inside ROOT, else absolute). Identical files are
kept once.

Optional sidecars (defaults: ``FOLDER/captions.json`` and ``FOLDER/aesthetic_scores.json`` when they
exist): ``{relative path or file name: [captions]}`` and ``{relative path or file name: score}``.
Captions are stored JSON-encoded, as in TRELLIS-500K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Dict, Optional

import pandas as pd

from dataset_toolkits.datasets._subset import asset_path
from dataset_toolkits.mesh_io import SUPPORTED_EXTENSIONS

__all__ = ["add_args", "get_metadata", "asset_path", "sha256_file", "list_assets"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=False, help="folder of 3D files (required for 'local')")
    parser.add_argument("--captions", default=None, help="JSON {file: [captions]} sidecar")
    parser.add_argument("--aesthetic_scores", default=None, help="JSON {file: score} sidecar")
    parser.add_argument("--default_aesthetic_score", type=float, default=None,
                        help="score of files the sidecar does not list (default: empty, which the "
                             "training datasets' min_aesthetic_score filter drops)")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_assets(folder: str) -> list:
    """Supported files under ``folder``, sorted, as paths relative to it (``/`` separators)."""
    out = []
    for d, dirs, names in os.walk(folder):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for n in sorted(names):
            if os.path.splitext(n)[1].lower() in SUPPORTED_EXTENSIONS and not n.startswith("."):
                out.append(os.path.relpath(os.path.join(d, n), folder).replace(os.sep, "/"))
    return sorted(out)


def _sidecar(path: Optional[str], default: str, what: str) -> Dict[str, object]:
    path = path or (default if os.path.exists(default) else None)
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {what} sidecar {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} sidecar {path} must be a JSON object {{file: value}}")
    return data


def _lookup(table: Dict[str, object], rel: str):
    if rel in table:
        return table[rel]
    return table.get(os.path.basename(rel))


def get_metadata(args: argparse.Namespace) -> pd.DataFrame:
    folder = getattr(args, "input", None)
    if not folder:
        raise ValueError("source 'local' needs --input FOLDER")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder} is not a folder")
    captions = _sidecar(args.captions, os.path.join(folder, "captions.json"), "captions")
    scores = _sidecar(args.aesthetic_scores, os.path.join(folder, "aesthetic_scores.json"), "aesthetic scores")
    root = os.path.abspath(args.output_dir)
    rows, seen = [], {}
    for rel in list_assets(folder):
        path = os.path.abspath(os.path.join(folder, rel))
        sha = sha256_file(path)
        if sha in seen:
            print(f"[local] {rel} has the same content as {seen[sha]}: kept once")
            continue
        seen[sha] = rel
        inside = os.path.commonpath([root, path]) == root
        cap = _lookup(captions, rel)
        if cap is not None and (not isinstance(cap, list) or not all(isinstance(c, str) for c in cap)):
            raise ValueError(f"captions for {rel} must be a list of strings, got {cap!r}")
        score = _lookup(scores, rel)
        score = args.default_aesthetic_score if score is None else score
        rows.append({
            "sha256": sha,
            "file_identifier": rel,
            "aesthetic_score": float(score) if score is not None else float("nan"),
            "captions": json.dumps(cap) if cap else None,
            "local_path": os.path.relpath(path, root).replace(os.sep, "/") if inside else path,
        })
    return pd.DataFrame(rows, columns=["sha256", "file_identifier", "aesthetic_score", "captions", "local_path"])
