"""Channel-wise affine deltas shared by BitFit, SSF and LayerNorm tuning."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from ..backbones._spec import BackboneSpec, channels_first_norm, resolve_targets
from ..config import MethodConfig
from ._base import Site


def channels_and_dim(module: nn.Module) -> tuple[int, int]:
    """(number of output channels, channel axis of the output) of a Linear / Conv / norm module."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features, 1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, nn.LayerNorm):
        c = module.normalized_shape[-1]
        return c, 1 if channels_first_norm(module) else -1
    raise TypeError(f"no channel axis known for {type(module).__name__}")


def has_channels(module: nn.Module) -> bool:
    """Modules whose output is ``weight * (...) [+ bias]`` channel-wise (bias optional)."""
    try:
        channels_and_dim(module)
    except TypeError:
        return False
    return getattr(module, "weight", None) is not None


def affine_site(module: nn.Module) -> bool:
    """Modules whose output is ``weight * (...) + bias`` channel-wise, with a bias to fold into."""
    return has_channels(module) and getattr(module, "bias", None) is not None


def view_channels(v: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """Reshape a (C,) vector to broadcast over a tensor of rank ``ndim`` on axis ``dim``."""
    if dim == -1:
        return v
    shape = [1] * ndim
    shape[dim] = -1
    return v.view(shape)


def scale_rows_(weight: torch.Tensor, gamma: torch.Tensor) -> None:
    """weight[o, ...] *= gamma[o] (output-channel scaling of a Linear / Conv / norm weight)."""
    weight.mul_(gamma.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))


def non_head_sites(
    model: nn.Module,
    spec: BackboneSpec,
    cfg: MethodConfig,
    what: str,
    accept: Callable[[nn.Module], bool] = affine_site,
) -> list[Site]:
    """Every module of the backbone that ``accept`` takes, except the classification head(s), as sites."""

    heads = spec.head(model) if cfg.targets is not None else spec.untouched(model)
    saved = cfg.modules_to_save if cfg.modules_to_save is not None else spec.head(model)

    def ok(n: str, m: nn.Module) -> bool:
        if any(n == h or n.startswith(h + ".") for h in list(heads) + list(saved)):
            return False
        return accept(m)

    targets = cfg.targets if cfg.targets is not None else [".*"]
    modules = dict(model.named_modules())
    found = resolve_targets(model, spec, targets, cfg.exclude, cfg.layers, accept=ok, what=f"{what} targets")
    return [Site(n, modules[n], role, spec.layout_of(role, modules[n]), spec) for n, role in found]
