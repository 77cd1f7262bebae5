"""Shared adapter bookkeeping: sites, layers, the method table and the merge contract.

A :class:`Method` is one row of the method table. It declares its config class, its traits
(``mergeable``, ``identity_at_init``, ``trains_base``), the roles it targets by default, the module types
it accepts, its :class:`Variant` settings (test rows, learning recipes, benchmark entries and experiment
configs are all generated from them) and its parameter-count formula. The base class resolves the
config's ``targets`` / ``exclude`` / ``layers`` into :class:`Site` objects, so a method's own code only
turns one site into one :class:`AdapterLayer`.

An :class:`AdapterLayer` is the trainable piece attached at one site. It reacts through module hooks:
:meth:`AdapterLayer.before` runs as a forward pre-hook and may replace the module's inputs,
:meth:`AdapterLayer.after` runs as a forward hook and may replace its output; :meth:`AdapterLayer.attach`
registers them (layers that read one module and write another override it). Parameter names carry the
method prefix (``lora_A``, ``adaptformer_down``, ``ln_tune_weight``).

Merge contract: a method with ``mergeable = True`` has layers implementing :meth:`AdapterLayer.merge`
(fold the effect into the target module's parameters, in place) and :meth:`AdapterLayer.unmerge`. While
merged its hooks do nothing, so merged, unmerged and ``merge_and_unload()`` outputs agree up to rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..backbones._spec import BackboneSpec, Tap, affine_output, resolve_targets
from ..config import MethodConfig


@dataclasses.dataclass(frozen=True)
class Site:
    """One resolved target of a method.

    Args:
        name: module name in the base model. module: the module. role: the spec role it matched
        (``None`` for a module-name pattern). layout: layout of the tensors entering and leaving it.
        spec: the backbone spec. host: the parent module that reads this module's weight itself
        (``F.linear(x, self.qkv.weight, bias)``; see ``BackboneSpec.hosted_weights``), else ``None``.
    """

    name: str
    module: nn.Module = dataclasses.field(repr=False)
    role: str | None
    layout: str
    spec: BackboneSpec = dataclasses.field(repr=False)
    host: nn.Module | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named setting of a method, from which the tests, tools and configs are generated.

    Args:
        id: unique name (``lora_qv``). options: config options on the tiny test and digits backbones.
        lr: AdamW learning rate that adapts the embedded digits backbone with these options.
        backbone: the embedded digits backbone it learns on (``vit`` or ``resnet``).
        paper: options at full scale (VTAB-1k configs, benchmark); ``None``: not generated there.
        stem: config file-name stem for ``paper`` (``lora-r8-qv``); ``None``: the method's name.
        paper_lr: learning rate of the generated configs (``None``: the base config's).
        gain: the learning test's bars: what the variant must gain over the head-only baseline on the
            embedded digits, ``(test-accuracy points, share of the test loss removed)``, near half the
            lowest gain measured over 3 seeds; ``None`` only for the head-only baseline itself.
        why: the reason when the accuracy bar is ``None`` (the loss bar still holds).
    """

    id: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 1e-2
    backbone: str = "vit"
    paper: dict[str, Any] | None = None
    stem: str | None = None
    paper_lr: float | None = None
    gain: tuple[float | None, float] | None = None
    why: str = ""


