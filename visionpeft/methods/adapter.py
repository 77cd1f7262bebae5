"""Serial bottleneck adapters (Houlsby and Pfeiffer placements).

Papers: "Parameter-Efficient Transfer Learning for NLP", Houlsby et al., 2019, arXiv:1902.00751
(adapters after the attention projection and after the MLP); "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning", Pfeiffer et al., 2021, arXiv:2005.00247 (after the MLP only).

Where it attaches: a forward hook on the attention module (its output is after the projection) and/or
the MLP replaces the output ``h`` with ``h + scale * up(act(down(h)))``, before the block's residual
addition. Initialisation: down Kaiming-uniform, up zero, so each adapter starts as the identity
(Houlsby et al. use a near-identity initialisation for the same reason).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import infer_features, resolve_targets
from ..config import MethodConfig
from ._base import AdapterLayer, Bottleneck, Method

_PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    """Args: bottleneck: hidden width. placement: ``"houlsby"`` or ``"pfeiffer"`` (ignored when
    ``targets`` is given). scale: output scale. dropout: on the hidden features."""

    bottleneck: int = 64
    placement: str = "houlsby"
    scale: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        self._positive(bottleneck=self.bottleneck)
        self._in_range("dropout", self.dropout, 0.0, 1.0)
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"AdapterConfig.placement must be one of {sorted(_PLACEMENTS)}, got {self.placement!r}")


class SerialAdapterLayer(AdapterLayer):
    """``out = h + scale * adapter(h)`` where ``h`` is the module output."""

    def __init__(self, channels: int, bottleneck: int, layout: str, scale: float, dropout: float, init_weights: bool):
        super().__init__()
        self.scale = scale
        self.adapter = Bottleneck(channels, channels, bottleneck, layout, nn.GELU(), dropout, init_weights)

    def after(self, module, args, kwargs, output):
        """output: (B, N, C), (B, H, W, C) or (B, C, H, W)."""
        return output + (self.scale * self.adapter(output)).to(output.dtype)


@register_method("adapter")
class Adapter(Method):
    config_cls = AdapterConfig
    paper = "Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751); AdapterFusion (arXiv:2005.00247)"
    default_roles = (("attn", "mlp"), ("mlp",))

    @classmethod
    def targets_for(cls, spec, cfg):
        if cfg.targets is not None:
            return list(cfg.targets)
        roles = [r for r in _PLACEMENTS[cfg.placement] if spec.has_role(r)]
        if not roles:
            raise ValueError(f"adapter: the {spec.name} spec has no attn / mlp roles; pass targets=[module names]")
        return roles

    @classmethod
    def build(cls, model, spec, cfg):
        modules = dict(model.named_modules())
        found = resolve_targets(
            model, spec, cls.targets_for(spec, cfg), cfg.exclude, cfg.layers, what="adapter targets"
        )
        out = []
        for name, role in found:
            m = modules[name]
            c = infer_features(m)[1]
            out.append(
                (
                    name,
                    SerialAdapterLayer(
                        c, cfg.bottleneck, spec.layout_of(role, m), cfg.scale, cfg.dropout, cfg.init_weights
                    ),
                )
            )
        return out
