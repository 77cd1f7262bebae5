"""Dense prediction heads: plain torch / torchvision modules on a feature pyramid (strides 4 / 8 / 16 / 32).

- :mod:`.segmentation`: UperNet, semantic FPN, SegFormer and linear heads, the auxiliary FCN head, the
  segmentation loss, whole-image and sliding-window inference.
- :mod:`.detection`: torchvision's Faster / Mask R-CNN, RetinaNet and FCOS on the pyramid.

This package imports no other visionpeft package except :mod:`visionpeft._registry`.
"""

from __future__ import annotations

from .detection import DETECTORS, PyramidBackbone, build_detector
from .segmentation import (
    SEG_HEADS,
    FCNHead,
    FPNHead,
    LinearHead,
    SegFormerHead,
    UPerHead,
    build_seg_head,
    seg_loss,
    slide_inference,
    whole_inference,
)

__all__ = [
    "DETECTORS",
    "SEG_HEADS",
    "FCNHead",
    "FPNHead",
    "LinearHead",
    "PyramidBackbone",
    "SegFormerHead",
    "UPerHead",
    "build_detector",
    "build_seg_head",
    "seg_loss",
    "slide_inference",
    "whole_inference",
]
