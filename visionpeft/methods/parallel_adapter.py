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

from .._registry import register_method
from ..config import MethodConfig
from ._base import Method
from .adaptformer import build_parallel


@dataclasses.dataclass
class ParallelAdapterConfig(MethodConfig):
    """Args: bottleneck: hidden width. scale: output scale s (the paper uses 4 on MLPs). dropout."""

    bottleneck: int = 64
    scale: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        self._positive(bottleneck=self.bottleneck)
        self._in_range("dropout", self.dropout, 0.0, 1.0)


@register_method("parallel_adapter")
class ParallelAdapter(Method):
    config_cls = ParallelAdapterConfig
    paper = "Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)"
    default_roles = (("mlp",),)

    @classmethod
    def build(cls, model, spec, cfg):
        return build_parallel(cls, model, spec, cfg, cfg.bottleneck, cfg.scale, cfg.dropout)
