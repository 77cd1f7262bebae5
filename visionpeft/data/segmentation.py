"""Semantic segmentation datasets: ADE20K in its standard layout and users' own image / mask folders.

ADE20K (SceneParsing, the ``ADEChallengeData2016`` release of Zhou et al., "Scene Parsing through ADE20K
Dataset", CVPR 2017)::

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg       (20,210 images)
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg       (2,000 images)
    ADEChallengeData2016/annotations/training/ADE_train_00000001.png  (0 = "other", 1..150 = the classes)

``reduce_zero_label`` (on for ADE20K, as in mmseg) turns 0 into the ignore index and k into k - 1, so the 150
classes are 0..149. A user's own data: images and single-channel PNG masks with the same file stem, plus a
class list (names in label order; a Python list or a text file, one name per line).

Pairing is checked when the dataset is built (an image without a mask, a mask without an image); labels, sizes
and decoding are checked per sample when it is read, and for the first ``check_samples`` samples right away, so
a broken data set fails before training starts. Every error names the file(s) and says how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .files import ImageReadError, is_image_file, load_rgb, read_text

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "ADE20K_SPLITS",
    "SegFolder",
    "SegmentationDataset",
    "read_classes",
    "read_mask",
]

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
"""The 150 ADE20K (SceneParsing) class names in label order (label k - 1 of the PNG value k)."""

ADE20K_SPLITS = ("training", "validation")
_SPLIT_ALIASES = {"train": "training", "val": "validation", "eval": "validation"}
_ADE_LAYOUT = (
    "expected the ADE20K layout:\n"
    "  <root>/images/training/*.jpg      <root>/annotations/training/*.png\n"
    "  <root>/images/validation/*.jpg    <root>/annotations/validation/*.png\n"
    "where <root> is ADEChallengeData2016 (or its parent folder)"
)
_SHOW = 5  # file names listed in an error


def _few(names: Sequence[str]) -> str:
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def read_classes(classes: Sequence[str] | str | os.PathLike, what: str = "classes") -> list[str]:
    """Class names in label order, from a list or a UTF-8 text file with one name per line (blank lines skipped).

    Raises:
        FileNotFoundError: the file does not exist. ValueError: no names, or a name given twice (the message names
            the file).
    """
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{what}: class list file {str(path)!r} not found (one class name per line)")
        names = [line.strip() for line in read_text(path, "class list file").splitlines()]
        names = [n for n in names if n]
        source = f"class list file {str(path)!r}"
    else:
        names = [str(n) for n in classes]
        source = f"{what} list"
    if not names:
        raise ValueError(f"{source} holds no class names; give one name per class, in label order")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{source} names {dup} more than once; each class needs its own name")
    return names


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label mask as an (H, W) integer array (palette PNGs give their indices, 16-bit PNGs their values).

    Raises:
        ImageReadError: the file is unreadable, or a colour image (RGB masks are not label masks).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read mask {str(path)!r}: {e}") from e
    if arr.ndim != 2:
        raise ImageReadError(
            f"mask {str(path)!r} is a {mode} colour image; a mask must be a single-channel PNG (mode L, P or I;16) "
            "holding one class index per pixel, not colours"
        )
    if mode == "1":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        raise ImageReadError(f"mask {str(path)!r} has floating-point pixels; save it as an 8- or 16-bit PNG")
    return arr


class SegmentationDataset(Dataset):
    """Image / mask pairs with label checks; the base of :class:`ADE20K` and :class:`SegFolder`.

    Args:
        pairs: ``(image path, mask path)`` per sample.
        classes: class names in label order (labels 0..len-1).
        transform: ``transform(image, mask) -> (image, mask)`` on numpy arrays (image (H, W, 3) uint8 RGB, mask
            (H, W) integers), e.g. :func:`~visionpeft.data.dense_transforms.seg_train_transform`; ``None``: the
            image as a float tensor in [0, 1] (not normalised) and the mask as int64.
        reduce_zero_label: 0 -> ``ignore_index``, k -> k - 1 (mmseg's rule for data where 0 means "unlabelled").
        ignore_index: the label not counted by losses and metrics.
        check_samples: read (and check) this many samples at construction.
        binary: binary masks: every non-zero pixel (255 in a 0 / 255 PNG) is class 1, zero is class 0.

    Returns (per item):
        ``image`` (3, H, W) float tensor and ``mask`` (H, W) int64 tensor (sizes as the transform makes them).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        classes: Sequence[str],
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        check_samples: int = 4,
        binary: bool = False,
    ) -> None:
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.classes = list(classes)
        self.binary = bool(binary)
        if self.binary and len(self.classes) != 2:
            raise ValueError(f"binary masks have 2 classes (background, object), got the names {self.classes}")
        self.transform = transform
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index={self.ignore_index} is a class label (there are {self.num_classes} classes); "
                "choose an ignore index >= the class count, e.g. 255"
            )
        self.check(check_samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def check(self, n: int | None = None) -> None:
        """Read the first ``n`` samples (all with ``None``) and raise the first problem found."""
        for i in range(len(self) if n is None else min(n, len(self))):
            self.read(i)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked sample ``index`` before the transform.

        Returns:
            ``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) (uint8 when the labels fit, else int32), with
            ``reduce_zero_label`` applied.

        Raises:
            ImageReadError: a file cannot be read. ValueError: sizes differ or a label is out of range.
        """
        image_path, mask_path = self.pairs[index]
        image = np.array(load_rgb(image_path))
        raw = read_mask(mask_path)
        if image.shape[:2] != raw.shape:
            raise ValueError(
                f"image {str(image_path)!r} is {image.shape[1]}x{image.shape[0]} (width x height) but its mask "
                f"{str(mask_path)!r} is {raw.shape[1]}x{raw.shape[0]}; a mask must have its image's size"
            )
        mask = (raw > 0).astype(np.int32) if self.binary else raw.astype(np.int32)
        if self.reduce_zero_label:
            mask = mask - 1
            mask[raw == 0] = self.ignore_index
            mask[mask == self.ignore_index - 1] = self.ignore_index  # mmseg: 255 stays ignored
        if mask.size and (mask.max() >= self.num_classes or mask.min() < 0):
            bad = np.unique(mask[((mask >= self.num_classes) | (mask < 0)) & (mask != self.ignore_index)])
            if bad.size:
                raise ValueError(self._label_error(mask_path, bad))
        if mask.max(initial=0) <= 255 and mask.min(initial=0) >= 0:
            mask = mask.astype(np.uint8)
        return image, mask

    def _label_error(self, mask_path: Path, bad: np.ndarray) -> str:
        values = [int(v) for v in bad[:10]] + (["..."] if bad.size > 10 else [])  # type: ignore[list-item]
        msg = (
            f"mask {str(mask_path)!r} has labels {values} outside 0..{self.num_classes - 1} "
            f"(num_classes={self.num_classes}, ignore index {self.ignore_index})"
        )
        if self.reduce_zero_label:
            raw = [v + 1 for v in values if isinstance(v, int)]
            return msg + (
                f"; reduce_zero_label is on (pixel value k is label k-1, 0 is ignored), so the file holds the values "
                f"{raw}: check the class list, or turn reduce_zero_label off if 0 is a real class"
            )
        return msg + (
            f"; check the class list (it has {self.num_classes} names), and if 0 means 'unlabelled' in these "
            "masks with the classes numbered from 1, set reduce_zero_label=True (now off)"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.read(index)
        if self.transform is not None:
            return self.transform(image, mask)
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0), torch.from_numpy(mask).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def _list_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not is_image_file(p):
            continue
        if p.stem in found:
            raise ValueError(
                f"two images share the stem {p.stem!r} in {str(folder)!r} ({found[p.stem].name}, {p.name}): "
                "each image needs its own name so it can be paired with <stem>.png"
            )
        found[p.stem] = p
    if not found:
        raise FileNotFoundError(f"no images (.jpg, .png, ...) in {str(folder)!r}")
    return found


def pair_images_and_masks(images_dir: str | os.PathLike, masks_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Pair ``images_dir/<stem>.<ext>`` with ``masks_dir/<stem>.png``, sorted by stem.

    Raises:
        FileNotFoundError: a folder is missing or empty, an image has no mask or a mask no image (a few of each
            are named).
    """
    images_dir, masks_dir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
    images = _list_images(images_dir)
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder {str(masks_dir)!r} not found (the masks of {str(images_dir)!r})")
    masks = {
        p.stem: p
        for p in sorted(masks_dir.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == ".png"
    }
    lonely = sorted(images[s].name for s in images.keys() - masks.keys())
    if lonely:
        raise FileNotFoundError(
            f"{len(lonely)} image(s) in {str(images_dir)!r} have no mask <stem>.png in {str(masks_dir)!r}: "
            f"{_few(lonely)} (masks are single-channel PNGs named like their images)"
        )
    orphans = sorted(masks[s].name for s in masks.keys() - images.keys())
    if orphans:
        raise FileNotFoundError(
            f"{len(orphans)} mask(s) in {str(masks_dir)!r} have no image in {str(images_dir)!r}: {_few(orphans)}"
        )
    return [(images[s], masks[s]) for s in sorted(images)]


def find_ade20k_root(root: str | os.PathLike) -> Path:
    """``root`` itself when it holds ``images/`` and ``annotations/``, else ``root/ADEChallengeData2016``.

    Raises:
        FileNotFoundError: neither holds the ADE20K layout (the message shows it).
    """
    root = Path(root).expanduser()
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    raise FileNotFoundError(f"no ADE20K data under {str(root)!r}; {_ADE_LAYOUT}")


class ADE20K(SegmentationDataset):
    """ADE20K (SceneParsing, 150 classes) in its standard layout (see the module docstring).

    Args:
        root: the ``ADEChallengeData2016`` folder or its parent.
        split: ``"training"`` or ``"validation"`` (``"train"`` / ``"val"`` accepted).
        transform: as :class:`SegmentationDataset`.
        reduce_zero_label: True for the real ADE20K (0 = "other" -> ignore); False for data in this layout
            whose 0 is a class (the digit scenes).
        classes: class names in label order; ``None``: :data:`ADE20K_CLASSES`.
        ignore_index: the ignored label. check_samples: samples read at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        reduce_zero_label: bool = True,
        classes: Sequence[str] | str | os.PathLike | None = None,
        ignore_index: int = 255,
        check_samples: int = 4,
    ) -> None:
        split = _SPLIT_ALIASES.get(split, split)
        if split not in ADE20K_SPLITS:
            raise ValueError(f"ADE20K split must be one of {ADE20K_SPLITS}, got {split!r}")
        self.root = find_ade20k_root(root)
        self.split = split
        names = list(ADE20K_CLASSES) if classes is None else read_classes(classes)
        pairs = pair_images_and_masks(self.root / "images" / split, self.root / "annotations" / split)
        super().__init__(pairs, names, transform, reduce_zero_label, ignore_index, check_samples)


class SegFolder(SegmentationDataset):
    """Users' own segmentation data: ``images_dir/<stem>.<jpg|png|...>`` with ``masks_dir/<stem>.png``.

    Args:
        images_dir: the images. masks_dir: single-channel PNG masks (mode L, P or 16-bit), one per image.
        classes: class names in label order, or a text file with one name per line.
        transform, reduce_zero_label, ignore_index, check_samples, binary: as :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        classes: Sequence[str] | str | os.PathLike,
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        check_samples: int = 4,
        binary: bool = False,
    ) -> None:
        names = read_classes(classes)
        self.images_dir, self.masks_dir = Path(images_dir).expanduser(), Path(masks_dir).expanduser()
        pairs = pair_images_and_masks(self.images_dir, self.masks_dir)
        super().__init__(pairs, names, transform, reduce_zero_label, ignore_index, check_samples, binary)
