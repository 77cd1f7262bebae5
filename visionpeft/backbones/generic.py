"""Fallback spec for any model: no roles, targets are module-name patterns; the head is
``model.get_classifier()`` when the model has one (timm's convention)."""

from __future__ import annotations

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec


def _head(model: nn.Module) -> list[str]:
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    try:
        clf = get()
    except Exception:  # noqa: BLE001 - some models need arguments; then there is no single head
        return []
    if clf is None or isinstance(clf, nn.Identity):
        return []
    return [n for n, m in model.named_modules() if m is clf and n][:1]


GENERIC = register_backbone(
    BackboneSpec(
        name="generic",
        match=lambda m: True,
        roles={},
        layouts={},
        default_layout="NCHW",
        head=_head,
    )
)
