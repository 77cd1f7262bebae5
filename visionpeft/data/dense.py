"""Segmentation and detection datasets from a data config (read duck-typed: ``data/`` does not import the engine).

``data.dataset`` and the task choose the reader:

- segmentation: ``ade20k`` (``data.root``: ``ADEChallengeData2016`` or its parent), ``segfolder``
  (``data.root/images/{train,val}/*`` + ``data.root/masks/{train,val}/<stem>.png`` and a class list:
  ``data.classes``, ``data.classes_file`` or ``data.root/classes.txt``; ``data.binary_masks``: 0 / non-zero PNGs
  as background / object), ``digit_scenes`` (the embedded default);
- detection: ``coco`` (``data.root`` in the COCO 2017 layout, or ``data.train_ann`` / ``data.eval_ann`` /
  ``data.train_images`` / ``data.eval_images``), ``digit_scenes``.

Keys read (with these defaults when absent): ``crop_size`` 512, ``scale`` [2048, 512], ``ratio_range``
[0.5, 2.0], ``cat_max_ratio`` 0.75, ``hflip`` 0.5, ``photometric`` True, ``mean`` / ``std`` ImageNet's,
``reduce_zero_label`` None (True for ade20k, False otherwise), ``ignore_index`` 255, ``classes``,
``classes_file``, ``masks`` False, ``binary_masks`` False, ``num_train`` / ``num_eval`` (digit scenes: 800 / 200).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

__all__ = ["DENSE_DATASETS", "DENSE_TASKS", "build_dense_datasets"]

DENSE_DATASETS = {
    "segmentation": ("ade20k", "segfolder", "digit_scenes"),
    "detection": ("coco", "digit_scenes"),
}
"""The datasets each dense task reads."""
DENSE_TASKS = tuple(DENSE_DATASETS)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _get(cfg: Any, key: str, default: Any) -> Any:
    value = getattr(cfg, key, None)
    return default if value is None else value


def _root(cfg: Any, dataset: str, layout: str) -> Path:
    root = getattr(cfg, "root", None)
    if not root:
        raise ValueError(f"data.root is not set: data.dataset={dataset} reads {layout} (--set data.root=/path)")
    return Path(root).expanduser()


def _override_classes(cfg: Any, default: list[str] | None, dataset: str) -> list[str] | None:
    from .segmentation import read_classes

    classes, classes_file = getattr(cfg, "classes", None), getattr(cfg, "classes_file", None)
    if classes and classes_file:
        raise ValueError("data.classes and data.classes_file are both set; keep one")
    names = read_classes(classes, "data.classes") if classes else None
    if classes_file:
        names = read_classes(classes_file, "data.classes_file")
    if names is not None and default is not None and len(names) != len(default):
        raise ValueError(
            f"data.classes{'_file' if classes_file else ''} names {len(names)} classes but {dataset} has "
            f"{len(default)}; give one name per class (or leave it unset for the built-in names)"
        )
    return names if names is not None else default


def _segmentation(cfg: Any, dataset: str) -> tuple[Dataset, Dataset, list[str]]:
    from .dense_transforms import seg_eval_transform, seg_train_transform
    from .segmentation import ADE20K, ADE20K_CLASSES, SegFolder, read_classes

    mean, std = _get(cfg, "mean", _IMAGENET_MEAN), _get(cfg, "std", _IMAGENET_STD)
    scale = _get(cfg, "scale", (2048, 512))
    ignore = int(_get(cfg, "ignore_index", 255))
    train_tf = seg_train_transform(
        crop_size=_get(cfg, "crop_size", 512),
        scale=scale,
        ratio_range=_get(cfg, "ratio_range", (0.5, 2.0)),
        cat_max_ratio=float(_get(cfg, "cat_max_ratio", 0.75)),
        hflip=float(_get(cfg, "hflip", 0.5)),
        photometric=bool(_get(cfg, "photometric", True)),
        mean=mean,
        std=std,
        ignore_index=ignore,
    )
    eval_tf = seg_eval_transform(scale=scale, mean=mean, std=std)
    rzl = getattr(cfg, "reduce_zero_label", None)
    if dataset == "ade20k":
        root = _root(cfg, dataset, "ADEChallengeData2016/{images,annotations}/{training,validation}")
        classes = _override_classes(cfg, list(ADE20K_CLASSES), dataset)
        rzl = True if rzl is None else bool(rzl)
        kw = {"reduce_zero_label": rzl, "classes": classes, "ignore_index": ignore}
        return ADE20K(root, "training", train_tf, **kw), ADE20K(root, "validation", eval_tf, **kw), classes
    if dataset == "segfolder":
        root = _root(cfg, dataset, "root/images/{train,val}/* with root/masks/{train,val}/<stem>.png")
        classes = _override_classes(cfg, None, dataset)
        binary = bool(_get(cfg, "binary_masks", False))
        if classes is None and binary and not (root / "classes.txt").is_file():
            classes = ["background", "object"]
        if classes is None:
            if not (root / "classes.txt").is_file():
                raise ValueError(
                    f"data.dataset=segfolder needs the class names: set data.classes (a list), data.classes_file, "
                    f"or write {str(root / 'classes.txt')!r} (one name per line, in label order)"
                )
            classes = read_classes(root / "classes.txt")
        kw = {"reduce_zero_label": bool(rzl), "ignore_index": ignore, "binary": binary}
        sets = [SegFolder(root / "images" / s, root / "masks" / s, classes, tf, **kw) for s, tf in
                (("train", train_tf), ("val", eval_tf))]  # fmt: skip
        return sets[0], sets[1], list(classes)  # type: ignore[arg-type]
    from .scenes import SCENE_CLASSES

    root = _scenes_root(cfg)
    classes = _override_classes(cfg, list(SCENE_CLASSES), dataset)
    kw = {"reduce_zero_label": bool(rzl), "classes": classes, "ignore_index": ignore}
    ade = root / "ADEChallengeData2016"
    return ADE20K(ade, "training", train_tf, **kw), ADE20K(ade, "validation", eval_tf, **kw), classes


def _scenes_root(cfg: Any) -> Path:
    from .scenes import ensure_digit_scenes

    return ensure_digit_scenes(
        getattr(cfg, "root", None), getattr(cfg, "num_train", None), getattr(cfg, "num_eval", None)
    )


def _coco_paths(cfg: Any, root: Path | None) -> tuple[Path, Path, Path, Path]:
    defaults = {
        "train_ann": "annotations/instances_train2017.json",
        "eval_ann": "annotations/instances_val2017.json",
        "train_images": "train2017",
        "eval_images": "val2017",
    }
    out = []
    for key, default in defaults.items():
        value = getattr(cfg, key, None)
        if value is None and root is None:
            raise ValueError(
                f"data.{key} is not set and neither is data.root: data.dataset=coco reads data.root in the COCO 2017 "
                f"layout (root/{default}) or the explicit data.train_ann / eval_ann / train_images / eval_images"
            )
        path = Path(value if value is not None else default).expanduser()
        out.append(path if path.is_absolute() or root is None else root / path)
    return out[0], out[1], out[2], out[3]


def _detection(cfg: Any, dataset: str) -> tuple[Dataset, Dataset, list[str]]:
    from .coco import CocoDetection
    from .dense_transforms import det_eval_transform, det_train_transform

    masks = bool(_get(cfg, "masks", False))
    train_tf, eval_tf = det_train_transform(hflip=float(_get(cfg, "hflip", 0.5))), det_eval_transform()
    if dataset == "coco":
        root = getattr(cfg, "root", None)
        train_ann, eval_ann, train_images, eval_images = _coco_paths(cfg, Path(root).expanduser() if root else None)
    else:
        coco = _scenes_root(cfg) / "coco"
        train_ann, eval_ann = (
            coco / "annotations/instances_train2017.json",
            coco / "annotations/instances_val2017.json",
        )
        train_images, eval_images = coco / "train2017", coco / "val2017"
    train = CocoDetection(train_images, train_ann, train_tf, masks=masks)
    evaluation = CocoDetection(eval_images, eval_ann, eval_tf, masks=masks, allow_empty=True)
    if evaluation.classes != train.classes:
        raise ValueError(
            f"the categories of {str(eval_ann)!r} ({evaluation.classes[:10]}) differ from those of {str(train_ann)!r} "
            f"({train.classes[:10]}); both files need the same category list"
        )
    names = _override_classes(cfg, list(train.classes), dataset)
    return train, evaluation, list(names or train.classes)


def build_dense_datasets(cfg: Any, task: str) -> tuple[Dataset, Dataset, list[str]]:
    """``(train_set, eval_set, classes)`` of a dense task.

    Args:
        cfg: a data config (``DataConfig``; any object with the keys of the module docstring).
        task: ``"segmentation"`` or ``"detection"``.

    Returns:
        Segmentation: datasets of ``(image (3, h, w) float normalised, mask (h, w) int64)`` (the evaluation mask
        at the original size) and the class names (label order). Detection: datasets of ``(image (3, H, W)
        float in [0, 1], target dict)`` and the foreground class names (label ``k`` is ``classes[k - 1]``).

    Raises:
        ValueError: an unknown task or dataset, a dataset that does not serve the task, a bad key (the message
            names the ``data.`` key). FileNotFoundError / ImageReadError: missing or unreadable files (named).
    """
    if task not in DENSE_DATASETS:
        raise ValueError(f"unknown dense task {task!r}; use one of {', '.join(DENSE_TASKS)}")
    dataset = getattr(cfg, "dataset", None)
    choices = DENSE_DATASETS[task]
    if dataset not in choices:
        known = sorted({d for ds in DENSE_DATASETS.values() for d in ds})
        if dataset in known:
            serves = [t for t, ds in DENSE_DATASETS.items() if dataset in ds]
            raise ValueError(
                f"data.dataset={dataset} serves the {' and '.join(serves)} task, not {task}; "
                f"for {task} use one of {', '.join(choices)}"
            )
        raise ValueError(f"data.dataset: unknown dataset {dataset!r} for {task}; use one of {', '.join(choices)}")
    if task == "segmentation":
        return _segmentation(cfg, dataset)
    return _detection(cfg, dataset)
