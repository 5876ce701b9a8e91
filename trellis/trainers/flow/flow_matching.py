"""Rectified-flow trainers under the original TRELLIS names (reference TRAINING.md 9.5, 10, 11).

One trainer, ``FlowMatchingTrainer``, holds three components:

* the objective: ``self.flow``, a ``RectifiedFlow`` (sigma_min, t schedule, x_t, velocity, 1000 t);
* the condition: ``self.condition`` (the dataset's raw tensor, DINOv2 image tokens or CLIP text tokens);
* CFG dropout: ``self.cfg_dropout`` (``p_uncond``), or None.

The original names assemble those components; the ``Sparse...`` names add the load-balanced sparse
batches (``SparseBatchesMixin``). Each class declares only its own config keys:

    FlowMatchingTrainer                    t_schedule, sigma_min (+ snapshot sampler settings)
    FlowMatchingCFGTrainer                 + p_uncond
    ImageConditionedFlowMatchingCFGTrainer + image_cond_model (+ image_cond_weights)
    TextConditionedFlowMatchingCFGTrainer  + text_cond_model (+ text_cond_weights)
    Sparse<any of the above>               same keys; SLat datasets

The model key is ``denoiser``. Datasets give ``x_0`` (dense ``[B, 8, 16, 16, 16]`` or a SparseTensor)
and ``cond`` (raw tensor, images or captions).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from trellis.datasets.base import DatasetError
from trellis.datasets.samplers import BalancedResumableSampler, ResumableSampler
from trellis.modules.rectified_flow import RectifiedFlow, per_sample_mse, t_bins
from trellis.modules.sparse import SparseTensor
from trellis.pipelines.samplers import classifier_free_guidance, denoiser_fn, sample_euler
from trellis.trainers.base import Trainer
from trellis.trainers.flow.components import (
    CFGDropout,
    ImageCondition,
    PrecomputedCondition,
    RawCondition,
    TextCondition,
    keyed_generators,
    keyed_randn_sparse,
)
from trellis.trainers.flow.snapshot import load_decoder, slat_pictures, ss_pictures
from trellis.utils.device import to_device_async

__all__ = [
    "FlowMatchingTrainer", "FlowMatchingCFGTrainer", "TextConditionedFlowMatchingCFGTrainer",
    "ImageConditionedFlowMatchingCFGTrainer", "SparseBatchesMixin", "SparseFlowMatchingTrainer",
    "SparseFlowMatchingCFGTrainer", "TextConditionedSparseFlowMatchingCFGTrainer",
    "ImageConditionedSparseFlowMatchingCFGTrainer",
]

DEFAULT_T_SCHEDULE = {"name": "logitNormal", "args": {"mean": 0.0, "std": 1.0}}


class FlowMatchingTrainer(Trainer):
    """Trains ``models["denoiser"]`` to predict the rectified-flow velocity.

    Args:
        t_schedule: ``{"name": "uniform" | "logitNormal", "args": {...}}`` (configs: logitNormal(1, 1)).
        sigma_min: the flow's noise floor (1e-5).
        sample_steps: Euler steps of the snapshot sampler (50).
        sample_cfg_strength: snapshot guidance strength (3.0; CFG trainers only).
        sample_rescale_t: snapshot time-grid warp (1.0).
        sample_cfg_interval: ``[lo, hi]`` guidance interval of the snapshot sampler (None: everywhere).
        **kwargs: see ``Trainer``.
    """

    def __init__(self, *args: Any, t_schedule: dict | None = None, sigma_min: float = 1e-5,
                 sample_steps: int = 50, sample_cfg_strength: float = 3.0, sample_rescale_t: float = 1.0,
                 sample_cfg_interval: list[float] | None = None, **kwargs: Any):
        self.flow = RectifiedFlow(sigma_min, t_schedule if t_schedule is not None else DEFAULT_T_SCHEDULE)
        self.sample_steps = int(sample_steps)
        self.sample_cfg_strength = float(sample_cfg_strength)
        self.sample_rescale_t = float(sample_rescale_t)
        self.sample_cfg_interval = tuple(sample_cfg_interval) if sample_cfg_interval is not None else None
        self.cfg_dropout: CFGDropout | None = None
        super().__init__(*args, **kwargs)
        if "denoiser" not in self.models:
            raise ValueError(f"{type(self).__name__} needs a model under the key 'denoiser' "
                             f"(config models: {sorted(self.models)})")
        self.condition = self.make_condition()
        self._check_condition_width()
        self._decoder: torch.nn.Module | None = None
        self._decoder_loaded = False

    # ------------------------------------------------------------------ components (hooks)
    def make_condition(self) -> RawCondition | ImageCondition | TextCondition:
        """The condition component (subclasses: image / text encoders)."""
        return RawCondition()

    def _check_condition_width(self) -> None:
        width = getattr(self.condition, "channels", None)
        want = getattr(self.models["denoiser"], "cond_channels", None)
        if width is not None and want is not None and width != want:
            raise ValueError(f"the {self.condition.kind} condition encoder gives {width}-channel tokens but "
                             f"models.denoiser.args.cond_channels is {want}")

    @property
    def is_sparse(self) -> bool:
        return False

    # ------------------------------------------------------------------ per-sample randomness
    def generators(self, stream: str, batch_size: int, device: torch.device | str = "cpu") -> list:
        """One generator per item of the current micro-batch, keyed by (seed, step, dataset index, stream)."""
        return keyed_generators(self.sample_keys, batch_size, self.seed, self.step, stream, device)

    def noise_like(self, x_0: torch.Tensor | SparseTensor) -> torch.Tensor | SparseTensor:
        if isinstance(x_0, SparseTensor):
            return keyed_randn_sparse(x_0, self.generators("noise", x_0.batch_size, x_0.device))
        return self.randn_like_per_sample(x_0)

    def _describe(self, item: int | None = None) -> str:
        """Names the samples of the current micro-batch (dataset index, root, sha256)."""
        keys = self.sample_keys.tolist() if self.sample_keys is not None else []
        if item is not None:
            keys = keys[item:item + 1]
        inst = getattr(self.dataset, "instances", None)
        names = [f"#{k} ({inst[k][1]} in {inst[k][0]})" if inst is not None and 0 <= k < len(inst) else f"#{k}"
                 for k in keys]
        return ", ".join(names) if names else "(unknown samples)"

    # ------------------------------------------------------------------ training
    def check_x0(self, x_0: Any) -> int:
        """Validates the micro-batch input; returns its batch size."""
        if x_0 is None:
            raise DatasetError(f"step {self.step}: a micro-batch without 'x_0' (every sample failed?) for {self._describe()}")
        if isinstance(x_0, SparseTensor):
            if x_0.feats.shape[0] == 0:
                raise DatasetError(f"step {self.step}: empty sparse micro-batch (no voxels) for {self._describe()}")
            for i, sl in enumerate(x_0.layout):
                if sl.stop <= sl.start:
                    raise DatasetError(f"step {self.step}: sample {self._describe(i)} has no voxels")
            return x_0.batch_size
        if not isinstance(x_0, torch.Tensor):
            raise TypeError(f"x_0 must be a tensor or SparseTensor, got {type(x_0).__name__}")
        return x_0.shape[0]

    def training_condition(self, cond: Any, batch_size: int) -> torch.Tensor:
        """Encodes the dataset's condition, checks its shape and applies CFG dropout (keyed per sample)."""
        if cond is None:
            raise DatasetError(f"{type(self).__name__}: the dataset gives no 'cond' (samples {self._describe()}); "
                               "the TRELLIS flow models need a condition")
        c = self.condition.encode(cond).to(self.device)
        if c.dim() != 3 or c.shape[0] != batch_size:
            raise ValueError(f"condition of shape {tuple(c.shape)} for a micro-batch of {batch_size} "
                             f"(samples {self._describe()}); expected [{batch_size}, L, C]")
        want = getattr(self.models["denoiser"], "cond_channels", c.shape[2])
        if c.shape[2] != want:
            raise ValueError(f"condition of shape {tuple(c.shape)} (samples {self._describe()}) but "
                             f"models.denoiser.args.cond_channels is {want}")
        if self.cfg_dropout is not None:
            drop = self.cfg_dropout.mask(self.generators("cfg", batch_size))
            c = self.cfg_dropout.apply(c, self.condition.null(c), drop)
        return c

    def training_losses(self, x_0: Any = None, cond: Any = None, **_: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        b = self.check_x0(x_0)
        t = self.flow.sample_t(self.generators("t", b))  # [B] CPU (t_bins below reads it there)
        t_dev = to_device_async(t, self.device)  # one copy for x_t and the model's time input
        noise = self.noise_like(x_0)
        x_t = self.flow.x_t(x_0, t_dev, noise)
        target = self.flow.velocity(x_0, noise)
        c = self.training_condition(cond, b)
        model = self.models["denoiser"]
        if self.elastic is not None:
            self.elastic.set_input_size(model.input_size(x_t) if hasattr(model, "input_size") else b)
        pred = self.training_models["denoiser"](x_t, self.flow.model_time(t_dev), c)
        if isinstance(pred, SparseTensor):
            mse = F.mse_loss(pred.feats.float(), target.feats.float())
        else:
            mse = F.mse_loss(pred.float(), target.float())
        step, rank, samples = self.step, self.dist.rank, self._describe()
        self.check_finite_later(mse, lambda v: f"non-finite loss ({v}) at step {step} on rank {rank} for samples {samples}")
        terms: dict[str, Any] = {"loss": mse, "mse": mse}
        for name, value in t_bins(per_sample_mse(pred, target), t).items():
            terms[f"{name}/mse"] = value["mse"]
        return terms, {}

    # ------------------------------------------------------------------ snapshots
    @property
    def uses_guidance(self) -> bool:
        return self.cfg_dropout is not None

    def snapshot_decoder(self) -> torch.nn.Module | None:
        """The decoder named by the dataset (loaded once), or None."""
        if not self._decoder_loaded:
            self._decoder_loaded = True
            ds = self.dataset
            if self.is_sparse:
                spec = (getattr(ds, "pretrained_slat_dec", None), getattr(ds, "slat_dec_path", None),
                        getattr(ds, "slat_dec_ckpt", None))
            else:
                spec = (getattr(ds, "pretrained_ss_dec", None), getattr(ds, "ss_dec_path", None),
                        getattr(ds, "ss_dec_ckpt", None))
            self._decoder = load_decoder(*spec, device=self.device)
            if self._decoder is None and self.dist.is_main:
                shown = "the latent's channel-mean sign" if not self.is_sparse else "voxels coloured by the latent"
                print(f"note: snapshot decoder {spec[0]!r} is not on this machine (set TRELLIS_WEIGHTS_DIR or a "
                      f"local path); snapshots show {shown}", flush=True)
        return self._decoder

    def latent_pictures(self, x: Any) -> torch.Tensor:
        """``[B, 3, H, W]`` pictures of latents (SS: decoded voxels; SLat: voxels coloured by the latent)."""
        if isinstance(x, SparseTensor):
            return slat_pictures(x)  # a SLat decoder has no renderer here yet: show the latent itself
        decoder = self.snapshot_decoder()
        denorm = getattr(self.dataset, "denormalize", None)
        return ss_pictures(denorm(x) if (decoder is not None and denorm is not None) else x, decoder,
                           seed=self.seed)

    @torch.no_grad()
    def sample(self, noise: Any, cond: torch.Tensor, null: torch.Tensor | None) -> Any:
        """Euler sampling of the live denoiser with this trainer's snapshot settings."""
        model = self.models["denoiser"]
        fn = denoiser_fn(model, cond, self.flow)
        if self.uses_guidance and null is not None:
            fn = classifier_free_guidance(fn, denoiser_fn(model, null, self.flow), self.sample_cfg_strength,
                                          self.sample_cfg_interval)
        return sample_euler(fn, noise, self.sample_steps, self.sample_rescale_t, self.flow).samples

    @torch.no_grad()
    def run_snapshot(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        x_0 = batch["x_0"]
        b = x_0.batch_size if isinstance(x_0, SparseTensor) else x_0.shape[0]
        cond = self.condition.encode(batch.get("cond")).to(self.device)
        null = self.condition.null(cond)
        g = torch.Generator().manual_seed(self.seed + 777)  # the same noise at every snapshot
        if isinstance(x_0, SparseTensor):
            noise = x_0.replace(torch.randn(x_0.feats.shape, generator=g).to(x_0.device))
        else:
            noise = torch.randn(x_0.shape, generator=g).to(x_0.device)
        samples = self.sample(noise, cond, null)
        out = {"sample_gt": {"value": self.latent_pictures(x_0), "type": "image"},
               "sample": {"value": self.latent_pictures(samples), "type": "image"}}
        raw = batch.get("cond")
        if isinstance(raw, torch.Tensor) and raw.dim() == 4 and raw.shape[:2] == (b, 3):
            out["image"] = {"value": raw.float(), "type": "image"}
        return out


class FlowMatchingCFGTrainer(FlowMatchingTrainer):
    """Adds classifier-free-guidance dropout of the condition.

    Args:
        p_uncond: per-sample probability of training on the null condition (0.1).
        **kwargs: see ``FlowMatchingTrainer``.
    """

    def __init__(self, *args: Any, p_uncond: float = 0.1, **kwargs: Any):
        dropout = CFGDropout(p_uncond)
        super().__init__(*args, **kwargs)
        self.cfg_dropout = dropout


def precomputed_condition(dataset: Any, kind: str, model: str, arg: str) -> PrecomputedCondition:
    """The condition of a dataset with ``cond_features``: its tokens must come from the trainer's
    encoder (``trainer.args.<arg>``), else a clear error."""
    name, info = dataset.cond_features, dataset.cond_feature_info
    if info.get("kind", "image") != kind or info.get("model") != model:
        raise ValueError(f"dataset.args.cond_features={name!r} holds {info.get('kind', 'image')} tokens of "
                         f"{info.get('model')!r} but trainer.args.{arg}={model!r}: precomputed tokens must come "
                         "from the trainer's encoder")
    return PrecomputedCondition(kind, name, info["num_tokens"], info["channels"],
                                getattr(dataset, "cond_feature_null", None))


class ImageConditionedFlowMatchingCFGTrainer(FlowMatchingCFGTrainer):
    """Conditions on DINOv2 tokens of the dataset's images (encoded online, frozen).

    Args:
        image_cond_model: ``dinov2_vitl14_reg`` (or ``tiny`` for tests and demos).
        image_cond_weights: local checkpoint file or HF directory (default: ``$TRELLIS_WEIGHTS_DIR``).
        **kwargs: see ``FlowMatchingCFGTrainer``.
    """

    def __init__(self, *args: Any, image_cond_model: str = "dinov2_vitl14_reg",
                 image_cond_weights: str | None = None, **kwargs: Any):
        self.image_cond_model = image_cond_model
        self.image_cond_weights = image_cond_weights
        super().__init__(*args, **kwargs)

    def make_condition(self) -> ImageCondition | PrecomputedCondition:
        if getattr(self.dataset, "cond_features", None) is not None:
            return precomputed_condition(self.dataset, "image", self.image_cond_model, "image_cond_model")
        return ImageCondition(self.image_cond_model, self.image_cond_weights,
                              int(getattr(self.dataset, "image_size", 518)), self.device)


class TextConditionedFlowMatchingCFGTrainer(FlowMatchingCFGTrainer):
    """Conditions on CLIP text tokens of the dataset's captions (encoded online, frozen).

    Args:
        text_cond_model: ``openai/clip-vit-large-patch14`` (or ``tiny`` for tests and demos).
        text_cond_weights: local HF directory (default: ``$TRELLIS_WEIGHTS_DIR/clip-vit-large-patch14``).
        **kwargs: see ``FlowMatchingCFGTrainer``.
    """

    def __init__(self, *args: Any, text_cond_model: str = "openai/clip-vit-large-patch14",
                 text_cond_weights: str | None = None, **kwargs: Any):
        self.text_cond_model = text_cond_model
        self.text_cond_weights = text_cond_weights
        super().__init__(*args, **kwargs)

    def make_condition(self) -> TextCondition | PrecomputedCondition:
        if getattr(self.dataset, "cond_features", None) is not None:
            return precomputed_condition(self.dataset, "text", self.text_cond_model, "text_cond_model")
        return TextCondition(self.text_cond_model, self.text_cond_weights, self.device)


class SparseBatchesMixin:
    """Sparse latents (``SLat`` datasets): every global batch is spread over the ranks by voxel count
    (``BalancedResumableSampler``) and each rank's share is cut into ``batch_split`` micro-batches,
    largest first, greedily by voxel count (``dataset.collate_fn(split_size=batch_split)``)."""

    @property
    def is_sparse(self) -> bool:
        return True

    def make_sampler(self) -> ResumableSampler:
        return BalancedResumableSampler(self.dataset, self.batch_size_per_gpu, self.dist.rank,
                                        self.dist.world_size, shuffle=True, seed=self.seed)

    def collate_fn(self) -> Any:
        collate = getattr(self.dataset, "collate_fn", None)
        if collate is None:
            raise TypeError(f"{type(self).__name__}: {type(self.dataset).__name__} has no collate_fn(batch, split_size)")
        return functools.partial(collate, split_size=self.batch_split)


class SparseFlowMatchingTrainer(SparseBatchesMixin, FlowMatchingTrainer):
    """``FlowMatchingTrainer`` on sparse latents."""


class SparseFlowMatchingCFGTrainer(SparseBatchesMixin, FlowMatchingCFGTrainer):
    """``FlowMatchingCFGTrainer`` on sparse latents."""


class ImageConditionedSparseFlowMatchingCFGTrainer(SparseBatchesMixin, ImageConditionedFlowMatchingCFGTrainer):
    """``ImageConditionedFlowMatchingCFGTrainer`` on sparse latents."""


class TextConditionedSparseFlowMatchingCFGTrainer(SparseBatchesMixin, TextConditionedFlowMatchingCFGTrainer):
    """``TextConditionedFlowMatchingCFGTrainer`` on sparse latents."""
