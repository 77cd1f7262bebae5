"""PEFT methods, one file per method; importing this package imports every module in it, which
registers the methods (a new method is a new file here and nothing else)."""

from __future__ import annotations

import importlib
import pkgutil

from ._base import AdapterLayer, Method, Site, Variant

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AdapterLayer", "Method", "Site", "Variant"]
