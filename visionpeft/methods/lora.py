"""LoRA: low-rank adaptation.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., 2021, arXiv:2106.09685.

Where it attaches: a forward hook on ``nn.Linear`` or ``nn.Conv2d`` modules (the ``qkv`` role by
default) adds ``(alpha / rank) * B(A(dropout(x)))`` to the module's output. On a fused ``qkv`` Linear
``qkv_slices`` restricts the update to any subset of the q, k, v output slices (``"qv"`` is the
SAMed / original LoRA setting), each slice with its own A and B. On a convolution, A is a conv with the
target's kernel, stride, padding, dilation and groups (``rank`` output channels per group) and B a
grouped 1x1 conv, so the update is a weight of the target's exact shape and merges, also for grouped
and depthwise convolutions; its size is ``rank * (C_in * k_h * k_w + C_out)`` for any number of groups.
Initialisation (paper): A Kaiming-uniform, B zero, so the model is unchanged at init.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import BackboneSpec, resolve_targets
from ..config import MethodConfig
from ._base import AdapterLayer, Method, first_tensor, lora_init_, random_init_

_QKV = {"q": 0, "k": 1, "v": 2}


@dataclasses.dataclass
class LoRAConfig(MethodConfig):
    """LoRA hyper-parameters.

    Args:
        rank: rank r of the update. alpha: scaling numerator (scale = alpha / rank; ``None`` = rank).
        dropout: dropout on the input of the low-rank path.
        qkv_slices: on fused ``qkv`` Linears, the slices to adapt, e.g. ``"qv"``; ``None`` = the whole
            layer (identical to LoRA on any Linear).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    qkv_slices: str | None = None

    def validate(self) -> None:
        self._positive(rank=self.rank)
        if self.alpha is not None:
            self._positive(alpha=self.alpha)
        self._in_range("dropout", self.dropout, 0.0, 1.0)
        if self.qkv_slices is not None:
            s = self.qkv_slices.lower()
            if not s or any(c not in _QKV for c in s) or len(set(s)) != len(s):
                raise ValueError(
                    f"qkv_slices must be a non-empty subset of 'qkv' such as 'qv', got {self.qkv_slices!r}"
                )
            self.qkv_slices = "".join(sorted(set(s), key=_QKV.get))

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _is_qkv_name(name: str, role: str | None) -> bool:
    return role == "qkv" or name.split(".")[-1] == "qkv"


