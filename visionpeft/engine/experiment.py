"""Experiment configs: YAML files that map 1:1 onto dataclasses.

A config file has the sections ``model``, ``method``, ``task``, ``data``, ``optimizer``, ``schedule`` and
``runtime`` (without ``task``: classification); each maps onto the dataclass of the same name below
(``method`` onto the registered method's config, chosen by its ``name`` key).
A file may name one ``_base_`` file (a path relative to itself) whose values it overrides; the base may not
have a base of its own. Command-line overrides ``key.sub=value`` are parsed as YAML scalars and type-checked
against the dataclass field; a misspelt key fails and suggests the right one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .._registry import get_method
from ..config import MethodConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and suggests a fix."""


def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def _positive(key: str, value: float | None, optional: bool = False) -> None:
    """``value > 0`` (``None`` allowed when ``optional``), with the config key in the message."""
    if value is None and optional:
        return
    _finite(key, value)
    if value <= 0:
        raise ConfigError(f"{key} must be > 0{' (or null for none)' if optional else ''}, got {value!r}")


def _at_least(key: str, value: int | None, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def _one_of(key: str, value: str, choices: tuple[str, ...], hint: str = "") -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}{hint}")


@dataclasses.dataclass
class ModelConfig:
    """Args: name: timm model name. pretrained: load timm's weights from the hub. pretrained_file: a
    local checkpoint (.safetensors / .pth / .npz) read the way timm reads it. num_classes: classes of the
    new head (``None``: the dataset's). img_size: input size passed to timm (ViT / Swin need it).
    kwargs: extra keyword arguments for ``timm.create_model``."""

    name: str = "vit_base_patch16_224"
    pretrained: bool = False
    pretrained_file: str | None = None
    num_classes: int | None = None
    img_size: int | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _at_least("model.num_classes", self.num_classes, 1, optional=True)
        _at_least("model.img_size", self.img_size, 1, optional=True)


# the data keys that only dense tasks (segmentation, detection) read
DENSE_DATA_KEYS = (
    "crop_size",
    "scale",
    "ratio_range",
    "cat_max_ratio",
    "photometric",
    "reduce_zero_label",
    "ignore_index",
    "classes",
    "classes_file",
    "train_ann",
    "eval_ann",
    "train_images",
    "eval_images",
    "masks",
    "binary_masks",
    "num_train",
    "num_eval",
)


