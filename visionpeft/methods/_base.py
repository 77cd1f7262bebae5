"""Shared adapter bookkeeping and the merge contract.

An :class:`AdapterLayer` is the trainable piece attached at one *site* (one named module of the base
model). It reacts through module hooks: :meth:`AdapterLayer.before` runs as a forward pre-hook and may
replace the module's inputs, :meth:`AdapterLayer.after` runs as a forward hook and may replace its
output. The wrapper owns the hooks; a layer only says what it does when it is active and unmerged.

Merge contract: a layer with ``mergeable = True`` implements :meth:`merge` (fold its effect into the
target module's parameters, in place) and :meth:`unmerge` (take it out again). While merged its hooks
do nothing, so merged, unmerged and ``merge_and_unload()`` outputs agree up to rounding.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones._spec import BackboneSpec
from ..config import MethodConfig


class AdapterLayer(nn.Module):
    """Base class of every adapter layer (one adapter at one site)."""

    mergeable: ClassVar[bool] = False
    uses_before: ClassVar[bool] = False
    uses_after: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        # plain attributes, not buffers: they are switches, not state to save
        self.active = False
        self.merged = False

    # hook entry points (called by the wrapper's hooks) -----------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active or self.merged:
            return None
        return self.before(module, args, kwargs)

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.active or self.merged:
            return None
        return self.after(module, args, kwargs, output)

    # what subclasses implement -------------------------------------------------------------------
    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return None

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return None

    def merge(self, target: nn.Module) -> None:
        raise NotImplementedError

    def unmerge(self, target: nn.Module) -> None:
        raise NotImplementedError


class ModulesToSave(AdapterLayer):
    """A trainable copy of a base module (usually the classification head).

    The copy replaces the original's output while the adapter is active, so the base module is never
    touched: disabling the adapter gives the original output back. Merging copies the trained weights
    into the base module (the original values are kept to unmerge).
    """

    mergeable = True

    def __init__(self, target: nn.Module, init_weights: bool = True) -> None:
        super().__init__()
        self.module = copy_without_hooks(target)
        for p in self.module.parameters():
            p.requires_grad_(True)
            if not init_weights:  # a copy that differs from the original, so equivalence tests can fail
                with torch.no_grad():
                    p.add_(torch.randn_like(p) * 0.05)
        self._saved: dict[str, torch.Tensor] | None = None

    def after(self, module, args, kwargs, output):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        self._saved = {k: v.detach().clone() for k, v in target.state_dict().items()}
        target.load_state_dict(self.module.state_dict())

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        if self._saved is not None:
            target.load_state_dict(self._saved)
            self._saved = None


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """Deep copy of a module that leaves behind the hooks (and so the adapters) attached to it."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d is not None:
                memo[id(d)] = type(d)()
    return copy.deepcopy(module, memo)


class Method:
    """A PEFT method: its config class, its traits, and how it builds layers for a model.

    Traits (class attributes) let the tests and tools reason about methods without hand-kept lists:
    ``mergeable``; ``identity_at_init`` (output equals the base model's with the paper's init);
    ``trains_base`` (updates base parameters in place: full fine-tuning); ``needs`` (spec features
    the method requires).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    trains_base: ClassVar[bool] = False
    default_roles: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @classmethod
    def unsupported_reason(cls, model: nn.Module, spec: BackboneSpec, cfg: MethodConfig) -> str | None:
        """Why the method cannot run on this backbone (``None`` when it can)."""
        if cfg.targets is None and cls.default_roles and cls.default_targets(spec) is None:
            wanted = " or ".join("+".join(r) for r in cls.default_roles)
            return (
                f"{cls.name} needs the role(s) {wanted}, which the {spec.name} spec does not define; "
                f"pass targets=[module-name patterns]"
            )
        return None

    @classmethod
    def default_targets(cls, spec: BackboneSpec) -> list[str] | None:
        """The first group of default roles that the spec defines, or ``None``."""
        for group in cls.default_roles:
            if all(spec.has_role(r) for r in group):
                return list(group)
        return None

    @classmethod
    def targets_for(cls, spec: BackboneSpec, cfg: MethodConfig) -> list[str]:
        if cfg.targets is not None:
            return list(cfg.targets)
        t = cls.default_targets(spec)
        if t is None:
            reason = cls.unsupported_reason(None, spec, cfg)  # type: ignore[arg-type]
            raise ValueError(reason or f"{cls.name}: no default targets on {spec.name}")
        return t

    @classmethod
    def build(cls, model: nn.Module, spec: BackboneSpec, cfg: MethodConfig) -> list[tuple[str, AdapterLayer]]:
        """Return ``(module_name, layer)`` pairs; must not modify ``model``."""
        raise NotImplementedError

    @classmethod
    def base_parameters_to_train(cls, model: nn.Module, cfg: MethodConfig) -> list[str]:
        """Names of base parameters trained in place (only full fine-tuning has any)."""
        return []


# building blocks shared by several methods -------------------------------------------------------


def lora_init_(weight: torch.Tensor) -> None:
    """Kaiming-uniform with a=sqrt(5): nn.Linear's default, used for LoRA's A and adapters' down."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def random_init_(t: torch.Tensor, std: float = 0.02) -> None:
    """The non-trivial random initialisation used with ``init_weights=False``."""
    nn.init.normal_(t, std=std)


def channel_dim(layout: str) -> int:
    return 1 if layout == "NCHW" else -1


class Bottleneck(nn.Module):
    """Down-projection, activation, up-projection on the channel axis of any layout.

    Args:
        c_in: input channels. c_out: output channels. bottleneck: hidden width.
        layout: ``NLC`` / ``NHWC`` (channels last, Linear) or ``NCHW`` (1x1 convs).
        act: activation module. dropout: dropout on the hidden features.
        init_weights: ``True``: down Kaiming-uniform, up and biases zero (identity at init);
            ``False``: everything random.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        bottleneck: int,
        layout: str,
        act: nn.Module | None = None,
        dropout: float = 0.0,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.down = nn.Linear(c_in, bottleneck)
        self.act = act if act is not None else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, c_out)
        with torch.no_grad():
            lora_init_(self.down.weight)
            self.down.bias.zero_()
            if init_weights:
                self.up.weight.zero_()
                self.up.bias.zero_()
            else:
                random_init_(self.up.weight, 0.1)
                random_init_(self.up.bias, 0.1)
                random_init_(self.down.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C_in) -> (..., C_out) for channels-last layouts; (B, C_in, H, W) -> (B, C_out, H, W) for NCHW."""
        if self.layout == "NCHW":
            h = F.conv2d(x, self.down.weight[:, :, None, None], self.down.bias)
            h = self.dropout(self.act(h))
            return F.conv2d(h, self.up.weight[:, :, None, None], self.up.bias)
        return self.up(self.dropout(self.act(self.down(x))))


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError("adapter site received no tensor input")
