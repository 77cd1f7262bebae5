"""timm RegNet (X / Y / Z-less: ``regnetx_*``, ``regnety_*``, ``regnetv_*``): stages ``s1..s4``, blocks
``sI.bJ``, NCHW.

A block is ``conv1`` (1x1), ``conv2`` (grouped 3x3, strided), optional squeeze-excitation, ``conv3``
(1x1), each a ``ConvNormAct`` whose convolution is ``convK.conv``; Conv-Adapter's ``conv`` level reads the
input of ``conv2`` and is summed after its norm + activation (as on a ResNet bottleneck).
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _is_regnet(model: nn.Module) -> bool:
    from timm.models.regnet import RegNet

    return isinstance(model, RegNet)


_B = r"s\d\.b\d+"

TIMM_REGNET = register_backbone(
    BackboneSpec(
        name="timm_regnet",
        match=_is_regnet,
        roles={
            "stage": r"s\d",
            "block": _B,
            "conv": _B + r"\.conv\d\.conv",
            "conv_mid": _B + r"\.conv2\.conv",  # the grouped 3x3 convolution
            "norm": _B + r"\.conv\d\.bn",
            "stem": r"stem\.conv",
        },
        layouts={"stage": "NCHW", "block": "NCHW", "conv": "NCHW", "conv_mid": "NCHW"},
        default_layout="NCHW",
        head=classifier_at("head.fc"),
        conv_tap=lambda block: Tap("conv2.conv", "in", "conv2", "NCHW"),
        act_layer=nn.ReLU,
    )
)
