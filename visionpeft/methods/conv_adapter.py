"""Conv-Adapter for convolutional backbones (ResNet, ConvNeXt), as the authors published it.

Paper: "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets", Chen et al., 2022,
arXiv:2208.07463 (CVPR 2024 Prompting in Vision workshop).

The adapter: a grouped k x k convolution from C_in to C_in / gamma channels (groups = C_in / gamma, with
bias, the stride of the adapted convolution), the backbone's activation (ReLU on ResNet, GELU on
ConvNeXt), a 1 x 1 convolution up to C_out (with bias), times a learned per-channel scale initialised to
1. Parameters per site: ``C_in*k*k + C_in/gamma + (C_in/gamma)*C_out + 2*C_out``. Convolutions are
initialised like the authors' backbones initialise theirs (Kaiming-normal, fan-out, biases zero), so the
output changes at init, as in the paper.

Where it attaches, the paper's four placements (``level`` x ``mode``):
- ``level="conv"`` (the paper's best, default): beside each block's spatial k x k convolution. On a
  ResNet bottleneck the adapter reads the input of ``conv2`` and its output is summed after ``bn2`` +
  ReLU; on a BasicBlock it sits beside the first (strided) conv; on ConvNeXt it reads the block input and
  is added to the depthwise convolution's output.
- ``level="block"``: beside each residual block (reads the block input, added to its output); ``"stage"``
  does the same per stage.
- ``mode="parallel"`` (default) as above; ``mode="sequential"``: the adapter takes the output ``h`` of the
  convolution (after its norm and activation) or of the block, ``h + A(h)``.
Strides come from the adapted modules (convolutions and pools), never from tensor shapes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import BackboneSpec, Tap, infer_features, spatial_stride
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, TapHooks, Variant

_LEVELS = ("conv", "block", "stage")
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclasses.dataclass
class ConvAdapterConfig(MethodConfig):
    """Args: level: ``"conv"``, ``"block"`` or ``"stage"``. mode: ``"parallel"`` or ``"sequential"``.
    reduction: the paper's compression factor gamma (hidden width C_in / gamma). kernel_size: of the
    grouped convolution. act: ``"relu"`` / ``"gelu"``; ``None`` = the backbone's own activation."""

    level: str = "conv"
    mode: str = "parallel"
    reduction: int = 4
    kernel_size: int = 3
    act: str | None = None

    def validate(self) -> None:
        self._one_of("level", self.level, _LEVELS)
        self._one_of("mode", self.mode, ("parallel", "sequential"))
        if self.act is not None:
            self._one_of("act", self.act, tuple(_ACTS))
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ConvAdapterConfig.kernel_size must be odd, got {self.kernel_size}")


