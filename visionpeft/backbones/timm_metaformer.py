"""timm MetaFormer baselines (CAFormer, ConvFormer, PoolFormer-v2 ...): stages ``stages.i``, blocks
``stages.i.blocks.j``.

A block is ``x' = res_scale1(x) + layer_scale1(drop_path1(token_mixer(norm1(x))))`` and the same with
``mlp`` / ``norm2``. Convolutional stages (``SepConv`` / ``Pooling`` mixers, 1x1-conv MLPs) run on NCHW
maps; CAFormer's attention stages run on (B, N, C) tokens with Linear layers, so the layout of a site or
tap is read off the module of each block. The branch outputs (``token_mixer``, ``mlp``) are unscaled;
adapters join after ``layer_scale1`` / ``layer_scale2`` (which follow the DropPath). ``timm_caformer``
(models with attention mixers) adds the ``qkv`` role; on the others LoRA defaults to the MLP.
"""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at


def _mixers(model: nn.Module) -> list[type]:
    return [type(b.token_mixer) for s in model.stages for b in s.blocks]


def _is_metaformer(model: nn.Module, attention: bool) -> bool:
    from timm.models.metaformer import Attention, MetaFormer

    return isinstance(model, MetaFormer) and any(issubclass(t, Attention) for t in _mixers(model)) == attention


def _conv_tap(block: nn.Module) -> Tap:
    """ConvFormer's ``SepConv`` mixer: beside its depthwise convolution."""
    if not hasattr(block.token_mixer, "dwconv"):
        raise ValueError(
            f"conv_adapter level='conv': the {type(block.token_mixer).__name__} token mixer has no spatial "
            f"convolution; use level='block'"
        )
    return Tap("token_mixer.dwconv", "in", "token_mixer.dwconv", "NCHW")


_B = r"stages\.\d+\.blocks\.\d+"


def _roles(attention: bool) -> dict[str, str]:
    roles = {
        "stage": r"stages\.\d+",
        "block": _B,
        "attn": _B + r"\.token_mixer",
        "mlp": _B + r"\.mlp",
        "mlp_in": _B + r"\.mlp\.fc1",
        "mlp_out": _B + r"\.mlp\.fc2",
        "norm": _B + r"\.norm[12]",
        "stem": r"stem\.conv",
    }
    if attention:
        roles.update(qkv=_B + r"\.token_mixer\.qkv", attn_out=_B + r"\.token_mixer\.proj")
    return roles


_TAPS = {
    "attn": Tap("token_mixer", "out", "layer_scale1", None),
    "mlp": Tap("mlp", "out", "layer_scale2", None),
    "mlp_residual": Tap("norm2", "in", "layer_scale2", None),
}


def _spec(name: str, attention: bool) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        match=lambda m: _is_metaformer(m, attention),
        roles=_roles(attention),
        # stages take and return NCHW maps; CAFormer's attention blocks see (B, N, C) tokens: its block-level
        # roles are declared NLC and read NCHW off a first Conv2d (its ConvFormer stages)
        layouts={"stage": "NCHW", **{r: "NLC" if attention else "NCHW" for r in ("block", "attn", "mlp")}},
        default_layout="NCHW",
        head=classifier_at("head.fc"),
        num_prefix_tokens=None,
        taps=_TAPS,
        conv_tap=None if attention else _conv_tap,
        act_layer=nn.GELU,
    )


TIMM_CAFORMER = register_backbone(_spec("timm_caformer", attention=True))
TIMM_METAFORMER = register_backbone(_spec("timm_metaformer", attention=False))
