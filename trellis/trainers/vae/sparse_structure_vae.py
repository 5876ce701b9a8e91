"""``SparseStructureVaeTrainer``: reconstruction of 64^3 occupancy through the SS VAE
(reference TRAINING.md section 9.1)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trellis.trainers.base import Trainer


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """0.5 * mean(mu^2 + exp(logvar) - logvar - 1): an element mean, as the original."""
    return 0.5 * torch.mean(mean.pow(2) + logvar.exp() - logvar - 1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    if loss_type == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    if loss_type == "l1":
        return (p - target).abs().mean()
    if loss_type == "dice":  # sums over the whole micro-batch
        return 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    raise ValueError(f"loss_type must be 'bce', 'l1' or 'dice', got {loss_type!r}")


def occupancy_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over items of |pred AND gt| / |pred OR gt| with pred = logits > 0."""
    pred = logits > 0
    gt = target > 0.5
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
    return (inter / union).mean()


class SparseStructureVaeTrainer(Trainer):
    """Trains ``models["encoder"]`` and ``models["decoder"]`` on ``SparseStructure`` samples.

    Args:
        loss_type: 'bce' | 'l1' | 'dice' reconstruction term.
        lambda_kl: weight of the KL term.
        **kwargs: see ``Trainer``.
    """

    def __init__(self, *args: Any, loss_type: str = "bce", lambda_kl: float = 1e-6, **kwargs: Any):
        if loss_type not in ("bce", "l1", "dice"):
            raise ValueError(f"trainer.args.loss_type must be 'bce', 'l1' or 'dice', got {loss_type!r}")
        self.loss_type = loss_type
        self.lambda_kl = lambda_kl
        super().__init__(*args, **kwargs)
        missing = {"encoder", "decoder"} - set(self.models)
        if missing:
            raise ValueError(f"SparseStructureVaeTrainer needs models {sorted(missing)} in the config")

    def training_losses(self, ss: torch.Tensor, **_: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        target = ss.float()
        _, mean, logvar = self.training_models["encoder"](target, sample_posterior=False, return_raw=True)
        z = mean + torch.exp(0.5 * logvar) * self.randn_like_per_sample(mean)  # posterior sample
        logits = self.training_models["decoder"](z).float()
        rec = reconstruction_loss(logits, target, self.loss_type)
        kl = kl_divergence(mean.float(), logvar.float())
        terms = {"loss": rec + self.lambda_kl * kl, self.loss_type: rec, "kl": kl}
        status = {"iou": occupancy_iou(logits.detach(), target)}
        return terms, status

    @torch.no_grad()
    def run_snapshot(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        ss = batch["ss"].float()
        mean = self.models["encoder"](ss, sample_posterior=False)
        logits = self.models["decoder"](mean)
        return {"gt": {"value": ss, "type": "sample"},
                "recon": {"value": (logits > 0).float(), "type": "sample"}}
