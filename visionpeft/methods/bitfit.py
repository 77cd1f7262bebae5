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

import torch
import torch.nn as nn

from .._registry import register_method
from ..config import MethodConfig
from ._affine import channels_and_dim, non_head_sites, view_channels
from ._base import AdapterLayer, Method, random_init_


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """BitFit has no hyper-parameters beyond the shared ones (``targets`` default: every biased module)."""


class BiasLayer(AdapterLayer):
    mergeable = True

    def __init__(self, target: nn.Module, init_weights: bool):
        super().__init__()
        c, self.dim = channels_and_dim(target)
        self.bitfit_bias = nn.Parameter(torch.zeros(c, dtype=target.bias.dtype))
        if not init_weights:
            with torch.no_grad():
                random_init_(self.bitfit_bias, 0.1)

    def after(self, module, args, kwargs, output):
        return output + view_channels(self.bitfit_bias, self.dim, output.dim()).to(output.dtype)

    @torch.no_grad()
    def merge(self, target):
        target.bias.add_(self.bitfit_bias.to(target.bias.dtype))

    @torch.no_grad()
    def unmerge(self, target):
        target.bias.sub_(self.bitfit_bias.to(target.bias.dtype))


@register_method("bitfit")
class BitFit(Method):
    config_cls = BitFitConfig
    paper = "BitFit (arXiv:2106.10199)"
    mergeable = True

    @classmethod
    def build(cls, model, spec, cfg):
        modules = dict(model.named_modules())
        return [(n, BiasLayer(modules[n], cfg.init_weights)) for n, _ in non_head_sites(model, spec, cfg, "bitfit")]
