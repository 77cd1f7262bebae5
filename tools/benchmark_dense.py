"""The settings of ``tools/benchmark.py --dense``: semantic segmentation with UperNet as in ``configs/ade20k``, one
setting per backbone family and method, each against full fine-tuning of the same backbone, neck and head, and the
experiment config that builds each setting (random weights). Imported by ``tools/benchmark.py``, which measures."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from visionpeft.engine.experiment import ExperimentConfig, from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class DenseSetting:
    """One dense benchmark setting: the backbone family, the method with its options as in the matching
    ``configs/ade20k`` file, the neck, and the full fine-tuning setting of the same backbone, neck and head
    (the ratios' denominator)."""

    family: str
    method: str
    options: dict[str, Any]
    neck: str
    reference: str


# family -> (timm model as in configs/ade20k, whether the config builds it at the crop size (img_size))
DENSE_MODELS: dict[str, tuple[str, bool]] = {
    "vit": ("vit_base_patch16_224", False),  # dynamic_img_size: the position embedding is resampled
    "swin": ("swin_base_patch4_window7_224", True),
    "convnext": ("convnext_base", False),
}
DENSE_FAMILIES = tuple(DENSE_MODELS)
_LORA_QV = {"rank": 8, "qkv_slices": "qv"}
_ADAPTFORMER = {"bottleneck": 64, "scale": 0.1}
DENSE_SETTINGS: dict[str, DenseSetting] = {
    "vit_full": DenseSetting("vit", "full", {}, "simple_pyramid", "vit_full"),
    "vit_adaptformer": DenseSetting("vit", "adaptformer", _ADAPTFORMER, "simple_pyramid", "vit_full"),
    "vit_lora": DenseSetting("vit", "lora", _LORA_QV, "simple_pyramid", "vit_full"),
    "vit_vpt_deep": DenseSetting("vit", "vpt", {"num_tokens": 10, "deep": True}, "simple_pyramid", "vit_full"),
    "vit_adapter_full": DenseSetting("vit", "full", {}, "vit_adapter", "vit_adapter_full"),  # the paper's mode
    "vit_adapter": DenseSetting("vit", "linear_probe", {}, "vit_adapter", "vit_adapter_full"),  # frozen ViT
    "vit_adapter_lora": DenseSetting("vit", "lora", _LORA_QV, "vit_adapter", "vit_adapter_full"),
    "swin_full": DenseSetting("swin", "full", {}, "native", "swin_full"),
    "swin_lora": DenseSetting("swin", "lora", {"rank": 8}, "native", "swin_full"),
    "swin_adaptformer": DenseSetting("swin", "adaptformer", _ADAPTFORMER, "native", "swin_full"),
    "convnext_full": DenseSetting("convnext", "full", {}, "native", "convnext_full"),
    "convnext_lora": DenseSetting("convnext", "lora", {"rank": 8}, "native", "convnext_full"),
    "convnext_conv_adapter": DenseSetting("convnext", "conv_adapter", {"reduction": 4}, "native", "convnext_full"),
}
DENSE_BASE = "configs/_base_/ade20k.yaml"  # the task (UperNet, 512 channels, aux head 0.4) and the crop size
DENSE_CLASSES = 150  # ADE20K
DENSE_BEGIN = "<!-- dense benchmark: begin (written by tools/benchmark.py --dense) -->"
DENSE_END = "<!-- dense benchmark: end -->"


def family_overrides(items: list[str] | None, flag: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """``FAMILY=VALUE`` strings (repeatable ``flag``) -> ``{family: parse(VALUE)}``; a clear error otherwise."""
    out = {}
    for item in items or []:
        family, sep, value = item.partition("=")
        if not sep or family not in DENSE_FAMILIES:
            raise ValueError(f"{flag} {item!r}: expected FAMILY=VALUE with FAMILY one of {', '.join(DENSE_FAMILIES)}")
        try:
            out[family] = parse(value)
        except ValueError as e:
            raise ValueError(f"{flag} {item!r}: {e}") from None
    return out


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("the value must be a JSON object of timm.create_model keyword arguments")
    return value


def dense_config(name: str, args: argparse.Namespace) -> ExperimentConfig:
    """The experiment config of dense setting ``name``: the ADE20K base config (task, head, auxiliary head) with the
    setting's model (random weights; ``--dense-model`` / ``--dense-model-kwargs`` overrides), method and neck."""
    s = DENSE_SETTINGS[name]
    data = read_yaml(ROOT / DENSE_BASE)
    model_name, at_crop_size = DENSE_MODELS[s.family]
    model: dict[str, Any] = {
        "name": family_overrides(args.dense_model, "--dense-model", str).get(s.family, model_name),
        "pretrained": False,
        "kwargs": family_overrides(args.dense_model_kwargs, "--dense-model-kwargs", _json_object).get(s.family, {}),
    }
    if at_crop_size:
        model["img_size"] = args.img_size
    task = dict(data.get("task") or {}, neck=s.neck)
    if args.dense_channels is not None:
        task["head_kwargs"] = {**(task.get("head_kwargs") or {}), "channels": args.dense_channels}
    options = dict(s.options)
    if s.method == "linear_probe":  # a dense model has no classifier: nothing in the backbone trains
        options.setdefault("modules_to_save", [])
    return from_dict({"model": model, "method": {"name": s.method, **options}, "task": task})
