"""SAM's training losses: focal + dice on the mask, a regression of the IoU head on the real IoU.

Weights come from `configs/` (the paper: focal x 20, dice x 1, IoU MSE x 1). With several mask
outputs per prompt only the one with the lowest focal + dice loss is trained ("minimum over
outputs", as SAM does for ambiguous prompts); every output's IoU prediction is trained. Sums are
divided by `num_masks`, the number of target masks across *all* ranks, so the gradient is the
same however the batch is split over GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Weights and shapes of the loss terms (see configs)."""

    focal: float
    dice: float
    iou: float
    focal_alpha: float
    focal_gamma: float
    iou_loss: str  # "mse" or "l1"


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-mask focal loss, averaged over pixels: N x K x H x W logits, N x 1 x H x W targets -> N x K."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss: N x K x H x W logits, N x 1 x H x W targets -> N x K."""
    prob = logits.sigmoid().flatten(2)
    targets = targets.flatten(2)
    numerator = 2 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return 1 - (numerator + smooth) / (denominator + smooth)


def actual_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded prediction with its target: N x K (an empty union counts as 1)."""
    pred = (logits > 0).flatten(2)
    targets = targets.flatten(2) > 0.5
    intersection = (pred & targets).sum(-1).float()
    union = (pred | targets).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def sam_loss(
    mask_logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, weights: LossWeights, num_masks: float
) -> dict[str, torch.Tensor]:
    """Loss of one prediction round.

    mask_logits N x K x h x w (K = 1 or 3 outputs per prompt), iou_pred N x K, targets N x H x W
    bool. Logits are upsampled to the targets' size when they differ. Returns the weighted
    total and its parts (each already divided by `num_masks`).
    """
    targets = targets[:, None].to(mask_logits.dtype)  # N x 1 x H x W
    if mask_logits.shape[-2:] != targets.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    focal = sigmoid_focal_loss(mask_logits, targets, weights.focal_alpha, weights.focal_gamma)  # N x K
    dice = dice_loss(mask_logits, targets)  # N x K
    combined = weights.focal * focal + weights.dice * dice
    best = combined.argmin(dim=1, keepdim=True)  # N x 1: the output that already fits best
    with torch.no_grad():
        target_iou = actual_iou(mask_logits, targets)
    if weights.iou_loss == "mse":
        iou = F.mse_loss(iou_pred, target_iou, reduction="none")
    elif weights.iou_loss == "l1":
        iou = F.l1_loss(iou_pred, target_iou, reduction="none")
    else:
        raise ValueError(f"iou_loss must be 'mse' or 'l1', got {weights.iou_loss!r}")
    parts = {
        "focal": focal.gather(1, best).sum() / num_masks,
        "dice": dice.gather(1, best).sum() / num_masks,
        "iou": iou.mean(dim=1).sum() / num_masks,
    }
    parts["total"] = weights.focal * parts["focal"] + weights.dice * parts["dice"] + weights.iou * parts["iou"]
    return parts
