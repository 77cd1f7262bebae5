"""SSF: scaling and shifting the deep features.

Paper: "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", Lian et al.,
2022, arXiv:2210.08823.

Where it attaches: a forward hook after every operation with a channel-wise affine output (Linear
projections qkv / proj / fc1 / fc2, convolutions, LayerNorm / BatchNorm; the head excluded), with or
without a bias (timm builds ``qkv`` without one when ``qkv_bias=False``), replaces the output ``y`` by
``gamma * y + beta`` (per channel). Because the preceding operation is linear in its weight and bias, it
merges exactly: ``W' = gamma * W``, ``b' = gamma * b + beta`` (merging gives a bias-free layer a bias,
and unmerging removes it again). Initialisation (paper's code): ``gamma ~ N(1, 0.02)``,
``beta ~ N(0, 0.02)``, so the output moves slightly at init.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .._registry import register_method
from ..config import MethodConfig
from ._affine import channels_and_dim, has_channels, non_head_sites, scale_rows_, view_channels
from ._base import AdapterLayer, Method, Site, Variant


@dataclasses.dataclass
class SSFConfig(MethodConfig):
    """SSF has no hyper-parameters beyond the shared ones (``targets`` default: every affine op)."""


class SSFLayer(AdapterLayer):
    before_activation = True  # on BatchNormAct2d: the affine output, so the merge is exact

    def __init__(self, target: nn.Module, init_weights: bool) -> None:
        super().__init__()
        c, self.dim = channels_and_dim(target)
        std = 0.02 if init_weights else 0.2
        self.ssf_scale = nn.Parameter(torch.normal(1.0, std, (c,)).to(target.weight.dtype))
        self.ssf_shift = nn.Parameter(torch.normal(0.0, std, (c,)).to(target.weight.dtype))
        self._created_bias = False

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        g = view_channels(self.ssf_scale, self.dim, output.dim()).to(output.dtype)
        b = view_channels(self.ssf_shift, self.dim, output.dim()).to(output.dtype)
        return output * g + b

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        scale_rows_(target.weight, self.ssf_scale)
        if target.bias is None:  # the shift needs a bias to live in
            target.bias = nn.Parameter(
                torch.zeros_like(self.ssf_shift, dtype=target.weight.dtype), requires_grad=False
            )
            self._created_bias = True
        target.bias.mul_(self.ssf_scale.to(target.bias.dtype)).add_(self.ssf_shift.to(target.bias.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self._created_bias:
            target.bias = None
            self._created_bias = False
        else:
            target.bias.sub_(self.ssf_shift.to(target.bias.dtype)).div_(self.ssf_scale.to(target.bias.dtype))
        scale_rows_(target.weight, 1.0 / self.ssf_scale)


@register_method("ssf")
class SSF(Method):
    config_cls = SSFConfig
    paper = "Scaling & Shifting Your Features (arXiv:2210.08823)"
    mergeable = True
    identity_at_init = False
    variants = (Variant("ssf", {}, lr=3e-2, paper={}, gain=(0.009, 0.06)),)

    @classmethod
    def sites(cls, model: nn.Module, spec: Any, cfg: SSFConfig) -> list[Site]:
        return non_head_sites(model, spec, cfg, "ssf", accept=has_channels)

    @classmethod
    def make_layer(cls, site: Site, cfg: SSFConfig) -> AdapterLayer:
        return SSFLayer(site.module, cfg.init_weights)

    @classmethod
    def site_params(cls, site: Site, cfg: SSFConfig) -> int:
        """A scale and a shift per output channel: ``2 * C``."""
        return 2 * channels_and_dim(site.module)[0]
