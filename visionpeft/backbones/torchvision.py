"""torchvision classification backbones: ViT (``vit_b_16`` ...), Swin (v1: ``swin_t`` ...), ConvNeXt and ResNet.

- ViT: blocks ``encoder.layers.encoder_layer_i`` on (B, N, C) tokens with a class token in front; the
  attention is ``nn.MultiheadAttention``, whose packed input projection ``in_proj_weight`` (3C, C) and
  ``out_proj`` it reads itself: LoRA / DoRA target the attention module (role ``qkv``, q / k / v slices
  included) and supply the adapted weight during its forward. No LayerScale or DropPath: the attention
  branch is read at the block's ``dropout``, the MLP's at its output.
- Swin (v1): blocks ``features.i.j`` on (B, H, W, C) maps; the window attention reads ``qkv.weight`` and
  ``proj.weight`` itself (hosted weights). One ``stochastic_depth`` module serves both branches of a
  block, so adapters join the branch outputs before it. SwinV2 (post-norm blocks) has no spec.
- ConvNeXt: blocks ``features.i.j`` (``CNBlock``), NCHW outside and NHWC inside the block's
  ``Sequential`` (``block.0`` depthwise conv, ``block.2`` LayerNorm, ``block.3`` / ``block.5`` MLP Linears);
  the MLP's unscaled output is ``block.5``'s, the branch joins the stream after ``stochastic_depth``.
- ResNet: as timm's ResNet (``layerI.J``, ``conv1..3``, ``bn1..3``), except that one ReLU module serves the
  whole block, so Conv-Adapter's ``conv`` level sums after ``bn2`` (before the ReLU).
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _isinstance(path: str, name: str, model: nn.Module) -> bool:
    import importlib

    try:
        cls = getattr(importlib.import_module(path), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(model, cls)


def _is_tv_swin_v1(model: nn.Module) -> bool:
    if not _isinstance("torchvision.models.swin_transformer", "SwinTransformer", model):
        return False
    from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    return bool(blocks) and not any(isinstance(b, SwinTransformerBlockV2) for b in blocks)


_VB = r"encoder\.layers\.encoder_layer_\d+"

TV_VIT = register_backbone(
    BackboneSpec(
        name="tv_vit",
        match=lambda m: _isinstance("torchvision.models.vision_transformer", "VisionTransformer", m),
        roles={
            "block": _VB,
            "attn": _VB + r"\.self_attention",
            "qkv": _VB + r"\.self_attention",  # nn.MultiheadAttention: its packed in_proj_weight
            "attn_out": _VB + r"\.self_attention\.out_proj",
            "mlp": _VB + r"\.mlp",
            "mlp_in": _VB + r"\.mlp\.0",
            "mlp_out": _VB + r"\.mlp\.3",
            "norm": _VB + r"\.ln_[12]",
            "patch_embed": r"conv_proj",
            "final_norm": r"encoder\.ln",
        },
        layouts={r: "NLC" for r in ("block", "attn", "mlp")},
        default_layout="NLC",
        head=classifier_at("heads.head"),
        num_prefix_tokens=lambda m: 1,
        patch_size=lambda m: int(m.patch_size),
        taps={
            "attn": Tap("dropout", "in", "dropout"),
            "mlp": Tap("mlp", "out", "mlp"),
            "mlp_residual": Tap("ln_2", "in", "mlp"),
        },
    )
)

# stages sit at the odd indices of ``features`` (0: stem / patch embedding, even: down-sampling / patch merging)
_STAGE = r"features\.\d*[13579]"
_SB = _STAGE + r"\.\d+"

TV_SWIN = register_backbone(
    BackboneSpec(
        name="tv_swin",
        match=_is_tv_swin_v1,
        roles={
            "stage": _STAGE,
            "block": _SB,
            "attn": _SB + r"\.attn",
            "qkv": _SB + r"\.attn\.qkv",
            "attn_out": _SB + r"\.attn\.proj",
            "mlp": _SB + r"\.mlp",
            "mlp_in": _SB + r"\.mlp\.0",
            "mlp_out": _SB + r"\.mlp\.3",
            "norm": _SB + r"\.norm[12]",
            "patch_embed": r"features\.0\.0",
        },
        layouts={"stage": "NHWC", "block": "NHWC", "attn": "NHWC", "mlp": "NHWC"},
        default_layout="NHWC",
        head=classifier_at("head"),
        num_prefix_tokens=None,
        patch_size=lambda m: int(m.features[0][0].stride[0]),
        taps={
            "attn": Tap("attn", "out", "attn", "NHWC"),
            "mlp": Tap("mlp", "out", "mlp", "NHWC"),
            "mlp_residual": Tap("norm2", "in", "mlp", "NHWC"),
        },
        hosted_weights=_SB + r"\.attn\.(qkv|proj)",
    )
)

TV_CONVNEXT = register_backbone(
    BackboneSpec(
        name="tv_convnext",
        match=lambda m: _isinstance("torchvision.models.convnext", "ConvNeXt", m),
        roles={
            "stage": _STAGE,
            "block": _SB,
            "conv_dw": _SB + r"\.block\.0",
            "mlp_in": _SB + r"\.block\.3",
            "mlp_out": _SB + r"\.block\.5",
            "norm": _SB + r"\.block\.2",
            "stem": r"features\.0\.0",
        },
        layouts={"stage": "NCHW", "block": "NCHW", "conv_dw": "NCHW"},
        default_layout="NCHW",
        head=classifier_at("classifier.2"),
        # block.5's output: the MLP's, unscaled (layer_scale multiplies the Sequential's NCHW output)
        taps={"mlp": Tap("block.5", "out", "stochastic_depth", "NHWC", sink_layout="NCHW")},
        conv_tap=lambda block: Tap("block.0", "in", "block.0", "NCHW"),
        act_layer=nn.GELU,
    )
)


def _resnet_conv_tap(block: nn.Module) -> Tap:
    if hasattr(block, "conv3"):  # Bottleneck: around the 3x3 conv2, summed after bn2
        return Tap("conv2", "in", "bn2", "NCHW")
    return Tap("conv1", "in", "conv1", "NCHW")


_RB = r"layer\d\.\d+"

TV_RESNET = register_backbone(
    BackboneSpec(
        name="tv_resnet",
        match=lambda m: _isinstance("torchvision.models.resnet", "ResNet", m),
        roles={
            "stage": r"layer\d",
            "block": _RB,
            "conv": _RB + r"\.conv\d",
            "conv_mid": _RB + r"\.conv2",
            "norm": _RB + r"\.bn\d",
            "stem": r"conv1",
        },
        layouts={"stage": "NCHW", "block": "NCHW", "conv": "NCHW", "conv_mid": "NCHW"},
        default_layout="NCHW",
        head=classifier_at("fc"),
        conv_tap=_resnet_conv_tap,
        act_layer=nn.ReLU,
    )
)
