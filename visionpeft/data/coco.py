"""COCO-format detection and instance segmentation data (``instances_*.json`` + an image folder), on pycocotools.

This is also how users bring their own boxes and polygons (CVAT, Label Studio, Roboflow and labelme2coco all
export it). Categories are numbered 1..K in increasing category id (torchvision's detectors keep 0 for the
background); boxes go from COCO's ``[x, y, w, h]`` to ``[x1, y1, x2, y2]`` pixels; crowd regions (``iscrowd: 1``)
and degenerate boxes (width or height <= 1 pixel) are skipped; with ``masks=True`` polygons and RLE become
(N, H, W) instance masks. Images without objects are kept, with empty targets.

The annotation file is checked when the dataset is built (valid JSON, the three lists, categories, every
annotation's image and category, every image file present); the errors name the file and say what to fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import load_rgb, read_text

__all__ = ["CocoDetection", "load_coco_json"]

_SHOW = 5
_KEYS = ("images", "annotations", "categories")


def _few(names: list[str]) -> str:
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def load_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read and check a COCO annotation file.

    Returns:
        The parsed dictionary (``images``, ``annotations``, ``categories`` present and lists; category and image
        ids unique; every annotation pointing at a listed image and category, with a 4-number ``bbox``).

    Raises:
        FileNotFoundError: the file is missing. ValueError: not JSON, or not the COCO structure (the message names
            the file and the offending entry).
    """
    path = Path(ann_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {str(path)!r} not found")
    try:
        data = json.loads(read_text(path, "COCO annotation file"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"COCO annotation file {str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    except OSError as e:
        raise OSError(f"cannot read COCO annotation file {str(path)!r}: {e}") from e
    where = f"COCO annotation file {str(path)!r}"
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}, not an object with {list(_KEYS)}")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ValueError(
            f"{where} has no {missing} key(s) (it has {sorted(data)}); a COCO instances file holds the lists "
            "'images', 'annotations' and 'categories'"
        )
    for k in _KEYS:
        if not isinstance(data[k], list):
            raise ValueError(f"{where}: '{k}' must be a list, got {type(data[k]).__name__}")
    if not data["categories"]:
        raise ValueError(f"{where} has an empty 'categories' list; list each class as {{'id': 1, 'name': 'cat'}}")
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{where}: category {c!r} needs an 'id' and a 'name'")
    cat_ids = [c["id"] for c in data["categories"]]
    if len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"{where}: category ids {sorted({i for i in cat_ids if cat_ids.count(i) > 1})} repeat")
    if not data["images"]:
        raise ValueError(f"{where} has an empty 'images' list")
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{where}: image entry {im!r} needs an 'id' and a 'file_name'")
    img_ids = [im["id"] for im in data["images"]]
    if len(set(img_ids)) != len(img_ids):
        raise ValueError(f"{where}: image ids {sorted({i for i in img_ids if img_ids.count(i) > 1})[:10]} repeat")
    known_imgs, known_cats = set(img_ids), set(cat_ids)
    for a in data["annotations"]:
        aid = a.get("id") if isinstance(a, dict) else None
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise ValueError(f"{where}: annotation {a!r} needs an 'image_id' and a 'category_id'")
        if a["image_id"] not in known_imgs:
            raise ValueError(f"{where}: annotation {aid} refers to image_id {a['image_id']}, not in 'images'")
        if a["category_id"] not in known_cats:
            raise ValueError(
                f"{where}: annotation {aid} has category_id {a['category_id']}, not in 'categories' "
                f"(ids {sorted(known_cats)[:20]})"
            )
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: annotation {aid} needs a 'bbox' [x, y, width, height], got {bbox!r}")
    return data


