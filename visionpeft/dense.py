"""Dense models: a frozen, adapted backbone with a feature pyramid (neck) and a segmentation head or a detector.

A :class:`DenseModel` composes three parts: the :class:`~visionpeft.model.PeftVisionModel` (the timm backbone
with its adapter hooks; it only emits features), the neck (:mod:`visionpeft.necks`: NCHW maps at strides 4, 8,
16 and 32) and the head (:mod:`visionpeft.heads`: UperNet and friends, or a torchvision detector). The neck and
the head train in full and are saved with the adapter::

    model = vp.DenseModel(vp.get_peft_model(backbone, vp.LoRAConfig(rank=8)), "segmentation", num_classes=150)
    model.save_adapter("out/ade")                 # adapter.safetensors + dense.safetensors + their configs
    model = vp.load_adapter(timm.create_model(..., num_classes=0), "out/ade")    # a DenseModel again

The adapter folder of a dense run holds the method's two files (``adapter.safetensors``,
``adapter_config.json``) and the dense part's two (``dense.safetensors``: neck, head and auxiliary head;
``dense_config.json``: how to build them, the class names and the SHA-256 of the tensors file).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._io import AdapterFileError, read_adapter_files, save_adapter_files
from ._version import __version__
from .heads import DETECTORS, SEG_HEADS, FCNHead, build_detector, build_seg_head, whole_inference
from .model import PeftVisionModel, print_trainable
from .model import load_adapter as _load_method_adapter
from .necks import build_neck

DENSE_CONFIG = "dense_config.json"
DENSE_WEIGHTS = "dense.safetensors"
DENSE_FORMAT = 1
DENSE_TASKS = ("segmentation", "detection")
DEFAULT_HEADS = {"segmentation": "upernet", "detection": "faster_rcnn"}


@dataclasses.dataclass
class DenseSpec:
    """How to build the dense part: saved as ``dense_config.json`` and read back by :func:`load_adapter`.

    Args:
        task: ``segmentation`` or ``detection``.
        num_classes: segmentation classes, or foreground classes of a detector.
        neck, neck_kwargs: the feature pyramid (``None``: chosen from the backbone).
        head, head_kwargs: the head or detector (``None``: upernet / faster_rcnn).
        aux_weight: the auxiliary FCN head's loss weight (0: none; segmentation).
        classes: class names in label order (optional).
        ignore_index: the label that counts nowhere (segmentation).
    """

    task: str
    num_classes: int
    neck: str | None = None
    neck_kwargs: dict = dataclasses.field(default_factory=dict)
    head: str | None = None
    head_kwargs: dict = dataclasses.field(default_factory=dict)
    aux_weight: float = 0.0
    classes: list[str] | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if self.task not in DENSE_TASKS:
            raise ValueError(f"task must be one of {', '.join(DENSE_TASKS)}, got {self.task!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.head is None:
            self.head = DEFAULT_HEADS[self.task]
        choices = SEG_HEADS if self.task == "segmentation" else DETECTORS
        if self.head not in choices:
            raise ValueError(f"{self.task} head {self.head!r} is unknown; choose one of {', '.join(choices)}")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")


class DenseModel(nn.Module):
    """A :class:`PeftVisionModel` (features), a neck (pyramid) and a head, trained and saved together.

    Args:
        peft: the adapted backbone. Its timm model should have no classifier (``num_classes=0``); plain ViTs
            should be built with ``dynamic_img_size=True`` so that any input size works.
        task: ``segmentation`` or ``detection`` (or a :class:`DenseSpec`, then nothing else is read).
        num_classes: see :class:`DenseSpec`; the remaining keyword arguments too.

    ``forward`` (segmentation): ``(B, 3, H, W)`` -> ``{"out": (B, K, H', W')}`` logits at the head's stride
    (``"aux"`` too in training mode with an auxiliary head); :meth:`predict` gives ``(B, K, H, W)``.
    ``forward`` (detection): torchvision's convention: ``(images, targets)`` -> a loss dict in training
    mode, ``images`` -> one dict of ``boxes`` / ``labels`` / ``scores`` (``masks``) per image in eval mode.
    """

    def __init__(self, peft: PeftVisionModel, task: str | DenseSpec, num_classes: int | None = None, **kwargs: Any):
        super().__init__()
        if not isinstance(peft, PeftVisionModel):
            raise TypeError(
                f"DenseModel takes a PeftVisionModel (vp.get_peft_model(backbone, config)), got {type(peft).__name__}"
            )
        spec = task if isinstance(task, DenseSpec) else DenseSpec(task=task, num_classes=num_classes, **kwargs)
        self.spec = spec
        self.peft = peft
        self.neck = build_neck(spec.neck, peft.base_model, **spec.neck_kwargs)
        chans = [int(f["num_chs"]) for f in self.neck.feature_info]
        strides = [int(f["reduction"]) for f in self.neck.feature_info]
        self.aux_head: nn.Module | None = None
        if spec.task == "segmentation":
            self.head = build_seg_head(spec.head, chans, strides, spec.num_classes, **spec.head_kwargs)
            if spec.aux_weight > 0:
                self.aux_head = FCNHead(chans[min(2, len(chans) - 1)], spec.num_classes)
        else:
            self.head = build_detector(spec.head, self.features, chans, spec.num_classes, **spec.head_kwargs)
        self.train(peft.training)

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def neck_name(self) -> str:
        """The neck in use (``spec.neck``, or the one chosen for the backbone)."""
        from .necks import auto_neck

        return self.spec.neck or auto_neck(self.peft.base_model)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The neck's pyramid of the adapted backbone: NCHW maps at the strides of ``neck.feature_info``."""
        return self.neck(self.peft.base_model, x)

    def forward(self, x: Any, targets: Any = None) -> Any:
        if self.spec.task == "detection":
            return self.head(x, targets) if targets is not None else self.head(x)
        feats = self.features(x)
        out = {"out": self.head(feats)}
        if self.aux_head is not None and self.training:
            out["aux"] = self.aux_head(feats)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Any:
        """Segmentation: logits ``(B, K, H, W)`` at the input size (whole-image inference); detection: the
        detector's per-image dicts. Runs in the current mode (call ``eval()`` first)."""
        if self.spec.task == "detection":
            return self.head(list(x) if isinstance(x, torch.Tensor) else x)
        return whole_inference(lambda t: self(t)["out"], x)

    # parameters and state ---------------------------------------------------------------------------
    def _dense_modules(self) -> dict[str, nn.Module]:
        mods = {"neck": self.neck, "head": self.head}
        if self.aux_head is not None:
            mods["aux_head"] = self.aux_head
        return mods

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The neck's, head's and auxiliary head's tensors (parameters and buffers such as BatchNorm statistics)."""
        return {f"{n}.{k}": v for n, m in self._dense_modules().items() for k, v in m.state_dict().items()}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a dense run trains: the adapter's tensors (``peft.`` prefix) and :meth:`dense_state_dict`."""
        out = {f"peft.{k}": v for k, v in self.peft.adapter_state_dict().items()}
        out.update(self.dense_state_dict())
        return out

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the whole model (backbone, adapters, neck, heads)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> str:
        """Print and return ``trainable: 0.39M / 86.2M (0.45%)`` (adapter, neck and heads)."""
        return print_trainable(*self.get_nb_trainable_parameters())

    def no_weight_decay(self) -> set[str]:
        """The adapter's no-decay names (prompts, ...) under the ``peft.`` prefix, and the neck's (embeddings)."""
        out = {f"peft.{n}" for n in self.peft.no_weight_decay()}
        declared = getattr(self.neck, "no_weight_decay", None)
        if callable(declared):
            out |= {f"neck.{n}" for n in declared()}
        return out

    # saving -------------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the adapter's files and the dense part's (``dense.safetensors`` + ``dense_config.json``)."""
        directory = Path(directory)
        self.peft.save_adapter(directory)
        tensors = {k: v.detach() for k, v in self.dense_state_dict().items()}
        meta = {
            "format_version": DENSE_FORMAT,
            "visionpeft_version": __version__,
            "spec": dataclasses.asdict(self.spec),
            "feature_info": [
                dict(num_chs=int(f["num_chs"]), reduction=int(f["reduction"])) for f in self.neck.feature_info
            ],
        }
        save_adapter_files(directory, DENSE_CONFIG, DENSE_WEIGHTS, meta, tensors, metadata={"task": self.spec.task})
        return directory