@dataclasses.dataclass
class DataConfig:
    """Args: dataset: ``vtab``, ``digits`` (the embedded default), ``imagefolder`` (``root/train/<class>/*``,
    ``root/val/<class>/*`` or ``root/test/...``) or ``csv`` (``train_csv`` / ``eval_csv``). root: dataset root.
    task: VTAB task (aliases accepted; any other name is a custom task folder in the VTAB layout). mode:
    ``tune`` (train800 -> val200) or ``final`` (train800val200 -> test). img_size: resize target. batch_size:
    global batch. num_workers: loader processes per rank.

    num_classes: the data's class count (``None``: read from the data: VTAB list files, class folders, CSV
    labels). train_csv, eval_csv: ``path,label`` CSVs for ``dataset: csv`` (label an integer or a class name;
    image paths relative to the CSV's folder; a relative CSV path is taken from ``root`` when set).

    Training augmentation (timm's transform factory; all off by default, so the VTAB protocol stays exact;
    evaluation is never augmented): auto_augment: a timm policy such as ``rand-m9-mstd0.5`` (RandAugment),
    ``original`` (AutoAugment), ``augmix-m5-w3``. random_resized_crop: ``[min, max]`` area fractions of a
    random-resized crop (e.g. ``[0.08, 1.0]``; ``None``: the square resize). hflip, vflip: flip probabilities.
    color_jitter: brightness / contrast / saturation strength (ignored with ``auto_augment``). random_erasing:
    probability. mixup, cutmix: Beta alphas of timm's mixup / cutmix (0: off; e.g. 0.8 and 1.0), trained with
    a soft-target cross-entropy. mixup_prob: probability to mix a batch. mixup_switch_prob: probability of
    cutmix instead of mixup when both are on."""

    dataset: str = "vtab"
    root: str | None = None
    task: str = "cifar100"
    mode: str = "final"
    img_size: int = 224
    batch_size: int = 64
    num_workers: int = 4
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_classes: int | None = None
    train_csv: str | None = None
    eval_csv: str | None = None
    auto_augment: str | None = None
    random_resized_crop: list[float] | None = None
    hflip: float = 0.0
    vflip: float = 0.0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # dense prediction (task.name segmentation / detection; see DENSE_DATA_DOC)
    crop_size: int = 512
    scale: list[int] = dataclasses.field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    reduce_zero_label: bool | None = None
    ignore_index: int = 255
    classes: list[str] | None = None
    classes_file: str | None = None
    train_ann: str | None = None
    eval_ann: str | None = None
    train_images: str | None = None
    eval_images: str | None = None
    masks: bool = False
    binary_masks: bool = False
    num_train: int | None = None
    num_eval: int | None = None

    def __post_init__(self) -> None:
        _one_of(
            "data.mode", self.mode, ("tune", "final"), " (tune: train800 -> val200, final: train800val200 -> test)"
        )
        _at_least("data.img_size", self.img_size, 1)
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        if len(self.mean) != len(self.std):
            raise ConfigError(f"data.mean and data.std must have the same length, got {self.mean} and {self.std}")
        for i, v in enumerate(self.std):
            _positive(f"data.std[{i}]", v)
        for i, v in enumerate(self.mean):
            _finite(f"data.mean[{i}]", v)
        _at_least("data.crop_size", self.crop_size, 1)
        if len(self.scale) != 2 or min(self.scale) < 1:
            raise ConfigError(f"data.scale must be two sizes [long, short] >= 1, e.g. [2048, 512], got {self.scale!r}")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"data.ratio_range must be [low, high] with 0 < low <= high, got {self.ratio_range!r}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ConfigError(f"data.cat_max_ratio must be in (0, 1] (1: off), got {self.cat_max_ratio!r}")
        _at_least("data.num_train", self.num_train, 1, optional=True)
        _at_least("data.num_eval", self.num_eval, 1, optional=True)


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW. Args: lr: base learning rate. head_lr: the head's (``None``: lr). weight_decay: not
    applied to norms, biases and prompts."""

    lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    grad_accum: int = 1
    clip_grad: float | None = None

    def __post_init__(self) -> None:
        _positive("optimizer.lr", self.lr)
        _positive("optimizer.head_lr", self.head_lr, optional=True)
        _finite("optimizer.weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas!r}")
        _at_least("optimizer.grad_accum", self.grad_accum, 1)
        _positive("optimizer.clip_grad", self.clip_grad, optional=True)


@dataclasses.dataclass
class ScheduleConfig:
    """Linear warm-up then decay, in epochs. name: ``cosine`` (timm) or ``poly`` (mmseg: ``(1 - t) ** power``
    down to ``min_lr``)."""

    epochs: int = 100
    warmup_epochs: int = 10
    min_lr: float = 1e-8
    name: str = "cosine"
    power: float = 1.0

    def __post_init__(self) -> None:
        _one_of("schedule.name", self.name, ("cosine", "poly"))
        _positive("schedule.power", self.power)
        _at_least("schedule.epochs", self.epochs, 1)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"schedule.warmup_epochs must be in [0, schedule.epochs={self.epochs}], got {self.warmup_epochs!r}"
            )
        _finite("schedule.min_lr", self.min_lr)
        if self.min_lr < 0:
            raise ConfigError(f"schedule.min_lr must be >= 0, got {self.min_lr!r}")


@dataclasses.dataclass
class RuntimeConfig:
    """Args: out_dir: run folder. seed. device: ``auto``, ``cpu`` or ``cuda``. amp: ``none``, ``bf16``
    or ``fp16`` (CUDA). ema: EMA decay (``None``: off). ckpt_every: epochs between checkpoints."""

    out_dir: str = "out/run"
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    ema: float | None = None
    ckpt_every: int = 10
    log_every: int = 10
    eval_every: int = 10
    threads: int | None = None

    def __post_init__(self) -> None:
        hint = " (a GPU is 'cuda'; pick one with CUDA_VISIBLE_DEVICES, torchrun gives each process its own)"
        _one_of("runtime.device", self.device, ("auto", "cpu", "cuda"), hint)
        _one_of("runtime.amp", self.amp, ("none", "bf16", "fp16"))
        if self.ema is not None:
            _finite("runtime.ema", self.ema)
            if not 0.0 < self.ema < 1.0:
                raise ConfigError(f"runtime.ema must be in (0, 1) (e.g. 0.999), or null for no EMA, got {self.ema!r}")
        for key in ("ckpt_every", "log_every", "eval_every"):
            _at_least(f"runtime.{key}", getattr(self, key), 1)
        _at_least("runtime.threads", self.threads, 1, optional=True)


TASKS = ("classification", "segmentation", "detection", "sam_prompt", "sam_semantic")
SAM_TASKS = ("sam_prompt", "sam_semantic")
# task keys of the SAM tasks (both), and those of the promptable one only, with their defaults
SAM_TASK_KEYS = ("grad_checkpointing", "decoder", "cache_embeddings")
SAM_PROMPT_KEYS = ("prompt_classes", "max_objects", "min_area", "prompts", "box_prob", "refine_iters", "mask_loss")


@dataclasses.dataclass
class TaskConfig:
    """What the model predicts. Args: name: ``classification``, ``segmentation`` or ``detection``. neck: the
    feature pyramid of a dense task (``native`` stages, ``simple_pyramid`` (ViTDet) or ``vit_adapter``; ``None``:
    native for hierarchical backbones, simple_pyramid for plain ViTs). neck_kwargs: its options. head: the
    segmentation head (``upernet``, ``fpn``, ``segformer``, ``linear``) or the detector (``faster_rcnn``,
    ``mask_rcnn``, ``retinanet``, ``fcos``); ``None``: upernet / faster_rcnn. head_kwargs: its options. aux_weight:
    weight of the auxiliary FCN head's loss (0: no auxiliary head; mmseg's UperNet recipes: 0.4). dice_weight:
    weight of a dice loss added to the cross-entropy. inference: ``whole`` image or ``slide`` window (segmentation).
    slide_crop, slide_stride: the window and its step (``None``: data.crop_size and two thirds of it).

    Segment Anything (``sam_prompt``: promptable masks from box / point prompts; ``sam_semantic``: one mask per
    class, SAMed's mode; ``model.name`` one of ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``). Both:
    grad_checkpointing: activation checkpointing of the image encoder. decoder: ``train`` (the mask decoder trains
    and is saved with the adapter) or ``frozen`` (applies when ``method.modules_to_save`` is not set).
    cache_embeddings: image embeddings kept in memory when the encoder does not train (decoder-only runs; 0: off).
    ``sam_prompt`` only: prompt_classes: the classes whose objects are prompted (class names, or integer label ids;
    ``None``: every class but the background). max_objects: objects per image and step (a random choice).
    min_area: smallest object (pixels). prompts: the prompt kinds of the first iteration (``box``, ``point``).
    box_prob: the probability of a box when both kinds are listed. refine_iters: corrective iterations after the
    first (SAM's: a point on the error region and the previous mask as input). mask_loss: ``focal_dice`` (SAM's
    20:1) or ``bce`` (binary cross-entropy + dice); the IoU head is trained with an MSE in both."""

    name: str = "classification"
    neck: str | None = None
    neck_kwargs: dict = dataclasses.field(default_factory=dict)
    head: str | None = None
    head_kwargs: dict = dataclasses.field(default_factory=dict)
    aux_weight: float = 0.0
    dice_weight: float = 0.0
    inference: str = "whole"
    slide_crop: int | None = None
    slide_stride: int | None = None
    # Segment Anything (sam_prompt, sam_semantic)
    grad_checkpointing: bool = False
    decoder: str = "train"
    cache_embeddings: int = 0
    # sam_prompt
    prompt_classes: list[str | int] | None = None
    max_objects: int = 8
    min_area: int = 10
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["box", "point"])
    box_prob: float = 0.5
    refine_iters: int = 2
    mask_loss: str = "focal_dice"

    def __post_init__(self) -> None:
        _one_of("task.name", self.name, TASKS)
        self._check_sam_keys()
        _one_of("task.inference", self.inference, ("whole", "slide"))
        for key in ("aux_weight", "dice_weight"):
            _finite(f"task.{key}", getattr(self, key))
            if getattr(self, key) < 0:
                raise ConfigError(f"task.{key} must be >= 0, got {getattr(self, key)!r}")
        _at_least("task.slide_crop", self.slide_crop, 1, optional=True)
        _at_least("task.slide_stride", self.slide_stride, 1, optional=True)
        if self.name == "classification":
            for key in ("neck", "head"):
                if getattr(self, key) is not None:
                    raise ConfigError(
                        f"task.{key} is for dense tasks; set task.name to segmentation or detection, or remove it"
                    )

    def _check_sam_keys(self) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}

        def default(key: str) -> Any:
            f = fields[key]
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]

        foreign = {"sam_prompt": (), "sam_semantic": SAM_PROMPT_KEYS}.get(self.name, SAM_TASK_KEYS + SAM_PROMPT_KEYS)
        for key in foreign:
            if getattr(self, key) != default(key):
                which = "task.name sam_prompt" if key in SAM_PROMPT_KEYS else "task.name sam_prompt or sam_semantic"
                raise ConfigError(f"task.{key} is a key of {which}, not of {self.name}; remove it")
        if self.name not in SAM_TASKS:
            return
        for key in ("neck", "head"):
            if getattr(self, key) is not None:
                raise ConfigError(f"task.{key} does not apply to {self.name} (SAM's own mask decoder): remove it")
        if self.inference != "whole":
            raise ConfigError(f"task.inference must be 'whole' for {self.name} (SAM takes whole padded images)")
        _one_of("task.decoder", self.decoder, ("train", "frozen"), " (frozen: only the encoder's adapter trains)")
        _at_least("task.cache_embeddings", self.cache_embeddings, 0)
        _at_least("task.max_objects", self.max_objects, 1)
        _at_least("task.min_area", self.min_area, 1)
        _at_least("task.refine_iters", self.refine_iters, 0)
        _one_of("task.mask_loss", self.mask_loss, ("focal_dice", "bce"))
        if not self.prompts or len(set(self.prompts)) != len(self.prompts):
            raise ConfigError(f"task.prompts must list box and / or point once each, got {self.prompts!r}")
        for i, kind in enumerate(self.prompts):
            _one_of(f"task.prompts[{i}]", kind, ("box", "point"))
        _finite("task.box_prob", self.box_prob)
        if not 0.0 <= self.box_prob <= 1.0:
            raise ConfigError(f"task.box_prob must be in [0, 1], got {self.box_prob!r}")
        if self.prompt_classes is not None and not self.prompt_classes:
            raise ConfigError("task.prompt_classes is an empty list: name at least one class, or null for every class")

    @property
    def dense(self) -> bool:
        """A task of :class:`~visionpeft.dense.DenseModel` (segmentation, detection)."""
        return self.name in ("segmentation", "detection")

    @property
    def sam(self) -> bool:
        """A Segment Anything task (``sam_prompt``, ``sam_semantic``)."""
        return self.name in SAM_TASKS


SECTIONS = {
    "model": ModelConfig,
    "task": TaskConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "runtime": RuntimeConfig,
}


@dataclasses.dataclass
class ExperimentConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    method: MethodConfig = dataclasses.field(default_factory=lambda: get_method("lora").config_cls())
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self._check_sam()

    def _check_sam(self) -> None:
        """The keys that must agree across sections for a SAM task (and a SAM model only in a SAM task)."""
        from ..backbones.sam import SAM_ARCHS

        m, t = self.model, self.task
        if not t.sam:
            if m.name in SAM_ARCHS:
                raise ConfigError(
                    f"model.name={m.name} is Segment Anything: set task.name to sam_prompt or sam_semantic"
                )
            return
        if m.name not in SAM_ARCHS:
            raise ConfigError(
                f"task.name={t.name} needs a SAM model: model.name must be one of {', '.join(SAM_ARCHS)}, "
                f"got {m.name!r}"
            )
        if m.pretrained:
            raise ConfigError(
                "model.pretrained: SAM's weights come from model.pretrained_file (the official checkpoint, e.g. "
                "sam_vit_b_01ec64.pth); set model.pretrained=false"
            )
        size = m.img_size or 1024
        if self.data.crop_size != size:
            raise ConfigError(
                f"data.crop_size={self.data.crop_size} differs from model.img_size={size}: SAM takes "
                f"{size} x {size} inputs, so the training crops must have that size (set data.crop_size={size}, "
                f"or model.img_size={self.data.crop_size} to build SAM for that size)"
            )
        if m.num_classes is not None:
            raise ConfigError(f"model.num_classes is not read by {t.name} (the classes come from the data): remove it")

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["method"] = {"name": self.method.method, **dataclasses.asdict(self.method)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _suggest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to the field type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(path, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list or tp is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp) or (Any,)
            return [_check_type(f"{path}[{i}]", v, inner) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    expected = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{path}: expected {expected}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict[str, Any], section: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"section {section!r} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            hint = f" (options of the method {cls.method!r})" if section == "method" else ""
            raise ConfigError(f"unknown key '{section}.{key}'{hint}{_suggest(key, names)}")
        kwargs[key] = _check_type(f"{section}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise  # __post_init__ names the key already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"section {section!r}: {e}") from e


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from nested mappings (unknown keys fail with a suggestion)."""
    names = ["model", "method", "task", "data", "optimizer", "schedule", "runtime"]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown section {key!r}{_suggest(key, names)}")
    sections = {name: _build(cls, data.get(name) or {}, name) for name, cls in SECTIONS.items()}
    method = dict(data.get("method") or {})
    name = method.pop("name", "lora")
    if not name or not isinstance(name, str):
        raise ConfigError("method.name must name a registered method (see vp.list_methods())")
    try:
        method_cls = get_method(name).config_cls
    except KeyError as e:
        raise ConfigError(f"method.name: {e.args[0]}") from None
    return ExperimentConfig(method=_build(method_cls, method, "method"), **sections)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file and its (single-level) ``_base_``; returns the merged mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(
                f"{path}: _base_ must be one file name (a string, relative to this file), got {base!r}"
                f" ({type(base).__name__}); a config has at most one base"
            )
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {base_path}")
        try:
            base_data = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"cannot parse {base_path} (the _base_ of {path}): {e}") from e
        if not isinstance(base_data, dict):
            raise ConfigError(f"{base_path} (the _base_ of {path}): the top level must be a mapping")
        if "_base_" in base_data:
            raise ConfigError(f"{base_path}: a _base_ file may not have a _base_ of its own (one level at most)")
        data = _deep_merge(base_data, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a config mapping."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be section.key (e.g. optimizer.lr)")
        section, name = parts
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem or e})") from None
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a section")
        data[section][name] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` (with its ``_base_``), apply ``overrides``, validate, and return the config."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))
