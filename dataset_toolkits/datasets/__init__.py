"""Asset sources. Each module ``dataset_toolkits.datasets.<name>`` provides

* ``add_args(parser)``: its options for ``build_metadata``;
* ``get_metadata(args) -> pandas.DataFrame``: the source's rows (``sha256`` first, plus
  ``file_identifier``, ``aesthetic_score``, ``captions`` (JSON list) and ``local_path`` when known);
* ``asset_path(root, row) -> str``: the local file of one metadata row, or :class:`AssetError`.

Sources: ``local`` (a folder of files), and the TRELLIS-500K subsets ``ObjaverseXL``, ``ABO``,
``3D-FUTURE``, ``HSSD``, ``Toys4k``, which read the released subset CSVs from local files (nothing is
downloaded by this toolkit).
"""

from __future__ import annotations

import importlib
from types import ModuleType

SOURCES = ("local", "ObjaverseXL", "ABO", "3D-FUTURE", "HSSD", "Toys4k")


def get_source(name: str) -> ModuleType:
    """The source module called ``name``; unknown names list the known ones."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    return importlib.import_module(f"dataset_toolkits.datasets.{name}")
