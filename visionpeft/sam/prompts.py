"""Prompt sampling for promptable-segmentation training of Segment Anything.

Follows the training recipe of "Segment Anything" (Kirillov et al., arXiv 2304.02643, appendix A, "Training
algorithm"): each object of a ground-truth mask is prompted with a box (its tight box, every coordinate jittered by
a normal noise of standard deviation 10% of the box side, at most 20 pixels) or a foreground point, and later
iterations add one point drawn uniformly from the error region between the previous prediction and the ground
truth (positive on a false negative, negative on a false positive).

Coordinates follow ``segment_anything``'s own convention: ``x`` is the column and ``y`` the row of a pixel, given
as the pixel's index (a point on pixel ``(row 3, col 5)`` is ``(5.0, 3.0)``), and a box is ``(x0, y0, x1, y1)``
with the indices of its first and last pixel, as ``segment_anything.utils.amg.batched_mask_to_box`` returns them.
SAM's prompt encoder adds the half-pixel shift to the pixel centre itself, so no ``+ 0.5`` is applied here.

All randomness comes from the ``torch.Generator`` argument. The random numbers are drawn on the generator's device
and moved to the data's device, so a CPU generator serves CUDA masks too, and one seed gives the same prompts on
every device. Point label ``-1`` marks padding (SAM's "not a point").
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["objects_from_mask", "pad_points", "refine_points", "sample_boxes", "sample_points"]


def objects_from_mask(
    mask: torch.Tensor,
    ignore_index: int | None = 255,
    background: int | None = None,
    min_area: int = 1,
    instances: bool = True,
    connectivity: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a semantic label map into binary object masks.

    Args:
        mask: label map ``(H, W)``, integer class ids.
        ignore_index: label of unlabelled pixels, never an object (``None``: no such label).
        background: class that is not an object (``None``: every class is one).
        min_area: objects with fewer pixels are dropped (with ``instances=False``, the class's whole area counts).
        instances: ``True``: one mask per connected component of each class; ``False``: one mask per class.
        connectivity: 8 (diagonal neighbours connect, as in ``segment_anything``'s mask post-processing) or 4.

    Returns:
        ``(masks, labels)``: ``masks`` ``(N, H, W)`` bool on the mask's device, ``labels`` ``(N,)`` int64 class
        ids, ordered by class, then by component (scan order). No object gives ``masks`` of shape ``(0, H, W)``.
    """
    if mask.ndim != 2:
        raise ValueError(f"objects_from_mask: mask must be (H, W), got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise ValueError(f"objects_from_mask: mask must hold integer class ids, got dtype {mask.dtype}")
    if connectivity not in (4, 8):
        raise ValueError(f"objects_from_mask: connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    height, width = mask.shape
    labels_np = mask.detach().cpu().numpy()
    out_masks: list[np.ndarray] = []
    out_labels: list[int] = []
    for cls in np.unique(labels_np).tolist():
        if cls == ignore_index or cls == background:
            continue
        region = labels_np == cls
        if not instances:
            if region.sum() >= min_area:
                out_masks.append(region)
                out_labels.append(cls)
            continue
        components, count = ndimage.label(region, structure=structure)
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for k in range(1, count + 1):
            if areas[k] >= min_area:
                out_masks.append(components == k)
                out_labels.append(cls)
    if not out_masks:
        return (
            torch.zeros((0, height, width), dtype=torch.bool, device=mask.device),
            torch.zeros((0,), dtype=torch.int64, device=mask.device),
        )
    masks = torch.from_numpy(np.stack(out_masks)).to(mask.device)
    return masks, torch.tensor(out_labels, dtype=torch.int64, device=mask.device)


def _check_masks(masks: torch.Tensor, fn: str) -> None:
    if masks.ndim != 3:
        raise ValueError(f"{fn}: masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"{fn}: masks must be bool, got {masks.dtype} (use mask > 0 or mask.bool())")


def _rand(generator: torch.Generator, shape: tuple[int, ...], device: torch.device, normal: bool = False):
    """Uniform ``[0, 1)`` (or standard normal) numbers drawn on the generator's device, moved to ``device``."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=generator.device).to(device)


def _masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight inclusive boxes ``(N, 4)`` xyxy (float) of non-empty masks ``(N, H, W)``."""
    height, width = masks.shape[-2:]
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    ys = torch.arange(height, device=masks.device)
    xs = torch.arange(width, device=masks.device)
    y0 = torch.where(rows, ys, height).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    x0 = torch.where(cols, xs, width).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def sample_boxes(
    masks: torch.Tensor, generator: torch.Generator, noise: float = 0.1, max_noise: float = 20.0
) -> torch.Tensor:
    """Noisy box prompts: the tight box of each mask, every coordinate jittered.

    Each coordinate moves by ``N(0, (noise * side)^2)`` (``side`` the box's width for x, height for y), the shift
    clipped to ``[-max_noise, max_noise]`` pixels; the corners are then re-ordered so that ``x0 <= x1`` and
    ``y0 <= y1``, and clamped to the image (``[0, W - 1]``, ``[0, H - 1]``).

    Args:
        masks: ``(N, H, W)`` bool, every mask non-empty.
        generator: source of the noise.
        noise: noise standard deviation as a fraction of the box side (SAM: 0.1); 0 gives the tight box.
        max_noise: largest shift of one coordinate, in pixels (SAM: 20).

    Returns:
        ``(N, 4)`` float boxes ``(x0, y0, x1, y1)`` in pixel indices, on the masks' device.
    """
    _check_masks(masks, "sample_boxes")
    if noise < 0 or max_noise < 0:
        raise ValueError(f"sample_boxes: noise and max_noise must be >= 0, got noise={noise}, max_noise={max_noise}")
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(
            f"sample_boxes: masks {empty.nonzero().flatten().tolist()} are empty and have no box; "
            "drop empty masks first (objects_from_mask never returns one)"
        )
    height, width = masks.shape[-2:]
    boxes = _masks_to_boxes(masks)
    side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (N, 4): w, h, w, h
    shift = _rand(generator, tuple(boxes.shape), boxes.device, normal=True) * noise * side
    boxes = boxes + shift.clamp(-max_noise, max_noise)
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])
    limit = torch.tensor([width - 1, height - 1], dtype=boxes.dtype, device=boxes.device)
    lo = torch.minimum(lo.clamp(min=0), limit)
    hi = torch.minimum(hi.clamp(min=0), limit)
    return torch.cat([lo, hi], dim=1)


def _uniform_pixels(region: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pixels drawn uniformly from each region.

    Args:
        region: ``(N, H, W)`` bool; rows without a pixel give arbitrary (in-image) points.
        u: ``(N, n)`` uniform numbers in ``[0, 1)``.

    Returns:
        ``(N, n, 2)`` float xy pixel indices.
    """
    width = region.shape[-1]
    flat = region.flatten(1)
    cum = flat.cumsum(dim=1, dtype=torch.int32 if flat.shape[1] < 2**31 else torch.int64)  # (N, H*W)
    count = cum[:, -1:]  # (N, 1)
    rank = torch.minimum((u.double() * count).long(), (count - 1).clamp(min=0)).to(cum.dtype)  # k-th pixel, k < count
    index = torch.searchsorted(cum, rank + 1).clamp(max=flat.shape[1] - 1)  # first position whose count is k + 1
    return torch.stack([index % width, index // width], dim=-1).float()


def sample_points(masks: torch.Tensor, generator: torch.Generator, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive point prompts drawn uniformly (with replacement) from each mask's foreground.

    Args:
        masks: ``(N, H, W)`` bool, every mask non-empty.
        generator: source of the draws.
        n: points per mask.

    Returns:
        ``(coords, labels)``: ``coords`` ``(N, n, 2)`` float xy pixel indices, ``labels`` ``(N, n)`` int64 ones.
    """
    _check_masks(masks, "sample_points")
    if n < 1:
        raise ValueError(f"sample_points: n must be >= 1, got {n}")
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(
            f"sample_points: masks {empty.nonzero().flatten().tolist()} are empty and have no foreground point; "
            "drop empty masks first"
        )
    u = _rand(generator, (masks.shape[0], n), masks.device)
    coords = _uniform_pixels(masks, u)
    return coords, torch.ones(masks.shape[0], n, dtype=torch.int64, device=masks.device)


def refine_points(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective point per mask, as in SAM's iterative training.

    The point is drawn uniformly from the error region ``pred != gt``: label 1 on a false negative (``gt`` and not
    ``pred``), 0 on a false positive. Without error it is drawn from ``gt`` with label 1, and when ``gt`` is empty
    too it is the image centre with label -1 (padding for SAM's prompt encoder).

    Args:
        pred: ``(N, H, W)`` bool, the previous prediction (``logits > 0``) at the ground truth's size.
        gt: ``(N, H, W)`` bool ground truth.
        generator: source of the draws.

    Returns:
        ``(coords, labels)``: ``coords`` ``(N, 1, 2)`` float xy pixel indices, ``labels`` ``(N, 1)`` int64.
    """
    _check_masks(pred, "refine_points")
    _check_masks(gt, "refine_points")
    if pred.shape != gt.shape:
        raise ValueError(
            f"refine_points: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} differ; "
            "resize the predicted logits to the ground truth's size before thresholding"
        )
    height, width = gt.shape[-2:]
    error = pred ^ gt
    has_error = error.flatten(1).any(dim=1)  # (N,)
    has_gt = gt.flatten(1).any(dim=1)
    region = torch.where(has_error[:, None, None], error, gt)
    u = _rand(generator, (gt.shape[0], 1), gt.device)
    coords = _uniform_pixels(region, u)  # (N, 1, 2)
    x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
    labels = gt[torch.arange(gt.shape[0], device=gt.device), y, x].long()
    empty = ~(has_error | has_gt)
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=coords.dtype, device=coords.device)
    coords = torch.where(empty[:, None, None], centre, coords)
    labels = torch.where(empty, -1, labels)
    return coords, labels[:, None]


def pad_points(points: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack point prompts with different point counts into one batch, padding with label -1.

    Args:
        points: ``(coords, labels)`` pairs, ``coords`` ``(N_i, n_i, 2)``, ``labels`` ``(N_i, n_i)``.

    Returns:
        ``(coords, labels)``: ``(sum N_i, max n_i, 2)`` float and ``(sum N_i, max n_i)`` int64; padded points sit at
        ``(0, 0)`` with label -1.
    """
    if not points:
        raise ValueError("pad_points: got no (coords, labels) pair")
    for i, (coords, labels) in enumerate(points):
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise ValueError(
                f"pad_points: entry {i} must be coords (N, n, 2) and labels (N, n), got {tuple(coords.shape)} and "
                f"{tuple(labels.shape)}"
            )
    longest = max(coords.shape[1] for coords, _ in points)
    out_coords, out_labels = [], []
    for coords, labels in points:
        missing = longest - coords.shape[1]
        out_coords.append(torch.nn.functional.pad(coords.float(), (0, 0, 0, missing), value=0.0))
        out_labels.append(torch.nn.functional.pad(labels.long(), (0, missing), value=-1))
    return torch.cat(out_coords), torch.cat(out_labels)
