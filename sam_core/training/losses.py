"""Mask and IoU losses of SAM training (paper, appendix A).

All functions take mask logits and binary targets of the same spatial size and
return one value per mask, so that the caller can pick the best of several outputs
before reducing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss averaged over pixels: (...)xHxW -> (...).

    ``alpha`` weights positives (``1 - alpha`` negatives); a negative ``alpha`` disables
    the weighting. The same formula as RetinaNet, DETR and SAM 2.
    """
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities: (...)xHxW -> (...).

    ``smooth`` keeps the loss defined (and zero) for an empty target predicted empty.
    """
    prob = logits.sigmoid().flatten(-2)
    targets = targets.to(prob.dtype).flatten(-2)
    numerator = 2 * (prob * targets).sum(-1) + smooth
    denominator = prob.sum(-1) + targets.sum(-1) + smooth
    return 1 - numerator / denominator


def binary_mask_iou(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks: (...)xHxW -> (...). Two empty masks have IoU 1."""
    pred, targets = pred.flatten(-2), targets.flatten(-2)
    inter = (pred & targets).sum(-1)
    union = (pred | targets).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))


class MaskLosses(NamedTuple):
    """Per-mask losses of one decoder call, all of shape (M,).

    loss: focal_weight * focal + dice_weight * dice + iou_weight * iou, the value trained on.
    focal, dice: of the selected (lowest-loss) output.
    iou: MSE of the IoU head against the actual IoU (over all outputs or the selected one).
    best: (M,) index of the selected output.
    actual_iou: (M, K) IoU of each output with the target, thresholded at 0.
    """

    loss: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    best: torch.Tensor
    actual_iou: torch.Tensor


def multimask_losses(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    supervise_all_iou: bool = True,
    mask_threshold: float = 0.0,
) -> MaskLosses:
    """Losses of K candidate masks per target, trained only on the best candidate.

    Args:
        logits: MxKxHxW mask logits (K = 3 for multimask output, 1 otherwise).
        iou_pred: MxK predicted IoUs.
        targets: MxHxW boolean ground truth at the logits' resolution.
        supervise_all_iou: train the IoU head on every candidate (it ranks all three
            in automatic generation), not just the selected one.
    """
    logits = logits.float()
    iou_pred = iou_pred.float()
    t = targets[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, t)
    dice = dice_loss(logits, t)
    combined = focal_weight * focal + dice_weight * dice
    # Only the best candidate gets the mask loss so that the others stay free to
    # cover other plausible interpretations (part, subpart, whole).
    best = combined.detach().argmin(dim=1)
    rows = torch.arange(len(logits), device=logits.device)
    with torch.no_grad():
        actual_iou = binary_mask_iou(logits > mask_threshold, t)
    iou_err = (iou_pred - actual_iou) ** 2
    iou = iou_err.mean(dim=1) if supervise_all_iou else iou_err[rows, best]
    loss = combined[rows, best] + iou_weight * iou
    return MaskLosses(loss, focal[rows, best], dice[rows, best], iou, best, actual_iou)
