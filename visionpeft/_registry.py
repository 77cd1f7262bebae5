"""Registries for methods and backbone specs.

A registry name appears only at the boundary of the library (``get_peft_model(model, "lora")``,
``--set method=lora``); inside, objects are composed directly. The registries are filled by the
packages' own imports (importing :mod:`visionpeft` imports ``methods`` and ``backbones``, whose modules
call the ``register_*`` decorators), as timm fills its model registry; this module imports none of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

_METHODS: dict[str, Any] = {}
_BACKBONES: dict[str, Any] = {}


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Registered: {', '.join(sorted(candidates))}."


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`~visionpeft.methods._base.Method` under ``name``."""

    def deco(cls: type) -> type:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        cls.config_cls.method = name
        _METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> Any:
    """Return the method class registered under ``name``; the error lists the registered ones."""
    if name not in _METHODS:
        raise KeyError(f"unknown PEFT method {name!r}.{_suggest(name, list(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def register_backbone(spec: Any) -> Any:
    """Register a :class:`~visionpeft.backbones._spec.BackboneSpec` (matched in registration order)."""
    _BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> Any:
    """Return the backbone spec registered under ``name``."""
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone spec {name!r}.{_suggest(name, list(_BACKBONES))}")
    return _BACKBONES[name]


def list_backbones() -> list[str]:
    """Names of every registered backbone spec, in matching order (``generic`` last)."""
    return [n for n in _BACKBONES if n != "generic"] + (["generic"] if "generic" in _BACKBONES else [])


def unregister_method(name: str) -> None:
    """Remove a registered method (for methods defined at run time, e.g. in tests)."""
    _METHODS.pop(name, None)
