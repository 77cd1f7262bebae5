"""visionpeft: vision-first parameter-efficient fine-tuning for timm backbones and SAM.

Public API::

    import visionpeft as vp
    model = vp.get_peft_model(timm_model, vp.LoRAConfig(rank=8, qkv_slices="qv"))
    model.save_adapter("out/run1")
    model = vp.load_adapter(timm_model, "out/run1")
    dense = vp.DenseModel(vp.get_peft_model(headless_model, "lora", rank=8), "segmentation", num_classes=150)
"""

from __future__ import annotations

import os as _os

import torch.nn as _nn

from . import sam
from ._io import AdapterFileError
from ._registry import get_backbone, get_method, list_backbones, list_methods
from ._version import __version__
from .backbones import BackboneSpec, detect_backbone
from .config import MethodConfig
from .dense import DenseModel, DenseSpec
from .dense import load_adapter as _load_dense_or_method
from .methods.adapter import AdapterConfig
from .methods.adaptformer import AdaptFormerConfig
from .methods.bitfit import BitFitConfig
from .methods.conv_adapter import ConvAdapterConfig
from .methods.dora import DoRAConfig
from .methods.full import FullFinetuneConfig
from .methods.ia3 import IA3Config
from .methods.linear_probe import LinearProbeConfig
from .methods.ln_tune import LNTuneConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoRAConfig
from .methods.parallel_adapter import ParallelAdapterConfig
from .methods.ssf import SSFConfig
from .methods.vera import VeRAConfig
from .methods.vpt import VPTConfig
from .model import PeftVisionModel, get_peft_model
from .sam import SamModel


def load_adapter(
    model: _nn.Module, directory: str | _os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftVisionModel | DenseModel | SamModel:
    """Load a saved adapter onto a base model: a :class:`PeftVisionModel` for a classification adapter, a
    :class:`DenseModel` for a dense one (``dense_config.json``), a :class:`SamModel` for a SAM one
    (``sam_config.json``; the base model is a ``segment_anything`` ``Sam``). The files and every tensor are
    checked; a bad file is named (:class:`AdapterFileError`). ``is_trainable=False`` returns a frozen model in
    eval mode."""
    if sam.is_sam_adapter(directory):
        if isinstance(model, PeftVisionModel):
            raise AdapterFileError(f"{directory} holds a SAM adapter; load it onto the base Sam, not a wrapper")
        return sam.load_sam_adapter(model, directory, adapter_name, is_trainable)
    return _load_dense_or_method(model, directory, adapter_name, is_trainable)


__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterFileError",
    "AdaptFormerConfig",
    "BackboneSpec",
    "BitFitConfig",
    "ConvAdapterConfig",
    "DenseModel",
    "DenseSpec",
    "DoRAConfig",
    "FullFinetuneConfig",
    "IA3Config",
    "LinearProbeConfig",
    "LNTuneConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "MethodConfig",
    "ParallelAdapterConfig",
    "PeftVisionModel",
    "SamModel",
    "SSFConfig",
    "VeRAConfig",
    "VPTConfig",
    "detect_backbone",
    "get_backbone",
    "get_method",
    "get_peft_model",
    "list_backbones",
    "list_methods",
    "sam",
    "load_adapter",
]
