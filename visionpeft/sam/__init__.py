"""Segment Anything adaptation: prompt sampling and losses for promptable-segmentation training.

- :mod:`.prompts`: object masks from a label map, noisy box prompts, foreground points, SAM's iterative
  error-region points and point padding (arXiv 2304.02643, appendix A).
- :mod:`.losses`: focal, dice and IoU per mask, and SAM's combined loss (focal:dice 20:1, lowest-loss candidate
  of a multimask output, IoU-head MSE).
- :mod:`.model`: :class:`SamModel` (SAM with an adapter, promptable or semantic), its adapter folder
  (``sam_config.json``), :func:`load_sam_adapter` and :func:`sam_predictor` (a ``SamPredictor`` with the adapter).

The models themselves come from :mod:`visionpeft.backbones.sam` (``build_sam``, official checkpoints, other input
sizes, activation checkpointing), re-exported here.
"""

from __future__ import annotations

from ..backbones.sam import (
    SAM_ARCHS,
    TINY_SAM,
    build_sam,
    load_sam_checkpoint,
    resize_sam,
    save_sam_checkpoint,
    set_grad_checkpointing,
)
from .losses import dice_loss, focal_loss, mask_iou, sam_loss
from .model import SamModel, SamSpec, is_sam_adapter, load_sam_adapter, read_sam_spec, sam_predictor, semantic_decoder
from .prompts import objects_from_mask, pad_points, refine_points, sample_boxes, sample_points

__all__ = [
    "SAM_ARCHS",
    "TINY_SAM",
    "SamModel",
    "SamSpec",
    "build_sam",
    "is_sam_adapter",
    "load_sam_adapter",
    "load_sam_checkpoint",
    "read_sam_spec",
    "resize_sam",
    "sam_predictor",
    "save_sam_checkpoint",
    "semantic_decoder",
    "set_grad_checkpointing",
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
