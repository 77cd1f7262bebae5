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

from ._io import AdapterFileError, check_field_types, load_json, read_adapter_files, save_adapter_files
from ._registry import get_method, list_methods
from ._version import __version__
from .backbones import detect_backbone
from .config import MethodConfig
from .methods._base import AdapterLayer, ModulesToSave

CONFIG_NAME = "adapter_config.json"
# 2: method-prefixed parameter names (``adaptformer_down`` ...), DoRA magnitudes over adapted rows only,
#    the published Conv-Adapter, AdaptFormer / serial adapters outside LayerScale and DropPath
FORMAT_VERSION = 2
WEIGHTS_NAME = "adapter.safetensors"
_SAVE_PREFIX = "modules_to_save-"
_BASE_PREFIX = "base_model."
_WRAPPED_ATTR = "_visionpeft_wrapped"  # set on a base model while a PeftVisionModel wraps it


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
        _refuse_wrapped(model)
        self.base_model = model
        self.spec = detect_backbone(model)
        self.peft_modules = nn.ModuleDict()
        self.training = model.training  # the wrapper starts in the model's mode, as its adapters do
        self.peft_modules.training = model.training
        self.peft_config: dict[str, MethodConfig] = {}
        self._targets: dict[str, dict[str, str]] = {}  # adapter -> site key -> module name
        self._handles: dict[str, list[Any]] = {}
        self._base_trained: dict[str, list[str]] = {}
        self.active_adapter: str | None = None
        self._merged: str | None = None
        self._unloaded = False
        built = self._build(adapter_name, config)  # may raise: nothing changed yet
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # restored on unload
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            self._attach(adapter_name, config, *built)
            self.set_adapter(adapter_name)
        except BaseException:
            for h in self._handles.get(adapter_name, []):
                h.remove()
            for n, p in model.named_parameters():
                p.requires_grad_(self._requires_grad[n])
            raise
        # a plain attribute (not in the state_dict): a second wrapper on this model is refused until unload
        model.__dict__[_WRAPPED_ATTR] = True

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
        inside = [m for m, _ in layers for n in save_names if m == n or m.startswith(n + ".")]
        if inside:
            raise ValueError(
                f"{config.method} targets {inside[:3]} lie inside modules_to_save {list(save_names)}, which train "
                "as a whole copy (the method's layers there would never run): set modules_to_save=[] (or leave "
                "that module out of it) to adapt it with the method, or exclude those modules from the targets"
            )
        base_trained = method.base_parameters_to_train(self.base_model, config)
        skip = tuple(n + "." for n in save_names)
        base_trained = [p for p in base_trained if not p.startswith(skip)]
        return layers, saves, base_trained

    def _attach(self, name: str, config: MethodConfig, layers: list, saves: list, base_trained: list[str]) -> None:
        modules = dict(self.base_model.named_modules())
        group = nn.ModuleDict()
        group.training = self.base_model.training
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
                layer.train(self.base_model.training)  # a new adapter follows the model's train / eval mode
                group[key] = layer
                targets[key] = module_name
                handles += layer.attach(modules[module_name])
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
        self.base_model.__dict__.pop(_WRAPPED_ATTR, None)
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
        return print_trainable(*self.get_nb_trainable_parameters())

    def no_weight_decay(self) -> set[str]:
        """Names of trainable parameters that take no weight decay (timm's convention): what each adapter
        layer declares, plus what the base model declares for its own parameters (full fine-tuning)."""
        out = set()
        for adapter, group in self.peft_modules.items():
            for key, layer in group.items():
                for n in layer.no_weight_decay():
                    out.add(f"peft_modules.{adapter}.{key}.{n}")
        base = getattr(self.base_model, "no_weight_decay", None)
        if callable(base):
            out |= {f"base_model.{n}" for n in base()}
        return out

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
        """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``.

        Each file is written atomically (temporary file, then rename), the tensors first and the config
        last; the config records the SHA-256 of the tensors file, so a load that runs while another
        save goes on never combines the halves of two saves.
        """
        name = adapter_name or self.active_adapter
        self._check_name(name)
        if self._merged == name:
            raise RuntimeError("unmerge() before saving: merged weights would be saved twice")
        directory = Path(directory)
        tensors = self.adapter_state_dict(name)
        cfg = self.peft_config[name]
        meta = {
            "format_version": FORMAT_VERSION,
            "visionpeft_version": __version__,
            "method": cfg.method,
            "config": cfg.to_dict(),
            "backbone": self.spec.name,
            "architecture": model_architecture(self.base_model),
            "sites": self._targets[name],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        save_adapter_files(directory, CONFIG_NAME, WEIGHTS_NAME, meta, tensors, metadata={"method": cfg.method})
        return directory

    def load_adapter(
        self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> None:
        """Attach the adapter saved in ``directory`` under ``adapter_name`` and make it active.

        The files, the config, the backbone and every tensor (name, shape, dtype, finite values) are
        checked before the model is touched; a call that fails changes nothing (adapters, hooks,
        parameters, ``requires_grad``, active adapter).

        Args:
            directory: a folder written by :meth:`save_adapter`.
            adapter_name: the name of the new adapter (must not exist yet).
            is_trainable: ``False`` (default) loads for inference: every parameter is frozen and the
                model is put in eval mode (dropout off, deterministic outputs), as huggingface peft
                does. ``True`` lets the loaded adapter train and leaves the train / eval mode as it is.

        Raises:
            AdapterFileError: a file is missing, unreadable or invalid, or does not fit this model.
            RuntimeError: an adapter is merged (``unmerge()`` first) or the model was unloaded.
        """
        if self._unloaded:
            raise RuntimeError("this PeftVisionModel was unloaded; load the adapter into the model it returned")
        if self._merged is not None:
            raise RuntimeError(
                f"adapter {self._merged!r} is merged into the base weights; unmerge() before loading another adapter"
            )
        _check_new_name(adapter_name, self.peft_config)
        directory = Path(directory)
        meta, cfg, tensors = _read_adapter(directory)
        check_compatible(meta, self.base_model, self.spec, directory)
        try:
            built = self._build(adapter_name, cfg)
        except (ValueError, TypeError, KeyError) as e:
            raise AdapterFileError(f"the adapter in {directory} cannot be attached to this model: {e}") from e
        _check_tensors(_expected_state(self.base_model, *built), tensors, directory / WEIGHTS_NAME)
        snapshot = _flags(self)
        try:
            self._attach(adapter_name, cfg, *built)
            self.peft_modules[adapter_name].train(self.training)  # new layers follow the model's mode
            _load_checked(self, adapter_name, tensors, directory)
            self.set_adapter(adapter_name)
        except BaseException:
            _roll_back(self, adapter_name, snapshot)
            raise
        if not is_trainable:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()


def print_trainable(trainable: int, total: int) -> str:
    """Print and return ``trainable: 0.39M / 86.2M (0.45%)``."""
    line = f"trainable: {trainable / 1e6:.2f}M / {total / 1e6:.1f}M ({100.0 * trainable / max(total, 1):.2f}%)"
    print(line)
    return line


def _check_new_name(name: Any, existing: dict[str, Any]) -> None:
    if not name or not isinstance(name, str) or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in existing:
        raise ValueError(
            f"an adapter named {name!r} exists already; delete_adapter({name!r}) first or pick another name"
        )


def _refuse_wrapped(model: nn.Module, loading: bool = False) -> None:
    """Raise when ``model`` (or a module in it) already carries the hooks of a PeftVisionModel."""
    carries = False
    for m in model.modules():
        if m.__dict__.get(_WRAPPED_ATTR):
            carries = True
            break
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            if any(isinstance(getattr(h, "__self__", None), AdapterLayer) for h in m.__dict__.get(attr, {}).values()):
                carries = True
        if carries:
            break
    if not carries:
        return
    if loading:
        fix = (
            "load the adapter through that wrapper (wrapper.load_adapter(directory, name), or "
            "vp.load_adapter(wrapper, directory, name)), or call its unload() / merge_and_unload() first"
        )
    else:
        fix = (
            "add another adapter with add_adapter(name, config) on that wrapper, or call its unload() / "
            "merge_and_unload() first to get the plain model back"
        )
    raise ValueError(f"this model already carries visionpeft adapters (a PeftVisionModel wraps it): {fix}")


def _flags(model: PeftVisionModel) -> dict[str, Any]:
    """What a failed load may have changed besides the new adapter's own entries."""
    return {
        "requires_grad": [(p, p.requires_grad) for p in model.parameters()],
        "active": [(layer, layer.active) for group in model.peft_modules.values() for layer in group.values()],
        "active_adapter": model.active_adapter,
        "training": [(m, m.training) for m in model.modules()],
    }


def _roll_back(model: PeftVisionModel, name: str, snapshot: dict[str, Any]) -> None:
    """Remove every trace of adapter ``name`` (attached by a load that failed) and restore ``snapshot``."""
    for h in model._handles.pop(name, []):
        h.remove()
    if name in model.peft_modules:
        del model.peft_modules[name]
    for table in (model.peft_config, model._targets, model._base_trained):
        table.pop(name, None)
    model.active_adapter = snapshot["active_adapter"]
    for layer, active in snapshot["active"]:
        layer.active = active
    for p, flag in snapshot["requires_grad"]:
        p.requires_grad_(flag)
    for m, training in snapshot["training"]:
        m.training = training


def _read_adapter(directory: Path) -> tuple[dict, MethodConfig, dict[str, torch.Tensor]]:
    """The config (raw and parsed) and the tensors of the adapter in ``directory``, checked as files."""
    if not directory.exists():
        raise AdapterFileError(f"adapter directory not found: {directory}")
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory: give the folder that save_adapter() wrote")
    meta, tensors = read_adapter_files(directory, CONFIG_NAME, WEIGHTS_NAME)
    meta, tensors = _upgrade(meta, tensors, directory / CONFIG_NAME)
    cfg = _config_from_meta(meta, directory / CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    bad = []
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad.append(f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()} values)")
    if bad:
        raise AdapterFileError(
            f"adapter {path} holds NaN or infinite values in {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + ": the adapter was saved from a diverged run; save it again from a finite state"
        )
    return meta, cfg, tensors


_REQUIRED_KEYS = ("method", "config", "backbone", "architecture")


def _config_from_meta(meta: Any, path: Path) -> MethodConfig:
    """The method config recorded in an adapter config file; every problem names the file."""
    if not isinstance(meta, dict):
        raise AdapterFileError(
            f"{path} is not a visionpeft adapter config: a JSON object was expected, got a {type(meta).__name__}"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise AdapterFileError(f"{path} is not a visionpeft adapter config: missing key(s) {', '.join(missing)}")
    wrong = [k for k in ("method", "backbone", "architecture") if not isinstance(meta[k], str)]
    if not isinstance(meta["config"], dict):
        wrong.append("config")
    if wrong:
        raise AdapterFileError(
            f"{path}: wrong type for {', '.join(repr(k) for k in wrong)} (strings for 'method', 'backbone', "
            "'architecture'; an object for 'config')"
        )
    try:
        method = get_method(meta["method"])
    except KeyError as e:
        raise AdapterFileError(f"{path}: {e.args[0]}") from None
    config = meta["config"]
    if config.get("method", meta["method"]) != meta["method"]:
        raise AdapterFileError(
            f"{path}: 'config' is for method {config.get('method')!r} but 'method' is {meta['method']!r}"
        )
    wrong_types = check_field_types(method.config_cls, config)
    if wrong_types:
        raise AdapterFileError(f"{path}: invalid {meta['method']} config: {'; '.join(wrong_types)}")
    try:
        return method.config_cls.from_dict(config)
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterFileError(f"{path}: invalid {meta['method']} config: {e}") from e


def read_adapter_config(directory: Path) -> tuple[dict, MethodConfig]:
    """The raw JSON and the parsed method config of the adapter saved in ``directory``.

    Raises:
        AdapterFileError: naming the file, for any problem with it.
    """
    directory = Path(directory)
    if not directory.exists():
        raise AdapterFileError(f"adapter directory not found: {directory}")
    meta, _ = _upgrade(load_json(directory / CONFIG_NAME), {}, directory / CONFIG_NAME)
    return meta, _config_from_meta(meta, directory / CONFIG_NAME)


def _upgrade(meta: Any, tensors: dict[str, torch.Tensor], path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """Bring a file of an older format to today's (each method converts its own format-1 files)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        return meta, tensors  # _config_from_meta reports it
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: format_version {version!r} was written by a newer visionpeft (this one reads up to "
            f"{FORMAT_VERSION}); upgrade visionpeft"
        )
    if version == FORMAT_VERSION:
        return meta, tensors
    try:
        method = get_method(meta.get("method"))
        config, tensors = method.upgrade_v1(dict(meta["config"]), tensors)
    except KeyError:
        return meta, tensors  # an unknown method: _config_from_meta names it
    except ValueError as e:
        raise AdapterFileError(f"{path} (format 1) cannot be converted: {e}") from None
    return {**meta, "config": config, "format_version": FORMAT_VERSION}, tensors


def check_compatible(meta: dict, model: nn.Module, spec: Any, directory: Path) -> None:
    """The adapter was saved for this architecture and backbone spec. A file saved under the ``generic``
    spec (before its family had a spec of its own) still fits the same architecture: its sites are
    module names, which a spec does not change."""
    arch = model_architecture(model)
    same_spec = meta.get("backbone") in (spec.name, "generic")
    if not same_spec or meta.get("architecture") != arch:
        raise AdapterFileError(
            f"adapter in {directory} was saved for {meta.get('architecture')!r} (backbone spec "
            f"{meta.get('backbone')!r}); this model is {arch!r} ({spec.name!r})"
        )


def _expected_state(
    base_model: nn.Module, layers: list, saves: list, base_trained: list[str]
) -> dict[str, torch.Tensor]:
    """The tensors (by file key) that built but not yet attached layers will hold, as adapter_state_dict."""
    out = {}
    for prefix, items in (("", layers), (_SAVE_PREFIX, saves)):
        for module_name, layer in items:
            for k, v in layer.state_dict().items():
                out[f"{prefix}{_site_key(module_name)}.{k}"] = v
    params = dict(base_model.named_parameters())
    for n in base_trained:
        out[_BASE_PREFIX + n] = params[n]
    return out


def _check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise AdapterFileError naming ``path`` unless ``tensors`` has exactly the names, shapes and kinds of dtype."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    common = sorted(set(expected) & set(tensors))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    dtypes = [
        f"{k} ({tensors[k].dtype})"
        for k in common
        if expected[k].is_floating_point() and not tensors[k].is_floating_point()
    ]

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

    parts = []
    if wrong:
        parts.append(f"shape mismatches: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
    if missing:
        parts.append(f"missing in file: {few(missing)}")
    if unexpected:
        parts.append(f"not in model: {few(unexpected)}")
    if dtypes:
        parts.append(f"not floating-point in the file: {few(dtypes)}")
    if parts:
        raise AdapterFileError(f"adapter {path} does not fit this model: " + " | ".join(parts))


def _load_checked(model: PeftVisionModel, name: str, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy ``tensors`` into adapter ``name`` after checking that they fit (nothing is copied otherwise)."""
    expected = model.adapter_state_dict(name)
    _check_tensors(expected, tensors, directory / WEIGHTS_NAME)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))


def get_peft_model(
    model: nn.Module, config: MethodConfig | str, adapter_name: str = "default", **kwargs: Any
) -> PeftVisionModel:
    """Freeze ``model`` and attach an adapter.

    Args:
        model: any ``nn.Module`` (timm backbones and SAM get their spec automatically). A model that a
            PeftVisionModel already wraps is refused: add adapters through that wrapper
            (``add_adapter``), or ``unload()`` it first.
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

    Checks the files, the backbone, the method config and every tensor (shape, dtype, finite values);
    on any problem it raises :class:`AdapterFileError` naming the file and what differs, and leaves
    ``model`` unchanged. A base model that a PeftVisionModel already wraps is refused: pass that
    wrapper instead.

    Args:
        model: a base model, or a :class:`PeftVisionModel` (the adapter is added to it).
        directory: a folder written by :meth:`PeftVisionModel.save_adapter`.
        adapter_name: the name of the loaded adapter.
        is_trainable: ``False`` (default) loads for inference: the returned model is frozen and in eval
            mode (dropout off, deterministic outputs), as huggingface peft's loader does. ``True``
            lets the adapter train and leaves the train / eval mode as it is.
    """
    if isinstance(model, PeftVisionModel):
        model.load_adapter(directory, adapter_name, is_trainable)
        return model
    _refuse_wrapped(model, loading=True)
    _check_new_name(adapter_name, {})
    directory = Path(directory)
    meta, cfg, tensors = _read_adapter(directory)
    check_compatible(meta, model, detect_backbone(model), directory)
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        peft_model = PeftVisionModel(model, cfg, adapter_name)
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"the adapter in {directory} cannot be attached to this model: {e}") from e
    peft_model.train(model.training)  # the adapter follows the base model's train / eval mode
    try:
        _load_checked(peft_model, adapter_name, tensors, directory)
    except BaseException:
        peft_model._remove_all()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        raise
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        peft_model.eval()
    return peft_model
