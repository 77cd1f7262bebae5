"""Full fine-tuning: the baseline that trains every base parameter.

Every base parameter trains in place (the head as a saved copy), and ``save_adapter`` writes all of them
(``base_model.<name>``), so the baseline runs through the same code path as the methods. A baseline of
the PEFT papers (e.g. VPT, Jia et al. 2022, arXiv:2203.12119, Table 1).
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
class FullFinetuneConfig(MethodConfig):
    """Every base parameter trains (``exclude`` removes module-name patterns from the trained set)."""


@register_method("full")
class FullFinetune(Method):
    config_cls = FullFinetuneConfig
    paper = "full fine-tuning baseline"
    mergeable = True
    trains_base = True
    variants = (Variant("full", {}, lr=3e-3, paper={}, paper_lr=1e-4, gain=(0.03, 0.19)),)

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: FullFinetuneConfig) -> list[Site]:
        return []

    @classmethod
    def base_parameters_to_train(cls, model: nn.Module, cfg: FullFinetuneConfig) -> list[str]:
        spec = detect_backbone(model)
        frozen = tuple(p + "." for p in spec.frozen(model)) if spec.frozen is not None else ()
        names = []
        for n, _ in model.named_parameters():
            if n.startswith(frozen):  # SAM's prompt encoder: trained only when modules_to_save names it
                continue
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
