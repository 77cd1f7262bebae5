"""Conv-Adapter for convolutional backbones (ConvNeXt, ResNet).

Paper: "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets", Chen et al., 2022,
arXiv:2208.07463.

Where it attaches: at a ``level`` of the network, a forward hook on a module that maps NCHW to NCHW:
``"conv"`` (the spatial conv of each block: ResNet's ``conv2``, ConvNeXt's depthwise ``conv_dw``),
``"block"`` (each residual block) or ``"stage"`` (each stage). The adapter is a depthwise k x k conv,
a point-wise down-projection to the bottleneck width, ReLU and a point-wise up-projection.
``mode="parallel"`` computes it from the site's input (the depthwise conv takes the site's stride,
so strided blocks work) and adds it to the output; ``mode="sequential"`` applies it to the output
as a residual, ``h + adapter(h)``. Initialisation: depthwise and down Kaiming-uniform, up zero
(identity at init).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import infer_features, resolve_targets
from ..config import MethodConfig
from ._base import AdapterLayer, Method, first_tensor, lora_init_, random_init_

_LEVEL_ROLES = {"conv": ("conv_dw", "conv_mid"), "block": ("block",), "stage": ("stage",)}


@dataclasses.dataclass
class ConvAdapterConfig(MethodConfig):
    """Args: level: ``"conv"``, ``"block"`` or ``"stage"``. mode: ``"parallel"`` or ``"sequential"``.
    bottleneck: hidden width (``None``: ``C_in // reduction``). reduction: the paper's compression
    factor gamma. kernel_size: of the depthwise conv. scale: output scale."""

    level: str = "block"
    mode: str = "parallel"
    bottleneck: int | None = None
    reduction: int = 4
    kernel_size: int = 3
    scale: float = 1.0

    def validate(self) -> None:
        if self.level not in _LEVEL_ROLES:
            raise ValueError(f"ConvAdapterConfig.level must be one of {sorted(_LEVEL_ROLES)}, got {self.level!r}")
        if self.mode not in ("parallel", "sequential"):
            raise ValueError(f"ConvAdapterConfig.mode must be 'parallel' or 'sequential', got {self.mode!r}")
        if self.bottleneck is not None:
            self._positive(bottleneck=self.bottleneck)
        self._positive(reduction=self.reduction, kernel_size=self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ConvAdapterConfig.kernel_size must be odd, got {self.kernel_size}")


class ConvAdapterLayer(AdapterLayer):
    def __init__(self, c_in: int, c_out: int, hidden: int, k: int, mode: str, scale: float, init_weights: bool):
        super().__init__()
        self.mode, self.scale, self.k = mode, scale, k
        self.conv_adapter_dw = nn.Parameter(torch.empty(c_in, 1, k, k))
        self.conv_adapter_down = nn.Parameter(torch.empty(hidden, c_in, 1, 1))
        self.conv_adapter_up = nn.Parameter(torch.zeros(c_out, hidden, 1, 1))
        self.conv_adapter_up_bias = nn.Parameter(torch.zeros(c_out))
        with torch.no_grad():
            lora_init_(self.conv_adapter_dw)
            lora_init_(self.conv_adapter_down)
            if not init_weights:
                random_init_(self.conv_adapter_up, 0.1)
                random_init_(self.conv_adapter_up_bias, 0.1)

    def adapter(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        h = F.conv2d(x, self.conv_adapter_dw, None, stride, self.k // 2, 1, x.shape[1])
        h = F.relu(F.conv2d(h, self.conv_adapter_down))
        return F.conv2d(h, self.conv_adapter_up, self.conv_adapter_up_bias)

    def after(self, module, args, kwargs, output):
        if self.mode == "sequential":
            return output + (self.scale * self.adapter(output.to(self.conv_adapter_dw.dtype), 1)).to(output.dtype)
        x = first_tensor(args, kwargs)
        stride = max(1, round(x.shape[-2] / output.shape[-2]))
        delta = self.adapter(x.to(self.conv_adapter_dw.dtype), stride)
        if delta.shape != output.shape:
            raise RuntimeError(
                f"conv_adapter output {tuple(delta.shape)} does not match the site output {tuple(output.shape)}"
            )
        return output + (self.scale * delta).to(output.dtype)


@register_method("conv_adapter")
class ConvAdapter(Method):
    config_cls = ConvAdapterConfig
    paper = "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets (arXiv:2208.07463)"
    default_roles = (("block",),)

    @classmethod
    def _role(cls, spec, cfg) -> str | None:
        for r in _LEVEL_ROLES[cfg.level]:
            if spec.has_role(r):
                return r
        return None

    @classmethod
    def unsupported_reason(cls, model, spec, cfg):
        if cfg.targets is not None:
            return None
        role = cls._role(spec, cfg)
        if role is None:
            wanted = "/".join(_LEVEL_ROLES[cfg.level])
            return f"conv_adapter level={cfg.level!r} needs a {wanted} role, which {spec.name} lacks"
        if spec.layouts.get(role) != "NCHW":
            return f"conv_adapter needs NCHW feature maps; {spec.name} {role}s use {spec.layouts.get(role)}"
        return None

    @classmethod
    def targets_for(cls, spec, cfg):
        if cfg.targets is not None:
            return list(cfg.targets)
        reason = cls.unsupported_reason(None, spec, cfg)
        if reason:
            raise ValueError(reason)
        return [cls._role(spec, cfg)]

    @classmethod
    def build(cls, model, spec, cfg):
        modules = dict(model.named_modules())
        found = resolve_targets(
            model, spec, cls.targets_for(spec, cfg), cfg.exclude, cfg.layers, what="conv_adapter targets"
        )
        out = []
        for name, role in found:
            m = modules[name]
            if spec.layout_of(role, m) != "NCHW":
                raise ValueError(f"conv_adapter needs NCHW feature maps; {name} uses {spec.layout_of(role, m)}")
            c_in, c_out = infer_features(m)
            if cfg.mode == "sequential":
                c_in = c_out
            hidden = cfg.bottleneck or max(1, c_in // cfg.reduction)
            out.append(
                (name, ConvAdapterLayer(c_in, c_out, hidden, cfg.kernel_size, cfg.mode, cfg.scale, cfg.init_weights))
            )
        return out
