"""timm ResNet (BasicBlock / Bottleneck): stages ``layer1..4``, blocks ``layerI.J``, NCHW."""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _is_resnet(model: nn.Module) -> bool:
    from timm.models.resnet import ResNet

    return isinstance(model, ResNet)


def _conv_tap(block: nn.Module) -> Tap:
    """Bottleneck: around the 3x3 ``conv2``, summed after ``bn2`` + ReLU (Chen et al. 2022, ResNet-50);
    BasicBlock: beside the first (strided) 3x3 ``conv1``, summed with its output."""
    if hasattr(block, "conv3"):
        return Tap("conv2", "in", "act2", "NCHW")
    return Tap("conv1", "in", "conv1", "NCHW")


_B = r"layer\d\.\d+"

TIMM_RESNET = register_backbone(
    BackboneSpec(
        name="timm_resnet",
        match=_is_resnet,
        roles={
            "stage": r"layer\d",
            "block": _B,
            "conv": _B + r"\.conv\d",
            "conv_mid": _B + r"\.conv2",  # the 3x3 conv of a Bottleneck / the second of a BasicBlock
            "norm": _B + r"\.bn\d",
            "stem": r"conv1",
        },
        layouts={"stage": "NCHW", "block": "NCHW", "conv": "NCHW", "conv_mid": "NCHW"},
        default_layout="NCHW",
        head=classifier_at("fc"),
        conv_tap=_conv_tap,
        act_layer=nn.ReLU,
    )
)