def _hidden_and_groups(c_in: int, reduction: int) -> tuple[int, int]:
    hidden = max(1, c_in // reduction)
    return hidden, math.gcd(c_in, hidden)


def adapter_params(c_in: int, c_out: int, k: int, reduction: int) -> int:
    """``C_in*k*k + h + h*C_out + 2*C_out`` with ``h = C_in / gamma`` (groups = h when gamma divides C_in)."""
    hidden, groups = _hidden_and_groups(c_in, reduction)
    return hidden * (c_in // groups) * k * k + hidden + hidden * c_out + 2 * c_out


class ConvAdapterLayer(TapHooks, AdapterLayer):
    """Grouped k x k conv, activation, 1 x 1 conv, per-channel scale; reads ``tap.source``, adds at ``tap.sink``.

    Args:
        tap: where inside the site module the input is read and the output added (``source == sink == ""``
            means the site module itself). c_in, c_out: channels. stride: of the grouped conv.
        k, reduction: kernel size and gamma. act: activation module. init_weights: ``False`` also
        randomises the biases and the scale.
    """

    def __init__(
        self, tap: Tap, c_in: int, c_out: int, stride: int, k: int, reduction: int, act: nn.Module, init_weights: bool
    ) -> None:
        super().__init__()
        hidden, groups = _hidden_and_groups(c_in, reduction)
        self.tap, self.stride, self.groups, self.k, self.act = tap, stride, groups, k, act
        self.conv_adapter_down = nn.Parameter(torch.empty(hidden, c_in // groups, k, k))
        self.conv_adapter_down_bias = nn.Parameter(torch.zeros(hidden))
        self.conv_adapter_up = nn.Parameter(torch.empty(c_out, hidden, 1, 1))
        self.conv_adapter_up_bias = nn.Parameter(torch.zeros(c_out))
        self.conv_adapter_scale = nn.Parameter(torch.ones(c_out))
        with torch.no_grad():
            nn.init.kaiming_normal_(self.conv_adapter_down, mode="fan_out", nonlinearity="relu")
            nn.init.kaiming_normal_(self.conv_adapter_up, mode="fan_out", nonlinearity="relu")
            if not init_weights:
                for p in (self.conv_adapter_down_bias, self.conv_adapter_up_bias):
                    nn.init.normal_(p, std=0.1)
                self.conv_adapter_scale.add_(torch.randn_like(self.conv_adapter_scale) * 0.1)
        self._stash = None

    def adapter(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        x = x.to(self.conv_adapter_down.dtype)
        h = F.conv2d(x, self.conv_adapter_down, self.conv_adapter_down_bias, stride, self.k // 2, 1, self.groups)
        h = F.conv2d(self.act(h), self.conv_adapter_up, self.conv_adapter_up_bias)
        return h * self.conv_adapter_scale.view(1, -1, 1, 1)

    def contribution(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(x, self.stride if self.tap.read == "in" else 1)
        if delta.shape != output.shape:
            raise RuntimeError(
                f"conv_adapter output {tuple(delta.shape)} does not match the site output {tuple(output.shape)}"
            )
        return delta


@register_method("conv_adapter")
class ConvAdapter(Method):
    config_cls = ConvAdapterConfig
    paper = "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets (arXiv:2208.07463)"
    identity_at_init = False
    variants = (
        Variant(
            "conv_adapter",
            {},
            lr=2e-2,
            backbone="resnet",
            paper={"reduction": 4},
            stem="conv_adapter-conv-par",
            gain=(None, 0.035),
            why="the ResNet's head alone reaches ~94%: the accuracy gain is a few of the 750 images, within noise",
        ),
        Variant(
            "conv_adapter_conv_seq",
            {"mode": "sequential"},
            lr=1e-2,
            backbone="resnet",
            paper={"mode": "sequential", "reduction": 4},
            stem="conv_adapter-conv-seq",
            gain=(0.004, 0.06),
        ),
        Variant(
            "conv_adapter_block",
            {"level": "block"},
            lr=5e-3,
            backbone="resnet",
            paper={"level": "block", "reduction": 4},
            stem="conv_adapter-block-par",
            gain=(None, 0.05),
            why="the ResNet's head alone reaches ~94%: the accuracy gain is a few of the 750 images, within noise",
        ),
        Variant(
            "conv_adapter_stage_seq",
            {"level": "stage", "mode": "sequential"},
            lr=5e-3,
            backbone="resnet",
            gain=(None, 0.07),
            why="the ResNet's head alone reaches ~94%: the accuracy gain is a few of the 750 images, within noise",
        ),
    )

    @classmethod
    def upgrade_v1(cls, config: dict, tensors: dict) -> tuple[dict, dict]:
        raise ValueError(
            "conv_adapter files of format 1 hold the earlier (depthwise, bias-free, fixed-scale) module, which "
            "is not the published Conv-Adapter; retrain the adapter with this version"
        )

    @classmethod
    def _role(cls, spec: BackboneSpec, cfg: ConvAdapterConfig) -> str | None:
        role = "block" if cfg.level == "conv" else cfg.level
        return role if spec.has_role(role) else None

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: ConvAdapterConfig) -> str | None:
        if cfg.targets is not None:
            return None
        role = cls._role(spec, cfg)
        if role is None or (cfg.level == "conv" and spec.conv_tap is None):
            return (
                f"conv_adapter level={cfg.level!r} needs conv blocks with a spatial convolution; {spec.name} has none"
            )
        if spec.layouts.get(role) != "NCHW":
            return f"conv_adapter needs NCHW feature maps; {spec.name} {role}s use {spec.layouts.get(role)}"
        return None

    @classmethod
    def default_targets(cls, spec: BackboneSpec, cfg: ConvAdapterConfig) -> list[str] | None:
        role = cls._role(spec, cfg)
        return [role] if role is not None else None

    @classmethod
    def _geometry(cls, site: Site, cfg: ConvAdapterConfig) -> tuple[Tap, int, int, int]:
        """(tap, C_in, C_out, stride) of a site."""
        m = site.module
        if cfg.level == "conv" and cfg.targets is None:
            tap = site.spec.conv_tap(m)
            conv = m.get_submodule(tap.source)
            c_in, c_out, stride = conv.in_channels, conv.out_channels, spatial_stride(conv)
        else:
            tap = Tap("", "in", "", "NCHW")
            (c_in, c_out), stride = infer_features(m), spatial_stride(m)
        if cfg.mode == "sequential":
            tap = Tap(tap.sink, "out", tap.sink, "NCHW")
            c_in, stride = c_out, 1
        return tap, c_in, c_out, stride

    @classmethod
    def make_layer(cls, site: Site, cfg: ConvAdapterConfig) -> AdapterLayer:
        if site.layout != "NCHW":
            raise ValueError(f"conv_adapter needs NCHW feature maps; {site.name} uses {site.layout}")
        tap, c_in, c_out, stride = cls._geometry(site, cfg)
        act = _ACTS[cfg.act]() if cfg.act is not None else site.spec.act_layer()
        return ConvAdapterLayer(tap, c_in, c_out, stride, cfg.kernel_size, cfg.reduction, act, cfg.init_weights)

    @classmethod
    def site_params(cls, site: Site, cfg: ConvAdapterConfig) -> int:
        _, c_in, c_out, _ = cls._geometry(site, cfg)
        return adapter_params(c_in, c_out, cfg.kernel_size, cfg.reduction)
