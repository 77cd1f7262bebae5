"""Pictures of dense predictions, written as PNG with matplotlib: colour-coded masks over the image, and boxes
(with instance masks) drawn on it. Used by ``tools/predict.py`` and at the end of a dense training run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib comes with the demo / dev extras
        raise ImportError("pictures need matplotlib: pip install 'visionpeft[demo]'") from e
    return plt


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, distinct for neighbouring labels (tab20, then a fixed random draw); the same
    label always gets the same colour."""
    plt = _pyplot()
    base = (np.array(plt.get_cmap("tab20").colors) * 255).astype(np.uint8)
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(0).integers(40, 256, size=(n - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def colorize(mask: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 colours; ignored pixels black."""
    colors = palette(num_classes)
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    valid = (mask >= 0) & (mask < num_classes) & (mask != ignore_index)
    out[valid] = colors[mask[valid]]
    return out


def save_segmentation_png(
    path: str | Path,
    image: np.ndarray,
    mask: np.ndarray,
    classes: list[str],
    truth: np.ndarray | None = None,
    ignore_index: int = 255,
    alpha: float = 0.55,
) -> Path:
    """Write the image, the predicted mask over it (and the true mask when given), with a legend of the classes
    that appear. ``image`` ``(H, W, 3)`` uint8, masks ``(H, W)`` integer labels at the image's size."""
    plt = _pyplot()
    k = len(classes)
    panels = [("image", image), ("prediction", _blend(image, colorize(mask, k, ignore_index), mask, alpha))]
    if truth is not None:
        panels.append(("ground truth", _blend(image, colorize(truth, k, ignore_index), truth, alpha)))
    h, w = image.shape[:2]
    scale = 3.2 / max(h, w)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * w * scale + 1.6, h * scale + 0.6), squeeze=False)
    for ax, (title, pic) in zip(axes[0], panels, strict=True):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    present = sorted({int(v) for v in np.unique(mask) if 0 <= v < k} | _labels(truth, k))
    colors = palette(k) / 255.0
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[c]) for c in present]
    fig.legend(handles, [classes[c] for c in present], loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.99 - 1.4 / fig.get_size_inches()[0], wspace=0.04)
    return save_figure(fig, path)


def save_detection_png(
    path: str | Path,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    masks: np.ndarray | None = None,
    score_threshold: float = 0.3,
) -> Path:
    """Write the image with the detections whose score is at least ``score_threshold``: boxes ``(N, 4)`` xyxy
    pixels, labels ``(N,)`` in 1..K (torchvision's convention; ``classes`` has the K foreground names), instance
    masks ``(N, H, W)`` tinted under their box."""
    plt = _pyplot()
    keep = scores >= score_threshold
    colors = palette(len(classes) + 1) / 255.0
    pic = image.astype(np.float32) / 255.0
    if masks is not None:
        for m, lab in zip(masks[keep], labels[keep], strict=True):
            on = m > 0.5
            pic[on] = 0.5 * pic[on] + 0.5 * colors[int(lab)]
    h, w = image.shape[:2]
    scale = 4.0 / max(h, w)
    fig, ax = plt.subplots(figsize=(w * scale, h * scale + 0.3))
    ax.imshow(pic, interpolation="nearest")
    for (x0, y0, x1, y1), lab, s in zip(boxes[keep], labels[keep], scores[keep], strict=True):
        c = colors[int(lab)]
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=c, linewidth=1.5))
        name = classes[int(lab) - 1] if 1 <= int(lab) <= len(classes) else str(int(lab))
        ax.text(x0, y0, f"{name} {s:.2f}", color="white", fontsize=6, va="bottom", bbox=dict(fc=c, ec="none", pad=1))
    ax.set_title(f"{int(keep.sum())} detection(s) with score >= {score_threshold}", fontsize=8)
    ax.axis("off")
    return save_figure(fig, path)


def _labels(mask: np.ndarray | None, k: int) -> set[int]:
    return set() if mask is None else {int(v) for v in np.unique(mask) if 0 <= v < k}


def _blend(image: np.ndarray, color: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    return (image * (1 - alpha) + color * alpha).astype(np.uint8)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temporary file + rename) and close it."""
    import os

    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=150)
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