class CocoDetection(Dataset):
    """A COCO-format detection / instance segmentation dataset.

    Args:
        images_dir: the folder the ``file_name`` entries are relative to.
        ann_file: the ``instances_*.json`` file.
        transform: ``transform(image, target) -> (image, target)`` with ``image`` (H, W, 3) uint8 RGB and numpy
            targets (see :class:`~visionpeft.data.dense_transforms.DetTransform`); ``None``:
            :func:`~visionpeft.data.dense_transforms.det_eval_transform` (a float tensor in [0, 1]).
        masks: also return instance masks (polygons and RLE decoded by pycocotools).
        allow_empty: accept a file with no annotation at all (by default an error: nothing to learn).

    Attributes:
        classes: category names, label order (label ``k`` is ``classes[k - 1]``). cat_ids: COCO category id of
            each label - 1. ids: image ids, index order. coco_api: the ``pycocotools.coco.COCO`` index.

    Returns (per item):
        ``image`` (3, H, W) float in [0, 1]; ``target``: ``boxes`` (N, 4) float32 xyxy pixels, ``labels`` (N,)
        int64 in 1..K, ``image_id`` int, and ``masks`` (N, H, W) uint8 with ``masks=True``.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transform: Callable[[np.ndarray, dict[str, Any]], Any] | None = None,
        masks: bool = False,
        allow_empty: bool = False,
    ) -> None:
        from pycocotools.coco import COCO

        self.images_dir = Path(images_dir).expanduser()
        self.ann_file = Path(ann_file).expanduser()
        data = load_coco_json(self.ann_file)
        where = f"COCO annotation file {str(self.ann_file)!r}"
        if not data["annotations"] and not allow_empty:
            raise ValueError(
                f"{where} has an empty 'annotations' list: there are no objects to learn from "
                "(pass allow_empty=True for a set of images without objects)"
            )
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder {str(self.images_dir)!r} not found (the images of {where})")
        absent = [im["file_name"] for im in data["images"] if not (self.images_dir / im["file_name"]).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {len(data['images'])} image(s) listed in {where} are missing from "
                f"{str(self.images_dir)!r}: {_few(absent)}"
            )
        if masks:
            for im in data["images"]:
                if "height" not in im or "width" not in im:
                    raise ValueError(f"{where}: image {im['file_name']!r} needs 'height' and 'width' for masks")
            for a in data["annotations"]:
                if not a.get("iscrowd", 0) and not a.get("segmentation"):
                    raise ValueError(
                        f"{where}: annotation {a.get('id')} has no 'segmentation' (polygons or RLE), needed "
                        "with masks=True; turn masks off for boxes only"
                    )
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            coco.createIndex()
        self.coco_api = coco
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.classes = [str(c["name"]) for c in cats]
        self._label = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}
        self.ids = [im["id"] for im in data["images"]]
        self.masks = bool(masks)
        if transform is None:
            from .dense_transforms import det_eval_transform

            transform = det_eval_transform()
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """Foreground classes K (labels 1..K)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco_api.imgs[self.ids[index]]["file_name"]

    def read(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Sample ``index`` before the transform: ``image`` (H, W, 3) uint8 and numpy targets."""
        image_id = self.ids[index]
        info = self.coco_api.imgs[image_id]
        path = self.image_path(index)
        image = np.array(load_rgb(path))
        h, w = image.shape[:2]
        if ("height" in info and info["height"] != h) or ("width" in info and info["width"] != w):
            raise ValueError(
                f"image {str(path)!r} is {w}x{h} (width x height) but {str(self.ann_file)!r} says "
                f"{info.get('width')}x{info.get('height')}; fix the 'width' / 'height' of image id {image_id}"
            )
        boxes, labels, masks = [], [], []
        for ann in self.coco_api.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if bw <= 1 or bh <= 1:
                continue
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
            if x2 - x1 <= 1 or y2 - y1 <= 1:
                continue
            boxes.append((x1, y1, x2, y2))
            labels.append(self._label[ann["category_id"]])
            if self.masks:
                with warnings.catch_warnings():  # pycocotools under numpy 2: a DeprecationWarning per mask
                    warnings.simplefilter("ignore", DeprecationWarning)
                    masks.append(self.coco_api.annToMask(ann))
        target: dict[str, Any] = {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "image_id": int(image_id),
        }
        if self.masks:
            target["masks"] = np.stack(masks).astype(np.uint8) if masks else np.zeros((0, h, w), np.uint8)
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.read(index)
        return self.transform(image, target)

    def __repr__(self) -> str:
        return f"CocoDetection({len(self)} images, {self.num_classes} classes, masks={self.masks})"
