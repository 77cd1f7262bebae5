"""timm ConvNeXt: stages ``stages.i``, blocks ``stages.i.blocks.j`` (NCHW in and out).

Inside a block the depthwise conv sees NCHW; the MLP sees NHWC (``conv_mlp=False``, timm's default)
or NCHW (``conv_mlp=True``, 1x1 convs).
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _is_convnext(model: nn.Module) -> bool:
    from timm.models.convnext import ConvNeXt

    return isinstance(model, ConvNeXt)


_B = r"stages\.\d+\.blocks\.\d+"

TIMM_CONVNEXT = register_backbone(
    BackboneSpec(
        name="timm_convnext",
        match=_is_convnext,
        roles={
            "stage": r"stages\.\d+",
            "block": _B,
            "conv_dw": _B + r"\.conv_dw",
            "mlp": _B + r"\.mlp",
            "mlp_in": _B + r"\.mlp\.fc1",
            "mlp_out": _B + r"\.mlp\.fc2",
            "norm": _B + r"\.norm",
            "stem": r"stem\.0",
        },
        # "mlp": NHWC as declared; BackboneSpec.layout_of reads NCHW off a conv_mlp=True MLP's first Conv2d
        layouts={"stage": "NCHW", "block": "NCHW", "conv_dw": "NCHW", "mlp": "NHWC"},
        default_layout="NCHW",
        head=classifier_at("head.fc"),
        # the MLP's output is unscaled (LayerScale is the block's ``gamma`` parameter, applied after it); it is
        # NHWC with Linear layers and NCHW with conv_mlp's 1x1 convolutions: the tap reads the layout per block
        taps={"mlp": Tap("mlp", "out", "drop_path", None, sink_layout="NCHW")},
        conv_tap=lambda block: Tap("conv_dw", "in", "conv_dw", "NCHW"),
        act_layer=nn.GELU,
    )
)
