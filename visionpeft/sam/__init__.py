"""Segment Anything adaptation: prompt sampling and losses for promptable-segmentation training.

- :mod:`.prompts`: object masks from a label map, noisy box prompts, foreground points, SAM's iterative
  error-region points and point padding (arXiv 2304.02643, appendix A).
- :mod:`.losses`: focal, dice and IoU per mask, and SAM's combined loss (focal:dice 20:1, lowest-loss candidate
  of a multimask output, IoU-head MSE).

These modules use plain torch, numpy and scipy; they do not import ``segment_anything``.
"""

from __future__ import annotations

from .losses import dice_loss, focal_loss, mask_iou, sam_loss
from .prompts import objects_from_mask, pad_points, refine_points, sample_boxes, sample_points

__all__ = [
    "dice_loss",
    "focal_loss",
    "mask_iou",
    "objects_from_mask",
    "pad_points",
    "refine_points",
    "sam_loss",
    "sample_boxes",
    "sample_points",
]
