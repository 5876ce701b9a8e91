"""Pieces shared by the dataset classes (reference DATA.md section 7).

- ``SampleKey`` and ``sample_rng``: per-sample randomness keyed by (seed, epoch, index), never global state.
- ``KeyedDataset``: ``StandardDatasetBase`` whose ``get_instance`` receives that generator.
- ``load_render_view`` (7.1 ``_get_image``), ``load_condition_image`` (7.3), ``choose_caption``.
- ``read_npz``: an ``.npz`` read whose errors name the file, the key and the problem.
- ``balanced_groups`` (7.4) and ``collate_sparse``: batches with one ``SparseTensor``.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from trellis.datasets.base import (
    ASSET_ERRORS,
    FailedSample,
    StandardDatasetBase,
    captions_filter,
    flag_filter,
)
from trellis.modules.sparse import SparseTensor
from trellis.utils.geometry import c2w_blender_to_extrinsics, fov_to_intrinsics

__all__ = [
    "SampleKey", "sample_rng", "KeyedDataset", "read_npz", "load_transforms", "load_render_view",
    "load_condition_image", "choose_caption", "balanced_groups", "collate_sparse",
    "normalization_tensors", "TextConditionedMixin", "ImageConditionedMixin",
]


# ---------------------------------------------------------------------------------------- randomness
class SampleKey(int):
    """A dataset index that also carries the ``(seed, epoch)`` it was drawn for.

    The samplers yield these; ``dataset[key]`` then draws its per-sample randomness (random view, caption)
    from ``sample_rng(key)``, so the same key gives the same sample in any process, worker or resumed run.
    A plain ``int`` index works too and uses the dataset's own ``seed`` and ``epoch``.
    """

    epoch: int
    seed: int

    def __new__(cls, index: int, epoch: int = 0, seed: int = 0) -> SampleKey:
        obj = super().__new__(cls, index)
        obj.epoch = int(epoch)
        obj.seed = int(seed)
        return obj

    def __reduce__(self):
        return (SampleKey, (int(self), self.epoch, self.seed))

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, epoch={self.epoch}, seed={self.seed})"


def sample_rng(index: int, seed: int = 0, epoch: int = 0, stream: str = "") -> np.random.Generator:
    """A numpy generator for one access of one sample: keyed by (seed, epoch, index, stream). A
    ``SampleKey`` index overrides ``seed`` and ``epoch`` with its own."""
    if isinstance(index, SampleKey):
        seed, epoch = index.seed, index.epoch
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), zlib.crc32(stream.encode())])


class KeyedDataset(StandardDatasetBase):
    """A ``StandardDatasetBase`` whose ``get_instance(root, sha256, rng)`` receives a generator keyed by
    the sample. ``seed`` / ``set_epoch`` key plain integer indices; ``SampleKey`` indices carry their own."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | FailedSample:
        root, sha = self.instances[int(index)]
        rng = sample_rng(index, self.seed, self.epoch, type(self).__name__)
        try:
            sample = self.get_instance(root, sha, rng)
        except ASSET_ERRORS as e:
            return FailedSample(root, sha, f"{type(e).__name__}: {e}")
        sample["_index"] = int(index)  # as StandardDatasetBase: lets the trainer key per-sample randomness
        return sample

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def metadata_row(self, root: str, sha256: str) -> Any:
        """The metadata row of one instance (a pandas Series)."""
        return self.metadata[root].loc[sha256]