class AdapterLayer(nn.Module):
    """Base class of every adapter layer (one adapter at one site)."""

    uses_before: ClassVar[bool] = False
    uses_after: ClassVar[bool] = True
    before_activation: ClassVar[bool] = False
    """Whether the forward hook goes on the affine output of a norm + activation site (``BatchNormAct2d``'s
    ``drop`` child, before its activation; :meth:`after` still receives the norm's inputs as ``args``):
    layers whose effect merges into the norm's weight and bias."""

    def __init__(self) -> None:
        super().__init__()
        # plain attributes, not buffers: they are switches, not state to save
        self.active = False
        self.merged = False

    def attach(self, target: nn.Module) -> list[Any]:
        """Register this layer's hooks on ``target`` (the site module); returns the handles."""
        handles = []
        if self.uses_before:
            handles.append(target.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        point = affine_output(target) if self.uses_after and self.before_activation else target
        if self.uses_after and point is target:
            handles.append(target.register_forward_hook(self._post_hook, with_kwargs=True))
        elif self.uses_after:  # a norm + activation: its affine output, with the norm's own inputs as args
            seen: dict[str, Any] = {}

            def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
                seen.update(args=args, kwargs=kwargs)

            def affine(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                return self._post_hook(target, seen.pop("args", args), seen.pop("kwargs", kwargs), output)

            handles.append(target.register_forward_pre_hook(keep, with_kwargs=True))
            handles.append(point.register_forward_hook(affine, with_kwargs=True))
        return handles

    def no_weight_decay(self) -> set[str]:
        """Names of this layer's parameters that take no weight decay (timm's convention); 1-d tensors
        (biases, scales, norms) never take any, whatever this returns."""
        return set()

    # hook entry points ---------------------------------------------------------------------------
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
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge(self, target: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")


class TapHooks:
    """Mixin for a layer that reads the tensor at ``self.tap.source`` inside its site module and adds
    :meth:`contribution` to ``self.tap.sink``'s output.

    The read hook keeps the tensor until the sink's hook of the same forward pass consumes it (the two run
    in that order inside one call of the site module, also under activation checkpointing, which re-runs
    the whole module). ``source == sink`` (``""``: the site module itself) reads and adds at one module.
    """

    tap: Tap
    _stash: torch.Tensor | None = None

    def attach(self, target: nn.Module) -> list[Any]:
        self.tap = self.tap.resolve(target)  # a tap of layout None reads the layout of this site's source
        source, sink = target.get_submodule(self.tap.source), target.get_submodule(self.tap.sink)
        return [
            source.register_forward_hook(self._read, with_kwargs=True),
            sink.register_forward_hook(self._write, with_kwargs=True),
        ]

    def contribution(self, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What is added to the sink's ``output``, computed from the tapped tensor ``t``."""
        raise NotImplementedError

    def _read(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.active:
            self._stash = first_tensor(args, kwargs) if self.tap.read == "in" else output

    def _write(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.active:
            return None
        t, self._stash = self._stash, None
        if t is None:
            raise RuntimeError(f"{type(self).__name__}: tap {self.tap.source!r} did not run before {self.tap.sink!r}")
        return output + self.contribution(t, output).to(output.dtype)


class ModulesToSave(AdapterLayer):
    """A trainable copy of a base module (usually the classification head).

    The copy replaces the original's output while the adapter is active, so the base module is never
    touched: disabling the adapter gives the original output back. Merging copies the trained weights
    into the base module (the original values are kept to unmerge).
    """

    def __init__(self, target: nn.Module, init_weights: bool = True) -> None:
        super().__init__()
        self.module = copy_without_hooks(target)
        for p in self.module.parameters():
            p.requires_grad_(True)
            if not init_weights:  # a copy that differs from the original, so equivalence tests can fail
                with torch.no_grad():
                    p.add_(torch.randn_like(p) * 0.05)
        self._saved: dict[str, torch.Tensor] | None = None

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
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
    """A PEFT method: its config class, its traits, its variants and how it builds layers for a model.

    Traits (class attributes) let the tests and tools reason about methods without hand-kept lists:
    ``mergeable``; ``identity_at_init`` (output equals the base model's with the paper's init);
    ``trains_base`` (updates base parameters in place: full fine-tuning); ``accepts`` (module types a
    site must be; ``None``: any); ``variants`` (named settings, see :class:`Variant`).
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    trains_base: ClassVar[bool] = False
    reaches_hosted_weights: ClassVar[bool] = False
    """Whether the layers can adapt a module whose weight its parent reads itself (the site's ``host``)."""
    default_roles: ClassVar[tuple[tuple[str, ...], ...]] = ()
    accepts: ClassVar[tuple[type[nn.Module], ...] | None] = None
    variants: ClassVar[tuple[Variant, ...]] = ()
    renamed_keys: ClassVar[dict[str, str]] = {}
    """Parameter-name suffixes of adapter files of format 1 -> their names now (see :meth:`upgrade_v1`)."""

    # capabilities and targets ------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: MethodConfig) -> str | None:
        """Why the method cannot run on this backbone (``None`` when it can)."""
        if cfg.targets is None and cls.default_roles and cls.default_targets(spec, cfg) is None:
            wanted = " or ".join("+".join(r) for r in cls.default_roles)
            return (
                f"{cls.name} needs the role(s) {wanted}, which the {spec.name} spec does not define; "
                f"pass targets=[module-name patterns]"
            )
        return None

    @classmethod
    def build_refusal(cls, model: nn.Module | None, spec: BackboneSpec, cfg: MethodConfig) -> str | None:
        """For methods whose sites' modules decide (separate q / k / v, 1x1-conv MLPs): the error a dry run of
        :meth:`build` raises on ``model`` (nothing is attached), or ``None``."""
        if model is None:
            return None
        try:
            cls.build(model, spec, cfg)
        except ValueError as e:
            return str(e)
        return None

    @classmethod
    def default_targets(cls, spec: BackboneSpec, cfg: MethodConfig) -> list[str] | None:
        """The first group of default roles that the spec defines, or ``None``."""
        for group in cls.default_roles:
            if all(spec.has_role(r) for r in group):
                return list(group)
        return None

    @classmethod
    def targets_for(cls, spec: BackboneSpec, cfg: MethodConfig) -> list[str]:
        if cfg.targets is not None:
            return list(cfg.targets)
        t = cls.default_targets(spec, cfg)
        if t is None:
            raise ValueError(
                cls.unsupported_reason(None, spec, cfg) or f"{cls.name}: no default targets on {spec.name}"
            )
        return t

    @classmethod
    def accept(cls, name: str, module: nn.Module, cfg: MethodConfig) -> bool:
        """Whether a matched module can be a site (default: its type is in ``accepts``)."""
        return cls.accepts is None or isinstance(module, cls.accepts)

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: MethodConfig) -> list[Site]:
        """Resolve ``targets`` / ``exclude`` / ``layers`` to sites, in model order."""
        modules = dict(model.named_modules())
        found = resolve_targets(
            model,
            spec,
            cls.targets_for(spec, cfg),
            cfg.exclude,
            cfg.layers,
            accept=lambda n, m: cls.accept(n, m, cfg),
            what=f"{cls.name} targets",
            hosted=cls.reaches_hosted_weights,
        )
        sites = []
        for n, role in found:
            host = spec.host_of(n, modules)
            sites.append(Site(n, modules[n], role, spec.layout_of(role, modules[n]), spec, modules.get(host)))
        return sites

    # building ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, spec: BackboneSpec, cfg: MethodConfig) -> list[tuple[str, AdapterLayer]]:
        """``(module_name, layer)`` pairs, one per site; must not modify ``model``."""
        return [(s.name, cls.make_layer(s, cfg)) for s in cls.sites(model, spec, cfg)]

    @classmethod
    def make_layer(cls, site: Site, cfg: MethodConfig) -> AdapterLayer:
        """The adapter layer of one site."""
        raise NotImplementedError(f"{cls.name} does not implement make_layer")

    @classmethod
    def param_count(cls, model: nn.Module, sites: list[Site], cfg: MethodConfig) -> int:
        """Trainable parameters of the adapter at these sites by the paper's formula, the head excluded
        (the tests compare it with the built model). Default: the sum of :meth:`site_params`."""
        return sum(cls.site_params(s, cfg) for s in sites)

    @classmethod
    def site_params(cls, site: Site, cfg: MethodConfig) -> int:
        """Trainable parameters of one site's layer by the paper's formula."""
        raise NotImplementedError(f"{cls.name} does not declare its parameter-count formula")

    @classmethod
    def upgrade_v1(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Convert the config and tensors of an adapter file of format 1 (visionpeft 0.1) to today's.

        The default renames parameter suffixes by :attr:`renamed_keys`; a method whose format-1 files
        computed something else overrides this (and raises ``ValueError`` when no conversion exists).
        """
        out = {}
        for key, value in tensors.items():
            for old, new in cls.renamed_keys.items():
                if key.endswith(old):
                    key = key[: -len(old)] + new
                    break
            out[key] = value
        return config, out

    @classmethod
    def base_parameters_to_train(cls, model: nn.Module, cfg: MethodConfig) -> list[str]:
        """Names of base parameters trained in place (only full fine-tuning has any)."""
        return []


# initialisation helpers shared by several methods -------------------------------------------------


def lora_init_(weight: torch.Tensor) -> None:
    """Kaiming-uniform with a=sqrt(5): nn.Linear's default, used for LoRA's A and adapters' down."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def random_init_(t: torch.Tensor, std: float = 0.02) -> None:
    """The non-trivial random initialisation used with ``init_weights=False``."""
    nn.init.normal_(t, std=std)


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The first tensor among a hook's positional then keyword arguments."""
    if args:
        return args[0]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise ValueError("adapter site received no tensor input")


def register(layer: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    """Register ``value`` as parameter ``name`` of ``layer`` and return it."""
    p = nn.Parameter(value)
    layer.register_parameter(name, p)
    return p
