"""LayerNorm tuning: train only the LayerNorm gains and biases.

Paper: "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning", Zhao et al.,
2024, arXiv:2312.11420 (and the LN-tuning baseline of the vision PEFT literature).

Where it attaches: a forward hook on every affine LayerNorm of the backbone (channels-last and timm's
channels-first ``LayerNorm2d``) adds ``d_gamma * x_hat + d_beta``, where ``x_hat`` is the normalised
input, which is exactly training gamma and beta while the base weights stay frozen; merging adds the
deltas to them. Initialisation: zero (identity).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..config import MethodConfig
from ._affine import channels_and_dim, non_head_sites, view_channels
from ._base import AdapterLayer, Method, Site, Variant, first_tensor, random_init_


@dataclasses.dataclass
class LNTuneConfig(MethodConfig):
    """No hyper-parameters beyond the shared ones (``targets`` default: every LayerNorm)."""


def _is_ln(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None


class LNTuneLayer(AdapterLayer):
    before_activation = True  # on LayerNormAct2d: the affine output, so the merge is exact

    def __init__(self, target: nn.LayerNorm, init_weights: bool) -> None:
        super().__init__()
        c, self.dim = channels_and_dim(target)
        self.eps = target.eps
        self.ln_tune_weight = nn.Parameter(torch.zeros(c, dtype=target.weight.dtype))
        self.ln_tune_bias = nn.Parameter(torch.zeros(c, dtype=target.weight.dtype))
        if not init_weights:
            with torch.no_grad():
                random_init_(self.ln_tune_weight, 0.1)
                random_init_(self.ln_tune_bias, 0.1)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_tensor(args, kwargs)
        if self.dim == 1:
            x_hat = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), None, None, self.eps).permute(0, 3, 1, 2)
        else:
            x_hat = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        g = view_channels(self.ln_tune_weight, self.dim, output.dim())
        b = view_channels(self.ln_tune_bias, self.dim, output.dim())
        return output + (x_hat * g + b).to(output.dtype)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        target.weight.add_(self.ln_tune_weight.to(target.weight.dtype))
        target.bias.add_(self.ln_tune_bias.to(target.bias.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        target.weight.sub_(self.ln_tune_weight.to(target.weight.dtype))
        target.bias.sub_(self.ln_tune_bias.to(target.bias.dtype))


@register_method("ln_tune")
class LNTune(Method):
    config_cls = LNTuneConfig
    paper = "Tuning LayerNorm in Attention (arXiv:2312.11420)"
    mergeable = True
    variants = (Variant("ln_tune", {}, lr=3e-2, paper={}, gain=(0.012, 0.08)),)
    renamed_keys = {".ln_weight": ".ln_tune_weight", ".ln_bias": ".ln_tune_bias"}

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: Any, cfg: LNTuneConfig) -> str | None:
        if model is not None and cfg.targets is None and not any(_is_ln(m) for m in model.modules()):
            return (
                f"ln_tune needs affine LayerNorm modules; this {spec.name} model has none "
                f"(BatchNorm nets: try bitfit or ssf)"
            )
        return None

    @classmethod
    def sites(cls, model: nn.Module, spec: Any, cfg: LNTuneConfig) -> list[Site]:
        return non_head_sites(model, spec, cfg, "ln_tune", accept=_is_ln)

    @classmethod
    def make_layer(cls, site: Site, cfg: LNTuneConfig) -> AdapterLayer:
        return LNTuneLayer(site.module, cfg.init_weights)

    @classmethod
    def site_params(cls, site: Site, cfg: LNTuneConfig) -> int:
        """A gain and a bias delta per channel: ``2 * C``."""
        return 2 * site.module.normalized_shape[-1]
