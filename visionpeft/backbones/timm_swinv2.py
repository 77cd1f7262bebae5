"""timm Swin Transformer V2: stages ``layers.i``, blocks ``layers.i.blocks.j`` on (B, H, W, C) maps.

SwinV2 blocks are post-norm, ``x + drop_path1(norm1(attn(x)))`` and ``x + drop_path2(norm2(mlp(x)))``
with the MLP on (B, L, C); there is no LayerScale, so the branch outputs are read at the inputs of
``drop_path1`` / ``drop_path2`` and the MLP sub-block's residual stream at the MLP's input. The window
attention reads its ``qkv`` weight with ``F.linear`` (separate q / v biases): a hosted weight.
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at
from .timm_swin import SWIN_ROLES


def _is_swinv2(model: nn.Module) -> bool:
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return isinstance(model, SwinTransformerV2)


TIMM_SWINV2 = register_backbone(
    BackboneSpec(
        name="timm_swinv2",
        match=_is_swinv2,
        roles=SWIN_ROLES,
        layouts={"stage": "NHWC", "block": "NHWC", "attn": "NLC", "mlp": "NLC"},
        default_layout="NHWC",
        head=classifier_at("head.fc"),
        num_prefix_tokens=None,  # windowed attention on (B, H, W, C) maps
        patch_size=lambda m: int(m.patch_embed.patch_size[0]),
        taps={
            "attn": Tap("drop_path1", "in", "drop_path1", "NHWC"),
            "mlp": Tap("drop_path2", "in", "drop_path2", "NLC"),
            "mlp_residual": Tap("mlp", "in", "drop_path2", "NLC"),
        },
        hosted_weights=SWIN_ROLES["qkv"],
    )
)
