"""Backbone specs; importing this package registers them (``generic`` matches last)."""

from __future__ import annotations

import torch.nn as nn

from . import (  # noqa: F401
    generic,  # noqa: F401  (registered last: it matches everything)
    sam,
    timm_convnext,
    timm_efficientnet,
    timm_eva,
    timm_metaformer,
    timm_regnet,
    timm_resnet,
    timm_swin,
    timm_swinv2,
    timm_vit,
    torchvision,
)
from ._spec import BackboneSpec, block_index, infer_features, resolve_targets

__all__ = ["BackboneSpec", "detect_backbone", "block_index", "infer_features", "resolve_targets"]


def detect_backbone(model: nn.Module) -> BackboneSpec:
    """The first registered spec whose ``match`` accepts ``model`` (``generic`` when none does)."""
    from .._registry import _BACKBONES

    for name, spec in _BACKBONES.items():
        if name != "generic" and spec.match(model):
            return spec
    return _BACKBONES["generic"]
