"""DoRA: weight-decomposed low-rank adaptation.

Paper: "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., 2024, arXiv:2402.09353.

Where it attaches: the same sites as LoRA (Linear, Conv2d, q/k/v slices of a fused qkv). The adapted
weight is ``W' = m * (W + s*B@A) / ||W + s*B@A||``, the norm taken per output channel. A forward hook
computes it from the module output without touching W:
``y' = (m / ||W + dW||) * (y - b + s*B(A(x))) + b``. As in the paper (section 4.3) the norm is treated
as a constant in the backward pass. Initialisation: LoRA's (B zero) and ``m = ||W||``, so the model is
unchanged at init.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .._registry import register_method
from ._base import first_tensor
from .lora import LoRA, LoRAConfig, LoRALayer, lora_sites


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: LoRA's (``rank``, ``alpha``, ``dropout``, ``qkv_slices``)."""


def _channel_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1)


class DoRALayer(LoRALayer):
    mergeable = True

    def __init__(self, target, rank, scaling, dropout, slices, init_weights):
        super().__init__(target, rank, scaling, dropout, slices, init_weights)
        with torch.no_grad():
            m = _channel_norm(target.weight.float())
            if not init_weights:
                m = m * (1 + 0.1 * torch.randn_like(m))
        self.dora_magnitude = nn.Parameter(m.to(target.weight.dtype))
        self._merge_norm: torch.Tensor | None = None

    def _shape(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if self.kind == "conv" else v

    def after(self, module, args, kwargs, output):
        x = first_tensor(args, kwargs)
        w = module.weight
        dw = self.delta_weight()
        norm = _channel_norm(w.to(dw.dtype) + dw).detach()
        scale = self._shape(self.dora_magnitude / norm, output).to(output.dtype)
        bias = module.bias
        if bias is not None:
            b = self._shape(bias, output).to(output.dtype)
            return scale * (output - b + self.delta_output(x).to(output.dtype)) + b
        return scale * (output + self.delta_output(x).to(output.dtype))

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        w = target.weight
        new = w.float() + self.delta_weight().float()
        norm = _channel_norm(new)
        self._merge_norm = norm
        scale = (self.dora_magnitude.float() / norm).view(-1, *([1] * (w.dim() - 1)))
        w.copy_((new * scale).to(w.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self._merge_norm is None:
            raise RuntimeError("DoRA layer is not merged")
        w = target.weight
        scale = (self.dora_magnitude.float() / self._merge_norm).view(-1, *([1] * (w.dim() - 1)))
        w.copy_((w.float() / scale - self.delta_weight().float()).to(w.dtype))
        self._merge_norm = None


@register_method("dora")
class DoRA(LoRA):
    config_cls = DoRAConfig
    paper = "DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"
    mergeable = True

    @classmethod
    def build(cls, model, spec, cfg):
        return [
            (name, DoRALayer(m, cfg.rank, cfg.scaling, cfg.dropout, slices, cfg.init_weights))
            for name, m, slices in lora_sites(model, spec, cfg, cls)
        ]