# ---------------------------------------------------------------------------------------------- files
def read_npz(path: str, keys: dict[str, tuple[int | None, ...]]) -> dict[str, np.ndarray]:
    """Reads ``keys`` from an ``.npz``; ``keys`` maps each name to its expected shape (None = any size).

    Raises ValueError naming ``path`` for a missing or corrupt file, a missing key, a wrong shape or
    non-finite values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with np.load(path) as data:
            files = list(data.files)
            out = {k: data[k] for k in keys if k in files}
    except (OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: corrupt npz ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing} (has {files})")
    for k, shape in keys.items():
        arr = out[k]
        if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{path}: array '{k}' has shape {list(arr.shape)}, expected {want}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{path}: array '{k}' contains NaN or Inf values")
    return out


def load_transforms(directory: str) -> list[dict]:
    """The ``frames`` of ``<directory>/transforms.json`` (non-empty)."""
    path = os.path.join(directory, "transforms.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path) as f:
            frames = json.load(f)["frames"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed transforms.json ({type(e).__name__}: {e})") from None
    if not frames:
        raise ValueError(f"{path}: no frames")
    return frames


def _camera(frame: dict, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(extrinsics float32 [4,4] OpenCV world-to-camera, normalised intrinsics float32 [3,3])."""
    try:
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
        fov = float(frame["camera_angle_x"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad frame {frame.get('file_path', '?')!r} ({e})") from None
    if c2w.shape != (4, 4):
        raise ValueError(f"{path}: transform_matrix of {frame.get('file_path')!r} is {list(c2w.shape)}, not 4x4")
    extr = torch.from_numpy(c2w_blender_to_extrinsics(c2w)).float()
    intr = torch.from_numpy(fov_to_intrinsics(fov)).float()
    return extr, intr


def open_rgba(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with Image.open(path) as im:
        return im.convert("RGBA")


def load_render_view(directory: str, image_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """DATA.md 7.1: one uniformly random view of ``directory`` (``renders/<sha>``).

    Returns ``image`` float32 [3,S,S] (straight RGB, not premultiplied), ``alpha`` float32 [S,S],
    ``extrinsics`` float32 [4,4], ``intrinsics`` float32 [3,3]; RGB and alpha resized separately (LANCZOS)."""
    frames = load_transforms(directory)
    frame = frames[int(rng.integers(len(frames)))]
    path = os.path.join(directory, frame["file_path"])
    rgba = open_rgba(path)
    rgb, alpha = rgba.convert("RGB"), rgba.getchannel("A")
    if rgba.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)
        alpha = alpha.resize((image_size, image_size), Image.Resampling.LANCZOS)
    image = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()  # [3,S,S]
    extr, intr = _camera(frame, os.path.join(directory, "transforms.json"))
    return {
        "image": image,
        "alpha": torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0),
        "extrinsics": extr,
        "intrinsics": intr,
    }


def crop_condition(rgba: Image.Image, image_size: int, path: str = "") -> torch.Tensor:
    """DATA.md 7.3 steps 2-5 on one RGBA image: square crop around the alpha > 0 box enlarged 1.2x,
    LANCZOS to ``image_size``, premultiplied on black. Returns float32 [3,S,S] in [0,1]."""
    alpha = np.asarray(rgba.getchannel("A"))
    rows, cols = np.nonzero(alpha > 0)
    if rows.size == 0:
        raise ValueError(f"{path}: condition image is fully transparent")
    xmin, xmax, ymin, ymax = cols.min(), cols.max(), rows.min(), rows.max()
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    half = max(xmax - xmin, ymax - ymin) / 2 * 1.2
    box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))  # truncation toward zero
    crop = rgba.crop(box).resize((image_size, image_size), Image.Resampling.LANCZOS)  # outside = (0,0,0,0)
    arr = np.asarray(crop, dtype=np.float32) / 255.0  # [S,S,4]
    premul = arr[..., :3] * arr[..., 3:4]
    return torch.from_numpy(premul).permute(2, 0, 1).contiguous()  # [3,S,S]


