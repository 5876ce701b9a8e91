"""Stage ``render_cond``: conditioning views for image-conditioned training (reference DATA.md 3.2).

    python -m dataset_toolkits.render_cond <source> --output_dir ROOT [--num_views 24] [--resolution 1024]

24 views per asset on a Hammersley sphere, each with a random FoV in [10, 70] degrees
(``sin^2(fov/2)`` uniform) and the radius ``(sqrt(3)/2)/sin(fov/2)`` at which the bounding sphere of
the unit cube touches the frame; seeded from the sha256. Writes ``renders_cond/<sha>/NNN.png`` and
``transforms.json`` (same schema as ``render``, no mesh) atomically and records ``cond_rendered``.
Options as for :mod:`dataset_toolkits.render`.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Optional

from dataset_toolkits.datasets import get_source
from dataset_toolkits.render import (
    _select_downloaded,
    add_render_args,
    check_rendered,
    find_blender,
    render_asset,
)
from dataset_toolkits.stage import Stage, run_stage_from_args

__all__ = ["make_stage"]


def make_stage(source: str, num_views: int = 24, resolution: int = 1024, renderer: str = "builtin",
               device: str = "auto", ssaa: int = 2, max_faces: int = 10_000_000,
               blender: Optional[str] = None, torch_threads: Optional[int] = None) -> Stage:
    """The ``cond_rendered`` stage."""
    get_source(source)
    if renderer not in ("builtin", "blender"):
        raise ValueError(f"unknown renderer {renderer!r}; use 'builtin' or 'blender'")
    return Stage(name="cond_rendered", columns=("cond_rendered",),
                 process=partial(render_asset, source=source, subdir="renders_cond", views="conditioning",
                                 num_views=num_views, resolution=resolution, renderer=renderer, device=device,
                                 ssaa=ssaa, save_mesh=False, max_faces=max_faces, blender=blender),
                 select=_select_downloaded,
                 check_done=partial(check_rendered, subdir="renders_cond", flag="cond_rendered"),
                 torch_threads=torch_threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_render_args(parser, num_views=24, resolution=1024)
    args = parser.parse_args(argv)
    if args.renderer == "blender":
        find_blender(args.blender)
    stage = make_stage(args.source, args.num_views, args.resolution, args.renderer, args.device, args.ssaa,
                       args.max_faces, args.blender, args.torch_threads)
    return run_stage_from_args(stage, args)


if __name__ == "__main__":
    sys.exit(main())
