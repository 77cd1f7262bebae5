"""(IA)^3: infused adapter by inhibiting and amplifying inner activations.

Paper: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", Liu et al.,
2022, arXiv:2205.05638.

Where it attaches: learned vectors rescale, element-wise, the keys and values of every attention layer
(``l_k``, ``l_v``) and the intermediate activation of every MLP (``l_ff``, the hidden features after the
non-linearity, i.e. the input of the MLP's second Linear). On timm's fused ``qkv`` Linear a forward hook
multiplies the output rows of the k and v slices (``qkv_slices="kv"``, the paper's setting; any subset of q,
k, v can be chosen) and leaves the q rows alone; on the MLP's second Linear (the ``mlp_out`` role, or the
modules named in ``feedforward``) a forward pre-hook multiplies its input channels. Any other Linear or Conv2d
given as a target has its output channels scaled. ``ia3_scale`` holds one entry per scaled channel, so the
parameter count per block is ``2 * C + C_mlp`` (55,296 on ViT-B/16).
Initialisation (paper): ones, so the model is unchanged at init. Merge is exact (up to rounding): an output
scaling multiplies the weight rows and the bias entries, an input scaling the weight's input columns (per
group of a grouped convolution); unmerge divides again, and channels scaled by (near) zero are restored from a
copy kept at merge time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import BackboneSpec, pattern_matches
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant, first_tensor, register
from .lora import _QKV, qkv_slices_of

_TINY = 1e-4  # |scale| below this: the merged channel cannot be divided back, it is restored from a copy


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """(IA)^3 hyper-parameters.

    Args:
        qkv_slices: on fused ``qkv`` Linears, the slices to scale (the paper's keys and values: ``"kv"``);
            ``None`` scales the whole output.
        feedforward: roles or module-name patterns of the targets whose *input* is scaled (the paper's
            ``l_ff``); ``None`` = the ``mlp_out`` role. Every other target has its output scaled.
    """

    qkv_slices: str | None = "kv"
    feedforward: list[str] | None = None

    def validate(self) -> None:
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if self.qkv_slices is not None:
            s = self.qkv_slices.lower()
            if not s or any(c not in _QKV for c in s) or len(set(s)) != len(s):
                raise ValueError(
                    f"IA3Config.qkv_slices must be a non-empty subset of 'qkv' such as 'kv' (or None), "
                    f"got {self.qkv_slices!r}"
                )
            self.qkv_slices = "".join(sorted(set(s), key=_QKV.get))


def is_fused_qkv(site: Site) -> bool:
    """Whether the site is a fused qkv Linear (3 * C outputs), by its role or its name."""
    return isinstance(site.module, nn.Linear) and (site.role == "qkv" or site.name.split(".")[-1] == "qkv")


def hosted_qkv_reason(method: str, model: nn.Module | None, spec: BackboneSpec, cfg: MethodConfig) -> str | None:
    """Why the default targets cannot reach the model's qkv projections (``None``: they can): the attention
    computes them itself with ``F.linear`` (EVA, BEiT, SwinV2), so no hook on them runs, or they are not a
    Linear (``nn.MultiheadAttention``'s packed ``in_proj_weight``)."""
    if model is None or cfg.targets is not None or not spec.has_role("qkv"):
        return None
    modules = dict(model.named_modules())
    pattern = re.compile(spec.roles["qkv"])
    for n in (n for n in modules if n and pattern.fullmatch(n)):
        if spec.host_of(n, modules) is not None:
            return (
                f"{method} adapts the output of qkv, which the attention of {spec.name} computes itself with "
                f"F.linear ({n}); a hook there never runs: pass targets=[...] (e.g. the MLP's Linears)"
            )
        if not isinstance(modules[n], nn.Linear):
            return (
                f"{method} adapts a fused qkv Linear, but qkv of {spec.name} is a {type(modules[n]).__name__} ({n}): "
                f"pass targets=[...] (e.g. the MLP's Linears)"
            )
    return None


class IA3Layer(AdapterLayer):
    """Element-wise scaling of one Linear / Conv2d: of its output rows (``rows``) or of its input channels.

    Args:
        target: the Linear or Conv2d. rows: output rows to scale (``None``: every output channel).
        feedforward: scale the input channels instead of the output. init_weights: ``False`` draws the
        scales around 1 instead of ones.
    """

    def __init__(self, target: nn.Module, rows: list[int] | None, feedforward: bool, init_weights: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        self.uses_before, self.uses_after = feedforward, not feedforward
        self.channel_dim = 1 if isinstance(target, nn.Conv2d) else -1
        self.groups = target.groups if isinstance(target, nn.Conv2d) else 1
        w = target.weight
        if feedforward:  # one scale per input channel
            rows, n = None, w.shape[1] * self.groups
        else:
            n = w.shape[0] if rows is None else len(rows)
        self.size = w.shape[0]  # the output channels (``rows`` index them)
        self.register_buffer("rows", None if rows is None else torch.tensor(rows, dtype=torch.long), persistent=False)
        scale = torch.ones(n, dtype=w.dtype)
        if not init_weights:
            scale = torch.normal(1.0, 0.2, (n,)).to(w.dtype)
        register(self, "ia3_scale", scale)
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def scale(self) -> nn.Parameter:
        return self._parameters["ia3_scale"]

    def full_scale(self) -> torch.Tensor:
        """The scale of every channel of the scaled side (1 outside ``rows``): (C,)."""
        if self.rows is None:
            return self.scale
        return torch.ones(self.size, dtype=self.scale.dtype, device=self.scale.device).index_copy(
            0, self.rows, self.scale
        )

    def _view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return v
        return v.view(-1, *([1] * (ndim - 2)))

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Scales the input channels: (..., C_in) or (B, C_in, H, W)."""
        x = first_tensor(args, kwargs)
        x = x * self._view(self.scale, x.dim()).to(x.dtype)
        if args:
            return (x, *args[1:]), kwargs
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
        return args, {**kwargs, key: x}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Scales the output channels: (..., C_out) or (B, C_out, H, W)."""
        return output * self._view(self.full_scale(), output.dim()).to(output.dtype)

    # merging --------------------------------------------------------------------------------------
    def _weight_scale(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` shaped to multiply ``weight`` (rows, or input columns per group)."""
        if not self.feedforward:
            return scale.view(-1, *([1] * (weight.dim() - 1)))
        if weight.dim() == 2:
            return scale.view(1, -1)
        # grouped conv: output o of group o // (C_out / g) reads input channels of that group only
        per_group = scale.view(self.groups, weight.shape[1]).repeat_interleave(weight.shape[0] // self.groups, 0)
        return per_group.view(*per_group.shape, *([1] * (weight.dim() - 2)))

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        scale = self.full_scale().detach()
        self._kept = {}
        for name in ("weight", "bias"):
            t = getattr(target, name, None)
            if t is None or (name == "bias" and self.feedforward):
                continue
            s = self._weight_scale(t, scale.to(t.dtype)) if name == "weight" else scale.to(t.dtype)
            s = s.expand_as(t)
            tiny = s.abs() < _TINY
            if tiny.any():
                self._kept[name] = (tiny, t[tiny].clone())
            t.mul_(s)

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        scale = self.full_scale().detach()
        for name in ("weight", "bias"):
            t = getattr(target, name, None)
            if t is None or (name == "bias" and self.feedforward):
                continue
            s = self._weight_scale(t, scale.to(t.dtype)) if name == "weight" else scale.to(t.dtype)
            s = s.expand_as(t)
            tiny = s.abs() < _TINY
            t.div_(torch.where(tiny, torch.ones_like(s), s))
            if name in self._kept:
                mask, values = self._kept[name]
                t[mask] = values
        self._kept = {}


def is_feedforward(site: Site, cfg: IA3Config) -> bool:
    """Whether the site's input is scaled (the paper's ``l_ff``) rather than its output."""
    names = cfg.feedforward if cfg.feedforward is not None else ["mlp_out"]
    return any(site.role == p or pattern_matches(p, site.name) for p in names)


def scaled_rows(site: Site, cfg: IA3Config) -> list[int] | None:
    """The output rows a non-feedforward site scales (``None``: all of them)."""
    if cfg.qkv_slices is None or not is_fused_qkv(site):
        return None
    return [r for s, e in qkv_slices_of(site.module, cfg.qkv_slices) for r in range(s, e)]


@register_method("ia3")
class IA3(Method):
    config_cls = IA3Config
    paper = (
        "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning (arXiv:2205.05638)"
    )
    mergeable = True
    default_roles = (("qkv", "mlp_out"), ("mlp_out",))
    accepts = (nn.Linear, nn.Conv2d)
    variants = (Variant("ia3", {}, lr=1e-1, paper={}, gain=(0.02, 0.09)),)  # gains over seeds 0-2: >= 0.043, 0.18

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: IA3Config) -> str | None:
        reason = hosted_qkv_reason(cls.name, model, spec, cfg) or super().unsupported_reason(model, spec, cfg)
        return reason or cls.build_refusal(model, spec, cfg)

    @classmethod
    def make_layer(cls, site: Site, cfg: IA3Config) -> AdapterLayer:
        ff = is_feedforward(site, cfg)
        return IA3Layer(site.module, None if ff else scaled_rows(site, cfg), ff, cfg.init_weights)

    @classmethod
    def site_params(cls, site: Site, cfg: IA3Config) -> int:
        """One scale per scaled channel: the input channels of a feedforward site, else the output channels
        (of the chosen q / k / v slices of a fused qkv)."""
        m = site.module
        if is_feedforward(site, cfg):
            return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        rows = scaled_rows(site, cfg)
        return len(rows) if rows is not None else m.weight.shape[0]
