"""Mask losses for promptable-segmentation training of Segment Anything.

"Segment Anything" (Kirillov et al., arXiv 2304.02643, section 3 and appendix A) supervises the mask prediction
with a linear combination of focal loss ("Focal Loss for Dense Object Detection", Lin et al., arXiv 1708.02002)
and dice loss in the ratio 20:1, back-propagates only the lowest-loss candidate when the decoder predicts several
masks for an ambiguous prompt, and trains the IoU-prediction head with the mean squared error between the
predicted IoU and the IoU of each candidate mask with the ground truth.

All per-mask functions take logits ``(N, ...)`` and reduce every dimension but the first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dice_loss", "focal_loss", "mask_iou", "sam_loss"]


def _check_pair(logits: torch.Tensor, target: torch.Tensor, fn: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"{fn}: logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
    if logits.ndim < 2:
        raise ValueError(f"{fn}: expected (N, ...) with at least one dimension after N, got {tuple(logits.shape)}")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the pixels of each mask.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t`` the predicted probability of the true label and
    ``alpha_t = alpha`` on foreground, ``1 - alpha`` on background (a negative ``alpha`` turns the weighting off).

    Args:
        logits: ``(N, ...)`` mask logits.
        target: ``(N, ...)`` float (or bool) targets in ``[0, 1]``.
        alpha: foreground weight.
        gamma: focusing exponent (0 gives binary cross-entropy).

    Returns:
        ``(N,)`` loss per mask.
    """
    _check_pair(logits, target, "focal_loss")
    target = target.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.flatten(1).mean(dim=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss ``1 - (2 |P T| + eps) / (|P| + |T| + eps)`` on sigmoid probabilities, per mask.

    Args:
        logits: ``(N, ...)`` mask logits.
        target: ``(N, ...)`` float (or bool) targets in ``[0, 1]``.
        eps: smoothing; keeps an empty target with an empty prediction at a loss near 0.

    Returns:
        ``(N,)`` loss per mask.
    """
    _check_pair(logits, target, "dice_loss")
    prob = logits.sigmoid().flatten(1)
    target = target.to(logits.dtype).flatten(1)
    inter = (prob * target).sum(dim=1)
    return 1 - (2 * inter + eps) / (prob.sum(dim=1) + target.sum(dim=1) + eps)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the predicted masks ``logits > 0`` with the targets (``target > 0.5``); empty with empty is 1.

    Args:
        logits: ``(N, ...)`` mask logits.
        target: ``(N, ...)`` bool or float targets.

    Returns:
        ``(N,)`` float32 IoU per mask, without gradient.
    """
    _check_pair(logits, target, "mask_iou")
    pred = (logits > 0).flatten(1)
    gt = (target > 0.5).flatten(1) if target.dtype != torch.bool else target.flatten(1)
    inter = (pred & gt).sum(dim=1).float()
    union = (pred | gt).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """SAM's training loss for one decoder call.

    The logits are resized bilinearly to the target's size when they differ, and the loss is computed in float32
    (also under autocast). Per prompt, the candidate mask with the
    lowest ``focal_weight * focal + dice_weight * dice`` is the only one whose mask loss is back-propagated; the IoU
    head is trained on every candidate with the MSE to the candidate's actual IoU (a detached target).

    Args:
        mask_logits: ``(N, M, h, w)`` logits, ``M`` candidates per prompt.
        iou_pred: ``(N, M)`` predicted IoU of each candidate.
        target: ``(N, H, W)`` bool ground-truth mask per prompt.
        focal_weight: weight of the focal loss (SAM: 20).
        dice_weight: weight of the dice loss (SAM: 1).
        iou_weight: weight of the IoU-prediction MSE.

    Returns:
        ``loss`` (scalar, with gradient), and detached scalars for logging: ``focal``, ``dice`` (of the chosen
        candidates), ``iou_mse`` and ``iou`` (mean IoU of the chosen candidates).
    """
    if mask_logits.ndim != 4:
        raise ValueError(f"sam_loss: mask_logits must be (N, M, h, w), got shape {tuple(mask_logits.shape)}")
    n, m = mask_logits.shape[:2]
    if n == 0:
        raise ValueError("sam_loss: no mask to supervise (N == 0); skip images without objects before the loss")
    if iou_pred.shape != (n, m):
        raise ValueError(f"sam_loss: iou_pred must be (N, M) = {(n, m)}, got {tuple(iou_pred.shape)}")
    if target.ndim != 3 or target.shape[0] != n:
        raise ValueError(f"sam_loss: target must be (N, H, W) with N = {n}, got shape {tuple(target.shape)}")
    if target.shape[-2:] != mask_logits.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    size = target.shape[-2:]
    logits = mask_logits.float().reshape(n * m, *size)
    tgt = target[:, None].expand(n, m, *size).reshape(n * m, *size).to(logits.dtype)
    focal = focal_loss(logits, tgt).view(n, m)
    dice = dice_loss(logits, tgt).view(n, m)
    iou = mask_iou(logits, tgt).view(n, m)
    chosen = (focal_weight * focal + dice_weight * dice).detach().argmin(dim=1, keepdim=True)  # (N, 1)
    focal_c = focal.gather(1, chosen).mean()
    dice_c = dice.gather(1, chosen).mean()
    iou_mse = F.mse_loss(iou_pred.float(), iou)
    loss = focal_weight * focal_c + dice_weight * dice_c + iou_weight * iou_mse
    return {
        "loss": loss,
        "focal": focal_c.detach(),
        "dice": dice_c.detach(),
        "iou_mse": iou_mse.detach(),
        "iou": iou.gather(1, chosen).mean(),
    }
