"""Datasets and transforms from a data config (:class:`~visionpeft.engine.experiment.DataConfig`, read
duck-typed: ``data/`` does not import the engine).

``data.dataset`` chooses the reader:

- ``vtab``: a folder in the VTAB-1k layout, ``data.root`` + ``data.task`` (a VTAB name, alias, or any folder
  name; ``data.num_classes`` or the class count read from the list files), ``data.mode`` picks the splits;
- ``digits``: the embedded MNIST task (the default of the demo);
- ``imagefolder``: ``data.root/train/<class>/*`` and ``data.root/val/<class>/*`` (or ``test/``);
- ``csv``: ``data.train_csv`` and ``data.eval_csv`` of ``path,label`` rows (relative CSV paths are taken from
  ``data.root`` when set).

Evaluation always uses :func:`vtab_transform`; training too unless an augmentation is switched on
(:mod:`visionpeft.data.augment`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torchvision import transforms as T

from .augment import build_mixup, train_transform

DATASETS = ("vtab", "digits", "imagefolder", "csv")

__all__ = ["DATASETS", "build_datasets", "build_mixup", "eval_transform", "train_transform", "vtab_transform"]


def vtab_transform(img_size: int, mean: list[float], std: list[float]) -> Any:
    """The VTAB-1k convention of the PEFT papers (VPT, NOAH, SSF): resize to a square with bicubic
    interpolation, no crop, no augmentation, normalise."""
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(cfg: Any) -> Any:
    """The evaluation (and prediction) transform of a data config: :func:`vtab_transform`, never augmented."""
    return vtab_transform(cfg.img_size, cfg.mean, cfg.std)


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per process
        print(text, flush=True)


def _check_keys(cfg: Any) -> None:
    """Check the data keys of this module (the engine's config checks the others)."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"data.dataset: unknown dataset {cfg.dataset!r}; use one of {', '.join(DATASETS)}")
    n = getattr(cfg, "num_classes", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"data.num_classes: a class count >= 1 (or unset: read from the data), got {n!r}")
    if n is not None and cfg.dataset == "digits":
        raise ValueError("data.num_classes: the embedded digits task has 5 classes; leave data.num_classes unset")
    for key in ("train_csv", "eval_csv"):
        if getattr(cfg, key, None) and cfg.dataset != "csv":
            raise ValueError(
                f"data.{key} is only read with data.dataset=csv (data.dataset is {cfg.dataset!r}); "
                f"set data.dataset=csv or remove data.{key}"
            )


def _csv_path(cfg: Any, key: str) -> Path:
    value = getattr(cfg, key, None)
    if not value:
        raise ValueError(
            f"data.{key} is not set: data.dataset=csv needs data.train_csv and data.eval_csv "
            f"(e.g. --set data.{key}=/data/mine/{'train' if key == 'train_csv' else 'val'}.csv)"
        )
    path = Path(value).expanduser()
    if not path.is_absolute() and cfg.root:
        path = Path(cfg.root).expanduser() / path
    if not path.is_file():
        where = f" (relative to data.root {cfg.root!r})" if cfg.root and not Path(value).is_absolute() else ""
        raise FileNotFoundError(f"data.{key}: CSV file {str(path)!r} not found{where}")
    return path


def build_datasets(cfg: Any) -> tuple[Any, Any, int, str]:
    """``(train, eval, num_classes, task)`` for ``cfg.dataset`` in :data:`DATASETS`.

    Datasets with class names (ImageFolder, CSV with names) have a ``classes`` attribute (names in label order);
    the others have none or ``None``.

    Raises:
        ValueError / FileNotFoundError: a bad setting (the message names the ``data.`` key) or bad data (it
            names the file and line).
    """
    _check_keys(cfg)
    train_tf, eval_tf = train_transform(cfg), eval_transform(cfg)
    num_classes = getattr(cfg, "num_classes", None)
    if cfg.dataset == "digits":
        from .embedded import NUM_CLASSES, TASK, ensure_digits_task
        from .vtab import vtab_datasets

        root = ensure_digits_task(cfg.root)
        train, evaluation = vtab_datasets(root, TASK, cfg.mode, train_tf, eval_tf, num_classes=NUM_CLASSES)
        return train, evaluation, NUM_CLASSES, TASK
    if cfg.dataset == "vtab":
        from .vtab import splits_for, vtab_datasets

        if not cfg.root:
            raise ValueError("data.root is not set: pass --data-root /path/to/vtab-1k (or --set data.root=...)")
        splits_for(cfg.mode)  # validates the mode
        train, evaluation = vtab_datasets(cfg.root, cfg.task, cfg.mode, train_tf, eval_tf, num_classes)
        return train, evaluation, train.num_classes, train.task
    if cfg.dataset == "imagefolder":
        from .folders import imagefolder_datasets

        if not cfg.root:
            raise ValueError(
                "data.root is not set: data.dataset=imagefolder reads data.root/train/<class>/* and "
                "data.root/val/<class>/* (--set data.root=/path/to/images)"
            )
        train, evaluation = imagefolder_datasets(cfg.root, train_tf, eval_tf)
        if num_classes is not None and num_classes != train.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes}, but {str(Path(cfg.root) / 'train')!r} holds "
                f"{train.num_classes} class folders; leave data.num_classes unset for an image folder"
            )
        if evaluation.split != "val":
            _say(f"data: no val/ folder in {cfg.root}; evaluating on {evaluation.split}/")
        return train, evaluation, train.num_classes, Path(cfg.root).expanduser().resolve().name
    from .folders import csv_datasets

    train_csv, eval_csv = _csv_path(cfg, "train_csv"), _csv_path(cfg, "eval_csv")
    try:
        train, evaluation = csv_datasets(train_csv, eval_csv, train_tf, eval_tf, num_classes)
    except ValueError as e:
        if str(e).startswith("num_classes="):
            raise ValueError(f"data.{e}") from None
        raise
    return train, evaluation, train.num_classes, train_csv.resolve().parent.name
