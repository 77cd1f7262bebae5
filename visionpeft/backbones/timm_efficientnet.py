"""timm EfficientNet (B0-B7, V2, Lite, MixNet ...) and MobileNet-V3: stages ``blocks.i``, blocks ``blocks.i.j``, NCHW.

The blocks are timm's ``ConvBnAct``, ``DepthwiseSeparableConv``, ``InvertedResidual`` and ``EdgeResidual``:
``conv*`` children (``conv_pw``, ``conv_dw``, ``conv_pwl``, ``conv_exp``, ``conv``) with a ``bn*``
norm + activation (``BatchNormAct2d``) after each; squeeze-excitation convs (``se.conv_reduce`` /
``se.conv_expand``) are not part of the ``conv`` role. Conv-Adapter's ``conv`` level sits beside the
block's spatial (k x k) convolution: it reads that conv's input and is summed after its norm + activation.
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap


def _is_efficientnet(model: nn.Module) -> bool:
    from timm.models.efficientnet import EfficientNet

    return isinstance(model, EfficientNet)


def _is_mobilenetv3(model: nn.Module) -> bool:
    from timm.models.mobilenetv3 import MobileNetV3

    return isinstance(model, MobileNetV3)


def spatial_conv_tap(block: nn.Module) -> Tap:
    """The block's first k x k (k > 1) convolution child, else its first convolution child (a 1x1
    ``ConvBnAct``), and the norm child after it (whose output is the convolution's after norm + activation)."""
    children = list(block.named_children())
    convs = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"conv_adapter level='conv': {type(block).__name__} has no convolution child; use level='block'"
        )
    i = next((j for j in convs if max(children[j][1].kernel_size) > 1), convs[0])
    name = children[i][0]
    norm = next((n for n, c in children[i + 1 :] if isinstance(c, (nn.BatchNorm2d, nn.GroupNorm))), name)
    return Tap(name, "in", norm, "NCHW")


def _head(model: nn.Module) -> list[str]:
    return [] if isinstance(model.classifier, nn.Identity) else ["classifier"]


_B = r"blocks\.\d+\.\d+"


def _spec(name: str, match, act: type[nn.Module]) -> BackboneSpec:  # noqa: ANN001
    return BackboneSpec(
        name=name,
        match=match,
        roles={
            "stage": r"blocks\.\d+",
            "block": _B,
            "conv": _B + r"\.conv(_\w+)?",
            "conv_dw": _B + r"\.conv_dw",
            "conv_pw": _B + r"\.conv_(pw|pwl)",
            "norm": _B + r"\.bn\d",
            "stem": r"conv_stem",
        },
        layouts={"stage": "NCHW", "block": "NCHW", "conv": "NCHW", "conv_dw": "NCHW", "conv_pw": "NCHW"},
        default_layout="NCHW",
        head=_head,
        conv_tap=spatial_conv_tap,
        act_layer=act,
    )


TIMM_EFFICIENTNET = register_backbone(_spec("timm_efficientnet", _is_efficientnet, nn.SiLU))
TIMM_MOBILENETV3 = register_backbone(_spec("timm_mobilenetv3", _is_mobilenetv3, nn.Hardswish))
