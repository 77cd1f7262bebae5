"""DoRA: weight-decomposed low-rank adaptation.

Paper: "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., 2024, arXiv:2402.09353.

Where it attaches: the same sites as LoRA (Linear, Conv2d, q/k/v slices of a fused qkv). The adapted
weight is ``W' = m * (W + s*B@A) / ||W + s*B@A||``, the norm taken per output channel. A forward hook
computes it from the module output without touching W:
``y' = (m / ||W + dW||) * (y - b + s*B(A(x))) + b``. As in the paper (section 4.3) the norm is treated
as a constant in the backward pass. On q / v slices of a fused qkv only the adapted rows are decomposed:
the magnitude ``m`` has one entry per adapted output row, and the k rows keep their weights, exactly as
DoRA on separate q and v layers with k untouched. Initialisation: LoRA's (B zero) and ``m = ||W||``
(of the adapted rows), so the model is unchanged at init.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .._registry import register_method
from ._base import AdapterLayer, Site, Variant, first_tensor, register
from .lora import LoRA, LoRAConfig, LoRAConv2d, LoRALinear, _weight, hosted, site_slices


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: LoRA's (``rank``, ``alpha``, ``dropout``, ``qkv_slices``)."""


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1)


class _Magnitude:
    """The magnitude vector over the adapted output rows, and the output-side rescaling it implies."""

    prefix = "dora"

    def _init_magnitude(self, target: nn.Module, rows: list[int], init_weights: bool) -> None:
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        w = self.weight_of(target)
        with torch.no_grad():
            m = _row_norm(w.float()[self.rows])
            if not init_weights:
                m = m * (1 + 0.1 * torch.randn_like(m))
        register(self, "dora_magnitude", m.to(w.dtype))
        self._merge_norm: torch.Tensor | None = None

    @property
    def magnitude(self) -> nn.Parameter:
        return self._parameters["dora_magnitude"]

    def _row_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """(C_out,) factors: ``m / ||W + dW||`` on the adapted rows (norm detached), 1 elsewhere."""
        dw = self.delta_weight()
        norm = _row_norm(weight.to(dw.dtype)[self.rows] + dw[self.rows]).detach()
        ones = torch.ones(weight.shape[0], dtype=dw.dtype, device=dw.device)
        return ones.index_copy(0, self.rows, (self.magnitude / norm).to(dw.dtype))

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``m * (W + dW) / ||W + dW||`` on the adapted rows (norm detached), ``W`` elsewhere: (C_out, C_in)."""
        scale = self._row_scale(weight).to(weight.dtype)
        return scale[:, None] * (weight + self.delta_weight().to(weight.dtype))

    def _view(self, v: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, 1, 1) if output.dim() == 4 and isinstance(self, LoRAConv2d) else v

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        scale = self._view(self._row_scale(module.weight), output).to(output.dtype)
        delta = self.delta_output(first_tensor(args, kwargs)).to(output.dtype)
        if module.bias is None:
            return scale * (output + delta)
        b = self._view(module.bias, output).to(output.dtype)
        return scale * (output - b + delta) + b

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        w, rows = self.weight_of(target), self.rows
        dt = torch.promote_types(w.dtype, torch.float32)  # at least float32 for half-precision weights
        new = w.to(dt)[rows] + self.delta_weight().to(dt)[rows]
        self._merge_norm = _row_norm(new)
        scale = (self.magnitude.to(dt) / self._merge_norm).view(-1, *([1] * (w.dim() - 1)))
        w[rows] = (new * scale).to(w.dtype)

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self._merge_norm is None:
            raise RuntimeError("DoRA layer is not merged")
        w, rows = self.weight_of(target), self.rows
        dt = self._merge_norm.dtype
        scale = (self.magnitude.to(dt) / self._merge_norm).view(-1, *([1] * (w.dim() - 1)))
        w[rows] = (w.to(dt)[rows] / scale - self.delta_weight().to(dt)[rows]).to(w.dtype)
        self._merge_norm = None


class DoRALinear(_Magnitude, LoRALinear):
    """DoRA on a Linear, or on the q / k / v slices of a fused qkv Linear."""

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
        super().__init__(target, rank, scaling, dropout, slices, init_weights, host, param)
        self._init_magnitude(target, [r for s, e in self.slices for r in range(s, e)], init_weights)


class DoRAConv2d(_Magnitude, LoRAConv2d):
    """DoRA on a (possibly grouped) Conv2d: one magnitude per output channel."""

    def __init__(self, target: nn.Conv2d, rank: int, scaling: float, dropout: float, init_weights: bool) -> None:
        super().__init__(target, rank, scaling, dropout, init_weights)
        self._init_magnitude(target, list(range(target.out_channels)), init_weights)


@register_method("dora")
class DoRA(LoRA):
    config_cls = DoRAConfig
    paper = "DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"
    mergeable = True
    variants = (
        Variant("dora", {"rank": 4}, paper={"rank": 8, "alpha": 8}, stem="dora-r8", gain=(0.025, 0.14)),
        Variant(
            "dora_qv",
            {"rank": 4, "qkv_slices": "qv"},
            paper={"rank": 8, "alpha": 8, "qkv_slices": "qv"},
            stem="dora-r8-qv",
            gain=(0.025, 0.13),
        ),
    )
    renamed_keys = {".lora_A": ".dora_A", ".lora_B": ".dora_B"}

    @classmethod
    def upgrade_v1(cls, config: dict, tensors: dict) -> tuple[dict, dict]:
        if config.get("qkv_slices"):
            raise ValueError(
                "DoRA files of format 1 with qkv_slices rescaled the untouched k rows too (a magnitude over all "
                "3C rows); that model cannot be expressed by today's DoRA: retrain the adapter"
            )
        return super().upgrade_v1(config, tensors)

    @classmethod
    def make_layer(cls, site: Site, cfg: DoRAConfig) -> AdapterLayer:
        if isinstance(site.module, nn.Conv2d):
            return DoRAConv2d(site.module, cfg.rank, cfg.scaling, cfg.dropout, cfg.init_weights)
        host, param = hosted(site)
        return DoRALinear(
            site.module, cfg.rank, cfg.scaling, cfg.dropout, site_slices(site, cfg), cfg.init_weights, host, param
        )

    @classmethod
    def site_params(cls, site: Site, cfg: DoRAConfig) -> int:
        """LoRA's count plus one magnitude per adapted output row."""
        rows = sum(e - s for s, e in (site_slices(site, cfg) or [(0, _weight(site.module).shape[0])]))
        return LoRA.site_params(site, cfg) + rows
