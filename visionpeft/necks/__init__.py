"""Necks: multi-scale NCHW feature maps at strides 4, 8, 16, 32 from a (hooked) backbone.

``build_neck(name, backbone, **kwargs)`` returns a :class:`Neck`; call it as ``neck(backbone, x)``. Names:
``"native"`` (a hierarchical model's own stages), ``"simple_pyramid"`` (ViTDet's, for plain ViTs) and
``"vit_adapter"`` (ViT-Adapter's side network, for plain ViTs); ``None`` picks ``"simple_pyramid"`` for plain
ViTs and ``"native"`` otherwise.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from ._plain_vit import vit_kind
from .deform_attn import MSDeformAttn, ms_deform_attn
from .features import NativeNeck, Neck, SimplePyramidNeck, unwrap
from .vit_adapter import ViTAdapterNeck

NECKS = ("native", "simple_pyramid", "vit_adapter")

_CLASSES: dict[str, type[Neck]] = {
    "native": NativeNeck,
    "simple_pyramid": SimplePyramidNeck,
    "vit_adapter": ViTAdapterNeck,
}


def auto_neck(backbone: nn.Module) -> str:
    """The default neck of a backbone: ``"simple_pyramid"`` for plain ViTs, ``"native"`` otherwise."""
    return "simple_pyramid" if vit_kind(unwrap(backbone)) is not None else "native"


def build_neck(name: str | None, backbone: nn.Module, **kwargs: Any) -> Neck:
    """Build a neck for ``backbone``.

    Args:
        name: one of :data:`NECKS`, or ``None`` for :func:`auto_neck`'s choice.
        backbone: the timm model, or the ``PeftVisionModel`` around it (the neck reads its structure now and
            is called with it later; it does not keep it).
        **kwargs: the neck's options (see each class).

    Returns:
        The neck; ``neck.feature_info`` lists the channels and reductions of its four maps.

    Raises:
        ValueError: unknown name, or a backbone the neck cannot serve.
        TypeError: an option the neck does not take.
    """
    if name is None:
        name = auto_neck(backbone)
    if name not in _CLASSES:
        raise ValueError(f"unknown neck {name!r}; choose one of {', '.join(NECKS)} (or None for the default)")
    cls = _CLASSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "backbone")]
    bad = sorted(set(kwargs) - set(params))
    if bad:
        raise TypeError(
            f"neck {name!r} got unknown option(s) {', '.join(bad)}; it takes: {', '.join(params) or 'no options'}"
        )
    return cls(backbone, **kwargs)


__all__ = [
    "NECKS",
    "MSDeformAttn",
    "NativeNeck",
    "Neck",
    "SimplePyramidNeck",
    "ViTAdapterNeck",
    "auto_neck",
    "build_neck",
    "ms_deform_attn",
]
