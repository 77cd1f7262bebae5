"""Linear probing: the baseline that trains only the classification head.

Nothing is attached; only the ``modules_to_save`` (the classification head by default) train, as a saved
copy, so the baseline runs through the same code path as the methods. A baseline of the PEFT papers
(e.g. VPT, Jia et al. 2022, arXiv:2203.12119, Table 1).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import BackboneSpec
from ..config import MethodConfig
from ._base import Method, Site, Variant


@dataclasses.dataclass
class LinearProbeConfig(MethodConfig):
    """Only ``modules_to_save`` (default: the head) train."""


@register_method("linear_probe")
class LinearProbe(Method):
    config_cls = LinearProbeConfig
    paper = "linear probing baseline"
    mergeable = True
    variants = (Variant("linear_probe", {}, lr=1e-1, paper={}, paper_lr=1e-2),)

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: LinearProbeConfig) -> str | None:
        if model is not None and cfg.modules_to_save is None and not spec.head(model):
            return (
                "linear_probe needs a classification head (create the model with num_classes > 0) or modules_to_save"
            )
        return None

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: LinearProbeConfig) -> list[Site]:
        return []

    @classmethod
    def param_count(cls, model: nn.Module, sites: list[Site], cfg: LinearProbeConfig) -> int:
        """Nothing beyond the head."""
        return 0
