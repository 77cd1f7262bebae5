"""PeftVisionModel: attach, switch, merge, save and load adapters on an unmodified base model.

Adapters live in ``peft_modules[adapter_name][site]`` and act through forward hooks on named modules
of ``base_model``; the base model's module tree and state_dict keys never change, and removing the
hooks gives back the pristine model.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import AdapterFileError, load_json, load_tensors, save_json, save_tensors
from ._registry import get_method, list_methods
from ._version import __version__
from .backbones import detect_backbone
from .config import MethodConfig
from .methods._base import AdapterLayer, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
_SAVE_PREFIX = "modules_to_save-"
_BASE_PREFIX = "base_model."


def _site_key(module_name: str) -> str:
    return module_name.replace(".", "-")


def model_architecture(model: nn.Module) -> str:
    """timm's architecture name when known (``vit_base_patch16_224``), else the class name."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


class PeftVisionModel(nn.Module):
    """A base model with one or more named adapters.

    Args:
        model: the base model (timm, SAM, any ``nn.Module``); its parameters are frozen.
        config: the first adapter's config.
        adapter_name: the first adapter's name.
    """

    def __init__(self, model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PeftVisionModel):
            raise TypeError("model is already a PeftVisionModel; use model.add_adapter(name, config)")
        self.base_model = model
        self.spec = detect_backbone(model)
        self.peft_modules = nn.ModuleDict()
        self.peft_config: dict[str, MethodConfig] = {}
        self._targets: dict[str, dict[str, str]] = {}  # adapter -> site key -> module name
        self._handles: dict[str, list[Any]] = {}
        self._base_trained: dict[str, list[str]] = {}
        self.active_adapter: str | None = None
        self._merged: str | None = None
        self._unloaded = False
        built = self._build(adapter_name, config)  # may raise: nothing changed yet
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # restored on unload
        for p in model.parameters():
            p.requires_grad_(False)
        self._attach(adapter_name, config, *built)
        self.set_adapter(adapter_name)

    # attribute fall-through so timm's API (set_grad_checkpointing, forward_features ...) keeps working
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_modules", "_modules"):
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the base model with the active adapter's hooks in effect."""
        if self._unloaded:
            raise RuntimeError(
                "this PeftVisionModel was unloaded; use the model that merge_and_unload()/unload() returned"
            )
        return self.base_model(*args, **kwargs)

    # adapters ----------------------------------------------------------------------------------
    @property
    def method(self) -> Any:
        """The method class of the active adapter."""
        return get_method(self.peft_config[self.active_adapter].method)

    def _build(self, name: str, config: MethodConfig) -> tuple[list, list, list[str]]:
        if not isinstance(config, MethodConfig):
            raise TypeError(f"config must be a MethodConfig (e.g. vp.LoRAConfig(...)), got {type(config).__name__}")
        if not name or "." in name or not isinstance(name, str):
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.peft_config:
            raise ValueError(
                f"an adapter named {name!r} exists already; delete_adapter({name!r}) first or pick another name"
            )
        method = get_method(config.method)
        if method.trains_base and any(get_method(c.method).trains_base for c in self.peft_config.values()):
            raise ValueError(
                "only one full fine-tuning adapter can live on a model (it trains the base weights in place)"
            )
        reason = method.unsupported_reason(self.base_model, self.spec, config)
        if reason:
            raise ValueError(reason)
        layers = method.build(self.base_model, self.spec, config)
        modules = dict(self.base_model.named_modules())
        save_names = config.modules_to_save if config.modules_to_save is not None else self.spec.head(self.base_model)
        saves = []
        for n in save_names:
            if n not in modules or not n:
                close = difflib.get_close_matches(n, [m for m in modules if m], n=5, cutoff=0.5)
                raise ValueError(f"modules_to_save: no module named {n!r} in the base model. Close names: {close}")
            saves.append((n, ModulesToSave(modules[n], config.init_weights)))
        base_trained = method.base_parameters_to_train(self.base_model, config)
        skip = tuple(n + "." for n in save_names)
        base_trained = [p for p in base_trained if not p.startswith(skip)]
        return layers, saves, base_trained

    def _attach(self, name: str, config: MethodConfig, layers: list, saves: list, base_trained: list[str]) -> None:
        modules = dict(self.base_model.named_modules())
        group = nn.ModuleDict()
        targets: dict[str, str] = {}
        handles = []
        ref = next(self.base_model.parameters(), None)
        for prefix, items in (("", layers), (_SAVE_PREFIX, saves)):
            for module_name, layer in items:
                key = prefix + _site_key(module_name)
                if key in group:
                    raise RuntimeError(f"two layers of one adapter at {module_name!r}")
                if ref is not None:
                    layer.to(device=ref.device)
                    if ref.is_floating_point() and not isinstance(layer, ModulesToSave):
                        layer.to(dtype=ref.dtype)
                group[key] = layer
                targets[key] = module_name
                target = modules[module_name]
                if layer.uses_before:
                    handles.append(target.register_forward_pre_hook(layer._pre_hook, with_kwargs=True))
                if layer.uses_after:
                    handles.append(target.register_forward_hook(layer._post_hook, with_kwargs=True))
        self.peft_modules[name] = group
        self.peft_config[name] = config
        self._targets[name] = targets
        self._handles[name] = handles
        self._base_trained[name] = base_trained

    def add_adapter(self, name: str, config: MethodConfig) -> None:
        """Attach another adapter (inactive until :meth:`set_adapter`)."""
        built = self._build(name, config)
        self._attach(name, config, *built)
        if self.active_adapter is not None:
            self._set_flags(self.active_adapter)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter: its layers act and its parameters train; others are frozen."""
        self._check_name(name)
        if self._merged is not None and self._merged != name:
            raise RuntimeError(f"adapter {self._merged!r} is merged; unmerge() before switching to {name!r}")
        self.active_adapter = name
        self._set_flags(name)

    def _set_flags(self, active: str | None) -> None:
        for adapter, group in self.peft_modules.items():
            on = adapter == active
            for layer in group.values():
                layer.active = on
                for p in layer.parameters():
                    p.requires_grad_(on)
        params = dict(self.base_model.named_parameters())
        for adapter, names in self._base_trained.items():
            for n in names:
                params[n].requires_grad_(adapter == active)

    def _check_name(self, name: str) -> None:
        if name not in self.peft_config:
            raise KeyError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter: its hooks, parameters and config."""
        self._check_name(name)
        if self._merged == name:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        for h in self._handles.pop(name):
            h.remove()
        del self.peft_modules[name]
        del self.peft_config[name]
        del self._targets[name]
        for n in self._base_trained.pop(name):
            dict(self.base_model.named_parameters())[n].requires_grad_(False)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._set_flags(self.active_adapter)

    @property
    def adapters(self) -> list[str]:
        return list(self.peft_config)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model's output."""
        if self._merged is not None:
            raise RuntimeError("cannot disable a merged adapter; unmerge() first")
        if self.active_adapter and get_method(self.peft_config[self.active_adapter].method).trains_base:
            raise RuntimeError(
                "full fine-tuning changes the base weights in place; there is no base output to fall back to"
            )
        states = {id(layer): layer.active for group in self.peft_modules.values() for layer in group.values()}
        try:
            for group in self.peft_modules.values():
                for layer in group.values():
                    layer.active = False
            yield
        finally:
            for group in self.peft_modules.values():
                for layer in group.values():
                    layer.active = states[id(layer)]

    # merging -----------------------------------------------------------------------------------
    def _layers(self, name: str) -> list[tuple[AdapterLayer, nn.Module]]:
        modules = dict(self.base_model.named_modules())
        group = self.peft_modules[name]
        return [(group[key], modules[mod]) for key, mod in self._targets[name].items()]

    def merge(self) -> None:
        """Fold the active adapter into the base weights (its hooks then do nothing)."""
        name = self.active_adapter
        if name is None:
            raise RuntimeError("no active adapter to merge")
        if self._merged == name:
            return
        method = get_method(self.peft_config[name].method)
        if not method.mergeable:
            mergeable = [m for m in list_methods() if get_method(m).mergeable]
            raise ValueError(
                f"method {method.name!r} cannot be merged into the base weights (its update is not a "
                f"weight change of the target modules); mergeable methods: {', '.join(mergeable)}"
            )
        for layer, target in self._layers(name):
            layer.merge(target)
            layer.merged = True
        self._merged = name

    def unmerge(self) -> None:
        """Undo :meth:`merge` (up to floating-point rounding)."""
        if self._merged is None:
            return
        for layer, target in reversed(self._layers(self._merged)):
            layer.unmerge(target)
            layer.merged = False
        self._merged = None

    def _remove_all(self) -> nn.Module:
        for handles in self._handles.values():
            for h in handles:
                h.remove()
        self._handles = {n: [] for n in self._handles}
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        self._unloaded = True
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter, remove every hook and return the plain base model."""
        self.merge()
        return self._remove_all()

    def unload(self) -> nn.Module:
        """Remove every hook without merging and return the base model as it was."""
        self.unmerge()
        return self._remove_all()

    # parameters --------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total counts the base model and every adapter."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> str:
        """Print and return ``trainable: 0.39M / 86.2M (0.45%)``."""
        t, n = self.get_nb_trainable_parameters()
        line = f"trainable: {t / 1e6:.2f}M / {n / 1e6:.1f}M ({100.0 * t / max(n, 1):.2f}%)"
        print(line)
        return line

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors that :meth:`save_adapter` writes for adapter ``name`` (default: active)."""
        name = name or self.active_adapter
        self._check_name(name)
        out = {k: v for k, v in self.peft_modules[name].state_dict().items()}
        params = dict(self.base_model.named_parameters())
        for n in self._base_trained[name]:
            out[_BASE_PREFIX + n] = params[n]
        return out

    # saving and loading ------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike, adapter_name: str | None = None) -> Path:
        """Write ``adapter.safetensors`` and ``adapter_config.json`` (atomically) into ``directory``."""
        name = adapter_name or self.active_adapter
        self._check_name(name)
        if self._merged == name:
            raise RuntimeError("unmerge() before saving: merged weights would be saved twice")
        directory = Path(directory)
        tensors = self.adapter_state_dict(name)
        cfg = self.peft_config[name]
        meta = {
            "format_version": 1,
            "visionpeft_version": __version__,
            "method": cfg.method,
            "config": cfg.to_dict(),
            "backbone": self.spec.name,
            "architecture": model_architecture(self.base_model),
            "sites": self._targets[name],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        save_tensors(directory / WEIGHTS_NAME, tensors, metadata={"method": cfg.method})
        save_json(directory / CONFIG_NAME, meta)
        return directory

    def load_adapter(
        self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        """Attach the adapter saved in ``directory`` under ``adapter_name`` and make it active."""
        directory = Path(directory)
        meta, cfg = read_adapter_config(directory)
        check_compatible(meta, self.base_model, self.spec, directory)
        tensors = load_tensors(directory / WEIGHTS_NAME)
        self.add_adapter(adapter_name, cfg)
        try:
            _load_checked(self, adapter_name, tensors, directory)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_adapter(adapter_name)
        if not is_trainable:
            for p in self.parameters():
                p.requires_grad_(False)


def read_adapter_config(directory: Path) -> tuple[dict, MethodConfig]:
    if not directory.exists():
        raise AdapterFileError(f"adapter directory not found: {directory}")
    meta = load_json(directory / CONFIG_NAME)
    if not isinstance(meta, dict) or "config" not in meta or "method" not in meta:
        raise AdapterFileError(
            f"{directory / CONFIG_NAME} is not a visionpeft adapter config (no 'method' / 'config')"
        )
    try:
        method = get_method(meta["method"])
    except KeyError as e:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {e.args[0]}") from None
    cfg = method.config_cls.from_dict(meta["config"])
    return meta, cfg


def check_compatible(meta: dict, model: nn.Module, spec: Any, directory: Path) -> None:
    arch = model_architecture(model)
    if meta.get("backbone") != spec.name or meta.get("architecture") != arch:
        raise AdapterFileError(
            f"adapter in {directory} was saved for {meta.get('architecture')!r} (backbone spec "
            f"{meta.get('backbone')!r}); this model is {arch!r} ({spec.name!r})"
        )


def _load_checked(model: PeftVisionModel, name: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.adapter_state_dict(name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatches: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
        if missing:
            parts.append(f"missing in file: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"not in model: {', '.join(unexpected[:5])}" + (" ..." if len(unexpected) > 5 else ""))
        raise AdapterFileError(f"adapter {directory / WEIGHTS_NAME} does not fit this model: " + " | ".join(parts))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))


def get_peft_model(
    model: nn.Module, config: MethodConfig | str, adapter_name: str = "default", **kwargs: Any
) -> PeftVisionModel:
    """Freeze ``model`` and attach an adapter.

    Args:
        model: any ``nn.Module`` (timm backbones and SAM get their spec automatically).
        config: a method config (``vp.LoRAConfig(rank=8)``) or a registered method name
            (``"adaptformer"``) with its options as keyword arguments.
    """
    if isinstance(config, str):
        config = get_method(config).config_cls.from_dict(kwargs)
    elif kwargs:
        raise TypeError(
            f"keyword options {sorted(kwargs)} are only accepted with a method name, not with a config object"
        )
    return PeftVisionModel(model, config, adapter_name)


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftVisionModel:
    """Attach a saved adapter to a base model (or to an existing :class:`PeftVisionModel`).

    Checks the backbone, the method and every tensor shape; on any mismatch it raises
    :class:`AdapterFileError` naming what differs and leaves ``model`` unchanged. The returned model
    is frozen unless ``is_trainable``.
    """
    if isinstance(model, PeftVisionModel):
        model.load_adapter(directory, adapter_name, is_trainable)
        return model
    directory = Path(directory)
    meta, cfg = read_adapter_config(directory)
    check_compatible(meta, model, detect_backbone(model), directory)
    tensors = load_tensors(directory / WEIGHTS_NAME)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = PeftVisionModel(model, cfg, adapter_name)
    try:
        _load_checked(peft_model, adapter_name, tensors, directory)
    except Exception:
        peft_model._remove_all()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        raise
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
    return peft_model
