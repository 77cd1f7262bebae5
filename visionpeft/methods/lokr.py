"""LoKr: Kronecker product update of a weight.

Papers: "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", Yeh et al.,
ICLR 2024, arXiv:2309.14859 (LoKr, the form huggingface peft implements); "KronA: Parameter Efficient
Tuning with Kronecker Adapter", Edalati et al., 2022, arXiv:2212.10650 (the Kronecker update).

Where it attaches: the same sites as LoRA and LoHa (the ``qkv`` role by default, else the MLP's Linears,
else the convolutions; ``qkv_slices`` for q / k / v slices of a fused ``qkv``, each slice its own factors).
The update is ``dW = (alpha / rank) * W1 (x) W2`` (Kronecker product). With ``C_out = a * b`` and
``C_in = c * d`` (each split into two factors by :func:`factorize`, the smaller one first), ``W1`` is
(a, c) and ``W2`` (b, d * k_h * k_w) on a convolution, reshaped to (b, d, k_h, k_w) (``C_in`` counts the
channels of one group). ``W2`` is low-rank, ``W2a @ W2b`` with inner size ``rank``, unless
``rank >= max(b, d) / 2`` (then full); ``W1`` is full unless ``decompose_both`` and ``rank < max(a, c) / 2``.
These are peft's rules (``use_effective_conv2d=False``), so the parameter count is
``a*c (or r*(a+c)) + r*(b + d*k_h*k_w) (or b*d*k_h*k_w)``. Like LoHa, the module computes with ``W + dW``
supplied by a pre-hook (:class:`~.loha.WeightDeltaLayer`), and merging is ``W += dW``. Initialisation (peft):
``W1`` (or ``W1a``) zero, the other factors Kaiming-uniform, so the model is unchanged at init. peft's
``rank_dropout`` / ``module_dropout`` are not offered.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from .._registry import register_method
from ._base import AdapterLayer, Site, Variant, register
from .loha import LoHaConfig, WeightDeltaLayer, init_stack_
from .lora import LoRA, _weight, hosted, site_slices


@dataclasses.dataclass
class LoKrConfig(LoHaConfig):
    """LoKr hyper-parameters.

    Args:
        rank: inner size of the low-rank factor(s). alpha: scaling numerator (scale = alpha / rank; ``None``
            = rank). qkv_slices: as LoRA's.
        decompose_both: also make ``W1`` low-rank (when ``rank < max(a, c) / 2``).
        decompose_factor: ``-1`` splits each dimension into the two factors closest to its square root; a
            positive ``f`` that divides it gives ``(f, dim / f)``, else the two factors with the smaller one as
            close to ``f`` as possible from below.
    """

    decompose_both: bool = False
    decompose_factor: int = -1

    def validate(self) -> None:
        super().validate()
        if self.decompose_factor != -1 and self.decompose_factor <= 0:
            raise ValueError(
                f"LoKrConfig.decompose_factor must be -1 (near the square root) or > 0, got {self.decompose_factor!r}"
            )


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dim`` into ``(m, n)`` with ``m * n == dim`` (LyCORIS / peft's rule).

    ``factor > 0`` dividing ``dim``: ``(factor, dim // factor)`` as given. Otherwise ``m`` is the largest
    divisor of ``dim`` not above ``sqrt(dim)`` (nor above ``factor`` when it is positive), and ``m <= n``.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = math.isqrt(dim) if factor <= 0 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


@dataclasses.dataclass(frozen=True)
class KronShape:
    """The factor shapes of one slice: ``W1`` (a, c), ``W2`` (b, d * k) with ``k = k_h * k_w``; which are low-rank."""

    a: int
    b: int
    c: int
    d: int
    k: int
    w1_low_rank: bool
    w2_low_rank: bool

    @classmethod
    def of(cls, rows: int, cols: int, k: int, cfg: LoKrConfig) -> KronShape:
        """For a (rows, cols * k) update (``cols``: input channels of one group, ``k``: kernel size)."""
        a, b = factorize(rows, cfg.decompose_factor)
        c, d = factorize(cols, cfg.decompose_factor)
        w1_low = cfg.decompose_both and cfg.rank < max(a, c) / 2
        w2_low = cfg.rank < max(b, d) / 2
        return cls(a, b, c, d, k, w1_low, w2_low)

    def params(self, r: int) -> int:
        w1 = r * (self.a + self.c) if self.w1_low_rank else self.a * self.c
        w2 = r * (self.b + self.d * self.k) if self.w2_low_rank else self.b * self.d * self.k
        return w1 + w2


def _kron_shape(module: nn.Module, slices: list[tuple[int, int]] | None, cfg: LoKrConfig) -> KronShape:
    w = _weight(module)
    k = w[0, 0].numel()  # kernel size of a conv, 1 for a matrix
    rows = slices[0][1] - slices[0][0] if slices else w.shape[0]
    return KronShape.of(rows, w.shape[1], k, cfg)


class LoKrLayer(WeightDeltaLayer):
    """LoKr on a Linear (or q / k / v slices of a fused qkv), a ``nn.MultiheadAttention``'s packed input
    projection, or a Conv2d.

    Parameters (one matrix per slice): ``lokr_w1`` (n_slices, a, c), or ``lokr_w1_a`` (n_slices, a, r) and
    ``lokr_w1_b`` (n_slices, r, c); ``lokr_w2`` (n_slices, b, d * k_h * k_w), or ``lokr_w2_a`` (n_slices, b, r)
    and ``lokr_w2_b`` (n_slices, r, d * k_h * k_w).
    """

    def __init__(
        self,
        target: nn.Module,
        cfg: LoKrConfig,
        slices: list[tuple[int, int]] | None,
        host: nn.Module | None = None,
        param: str = "weight",
    ) -> None:
        super().__init__(target, host, param, slices)
        self.rank, self.scaling = cfg.rank, cfg.scaling
        self.shape = sh = _kron_shape(target, slices, cfg)
        w, n, r = self.weight_of(target), len(self.slices), cfg.rank
        if sh.w1_low_rank:  # W1's first factor starts at zero: the update is zero at init
            parts = [("lokr_w1_a", (n, sh.a, r), True), ("lokr_w1_b", (n, r, sh.c), False)]
        else:
            parts = [("lokr_w1", (n, sh.a, sh.c), True)]
        if sh.w2_low_rank:
            parts += [("lokr_w2_a", (n, sh.b, r), False), ("lokr_w2_b", (n, r, sh.d * sh.k), False)]
        else:
            parts += [("lokr_w2", (n, sh.b, sh.d * sh.k), False)]
        for name, shape, zero in parts:
            p = register(self, name, w.new_empty(shape))
            with torch.no_grad():
                init_stack_(p, zero, cfg.init_weights)

    def _factor(self, name: str) -> torch.Tensor:
        if name in self._parameters:
            return self._parameters[name]
        return self._parameters[f"{name}_a"] @ self._parameters[f"{name}_b"]

    def slice_deltas(self) -> torch.Tensor:
        """``W1 (x) W2`` per slice, flattened as the weight is: (n_slices, a * b, c * d * k_h * k_w)."""
        sh = self.shape
        w1 = self._factor("lokr_w1")  # (n, a, c)
        w2 = self._factor("lokr_w2").reshape(-1, sh.b, sh.d, sh.k)  # (n, b, d, k)
        kron = torch.einsum("nac,nbdk->nabcdk", w1, w2)  # out row a*b + b', input column (c*d + d')*k + k'
        return kron.reshape(kron.shape[0], sh.a * sh.b, sh.c * sh.d * sh.k)


@register_method("lokr")
class LoKr(LoRA):
    config_cls = LoKrConfig
    paper = "LyCORIS: LoKr (arXiv:2309.14859); KronA (arXiv:2212.10650)"
    mergeable = True
    reaches_hosted_weights = True
    variants = (
        Variant("lokr", {"rank": 4}, lr=3e-2, paper={"rank": 8, "alpha": 8}, stem="lokr-r8", gain=(0.023, 0.115)),
    )

    @classmethod
    def make_layer(cls, site: Site, cfg: LoKrConfig) -> AdapterLayer:
        host, param = hosted(site)
        return LoKrLayer(site.module, cfg, site_slices(site, cfg), host, param)

    @classmethod
    def site_params(cls, site: Site, cfg: LoKrConfig) -> int:
        """``a*c + r*(b + d*k_h*k_w)`` per adapted weight (see the module docstring for the low-rank / full
        rules), per q / k / v slice of a fused qkv."""
        slices = site_slices(site, cfg)
        return len(slices or [None]) * _kron_shape(site.module, slices, cfg).params(cfg.rank)
