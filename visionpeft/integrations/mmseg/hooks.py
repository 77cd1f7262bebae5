"""The adapter folder of an mmseg run: written beside each checkpoint by :class:`PeftAdapterHook`, read back by
``vp.load_adapter`` (the backbone's adapter), ``VisionPeftBackbone(adapter=...)`` and :func:`load_adapter_folder`
(the whole segmentor).

Folder ``<checkpoint without .pth>_adapter/``:

- ``adapter.safetensors`` + ``adapter_config.json``: the method's adapter (``PeftVisionModel.save_adapter``);
- ``mmseg_head.safetensors`` + ``mmseg_head.json``: every other tensor that trains: the backbone's pyramid
  (``backbone.pyramid.*``), the decode head, the auxiliary head and an mmseg neck, by their names in the
  segmentor's ``state_dict``; the JSON holds how the backbone was built and the class names.

The frozen backbone weights are in neither: they come from ``pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from ..._io import AdapterFileError, read_adapter_files, save_adapter_files
from ..._version import __version__
from .backbone import VisionPeftBackbone

HEAD_CONFIG = "mmseg_head.json"
HEAD_WEIGHTS = "mmseg_head.safetensors"
HEAD_FORMAT = 1
ADAPTER_SUFFIX = "_adapter"


def find_backbone(model: nn.Module) -> tuple[str, VisionPeftBackbone]:
    """The (name, module) of the segmentor's :class:`VisionPeftBackbone` (model wrappers unwrapped)."""
    if is_model_wrapper(model):
        model = model.module
    for name, m in model.named_modules():
        if isinstance(m, VisionPeftBackbone):
            return name, m
    raise ValueError(f"{type(model).__name__} has no VisionPeftBackbone: nothing to save as an adapter")


def frozen_backbone_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys of the backbone's base model that do not train (what an adapter-only checkpoint drops)."""
    if is_model_wrapper(model):
        model = model.module
    name, bb = find_backbone(model)
    prefix = f"{name}.peft.base_model." if name else "peft.base_model."
    trained = {prefix + n for n, p in bb.peft.base_model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict() if k.startswith(prefix) and k not in trained}


def save_adapter_folder(model: nn.Module, directory: str | os.PathLike, classes: Any = None) -> Path:
    """Write the adapter folder of a segmentor (see the module docstring); returns the folder."""
    if is_model_wrapper(model):
        model = model.module
    name, bb = find_backbone(model)
    directory = Path(directory)
    bb.peft.save_adapter(directory)
    peft_prefix = f"{name}.peft." if name else "peft."
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(peft_prefix)
    }
    meta = {
        "format_version": HEAD_FORMAT,
        "visionpeft_version": __version__,
        "backbone_key": name,
        "backbone_args": bb.build_args,
        "pyramid": bb.pyramid_name,
        "classes": list(classes) if classes is not None else None,
    }
    save_adapter_files(directory, HEAD_CONFIG, HEAD_WEIGHTS, meta, tensors, metadata={"format": "mmseg"})
    return directory


def read_head_state(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of the folder's ``mmseg_head`` files (checked: format version, tensors' checksum)."""
    directory = Path(directory)
    meta, tensors = read_adapter_files(directory, HEAD_CONFIG, HEAD_WEIGHTS)
    if meta.get("format_version") != HEAD_FORMAT:
        raise AdapterFileError(
            f"{directory / HEAD_CONFIG}: format_version {meta.get('format_version')!r} is not {HEAD_FORMAT} "
            f"(written by visionpeft {meta.get('visionpeft_version', 'unknown')}; this is {__version__})"
        )
    return meta, tensors


def load_adapter_folder(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter folder into a built segmentor of the same config: the adapter into its backbone (checked
    by visionpeft), then the pyramid and the heads (names and shapes checked; nothing is copied on a mismatch).

    Raises:
        AdapterFileError: a file is missing or does not fit the model (the message names it).
    """
    from ...model import _load_checked, _read_adapter

    if is_model_wrapper(model):
        model = model.module
    directory = Path(directory)
    name, bb = find_backbone(model)
    _, tensors = read_head_state(directory)
    _, cfg, adapter = _read_adapter(directory)
    peft_prefix = f"{name}.peft." if name else "peft."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(peft_prefix)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or wrong:
        raise AdapterFileError(
            f"{directory / HEAD_WEIGHTS} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {sorted(wrong)[:3]} ({len(missing)} / {len(unexpected)} / {len(wrong)} in all); build the "
            "model from the config of the run that wrote it"
        )
    if cfg.method != bb.peft.peft_config[bb.peft.active_adapter].method:
        raise AdapterFileError(
            f"{directory} holds a {cfg.method!r} adapter; the model's backbone has "
            f"{bb.peft.peft_config[bb.peft.active_adapter].method!r}"
        )
    _load_checked(bb.peft, bb.peft.active_adapter, adapter, directory)
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))
    return model


@HOOKS.register_module()
class PeftAdapterHook(Hook):
    """Write the adapter folder beside every checkpoint mmengine saves (``iter_2.pth`` -> ``iter_2_adapter/``).

    Args:
        adapter_only_checkpoint: also drop the frozen backbone weights from mmengine's own checkpoint (its
            ``state_dict`` then holds the adapter, the pyramid and the heads; resuming and testing load it with
            ``strict=False`` onto a model built with the same ``pretrained`` weights).
    """

    priority = "LOW"

    def __init__(self, adapter_only_checkpoint: bool = False) -> None:
        self.adapter_only_checkpoint = bool(adapter_only_checkpoint)
        self.last_adapter: Path | None = None

    def _folder(self, runner: Any, checkpoint: dict) -> Path:
        meta = checkpoint.get("meta", {})
        step = str(meta.get("iter", runner.iter))
        last = runner.message_hub.get_info("last_ckpt")  # CheckpointHook's file, set just before it saves
        if last and Path(str(last)).stem.endswith((step, str(meta.get("epoch")))):
            path = Path(str(last))
        else:  # runner.save_checkpoint called by other code
            path = Path(runner.work_dir) / f"iter_{step}.pth"
        return path.with_name(path.stem + ADAPTER_SUFFIX)

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Write the adapter folder; with ``adapter_only_checkpoint``, strip the frozen weights from ``checkpoint``."""
        if self.adapter_only_checkpoint:
            for k in frozen_backbone_keys(runner.model):
                checkpoint["state_dict"].pop(k, None)
        if not is_main_process():
            return
        classes = (checkpoint.get("meta", {}).get("dataset_meta") or {}).get("classes")
        self.last_adapter = save_adapter_folder(runner.model, self._folder(runner, checkpoint), classes)
        runner.logger.info(f"visionpeft: adapter and heads written to {self.last_adapter}")
