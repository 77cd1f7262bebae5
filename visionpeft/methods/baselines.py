"""Baselines expressed through the same API: linear probing and full fine-tuning.

Linear probe: nothing is attached; only the ``modules_to_save`` (the classification head by default)
train. Full fine-tuning: every base parameter trains in place (the head as a saved copy), and
``save_adapter`` writes all of them, so both baselines run through the same code path as the methods.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones import detect_backbone
from ..backbones._spec import BackboneSpec, pattern_matches
from ..config import MethodConfig
from ._base import Method, Site, Variant


@dataclasses.dataclass
class LinearProbeConfig(MethodConfig):
    """Only ``modules_to_save`` (default: the head) train."""


@dataclasses.dataclass
class FullFinetuneConfig(MethodConfig):
    """Every base parameter trains (``exclude`` removes module-name patterns from the trained set)."""


@register_method("linear_probe")
class LinearProbe(Method):
    config_cls = LinearProbeConfig
    paper = "linear probing baseline"
    mergeable = True
    variants = (Variant("linear_probe", {}, lr=1e-1, paper={}),)

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


@register_method("full")
class FullFinetune(Method):
    config_cls = FullFinetuneConfig
    paper = "full fine-tuning baseline"
    mergeable = True
    trains_base = True
    variants = (Variant("full", {}, lr=3e-3, paper={}),)

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: FullFinetuneConfig) -> list[Site]:
        return []

    @classmethod
    def base_parameters_to_train(cls, model: nn.Module, cfg: FullFinetuneConfig) -> list[str]:
        names = []
        for n, _ in model.named_parameters():
            module = n.rsplit(".", 1)[0]
            if cfg.exclude and any(pattern_matches(e, module) or pattern_matches(e, n) for e in cfg.exclude):
                continue
            names.append(n)
        return names

    @classmethod
    def param_count(cls, model: nn.Module, sites: list[Site], cfg: FullFinetuneConfig) -> int:
        """Every base parameter outside the head (the head trains as a saved copy)."""
        saved = cfg.modules_to_save if cfg.modules_to_save is not None else detect_backbone(model).head(model)
        heads = tuple(n + "." for n in saved)
        names = cls.base_parameters_to_train(model, cfg)
        params = dict(model.named_parameters())
        return sum(params[n].numel() for n in names if not n.startswith(heads))
