"""Baselines expressed through the same API: linear probing and full fine-tuning.

Linear probe: nothing is attached; only the ``modules_to_save`` (the classification head by default)
train. Full fine-tuning: every base parameter trains in place (the head as a saved copy), and
``save_adapter`` writes all of them, so both baselines run through the same code path as the methods.
"""

from __future__ import annotations

import dataclasses

from .._registry import register_method
from ..config import MethodConfig
from ._base import Method


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

    @classmethod
    def unsupported_reason(cls, model, spec, cfg):
        if model is not None and cfg.modules_to_save is None and not spec.head(model):
            return (
                "linear_probe needs a classification head (create the model with num_classes > 0) or modules_to_save"
            )
        return None

    @classmethod
    def build(cls, model, spec, cfg):
        return []


@register_method("full")
class FullFinetune(Method):
    config_cls = FullFinetuneConfig
    paper = "full fine-tuning baseline"
    mergeable = True
    trains_base = True

    @classmethod
    def build(cls, model, spec, cfg):
        return []

    @classmethod
    def base_parameters_to_train(cls, model, cfg):
        from ..backbones._spec import _pattern_matches

        names = []
        for n, _ in model.named_parameters():
            module = n.rsplit(".", 1)[0]
            if cfg.exclude and any(_pattern_matches(e, module) or _pattern_matches(e, n) for e in cfg.exclude):
                continue
            names.append(n)
        return names
