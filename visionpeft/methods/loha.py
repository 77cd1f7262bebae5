"""LoHa: low-rank Hadamard product update of a weight.

Papers: "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", Hyeon-Woo et
al., ICLR 2022, arXiv:2108.06098 (the parameterisation); "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", Yeh et al., ICLR 2024, arXiv:2309.14859 (LoHa as a fine-tuning
update, the form huggingface peft implements).

Where it attaches: the same sites as LoRA (the ``qkv`` role by default, else the MLP's Linears, else the
convolutions; any ``nn.Linear``, ``nn.Conv2d`` or ``nn.MultiheadAttention`` by pattern), and ``qkv_slices``
restricts it to q / k / v slices of a fused ``qkv`` (each slice its own factors). The update is a weight of
the target's shape, ``dW = (alpha / rank) * (W1a @ W1b) * (W2a @ W2b)`` (``*`` elementwise), of rank up to
``rank**2`` for ``2 * rank * (C_out + C_in)`` parameters. On a convolution the factors span the flattened
kernel, ``(C_out, C_in / groups * k_h * k_w)`` (peft's default ``use_effective_conv2d=False``), so grouped
and depthwise convolutions and every padding mode work. The adapted module computes with ``W + dW``: a
pre-hook on the module (on its parent for weights the parent reads itself, see :mod:`.lora`) supplies it for
the duration of the forward, so one matmul / conv runs, and merging is the same ``W += dW``.
Initialisation (FedPara's He init, as in peft): ``W1a``, ``W1b``, ``W2a`` Kaiming-uniform, ``W2b`` zero, so
the model is unchanged at init. peft's ``rank_dropout`` / ``module_dropout`` are not offered.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .._registry import register_method
from ..config import MethodConfig
from ._base import AdapterLayer, Site, Variant, lora_init_, random_init_, register
from .lora import LoRA, LoRAConfig, _weight, hosted, site_slices


@dataclasses.dataclass
class LoHaConfig(MethodConfig):
    """LoHa hyper-parameters.

    Args:
        rank: rank r of each of the two factors (the update's rank is up to r**2).
        alpha: scaling numerator (scale = alpha / rank; ``None`` = rank).
        qkv_slices: on fused ``qkv`` Linears, the slices to adapt, e.g. ``"qv"``; ``None`` = the whole layer.
    """

    rank: int = 8
    alpha: float | None = None
    qkv_slices: str | None = None

    def validate(self) -> None:
        LoRAConfig.validate(self)  # the qkv_slices check and normalisation

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class WeightDeltaLayer(AdapterLayer):
    """A layer whose effect is a delta ``dW`` of the target's weight: the module computes with ``W + dW``.

    A forward pre-hook on the module that reads the weight (the target itself, or its ``host``) puts
    ``W + dW`` in the target's instance ``__dict__``, where it shadows the Parameter for the duration of the
    forward; a forward hook (also when the forward raises) removes it. The Parameter, the module tree and the
    state_dict keys never change. Several such layers active on one module add their deltas. Subclasses
    implement :meth:`slice_deltas`.

    Args:
        target: the adapted module. host: the module that reads the weight (``None``: the target).
        param: the name of the adapted weight on ``target`` (``in_proj_weight`` of a ``nn.MultiheadAttention``).
        slices: ``[(start, end)]`` output rows adapted, each by its own factors (``None``: all rows).
    """

    uses_after = False

    def __init__(
        self, target: nn.Module, host: nn.Module | None, param: str, slices: list[tuple[int, int]] | None
    ) -> None:
        super().__init__()
        self.__dict__["host"] = host  # a plain attribute: the host is a base module, not part of the adapter
        self.param = param
        w = self.weight_of(target)
        self.weight_shape = tuple(w.shape)
        out = w.shape[0]
        self.slices = slices if slices is not None else [(0, out)]
        self.full_out = self.slices == [(0, out)]

    def weight_of(self, target: nn.Module) -> nn.Parameter:
        """The adapted weight Parameter of ``target``."""
        return target._parameters[self.param]

    def slice_deltas(self) -> torch.Tensor:
        """The unscaled per-slice updates: (n_slices, rows per slice, C_in * k_h * k_w)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``dW`` with the target weight's shape ((C_out, C_in) or (C_out, C_in / g, k_h, k_w)), zero in
        rows outside the slices."""
        d = self.slice_deltas() * self.scaling
        if self.full_out:
            return d[0].reshape(self.weight_shape)
        full = d.new_zeros(self.weight_shape[0], d.shape[-1])
        for i, (s, e) in enumerate(self.slices):
            full[s:e] = d[i]
        return full.reshape(self.weight_shape)

    def attach(self, target: nn.Module) -> list[Any]:
        reader = self.__dict__.get("host") or target
        return [
            reader.register_forward_pre_hook(lambda module, args: self._supply(target)),
            reader.register_forward_hook(lambda module, args, output: self._withdraw(target), always_call=True),
        ]

    def _supply(self, target: nn.Module) -> None:
        if self.active and not self.merged:  # shadows the Parameter (instance attributes come first)
            w = target.__dict__.get(self.param, self.weight_of(target))  # on top of another active layer's
            target.__dict__[self.param] = w + self.delta_weight().to(w.dtype)

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


def flat_in(target: nn.Module, param: str) -> int:
    """Columns of the adapted weight seen as a matrix: ``C_in`` (Linear) or ``C_in / g * k_h * k_w`` (Conv2d)."""
    w = target._parameters[param]
    return w[0].numel()


def init_stack_(p: torch.Tensor, zero: bool, init_weights: bool) -> None:
    """Initialise each matrix of a (n_slices, rows, cols) stack: Kaiming-uniform (fan-in = cols, as
    ``nn.Linear``), or zero when ``zero`` (random with ``init_weights=False``, so equivalence tests can fail)."""
    for m in p:
        if not zero:
            lora_init_(m)
        elif init_weights:
            nn.init.zeros_(m)
        else:
            random_init_(m, 0.5)


class LoHaLayer(WeightDeltaLayer):
    """LoHa on a Linear (or q / k / v slices of a fused qkv), a ``nn.MultiheadAttention``'s packed input
    projection, or a Conv2d (factors over the flattened kernel).

    Parameters (one matrix per slice): ``loha_w1_a``, ``loha_w2_a``: (n_slices, rows, r);
    ``loha_w1_b``, ``loha_w2_b``: (n_slices, r, C_in * k_h * k_w).
    """

    def __init__(
        self,
        target: nn.Module,
        rank: int,
        scaling: float,
        slices: list[tuple[int, int]] | None,
        init_weights: bool,
        host: nn.Module | None = None,
        param: str = "weight",
    ) -> None:
        super().__init__(target, host, param, slices)
        self.rank, self.scaling = rank, scaling
        w, n, cols = self.weight_of(target), self.slices[0][1] - self.slices[0][0], flat_in(target, param)
        k = len(self.slices)
        for name, shape, zero in (
            ("loha_w1_a", (k, n, rank), False),
            ("loha_w1_b", (k, rank, cols), False),
            ("loha_w2_a", (k, n, rank), False),
            ("loha_w2_b", (k, rank, cols), True),
        ):
            p = register(self, name, w.new_empty(shape))
            with torch.no_grad():
                init_stack_(p, zero, init_weights)

    def slice_deltas(self) -> torch.Tensor:
        """``(W1a @ W1b) * (W2a @ W2b)`` per slice: (n_slices, rows, C_in * k_h * k_w)."""
        return (self.loha_w1_a @ self.loha_w1_b) * (self.loha_w2_a @ self.loha_w2_b)


@register_method("loha")
class LoHa(LoRA):
    config_cls = LoHaConfig
    paper = "FedPara: Low-Rank Hadamard Product (arXiv:2108.06098); LyCORIS (arXiv:2309.14859)"
    mergeable = True
    reaches_hosted_weights = True
    variants = (
        Variant("loha", {"rank": 4}, lr=3e-2, paper={"rank": 8, "alpha": 8}, stem="loha-r8", gain=(0.03, 0.17)),
    )

    @classmethod
    def make_layer(cls, site: Site, cfg: LoHaConfig) -> AdapterLayer:
        host, param = hosted(site)
        return LoHaLayer(site.module, cfg.rank, cfg.scaling, site_slices(site, cfg), cfg.init_weights, host, param)

    @classmethod
    def site_params(cls, site: Site, cfg: LoHaConfig) -> int:
        """``2 * r * (C_out + C_in * k_h * k_w / groups)`` per adapted weight (per q / k / v slice of a fused
        qkv, with C_out the slice's rows): FedPara's ``2R(m + n)`` for an m x n matrix."""
        w = _weight(site.module)
        cols = w[0].numel()
        slices = site_slices(site, cfg) or [(0, w.shape[0])]
        return sum(2 * cfg.rank * ((e - s) + cols) for s, e in slices)
