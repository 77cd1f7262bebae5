"""Parallel adapter at any site.

Paper: "Towards a Unified View of Parameter-Efficient Transfer Learning", He et al., 2022,
arXiv:2110.04366 (the parallel adapter, PA).

Where it attaches: a forward hook on every target module (the MLP by default; ``attn`` or ``block``
are common alternatives) adds ``scale * up(ReLU(down(x)))`` computed from the module's input. Works on
channels-last token maps (Linear projections) and on NCHW maps (1x1 convolutions). Initialisation:
down Kaiming-uniform, up zero (identity at init).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import infer_features
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant
from ._bottleneck import ParallelBranch, bottleneck_params


@dataclasses.dataclass
class ParallelAdapterConfig(MethodConfig):
    """Args: bottleneck: hidden width. scale: output scale s (the paper uses 4 on MLPs). dropout."""

    bottleneck: int = 64
    scale: float = 1.0
    dropout: float = 0.0


@register_method("parallel_adapter")
class ParallelAdapter(Method):
    config_cls = ParallelAdapterConfig
    paper = "Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)"
    default_roles = (("mlp",),)
    variants = (
        Variant(
            "parallel_adapter",
            {"bottleneck": 16, "scale": 2.0},
            paper={"bottleneck": 8, "scale": 1.0},
            stem="parallel_adapter-b8",
            gain=(0.02, 0.10),
        ),
    )
    renamed_keys = {
        ".adapter.down.weight": ".parallel_adapter_down",
        ".adapter.down.bias": ".parallel_adapter_down_bias",
        ".adapter.up.weight": ".parallel_adapter_up",
        ".adapter.up.bias": ".parallel_adapter_up_bias",
    }

    @classmethod
    def make_layer(cls, site: Site, cfg: ParallelAdapterConfig) -> AdapterLayer:
        c_in, c_out = infer_features(site.module)
        return ParallelBranch(
            site.layout,
            prefix="parallel_adapter",
            c_in=c_in,
            c_out=c_out,
            hidden=cfg.bottleneck,
            act=nn.ReLU(),
            dropout=cfg.dropout,
            scale=cfg.scale,
            init_weights=cfg.init_weights,
        )

    @classmethod
    def site_params(cls, site: Site, cfg: ParallelAdapterConfig) -> int:
        return bottleneck_params(*infer_features(site.module), cfg.bottleneck)
