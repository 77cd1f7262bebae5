"""timm VisionTransformer family (ViT, DeiT, DeiT-distilled) and timm's SAM ViT (``samvit_*``)."""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _vit_like(prefix: str = r"blocks\.\d+") -> dict[str, str]:
    return {
        "block": prefix,
        "attn": prefix + r"\.attn",
        "qkv": prefix + r"\.attn\.qkv",
        "attn_out": prefix + r"\.attn\.proj",
        "mlp": prefix + r"\.mlp",
        "mlp_in": prefix + r"\.mlp\.fc1",
        "mlp_out": prefix + r"\.mlp\.fc2",
        "norm": prefix + r"\.norm[12]",
        "patch_embed": r"patch_embed\.proj",
        "final_norm": r"norm|fc_norm",
    }


# LayerScale's input is the branch's unscaled output; DropPath's output is where the branch joins the stream
_VIT_TAPS = {
    "attn": Tap("ls1", "in", "drop_path1"),
    "mlp": Tap("ls2", "in", "drop_path2"),
    "mlp_residual": Tap("norm2", "in", "drop_path2"),
}


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _vit_heads(model: nn.Module) -> list[str]:
    heads = []
    for name in ("head", "head_dist"):
        if not _is_identity(getattr(model, name, None)):
            heads.append(name)
    return heads


def _patch(model: nn.Module) -> int:
    p = model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _is_samvit(model: nn.Module) -> bool:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    return isinstance(model, VisionTransformerSAM)


TIMM_VIT = register_backbone(
    BackboneSpec(
        name="timm_vit",
        match=_is_vit,
        roles=_vit_like(),
        layouts={r: "NLC" for r in ("block", "attn", "mlp")},
        default_layout="NLC",
        head=_vit_heads,
        num_prefix_tokens=lambda m: int(getattr(m, "num_prefix_tokens", 1)),
        patch_size=_patch,
        taps=_VIT_TAPS,
    )
)

TIMM_SAMVIT = register_backbone(
    BackboneSpec(
        name="timm_samvit",
        match=_is_samvit,
        roles={k: v for k, v in _vit_like().items() if k != "final_norm"},
        layouts={r: "NHWC" for r in ("block", "attn", "mlp")},
        default_layout="NHWC",
        head=classifier_at("head.fc"),
        num_prefix_tokens=None,  # blocks see (B, H, W, C) maps, windowed attention
        patch_size=_patch,
        taps={k: Tap(t.source, t.read, t.sink, "NHWC") for k, t in _VIT_TAPS.items()},
    )
)
