"""AdaptFormer: a parallel bottleneck beside the MLP.

Paper: "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", Chen et al., 2022,
arXiv:2205.13535.

Where it attaches: a forward hook on each block's MLP adds ``scale * up(ReLU(down(x)))`` to the MLP
output, where ``x`` is the MLP's input (the paper's official code feeds the pre-norm residual stream;
feeding the MLP's own input keeps the adapter a pure function of one module's input and output, which
is what makes it attachable by a hook and merge-free; the two differ only by the LayerNorm).
Initialisation (paper, "LoRA-style"): down Kaiming-uniform, up and biases zero, so the model is
unchanged at init. Defaults: bottleneck 64, scale 0.1 (the paper's setting).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import infer_features, resolve_targets
from ..config import MethodConfig
from ._base import AdapterLayer, Bottleneck, Method, first_tensor


@dataclasses.dataclass
class AdaptFormerConfig(MethodConfig):
    """Args: bottleneck: hidden width. scale: fixed output scale s. dropout: on the hidden features."""

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.0

    def validate(self) -> None:
        self._positive(bottleneck=self.bottleneck)
        self._in_range("dropout", self.dropout, 0.0, 1.0)


class ParallelAdapterLayer(AdapterLayer):
    """``out = f(x) + scale * adapter(x)`` around one module (shape-preserving in the spatial axes)."""

    def __init__(
        self, c_in: int, c_out: int, bottleneck: int, layout: str, scale: float, dropout: float, init_weights: bool
    ):
        super().__init__()
        self.scale = scale
        self.adapter = Bottleneck(c_in, c_out, bottleneck, layout, nn.ReLU(), dropout, init_weights)

    def after(self, module, args, kwargs, output):
        """x: the module input, (B, N, C) / (B, H, W, C) / (B, C, H, W); output of the same layout."""
        delta = self.adapter(first_tensor(args, kwargs))
        if delta.shape != output.shape:
            raise RuntimeError(
                f"parallel adapter output {tuple(delta.shape)} does not match the site output {tuple(output.shape)}; "
                f"choose a shape-preserving site (or conv_adapter for strided conv blocks)"
            )
        return output + (self.scale * delta).to(output.dtype)


def build_parallel(method: type[Method], model, spec, cfg, bottleneck: int, scale: float, dropout: float):
    modules = dict(model.named_modules())
    found = resolve_targets(
        model, spec, method.targets_for(spec, cfg), cfg.exclude, cfg.layers, what=f"{method.name} targets"
    )
    layers = []
    for name, role in found:
        m = modules[name]
        c_in, c_out = infer_features(m)
        layers.append(
            (
                name,
                ParallelAdapterLayer(
                    c_in, c_out, bottleneck, spec.layout_of(role, m), scale, dropout, cfg.init_weights
                ),
            )
        )
    return layers


@register_method("adaptformer")
class AdaptFormer(Method):
    config_cls = AdaptFormerConfig
    paper = "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (arXiv:2205.13535)"
    default_roles = (("mlp",),)

    @classmethod
    def build(cls, model, spec, cfg):
        return build_parallel(cls, model, spec, cfg, cfg.bottleneck, cfg.scale, cfg.dropout)