class LoRALayer(AdapterLayer):
    """Low-rank update of one Linear (optionally per q/k/v slice) or Conv2d."""

    mergeable = True

    def __init__(
        self,
        target: nn.Module,
        rank: int,
        scaling: float,
        dropout: float,
        slices: list[tuple[int, int]] | None,
        init_weights: bool,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = target.weight
        if isinstance(target, nn.Linear):
            self.kind = "linear"
            out_f, in_f = w.shape
            self.slices = slices if slices is not None else [(0, out_f)]
            self.full_out = self.slices == [(0, out_f)]
            self.out_features = out_f
            n = len(self.slices)
            self.lora_A = nn.Parameter(w.new_empty(n * rank, in_f))
            self.lora_B = nn.Parameter(w.new_zeros(sum(e - s for s, e in self.slices), rank))
        elif isinstance(target, nn.Conv2d):
            if target.padding_mode != "zeros":
                raise ValueError(
                    f"LoRA supports zero-padded convolutions only, got padding_mode={target.padding_mode!r}"
                )
            self.kind = "conv"
            self.slices = [(0, target.out_channels)]
            self.full_out = True
            g = target.groups
            self.groups = g
            self.stride, self.padding, self.dilation = target.stride, target.padding, target.dilation
            self.lora_A = nn.Parameter(w.new_empty(g * rank, *w.shape[1:]))
            self.lora_B = nn.Parameter(w.new_zeros(target.out_channels, rank, 1, 1))
        else:
            raise TypeError(f"LoRA targets nn.Linear or nn.Conv2d, got {type(target).__name__}")
        with torch.no_grad():
            if self.kind == "linear":
                for i in range(len(self.slices)):
                    lora_init_(self.lora_A[i * rank : (i + 1) * rank])
            else:
                lora_init_(self.lora_A.view(self.lora_A.shape[0], -1))
            if not init_weights:
                random_init_(self.lora_B, 0.05)

    # the update as a weight -----------------------------------------------------------------------
    def _full_B(self) -> torch.Tensor:
        """B as one (C_out, n_slices * rank) matrix, zero outside the adapted slices."""
        if self.full_out:
            return self.lora_B
        r = self.rank
        full = self.lora_B.new_zeros(self.out_features, len(self.slices) * r)
        off = 0
        for i, (s, e) in enumerate(self.slices):
            full[s:e, i * r : (i + 1) * r] = self.lora_B[off : off + e - s]
            off += e - s
        return full

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` with the target weight's shape."""
        if self.kind == "linear":
            return (self._full_B() @ self.lora_A) * self.scaling
        g, r = self.groups, self.rank
        out = self.lora_B.shape[0]
        a = self.lora_A.reshape(g, r, -1)  # (g, r, C_in/g * kh * kw)
        b = self.lora_B.reshape(g, out // g, r)
        return (b @ a).reshape(out, *self.lora_A.shape[1:]) * self.scaling

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the output. x: (..., C_in) or (B, C_in, H, W)."""
        x = self.dropout(x).to(self.lora_A.dtype)
        if self.kind == "linear":
            h = F.linear(x, self.lora_A)
            return F.linear(h, self._full_B()) * self.scaling
        h = F.conv2d(x, self.lora_A, None, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(h, self.lora_B, None, groups=self.groups) * self.scaling

    def after(self, module, args, kwargs, output):
        return output + self.delta_output(first_tensor(args, kwargs)).to(output.dtype)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        target.weight.add_(self.delta_weight().to(target.weight.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        target.weight.sub_(self.delta_weight().to(target.weight.dtype))


def qkv_slices_of(target: nn.Linear, letters: str) -> list[tuple[int, int]]:
    out = target.out_features
    if out % 3:
        raise ValueError(f"qkv_slices needs a fused qkv Linear with 3*dim outputs, got {out}")
    d = out // 3
    return [(_QKV[c] * d, (_QKV[c] + 1) * d) for c in letters]


def lora_sites(
    model: nn.Module, spec: BackboneSpec, cfg: LoRAConfig, method: type[Method]
) -> list[tuple[str, nn.Module, list | None]]:
    """Resolve LoRA / DoRA targets to ``(name, module, slices)``."""
    targets = method.targets_for(spec, cfg)
    found = resolve_targets(
        model,
        spec,
        targets,
        cfg.exclude,
        cfg.layers,
        accept=lambda n, m: isinstance(m, (nn.Linear, nn.Conv2d)),
        what=f"{method.name} targets",
    )
    modules = dict(model.named_modules())
    sites = []
    any_qkv = False
    for name, role in found:
        m = modules[name]
        slices = None
        if cfg.qkv_slices is not None and isinstance(m, nn.Linear) and _is_qkv_name(name, role):
            slices = qkv_slices_of(m, cfg.qkv_slices)
            any_qkv = True
        sites.append((name, m, slices))
    if cfg.qkv_slices is not None and not any_qkv:
        raise ValueError(
            f"qkv_slices={cfg.qkv_slices!r} given but no target is a fused qkv Linear (targets {targets})"
        )
    return sites


@register_method("lora")
class LoRA(Method):
    config_cls = LoRAConfig
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    mergeable = True
    default_roles = (("qkv",), ("mlp_in", "mlp_out"), ("conv",))

    @classmethod
    def unsupported_reason(cls, model, spec, cfg):
        if cfg.qkv_slices is not None and cfg.targets is None and not spec.has_role("qkv"):
            return f"qkv_slices needs a fused qkv Linear; the {spec.name} spec has no qkv role"
        return super().unsupported_reason(model, spec, cfg)

    @classmethod
    def build(cls, model, spec, cfg):
        return [
            (name, LoRALayer(m, cfg.rank, cfg.scaling, cfg.dropout, slices, cfg.init_weights))
            for name, m, slices in lora_sites(model, spec, cfg, cls)
        ]