def load_condition_image(directory: str, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """DATA.md 7.3: a random view of ``directory`` (``renders_cond/<sha>``) cropped; float32 [3,S,S]."""
    frames = load_transforms(directory)
    frame = frames[int(rng.integers(len(frames)))]
    path = os.path.join(directory, frame["file_path"])
    return crop_condition(open_rgba(path), image_size, path)


def parse_captions(captions: Any, where: str = "") -> list[str]:
    """The metadata ``captions`` cell (a JSON-encoded list of strings) as a non-empty list."""
    try:
        options = json.loads(captions) if isinstance(captions, str) else captions
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: captions are not valid JSON ({e})") from None
    if not isinstance(options, list) or not options or not all(isinstance(c, str) for c in options):
        raise ValueError(f"{where}: captions must be a non-empty JSON list of strings, got {captions!r:.80}")
    return options


def choose_caption(captions: Any, rng: np.random.Generator, where: str = "") -> str:
    """One caption, uniformly, from a JSON-encoded list of strings (the metadata ``captions`` cell)."""
    options = parse_captions(captions, where)
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------------------------- collate
def balanced_groups(load: list[float] | np.ndarray, num_groups: int, equal_size: bool = False) -> list[list[int]]:
    """DATA.md 7.4 greedy grouping: indices by decreasing load, each to the group with the smallest running
    load (first on ties). With ``equal_size`` a group is full at ``len(load) // num_groups`` members."""
    load = np.asarray(load, dtype=np.float64)
    if num_groups <= 0:
        raise ValueError(f"balanced_groups: num_groups must be positive, got {num_groups}")
    order = np.argsort(-load)  # descending, numpy's default (quicksort) as the reference
    cap = len(load) // num_groups if equal_size else None
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    totals = [0.0] * num_groups
    for i in order:
        best = -1
        for g in range(num_groups):
            if cap is not None and len(groups[g]) >= cap:
                continue
            if best < 0 or totals[g] < totals[best]:
                best = g
        if best < 0:
            break  # equal_size: every group is full; the remainder is dropped
        groups[best].append(int(i))
        totals[best] += float(load[i])
    return groups


def collate_sparse(batch: list[Any], sparse_key: str) -> dict[str, Any]:
    """Collates samples holding ``coords`` int32 [N_i,3] and ``feats`` [N_i,C] into one ``SparseTensor``
    under ``sparse_key`` (coords [sum N_i, 4] = batch id, x, y, z; layout recorded). Other tensors are
    stacked, lists concatenated, anything else listed. Failed samples are dropped and listed in ``_failed``."""
    failed = [b for b in batch if isinstance(b, FailedSample)]
    good = [b for b in batch if not isinstance(b, FailedSample)]
    out: dict[str, Any] = {"_failed": failed}
    if not good:
        return out
    coords, feats, layout, start = [], [], [], 0
    for i, b in enumerate(good):
        n = b["coords"].shape[0]
        coords.append(torch.cat([torch.full((n, 1), i, dtype=torch.int32), b["coords"].int()], dim=1))  # [n,4]
        feats.append(b["feats"])
        layout.append(slice(start, start + n))
        start += n
    out[sparse_key] = SparseTensor(feats=torch.cat(feats), coords=torch.cat(coords), shape=(len(good),),
                                   layout=layout)
    for key in good[0]:
        if key in ("coords", "feats"):
            continue
        values = [b[key] for b in good]
        if key == "_index":
            out[key] = torch.tensor(values, dtype=torch.long)  # [B], as default_collate makes it
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], list):
            out[key] = [v for vs in values for v in vs]
        else:
            out[key] = values
    return out


