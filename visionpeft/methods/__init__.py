"""PEFT methods; importing this package registers them. One file per method."""

from . import adapter, adaptformer, baselines, bitfit, conv_adapter, dora, ln_tune, lora, parallel_adapter, ssf, vpt  # noqa: F401
from ._base import AdapterLayer, Method

__all__ = ["AdapterLayer", "Method"]
