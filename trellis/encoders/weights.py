"""Where pretrained encoder weights live: an explicit path, or a name inside ``$TRELLIS_WEIGHTS_DIR``.

Nothing is downloaded. A missing file is one error that names the file and says where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_ENV = "TRELLIS_WEIGHTS_DIR"


def weights_dir() -> Path | None:
    """``$TRELLIS_WEIGHTS_DIR`` as a path, or None when unset (read on every call, never cached)."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    return Path(value).expanduser() if value else None


def resolve_weight_path(explicit: str | os.PathLike | None, candidates: list[str], what: str, hint: str) -> Path:
    """Returns an existing file or directory for ``what``.

    ``explicit``: a path given by the caller; it must exist. Otherwise each name of ``candidates`` is tried
    inside ``$TRELLIS_WEIGHTS_DIR``. Raises FileNotFoundError naming the paths tried and where to put them.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if path.exists():
            return path
        raise FileNotFoundError(f"{what}: {path} does not exist. Put {hint} there, or pass another path.")
    names = [c for c in candidates if c]
    root = weights_dir()
    if root is None:
        raise FileNotFoundError(
            f"{what}: no path given and ${WEIGHTS_ENV} is not set. Download {hint}, put it at "
            f"$TRELLIS_WEIGHTS_DIR/{names[0] if names else '<file>'} and set ${WEIGHTS_ENV}, or pass the path.")
    tried = [root / n for n in names]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{what}: not found; tried {', '.join(str(p) for p in tried)}. Put {hint} at one of these paths "
        f"(${WEIGHTS_ENV}={root}), or pass the path explicitly.")
