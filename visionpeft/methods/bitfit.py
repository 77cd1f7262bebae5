"""BitFit: train only the bias terms.

Paper: "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
Ben Zaken et al., 2022, arXiv:2106.10199.

Where it attaches: a forward hook on every module that has a bias (Linear, Conv2d, LayerNorm,
BatchNorm ...; the head is trained whole through ``modules_to_save``) adds a trainable per-channel
``bitfit_bias`` to the output. Training it is exactly training the module's bias, while the base
weights stay frozen and untouched; merging adds it to the bias. Initialisation: zero (identity).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .._registry import register_method
from ..config import MethodConfig
from ._affine import channels_and_dim, non_head_sites, view_channels
from ._base import AdapterLayer, Method, Site, Variant, random_init_


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no hyper-parameters beyond the shared ones (``targets`` default: every biased module)."""


class BiasLayer(AdapterLayer):
    before_activation = True  # on BatchNormAct2d: the affine output, so the merge is exact

    def __init__(self, target: nn.Module, init_weights: bool) -> None:
        super().__init__()
        c, self.dim = channels_and_dim(target)
        self.bitfit_bias = nn.Parameter(torch.zeros(c, dtype=target.bias.dtype))
        if not init_weights:
            with torch.no_grad():
                random_init_(self.bitfit_bias, 0.1)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output + view_channels(self.bitfit_bias, self.dim, output.dim()).to(output.dtype)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        target.bias.add_(self.bitfit_bias.to(target.bias.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        target.bias.sub_(self.bitfit_bias.to(target.bias.dtype))


@register_method("bitfit")
class BitFit(Method):
    config_cls = BitFitConfig
    paper = "BitFit (arXiv:2106.10199)"
    mergeable = True
    variants = (Variant("bitfit", {}, lr=1e-2, paper={}, gain=(0.006, 0.03)),)  # 3e-2 overshoots (head frozen)

    @classmethod
    def sites(cls, model: nn.Module, spec: Any, cfg: BitFitConfig) -> list[Site]:
        return non_head_sites(model, spec, cfg, "bitfit")

    @classmethod
    def make_layer(cls, site: Site, cfg: BitFitConfig) -> AdapterLayer:
        return BiasLayer(site.module, cfg.init_weights)

    @classmethod
    def site_params(cls, site: Site, cfg: BitFitConfig) -> int:
        """One bias per output channel of every biased module."""
        return site.module.bias.numel()
