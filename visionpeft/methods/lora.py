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

Weights read by their parent: EVA, BEiT and SwinV2 attention compute ``F.linear(x, self.qkv.weight,
qkv_bias)`` (separate q / v biases), so a hook on ``qkv`` never runs. There the layer hooks the parent
(the site's ``host``): for the duration of the parent's forward, ``qkv.weight`` reads ``W + dW`` (an
instance attribute that shadows the Parameter, removed again after the forward, also when it raises);
the Parameter, the module tree and the state_dict keys are never touched, and the merge is the same
``W += dW``. LoRA's input dropout has no weight form, so it needs ``dropout=0`` at such sites.
``nn.MultiheadAttention`` (torchvision's ViT) is adapted the same way on its packed input projection
``in_proj_weight`` (3C, C; ``qkv_slices`` selects q / k / v rows) and on its ``out_proj`` (read by the
attention itself). On attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` Linears (EVA-02),
``qkv_slices`` keeps the projections it names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import BackboneSpec
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant, first_tensor, lora_init_, random_init_, register

_QKV = {"q": 0, "k": 1, "v": 2}
_SEPARATE = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


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


class LoRALinear(AdapterLayer):
    """Low-rank update of one Linear, optionally restricted to output slices (q / k / v of a fused qkv).

    Args:
        target: the Linear. rank, scaling, dropout: LoRA's. slices: ``[(start, end)]`` output rows to
        adapt, each with its own A and B (``None``: all rows). init_weights: ``False`` makes B random.
        host: the module that reads the weight itself (``None``: hook the Linear). param: the name of the
        adapted (C_out, C_in) weight on ``target`` (``in_proj_weight`` of a ``nn.MultiheadAttention``).
    """

    prefix = "lora"

    def __init__(
        self,
        target: nn.Linear,
        rank: int,
        scaling: float,
        dropout: float,
        slices: list[tuple[int, int]] | None,
        init_weights: bool,
        host: nn.Module | None = None,
        param: str = "weight",
    ) -> None:
        super().__init__()
        self.__dict__["host"] = host  # a plain attribute: the host is a base module, not part of the adapter
        self.param = param
        if host is not None and dropout > 0:
            raise ValueError(
                f"LoRA dropout={dropout} needs the input of the adapted Linear, but {type(host).__name__} reads its "
                f"weight itself (F.linear); use dropout=0 on this backbone's qkv"
            )
        self.rank, self.scaling = rank, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = self.weight_of(target)
        out_f, in_f = w.shape
        self.slices = slices if slices is not None else [(0, out_f)]
        self.full_out = self.slices == [(0, out_f)]
        self.out_features = out_f
        register(self, f"{self.prefix}_A", w.new_empty(len(self.slices) * rank, in_f))
        register(self, f"{self.prefix}_B", w.new_zeros(sum(e - s for s, e in self.slices), rank))
        with torch.no_grad():
            for i in range(len(self.slices)):
                lora_init_(self.A[i * rank : (i + 1) * rank])
            if not init_weights:
                random_init_(self.B, 0.05)

    def weight_of(self, target: nn.Module) -> nn.Parameter:
        """The adapted weight Parameter of ``target`` (``weight``, or ``in_proj_weight`` of an attention)."""
        return target._parameters[self.param]

    @property
    def A(self) -> nn.Parameter:
        """The down factor ``<prefix>_A``: (n_slices * rank, C_in), or (groups * rank, C_in / g, k_h, k_w)."""
        return self._parameters[f"{self.prefix}_A"]

    @property
    def B(self) -> nn.Parameter:
        """The up factor ``<prefix>_B``: (adapted rows, rank), or (C_out, rank, 1, 1)."""
        return self._parameters[f"{self.prefix}_B"]

    def _full_B(self) -> torch.Tensor:
        """B as one (C_out, n_slices * rank) matrix, zero outside the adapted slices."""
        if self.full_out:
            return self.B
        r = self.rank
        full = self.B.new_zeros(self.out_features, len(self.slices) * r)
        off = 0
        for i, (s, e) in enumerate(self.slices):
            full[s:e, i * r : (i + 1) * r] = self.B[off : off + e - s]
            off += e - s
        return full

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: (C_out, C_in), zero in rows outside the slices."""
        return (self._full_B() @ self.A) * self.scaling

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the output: (..., C_in) -> (..., C_out)."""
        x = self.dropout(x).to(self.A.dtype)
        return F.linear(F.linear(x, self.A), self._full_B()) * self.scaling

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return output + self.delta_output(first_tensor(args, kwargs)).to(output.dtype)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + scaling * B @ A``: (C_out, C_in), the weight a hosted site reads during its host's forward."""
        return weight + self.delta_weight().to(weight.dtype)

    def attach(self, target: nn.Module) -> list[Any]:
        host = self.__dict__.get("host")
        if host is None:
            return super().attach(target)
        return [
            host.register_forward_pre_hook(lambda module, args: self._supply(target)),
            host.register_forward_hook(lambda module, args, output: self._withdraw(target), always_call=True),
        ]

    def _supply(self, target: nn.Module) -> None:
        if self.active and not self.merged:  # shadows the Parameter (instance attributes come first)
            target.__dict__[self.param] = self.adapted_weight(self.weight_of(target))

    def _withdraw(self, target: nn.Module) -> None:
        target.__dict__.pop(self.param, None)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        w = self.weight_of(target)
        w.add_(self.delta_weight().to(w.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        w = self.weight_of(target)
        w.sub_(self.delta_weight().to(w.dtype))


class LoRAConv2d(LoRALinear):
    """Low-rank update of one (possibly grouped) zero-padded Conv2d: A is a conv like the target with
    ``rank`` outputs per group, B a grouped 1x1 conv."""

    def __init__(self, target: nn.Conv2d, rank: int, scaling: float, dropout: float, init_weights: bool) -> None:
        AdapterLayer.__init__(self)
        self.__dict__["host"], self.param = None, "weight"
        if target.padding_mode != "zeros":
            raise ValueError(f"LoRA supports zero-padded convolutions only, got padding_mode={target.padding_mode!r}")
        self.rank, self.scaling = rank, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.groups, self.stride = target.groups, target.stride
        self.padding, self.dilation = target.padding, target.dilation
        w = target.weight
        register(self, f"{self.prefix}_A", w.new_empty(self.groups * rank, *w.shape[1:]))
        register(self, f"{self.prefix}_B", w.new_zeros(target.out_channels, rank, 1, 1))
        with torch.no_grad():
            lora_init_(self.A.view(self.A.shape[0], -1))
            if not init_weights:
                random_init_(self.B, 0.05)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` per group, with the target weight's shape (C_out, C_in / g, k_h, k_w)."""
        g, r, out = self.groups, self.rank, self.B.shape[0]
        a = self.A.reshape(g, r, -1)
        b = self.B.reshape(g, out // g, r)
        return (b @ a).reshape(out, *self.A.shape[1:]) * self.scaling

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H', W')."""
        x = self.dropout(x).to(self.A.dtype)
        h = F.conv2d(x, self.A, None, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(h, self.B, None, groups=self.groups) * self.scaling


def qkv_slices_of(target: nn.Module, letters: str) -> list[tuple[int, int]]:
    """Output-row ranges of the q / k / v slices named by ``letters`` in a fused qkv Linear (or the packed
    input projection of a ``nn.MultiheadAttention``)."""
    out = _weight(target).shape[0]
    if out % 3:
        raise ValueError(f"qkv_slices needs a fused qkv Linear with 3*dim outputs, got {out}")
    d = out // 3
    return [(_QKV[c] * d, (_QKV[c] + 1) * d) for c in letters]


def site_slices(site: Site, cfg: LoRAConfig) -> list[tuple[int, int]] | None:
    """The q / k / v slices to adapt at a site (``None``: the whole module)."""
    is_qkv = site.name.split(".")[-1] == "qkv" or (site.role == "qkv" and site.name.split(".")[-1] not in _SEPARATE)
    if cfg.qkv_slices is not None and (
        isinstance(site.module, nn.MultiheadAttention) or (isinstance(site.module, nn.Linear) and is_qkv)
    ):
        return qkv_slices_of(site.module, cfg.qkv_slices)
    return None


def _weight(module: nn.Module) -> torch.Tensor:
    """The (C_out, C_in) weight LoRA adapts: a Linear's, or a ``nn.MultiheadAttention``'s packed input projection."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:
            raise ValueError(
                "LoRA on nn.MultiheadAttention needs its packed in_proj_weight (kdim == vdim == embed_dim); "
                "this attention has separate q / k / v weights"
            )
        return module.in_proj_weight
    return module.weight


def hosted(site: Site) -> tuple[nn.Module | None, str]:
    """(host, weight name) of a site: an attention adapts its own ``in_proj_weight`` during its forward."""
    if isinstance(site.module, nn.MultiheadAttention):
        _weight(site.module)
        return site.module, "in_proj_weight"
    return site.host, "weight"


@register_method("lora")
class LoRA(Method):
    config_cls = LoRAConfig
    paper = "LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    mergeable = True
    reaches_hosted_weights = True
    default_roles = (("qkv",), ("mlp_in", "mlp_out"), ("conv",))
    accepts = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
    variants = (
        Variant("lora", {"rank": 4}, paper={"rank": 8, "alpha": 8}, stem="lora-r8", gain=(0.02, 0.12)),
        Variant(
            "lora_qv",
            {"rank": 4, "qkv_slices": "qv", "alpha": 8},
            paper={"rank": 8, "alpha": 8, "qkv_slices": "qv"},
            stem="lora-r8-qv",
            gain=(0.025, 0.13),
        ),
    )

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: LoRAConfig) -> str | None:
        if cfg.qkv_slices is not None and cfg.targets is None and not spec.has_role("qkv"):
            return f"qkv_slices needs a fused qkv Linear; the {spec.name} spec has no qkv role"
        return super().unsupported_reason(model, spec, cfg)

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: LoRAConfig) -> list[Site]:
        sites = super().sites(model, spec, cfg)
        if cfg.qkv_slices is None:
            return sites
        letters = {s.name: _SEPARATE.get(s.name.split(".")[-1]) for s in sites}  # separate q / k / v projections
        sites = [s for s in sites if letters[s.name] is None or letters[s.name] in cfg.qkv_slices]
        separate = any(letters[s.name] is not None for s in sites)
        if not separate and not any(site_slices(s, cfg) for s in sites):
            raise ValueError(
                f"qkv_slices={cfg.qkv_slices!r} given but no target is a fused qkv Linear "
                f"(targets {cls.targets_for(spec, cfg)})"
            )
        return sites

    @classmethod
    def make_layer(cls, site: Site, cfg: LoRAConfig) -> AdapterLayer:
        if isinstance(site.module, nn.Conv2d):
            return LoRAConv2d(site.module, cfg.rank, cfg.scaling, cfg.dropout, cfg.init_weights)
        host, param = hosted(site)
        return LoRALinear(
            site.module, cfg.rank, cfg.scaling, cfg.dropout, site_slices(site, cfg), cfg.init_weights, host, param
        )

    @classmethod
    def site_params(cls, site: Site, cfg: LoRAConfig) -> int:
        """``r * (C_in * k_h * k_w + C_out)`` per adapted weight (per q / k / v slice of a fused qkv)."""
        m, r = site.module, cfg.rank
        if isinstance(m, nn.Conv2d):
            return r * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
        out_f, in_f = _weight(m).shape
        slices = site_slices(site, cfg) or [(0, out_f)]
        return sum(r * (in_f + (e - s)) for s, e in slices)
