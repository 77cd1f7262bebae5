"""visionpeft: vision-first parameter-efficient fine-tuning for timm backbones and SAM.

Public API::

    import visionpeft as vp
    model = vp.get_peft_model(timm_model, vp.LoRAConfig(rank=8, qkv_slices="qv"))
    model.save_adapter("out/run1")
    model = vp.load_adapter(timm_model, "out/run1")
    dense = vp.DenseModel(vp.get_peft_model(headless_model, "lora", rank=8), "segmentation", num_classes=150)
"""

from __future__ import annotations

from ._io import AdapterFileError
from ._registry import get_backbone, get_method, list_backbones, list_methods
from ._version import __version__
from .backbones import BackboneSpec, detect_backbone
from .config import MethodConfig
from .dense import DenseModel, DenseSpec, load_adapter
from .methods.adapter import AdapterConfig
from .methods.adaptformer import AdaptFormerConfig
from .methods.bitfit import BitFitConfig
from .methods.conv_adapter import ConvAdapterConfig
from .methods.dora import DoRAConfig
from .methods.full import FullFinetuneConfig
from .methods.linear_probe import LinearProbeConfig
from .methods.ln_tune import LNTuneConfig
from .methods.lora import LoRAConfig
from .methods.parallel_adapter import ParallelAdapterConfig
from .methods.ssf import SSFConfig
from .methods.vpt import VPTConfig
from .model import PeftVisionModel, get_peft_model

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
    "LinearProbeConfig",
    "LNTuneConfig",
    "LoRAConfig",
    "MethodConfig",
    "ParallelAdapterConfig",
    "PeftVisionModel",
    "SSFConfig",
    "VPTConfig",
    "detect_backbone",
    "get_backbone",
    "get_method",
    "get_peft_model",
    "list_backbones",
    "list_methods",
    "load_adapter",
]
