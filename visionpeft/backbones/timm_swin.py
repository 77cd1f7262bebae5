"""timm Swin Transformer (v1): stages ``layers.i``, blocks ``layers.i.blocks.j`` on (B, H, W, C) maps."""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return isinstance(model, SwinTransformer)


_B = r"layers\.\d+\.blocks\.\d+"
# the module names of timm's Swin blocks, shared by v1 and v2
SWIN_ROLES = {
    "stage": r"layers\.\d+",
    "block": _B,
    "attn": _B + r"\.attn",
    "qkv": _B + r"\.attn\.qkv",
    "attn_out": _B + r"\.attn\.proj",
    "mlp": _B + r"\.mlp",
    "mlp_in": _B + r"\.mlp\.fc1",
    "mlp_out": _B + r"\.mlp\.fc2",
    "norm": _B + r"\.norm[12]",
    "patch_embed": r"patch_embed\.proj",
}

TIMM_SWIN = register_backbone(
    BackboneSpec(
        name="timm_swin",
        match=_is_swin,
        roles=SWIN_ROLES,
        # WindowAttention sees (num_windows*B, window_area, C); blocks and MLPs (B, H, W, C)
        layouts={"stage": "NHWC", "block": "NHWC", "attn": "NLC", "mlp": "NHWC"},
        default_layout="NHWC",
        head=classifier_at("head.fc"),
        num_prefix_tokens=None,
        patch_size=lambda m: int(m.patch_embed.patch_size[0]),
        # no LayerScale; DropPath sees the window-reversed attention output (B, H, W, C) and the MLP's (B, L, C)
        taps={
            "attn": Tap("drop_path1", "in", "drop_path1", "NHWC"),
            "mlp": Tap("drop_path2", "in", "drop_path2", "NLC"),
            "mlp_residual": Tap("norm2", "in", "drop_path2", "NLC"),
        },
    )
)
