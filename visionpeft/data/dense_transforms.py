"""Joint image / mask / box augmentation for dense prediction, built on albumentations.

Segmentation training follows mmseg's ADE20K pipeline (the recipe of the ViT-Adapter / UperNet papers)::

    Resize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)   -> KeepRatioResize
    RandomCrop(crop_size, cat_max_ratio=0.75)                            -> CatMaxRatioCrop
    RandomFlip(prob=0.5)                                                 -> A.HorizontalFlip
    PhotoMetricDistortion()                                              -> A.RandomBrightnessContrast x2,
                                                                            SaturationScale, A.HueSaturationValue
    Normalize(mean, std)                                                 -> A.Normalize
    Pad(size=crop_size, pad_val=0, seg_pad_val=255)                      -> A.PadIfNeeded (bottom / right)

Evaluation resizes the image only (keep ratio, to fit ``scale``): the mask stays at its original size so the
metrics are computed at the original resolution (the logits are resized to the mask).

Detection transforms stay light: torchvision's detectors resize and normalise inside, so they flip (boxes and
instance masks with the image) and turn the image into a float tensor in [0, 1].

Every transform here is a callable on numpy arrays (``image`` (H, W, 3) uint8 RGB) that returns tensors; see
:class:`SegTransform` and :class:`DetTransform` for the exact signatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform
from albumentations.pytorch import ToTensorV2

__all__ = [
    "CatMaxRatioCrop",
    "DetTransform",
    "KeepRatioResize",
    "SaturationScale",
    "SegTransform",
    "det_eval_transform",
    "det_train_transform",
    "keep_ratio_size",
    "seg_eval_transform",
    "seg_train_transform",
]


def keep_ratio_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """The size mmcv's ``rescale_size`` gives an image resized with ``keep_ratio`` to fit ``scale``.

    The long side is brought to at most ``max(scale)`` and the short side to at most ``min(scale)``, whichever
    is the tighter (up or down), so ``(2048, 512)`` fits a 683x512 (W x H) image to 683x512 and a 100x50 one to
    1024x512.

    Args:
        height: image height. width: image width. scale: two edge lengths (order irrelevant).

    Returns:
        ``(new_height, new_width)``, rounded to the nearest pixel, at least 1.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class KeepRatioResize(DualTransform):
    """mmseg's ``Resize(scale, ratio_range, keep_ratio=True)``: pick ``r`` uniformly in ``ratio_range``, then
    resize (bilinear; masks nearest) to fit ``(scale[0] * r, scale[1] * r)`` keeping the aspect ratio.

    Args:
        scale: the target scale, e.g. ``(2048, 512)``; or a list of such scales, one chosen at random per call
            (multi-scale training as Detectron's ``ResizeShortestEdge``).
        ratio_range: ``(low, high)`` of ``r``; ``None``: ``r = 1``.
        p: probability of applying.
    """

    def __init__(
        self,
        scale: Sequence[float] | Sequence[Sequence[float]],
        ratio_range: Sequence[float] | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        scales = [scale] if not isinstance(scale[0], Sequence) else list(scale)  # type: ignore[index]
        self.scales = [(float(s[0]), float(s[1])) for s in scales]  # type: ignore[index]
        if any(len(s) != 2 or min(s) <= 0 for s in scales):  # type: ignore[arg-type]
            raise ValueError(f"scale must be two positive edge lengths (or a list of such pairs), got {scale!r}")
        if ratio_range is not None and (len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]):
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]), float(ratio_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        scale = self.scales[self.py_random.randrange(len(self.scales))]
        r = 1.0 if self.ratio_range is None else self.py_random.uniform(*self.ratio_range)
        return {"size": keep_ratio_size(h, w, (scale[0] * r, scale[1] * r))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        return bboxes  # albumentations keeps boxes normalised to [0, 1] inside a Compose: a resize leaves them

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scales", "ratio_range")


class CatMaxRatioCrop(DualTransform):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: a random ``height`` x ``width`` window (the whole side
    when the image is smaller; :class:`~albumentations.PadIfNeeded` pads later). Up to 10 times, a window is
    redrawn unless its most frequent class (``ignore_index`` not counted) covers less than ``cat_max_ratio`` of
    its labelled pixels and it holds more than one class; after 10 failures the next draw is kept.

    Args:
        height: crop height. width: crop width.
        cat_max_ratio: largest share of one class; ``>= 1`` disables the check (a plain random crop).
        ignore_index: the mask value not counted.
        p: probability of applying.
    """

    def __init__(
        self, height: int, width: int, cat_max_ratio: float = 0.75, ignore_index: int = 255, p: float = 1.0
    ) -> None:
        super().__init__(p=p)
        if height < 1 or width < 1:
            raise ValueError(f"crop size must be positive, got {height} x {width}")
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)

    @property
    def targets_as_params(self) -> list[str]:
        return ["image"]

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        y0 = self.py_random.randint(0, max(h - self.height, 0))
        x0 = self.py_random.randint(0, max(w - self.width, 0))
        return y0, min(y0 + self.height, h), x0, min(x0 + self.width, w)

    def accepts(self, mask_crop: np.ndarray) -> bool:
        """mmseg's rule: more than one labelled class and the largest below ``cat_max_ratio``.

        Args:
            mask_crop: (h, w) integer labels of a candidate window.
        """
        labels, counts = np.unique(mask_crop, return_counts=True)
        counts = counts[labels != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        box = self._window(h, w)
        mask = data.get("mask")
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                if self.accepts(mask[box[0] : box[1], box[2] : box[3]]):
                    break
                box = self._window(h, w)
        return {"window": box}

    def apply(self, img: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return np.ascontiguousarray(img[window[0] : window[1], window[2] : window[3]])

    def apply_to_mask(self, mask: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return np.ascontiguousarray(mask[window[0] : window[1], window[2] : window[3]])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index")


class SaturationScale(ImageOnlyTransform):
    """The saturation step of mmseg's ``PhotoMetricDistortion``: in HSV (8-bit, OpenCV's ranges) multiply the
    saturation by ``alpha ~ U(lower, upper)`` and clip to 255. (albumentations' own saturation transforms add
    to it or blend with grey, which is not the same.)

    Args:
        lower: smallest factor. upper: largest factor. p: probability of applying.
    """

    def __init__(self, lower: float = 0.5, upper: float = 1.5, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.lower, self.upper = float(lower), float(upper)

    def get_params(self) -> dict[str, float]:
        return {"alpha": self.py_random.uniform(self.lower, self.upper)}

    def apply(self, img: np.ndarray, alpha: float, **params: Any) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * alpha, 0, 255).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("lower", "upper")


def photometric_distortion() -> A.BaseCompose:
    """mmseg's ``PhotoMetricDistortion`` with its defaults (each step with probability 0.5): brightness
    ``+U(-32, 32)``; contrast ``x U(0.5, 1.5)`` either first or last (chosen at random); saturation
    ``x U(0.5, 1.5)``; hue ``+U(-18, 18)`` (OpenCV's 0-180 hue scale)."""

    def contrast() -> A.BasicTransform:
        return A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(-0.5, 0.5), p=0.5)

    def colour() -> list[A.BasicTransform]:
        return [
            SaturationScale(0.5, 1.5, p=0.5),
            A.HueSaturationValue(hue_shift_limit=(-18, 18), sat_shift_limit=(0, 0), val_shift_limit=(0, 0), p=0.5),
        ]

    brightness = A.RandomBrightnessContrast(
        brightness_limit=(-32 / 255, 32 / 255), contrast_limit=(0.0, 0.0), brightness_by_max=True, p=0.5
    )
    return A.Sequential(
        [
            brightness,
            A.OneOf([A.Sequential([contrast(), *colour()]), A.Sequential([*colour(), contrast()])], p=1.0),
        ],
        p=1.0,
    )


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std on the [0, 1] scale (values above 1 are read as 0-255, as mmseg writes them)."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={list(mean)} std={list(std)}")
    if max(mean) > 1.0:
        mean, std = [m / 255.0 for m in mean], [s / 255.0 for s in std]
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {list(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def _reseed_in_worker(transform: SegTransform | DetTransform) -> None:
    """Seed albumentations from torch, so that augmentation follows ``torch.manual_seed`` and a resumed run (whose
    checkpoint holds torch's random state) draws the same crops, flips and colours as an uninterrupted one.

    A pipeline built without a seed draws a fresh albumentations seed from torch's generator for every sample (in
    a DataLoader worker that generator is the worker's own, seeded distinctly by torch, so workers never repeat
    each other). A pipeline built with a seed keeps its own stream; in a worker it is reseeded once from the
    worker's seed (forked workers would otherwise inherit one state and repeat each other's draws).
    """
    if transform.torch_seeded:
        transform.compose.set_random_seed(int(torch.randint(0, 2**32 - 1, (), dtype=torch.int64)))
        return
    info = torch.utils.data.get_worker_info()
    if info is not None and transform._worker_seed != info.seed:
        transform.compose.set_random_seed(info.seed % 2**32)
        transform._worker_seed = info.seed


class SegTransform:
    """A segmentation transform: ``(image, mask) -> (image tensor, mask tensor)``.

    Args:
        compose: the albumentations pipeline (ends with ``ToTensorV2``).
        resize_mask: whether the mask goes through the pipeline (training) or is returned as it is (evaluation).

    Call args:
        image: (H, W, 3) uint8 RGB. mask: (H, W) integer labels.

    Returns:
        ``image`` (3, h, w) float32, ``mask`` (h, w) int64 (``(H, W)`` when ``resize_mask`` is False).
    """

    def __init__(self, compose: A.Compose, resize_mask: bool = True) -> None:
        self.compose = compose
        self.resize_mask = resize_mask
        self._worker_seed: int | None = None
        # built without a seed: every sample's draws come from torch (set_random_seed then records a seed on the
        # pipeline, so the choice is remembered here); the evaluation pipeline draws nothing, and leaves torch's
        # random state alone (evaluating does not change the training that follows)
        self.torch_seeded = compose.seed is None and resize_mask

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _reseed_in_worker(self)
        if self.resize_mask:
            out = self.compose(image=image, mask=mask)
            return out["image"].float(), torch.as_tensor(np.asarray(out["mask"]), dtype=torch.long)
        out = self.compose(image=image)
        return out["image"].float(), torch.from_numpy(np.ascontiguousarray(mask)).long()

    def __repr__(self) -> str:
        return f"SegTransform(resize_mask={self.resize_mask}, {self.compose!r})"


def seg_train_transform(
    crop_size: int | Sequence[int] = 512,
    scale: Sequence[float] = (2048, 512),
    ratio_range: Sequence[float] | None = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    ignore_index: int = 255,
    seed: int | None = None,
) -> SegTransform:
    """mmseg's ADE20K training pipeline (see the module docstring).

    Args:
        crop_size: crop side, or ``(height, width)``; the output always has this size (padded when smaller).
        scale: resize target before the ratio, e.g. ``(2048, 512)`` (long, short edge; order irrelevant).
        ratio_range: ``(low, high)`` of the random resize ratio; ``None``: resize to ``scale`` exactly.
        cat_max_ratio: see :class:`CatMaxRatioCrop` (``1``: a plain random crop).
        hflip: probability of a horizontal flip (image and mask together).
        photometric: whether to apply :func:`photometric_distortion`.
        mean: per-channel mean on the [0, 1] scale (or 0-255, as mmseg writes it). std: likewise.
        ignore_index: mask padding value, not counted by ``cat_max_ratio``.
        seed: seed of albumentations' random state (``None``: random).

    Returns:
        A :class:`SegTransform` giving ``image`` (3, crop_h, crop_w) float32 normalised (padding 0) and ``mask``
        (crop_h, crop_w) int64 (padding ``ignore_index``).
    """
    ch, cw = _pair(crop_size, "crop_size")
    mean, std = _mean_std(mean, std)
    steps: list[A.BasicTransform | A.BaseCompose] = [
        KeepRatioResize(scale, ratio_range),
        CatMaxRatioCrop(ch, cw, cat_max_ratio, ignore_index),
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if photometric:
        steps.append(photometric_distortion())
    steps += [
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
        A.PadIfNeeded(
            min_height=ch,
            min_width=cw,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        ToTensorV2(),
    ]
    return SegTransform(A.Compose(steps, seed=seed), resize_mask=True)


def seg_eval_transform(
    scale: Sequence[float] = (2048, 512),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> SegTransform:
    """mmseg's test pipeline: resize the image keeping its ratio to fit ``scale``, normalise; the mask is
    returned untouched (original size).

    Args:
        scale: resize target (long, short edge; order irrelevant). mean, std: as :func:`seg_train_transform`.

    Returns:
        A :class:`SegTransform` giving ``image`` (3, h, w) float32 and ``mask`` (H, W) int64 at the original size.
    """
    mean, std = _mean_std(mean, std)
    steps = [KeepRatioResize(scale), A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return SegTransform(A.Compose(steps), resize_mask=False)


class DetTransform:
    """A detection transform: ``(image, target) -> (image tensor, target)`` keeping boxes and masks consistent.

    Args:
        compose: the albumentations pipeline with ``BboxParams(format="pascal_voc", label_fields=["labels",
            "box_ids"])`` (``box_ids`` keeps the instance masks of the boxes that survive).
        geometric: whether ``compose`` moves pixels (boxes and masks go through it); ``False``: a pixel-only
            pipeline (boxes and masks are passed on unchanged).

    Call args:
        image: (H, W, 3) uint8 RGB. target: ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,), optionally ``masks``
            (N, H, W) uint8, plus any other key (``image_id``), passed through.

    Returns:
        ``image`` (3, h, w) float32 in [0, 1]; ``target`` with ``boxes`` (M, 4) float32, ``labels`` (M,) int64,
        ``masks`` (M, h, w) uint8 when given, other keys as they came.
    """

    def __init__(self, compose: A.Compose, geometric: bool = True) -> None:
        self.compose = compose
        self.geometric = geometric
        self._worker_seed: int | None = None
        # as SegTransform; the evaluation pipeline (no geometric step) draws nothing
        self.torch_seeded = compose.seed is None and geometric

    def __call__(self, image: np.ndarray, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        _reseed_in_worker(self)
        boxes = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(target["labels"], dtype=np.int64).reshape(-1)
        masks = target.get("masks")
        has_masks = masks is not None and len(masks) > 0
        kwargs: dict[str, Any] = {"image": image}
        if self.geometric:
            kwargs.update(bboxes=boxes, labels=labels, box_ids=np.arange(len(boxes)))
            if has_masks:
                kwargs["masks"] = np.asarray(masks, dtype=np.uint8)
        out = self.compose(**kwargs)
        img = out["image"].float()
        h, w = img.shape[-2:]
        result = {k: v for k, v in target.items() if k not in ("boxes", "labels", "masks")}
        if not self.geometric:  # pixels only: boxes and masks as they came
            out = {"bboxes": boxes, "box_ids": np.arange(len(boxes)), "masks": masks}
        keep = np.asarray(out["box_ids"], dtype=np.int64).reshape(-1)
        result["boxes"] = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        result["labels"] = torch.as_tensor(labels[keep], dtype=torch.int64)
        if masks is not None:
            if has_masks:
                kept = np.asarray(out["masks"], dtype=np.uint8)[keep]
                result["masks"] = torch.from_numpy(np.ascontiguousarray(kept)).reshape(-1, h, w)
            else:
                result["masks"] = torch.zeros((0, h, w), dtype=torch.uint8)
        return img, result

    def __repr__(self) -> str:
        return f"DetTransform({self.compose!r})"


def _det_compose(steps: list[A.BasicTransform]) -> DetTransform:
    tail = [A.ToFloat(max_value=255.0), ToTensorV2()]
    if not steps:
        return DetTransform(A.Compose(tail), geometric=False)
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "box_ids"], clip=True)
    return DetTransform(A.Compose([*steps, *tail], bbox_params=bbox_params))


def det_train_transform(
    min_size: int | Sequence[int] | None = None, max_size: int = 1333, hflip: float = 0.5
) -> DetTransform:
    """Detection training: optional multi-scale resize, horizontal flip, float tensor in [0, 1].

    Args:
        min_size: ``None``: no resize (torchvision's detector resizes to its own ``min_size``); an int or a list
            of ints: resize keeping the ratio so the short side is one of them (picked at random) and the long
            side at most ``max_size``.
        max_size: long-side limit of that resize.
        hflip: flip probability (boxes and masks follow).
    """
    steps: list[A.BasicTransform] = []
    if min_size is not None:
        sizes = [min_size] if isinstance(min_size, (int, np.integer)) else list(min_size)
        steps.append(KeepRatioResize([(max_size, s) for s in sizes]))
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    return _det_compose(steps)


def det_eval_transform() -> DetTransform:
    """Detection evaluation: the image as a float tensor in [0, 1], boxes and masks unchanged."""
    return _det_compose([])