# -------------------------------------------------------------------------------------------- filters
def normalization_tensors(normalization: dict | None, where: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``{"mean": [C], "std": [C]}`` -> (mean [C], std [C]) float32, or None."""
    if normalization is None:
        return None
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise ValueError(f"{where}.normalization must be {{'mean': [...], 'std': [...]}}, got {normalization!r}")
    mean = torch.tensor(normalization["mean"], dtype=torch.float32)
    std = torch.tensor(normalization["std"], dtype=torch.float32)
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"{where}.normalization: mean and std must be equal-length lists")
    if not bool((std > 0).all()):
        raise ValueError(f"{where}.normalization: every std must be positive")
    return mean, std


class PrecomputedCondMixin:
    """``cond_features="<name>"`` (new): the dataset reads precomputed condition tokens from
    ``cond_features/<name>/`` (``dataset_toolkits.encode_cond``) instead of the raw condition, keeps
    only assets with the ``cond_feature_<name>`` flag, and exposes ``cond_feature_info`` (the
    directory's ``model.json``) for the trainer."""

    def _init_cond_features(self, cond_features: str | None) -> None:
        self.cond_features = cond_features

    def _check_cond_features(self) -> None:
        if self.cond_features is None:
            return
        infos = {r: cond_feature_info(r, self.cond_features) for r in self.roots}
        kinds = {(i.get("kind", "image"), i.get("model"), i["num_tokens"], i["channels"]) for i in infos.values()}
        if len(kinds) > 1:
            raise ValueError(f"cond_features={self.cond_features!r}: the roots hold tokens of different encoders or "
                             f"shapes: {infos}")
        root, self.cond_feature_info = next(iter(infos.items()))
        self.cond_feature_null = None  # text: the encoding of the empty caption, [T, C]
        if self.cond_feature_info.get("kind") == "text":
            path = os.path.join(root, "cond_features", self.cond_features, "null.npy")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: not found (written by dataset_toolkits.encode_cond --kind text)")
            self.cond_feature_null = torch.from_numpy(np.load(path).astype(np.float32))

    def _cond_filter(self, df: pd.DataFrame, raw_flag: str | None) -> tuple[pd.DataFrame, str | None]:
        """Rows with the precomputed tokens' flag, else with ``raw_flag`` (None: all rows); and that flag."""
        flag = f"cond_feature_{self.cond_features}" if self.cond_features is not None else raw_flag
        return (df if flag is None else flag_filter(df, flag)), flag


class TextConditionedMixin(PrecomputedCondMixin):
    """Adds ``cond``: one caption, uniformly chosen per access, from the metadata ``captions`` JSON list
    (filter: ``captions`` present); or, with ``cond_features="text_<model>"`` (new), that caption's
    precomputed text tokens float32 [77, C] (``dataset_toolkits.encode_cond --kind text``; filter:
    ``cond_feature_text_<model>``)."""

    def __init__(self, roots: str, *, cond_features: str | None = None, **kwargs: Any):
        self._init_cond_features(cond_features)
        super().__init__(roots, **kwargs)
        self._check_cond_features()

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        df, stats = super().filter_metadata(metadata)
        df = captions_filter(df)
        stats = stats + [("captions", len(df))]
        df, flag = self._cond_filter(df, None)
        return df, stats + ([(flag, len(df))] if flag else [])

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        pack = super().get_instance(root, sha256, rng)
        where = f"{sha256} in {os.path.join(root, 'metadata.csv')}"
        captions = self.metadata_row(root, sha256)["captions"]
        if self.cond_features is not None:  # the same draw as choose_caption: one rng.integers(K)
            count = len(parse_captions(captions, where))
            pack["cond"] = load_condition_tokens(root, self.cond_features, sha256, rng, expect=count)
        else:
            pack["cond"] = choose_caption(captions, rng, where)
        return pack


def cond_feature_info(root: str, model: str) -> dict[str, Any]:
    """``cond_features/<model>/model.json`` of ``root`` (written by ``dataset_toolkits.encode_cond``)."""
    path = os.path.join(root, "cond_features", model, "model.json")
    if not os.path.isfile(path):
        how = "--kind text --model <the text model>" if model.startswith("text_") else f"--model {model}"
        raise FileNotFoundError(f"{path}: not found; precompute the condition tokens with "
                                f"`python -m dataset_toolkits.encode_cond --output_dir {root} {how}`")
    with open(path) as f:
        return json.load(f)


def load_condition_tokens(root: str, model: str, sha256: str, rng: np.random.Generator,
                          expect: int | None = None) -> torch.Tensor:
    """Precomputed condition tokens of one uniformly drawn entry (a view, or a caption): float32
    [T, C]. The file ``cond_features/<model>/<sha>.npy`` [K, T, C] is memory-mapped, so only that
    entry is read. ``expect``: the number of entries there must be (the asset's captions)."""
    path = os.path.join(root, "cond_features", model, f"{sha256}.npy")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 3 or tokens.shape[0] == 0:
        raise ValueError(f"{path}: expected tokens [K, T, C] with K >= 1, got shape {tokens.shape}")
    if expect is not None and tokens.shape[0] != expect:
        raise ValueError(f"{path}: {tokens.shape[0]} token sets for {expect} captions (the captions changed since "
                         "dataset_toolkits.encode_cond ran: run it again for this asset)")
    view = np.array(tokens[int(rng.integers(tokens.shape[0]))], dtype=np.float32)
    if not np.isfinite(view).all():
        raise ValueError(f"{path}: non-finite condition tokens")
    return torch.from_numpy(view)


class ImageConditionedMixin(PrecomputedCondMixin):
    """Adds ``cond``: a random ``renders_cond`` view cropped as DATA.md 7.3, float32 [3,S,S]
    (filter: ``cond_rendered``; ``image_size``: S, 518); or, with ``cond_features="<model>"`` (new),
    that view's precomputed DINOv2 tokens float32 [T, C] from ``cond_features/<model>/``
    (``dataset_toolkits.encode_cond``; filter: ``cond_feature_<model>``), so that no image encoder
    runs in the training step."""

    def __init__(self, roots: str, *, image_size: int = 518, cond_features: str | None = None, **kwargs: Any):
        self.image_size = image_size
        self._init_cond_features(cond_features)
        super().__init__(roots, **kwargs)
        self._check_cond_features()

    def filter_metadata(self, metadata: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, int]]]:
        df, stats = super().filter_metadata(metadata)
        df, flag = self._cond_filter(df, "cond_rendered")
        return df, stats + [(flag, len(df))]

    def get_instance(self, root: str, sha256: str, rng: np.random.Generator) -> dict[str, Any]:
        pack = super().get_instance(root, sha256, rng)
        if self.cond_features is not None:
            pack["cond"] = load_condition_tokens(root, self.cond_features, sha256, rng)
        else:
            pack["cond"] = load_condition_image(os.path.join(root, "renders_cond", sha256), self.image_size, rng)
        return pack