def is_dense_adapter(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a dense adapter (``dense_config.json``)."""
    return (Path(directory) / DENSE_CONFIG).is_file()


def read_dense_spec(directory: str | os.PathLike) -> DenseSpec:
    """The :class:`DenseSpec` saved in ``directory`` (checked)."""
    meta, _ = read_adapter_files(Path(directory), DENSE_CONFIG, DENSE_WEIGHTS)
    return _spec_of(meta, Path(directory))


def _spec_of(meta: dict, directory: Path) -> DenseSpec:
    path = directory / DENSE_CONFIG
    version = meta.get("format_version")
    if version != DENSE_FORMAT:
        raise AdapterFileError(
            f"{path}: format_version {version!r} is not {DENSE_FORMAT}; it was written by another visionpeft "
            f"version ({meta.get('visionpeft_version', 'unknown')}); this is {__version__}"
        )
    spec = meta.get("spec")
    if not isinstance(spec, dict):
        raise AdapterFileError(f"{path}: no 'spec' object; the file is not a visionpeft dense config")
    names = {f.name for f in dataclasses.fields(DenseSpec)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise AdapterFileError(f"{path}: unknown spec keys {unknown}; expected {sorted(names)}")
    try:
        return DenseSpec(**spec)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


def load_dense_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> DenseModel:
    """Rebuild the :class:`DenseModel` saved in ``directory`` on ``model`` (the same backbone; a timm classifier is
    removed with ``reset_classifier(0)``, as the dense model was trained without one).

    The method's adapter is attached by :func:`visionpeft.model.load_adapter` (every check of it applies); then
    the neck and head are built from ``dense_config.json`` and their tensors loaded (names and shapes checked).

    Raises:
        AdapterFileError: a file is missing, unreadable or does not fit (the message names the file).
    """
    directory = Path(directory)
    meta, tensors = read_adapter_files(directory, DENSE_CONFIG, DENSE_WEIGHTS)
    spec = _spec_of(meta, directory)
    if getattr(model, "num_classes", 0) and callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(0)  # a dense model never uses the classifier, and was trained without one
    peft = _load_method_adapter(model, directory, adapter_name, is_trainable)
    try:
        dense = DenseModel(peft, spec)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(
            f"the dense model of {directory / DENSE_CONFIG} cannot be built on this backbone: {e}"
        ) from e
    expected = dense.dense_state_dict()
    path = directory / DENSE_WEIGHTS
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{path} does not fit the neck and head of {directory / DENSE_CONFIG}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]} ({len(missing)} / {len(unexpected)} in all)"
        )
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise AdapterFileError(
                f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(v.shape)}"
            )
        if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
            raise AdapterFileError(f"{path}: {k} holds NaN or infinite values")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(dtype=v.dtype, device=v.device))
    for m in dense._dense_modules().values():
        for p in m.parameters():
            p.requires_grad_(is_trainable)
    dense.train(model.training if is_trainable else False)
    return dense


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftVisionModel | DenseModel:
    """Load a saved adapter onto a base model: a :class:`PeftVisionModel` for a classification adapter, a
    :class:`DenseModel` for a dense one (a folder with ``dense_config.json``). See
    :func:`visionpeft.model.load_adapter` for the arguments and the checks."""
    if is_dense_adapter(directory):
        if isinstance(model, PeftVisionModel):
            raise AdapterFileError(
                f"{directory} holds a dense adapter (neck and head); load it onto the base model, not into a "
                "PeftVisionModel"
            )
        return load_dense_adapter(model, directory, adapter_name, is_trainable)
    return _load_method_adapter(model, directory, adapter_name, is_trainable)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, K, h, w)`` logits to ``size`` (mmseg's ``align_corners=False``)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
