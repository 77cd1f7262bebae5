"""Training augmentation through timm: its transform factory (RandAugment / AutoAugment / AugMix strings,
random-resized crop, flips, colour jitter, random erasing) and its mixup / cutmix.

All of it is off by default: the VTAB-1k protocol of the PEFT papers uses no augmentation (a square bicubic
resize, :func:`~visionpeft.data.build.vtab_transform`), and evaluation never augments nor mixes.

The settings are read duck-typed from a data config (``visionpeft.engine.experiment.DataConfig``):
``auto_augment``, ``random_resized_crop``, ``hflip``, ``vflip``, ``color_jitter``, ``random_erasing``,
``mixup``, ``cutmix``, ``mixup_prob``, ``mixup_switch_prob``; ``img_size``, ``mean`` and ``std``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

_AUG_KEYS = ("auto_augment", "random_resized_crop", "hflip", "vflip", "color_jitter", "random_erasing")


def augmentation_enabled(cfg: Any) -> bool:
    """Whether any image-level training augmentation is switched on in ``cfg``."""
    return bool(
        getattr(cfg, "auto_augment", None)
        or getattr(cfg, "random_resized_crop", None)
        or any(getattr(cfg, k, 0.0) for k in ("hflip", "vflip", "color_jitter", "random_erasing"))
    )


def check_augmentation(cfg: Any) -> None:
    """Range-check the augmentation and mixup settings of ``cfg``.

    Raises:
        ValueError: naming the key (``data.hflip: ...``) and the allowed range.
    """
    for key in ("hflip", "vflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
        v = getattr(cfg, key, None)
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"data.{key}: a probability in [0, 1], got {v!r}")
    for key in ("color_jitter", "mixup", "cutmix"):
        v = getattr(cfg, key, None)
        if v is not None and v < 0.0:
            raise ValueError(f"data.{key}: must be >= 0 (0 switches it off), got {v!r}")
    rrc = getattr(cfg, "random_resized_crop", None)
    if rrc is not None and (len(rrc) != 2 or not 0.0 < rrc[0] <= rrc[1] <= 1.0):
        raise ValueError(
            f"data.random_resized_crop: [min, max] fractions of the image area with 0 < min <= max <= 1 "
            f"(e.g. [0.08, 1.0]), got {rrc!r}"
        )
    aa = getattr(cfg, "auto_augment", None)
    if aa is not None and (not isinstance(aa, str) or not aa.strip()):
        raise ValueError(f"data.auto_augment: a timm policy string such as 'rand-m9-mstd0.5', got {aa!r}")


def train_transform(cfg: Any) -> Any:
    """The training transform of ``cfg``: exactly :func:`~visionpeft.data.build.vtab_transform` when no
    augmentation is on; otherwise timm's training pipeline (``timm.data.create_transform(is_training=True)``).

    Without ``random_resized_crop`` the image is resized to a square (bicubic) as in evaluation, then flipped /
    augmented; with it, timm's ``RandomResizedCropAndInterpolation`` (bicubic) takes that place.

    Raises:
        ValueError: an out-of-range setting or a policy string timm cannot parse, naming the key.
    """
    from .build import vtab_transform

    check_augmentation(cfg)
    if not augmentation_enabled(cfg):
        return vtab_transform(cfg.img_size, cfg.mean, cfg.std)
    from timm.data import create_transform

    rrc = cfg.random_resized_crop
    try:
        primary, secondary, final = create_transform(
            cfg.img_size,
            is_training=True,
            scale=tuple(rrc) if rrc else None,
            hflip=cfg.hflip,
            vflip=cfg.vflip,
            color_jitter=cfg.color_jitter or None,
            auto_augment=cfg.auto_augment or None,
            interpolation="bicubic",
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            re_prob=cfg.random_erasing,
            separate=True,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ValueError(
            f"data.auto_augment: timm cannot read the policy {cfg.auto_augment!r} ({e or type(e).__name__}); "
            "use e.g. 'rand-m9-mstd0.5' (RandAugment), 'original' (AutoAugment) or 'augmix-m5-w3'"
        ) from None
    steps = list(primary.transforms)
    if not rrc:  # keep the protocol's square resize instead of timm's random-resized crop
        steps = [T.Resize((cfg.img_size, cfg.img_size), interpolation=T.InterpolationMode.BICUBIC)] + steps[1:]
    return T.Compose(steps + list(secondary.transforms) + list(final.transforms))


class BatchMixup:
    """timm's :class:`~timm.data.Mixup` for training batches of any size, reproducible across a resume.

    Mixup / cutmix pair each image with the batch's reversed order, so timm needs an even batch: the last image
    of an odd batch is passed through unmixed (its target one-hot). timm draws its mixing parameters from
    NumPy's global generator; here they come from a generator seeded from torch's (which the trainer's checkpoints
    save), and the global NumPy state is left untouched.

    Args:
        mixup: the configured timm ``Mixup``.

    Attributes:
        loss: the soft-target loss for the mixed targets (timm's ``SoftTargetCrossEntropy``).
    """

    def __init__(self, mixup: Any) -> None:
        from timm.loss import SoftTargetCrossEntropy

        self.mixup = mixup
        self.num_classes = mixup.num_classes
        self.loss = SoftTargetCrossEntropy()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch.

        Args:
            x: images (B, C, H, W).
            y: integer labels (B,).

        Returns:
            ``(mixed images (B, C, H, W), soft targets (B, num_classes))``; the targets sum to 1 per row.
        """
        from timm.data.mixup import mixup_target

        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            n = x.shape[0] - x.shape[0] % 2
            x = x.clone()  # timm mixes in place
            parts_x, parts_y = [], []
            if n:
                xm, ym = self.mixup(x[:n], y[:n])
                parts_x.append(xm)
                parts_y.append(ym)
            if n < x.shape[0]:
                parts_x.append(x[n:])
                parts_y.append(mixup_target(y[n:], self.num_classes, 1.0, self.mixup.label_smoothing))
        finally:
            np.random.set_state(saved)
        return torch.cat(parts_x), torch.cat(parts_y).to(torch.float32)


def build_mixup(cfg: Any, num_classes: int) -> BatchMixup | None:
    """Mixup / cutmix for training batches, or ``None`` when ``cfg.mixup`` and ``cfg.cutmix`` are both 0 (the
    default). Never apply it to evaluation batches.

    Args:
        cfg: a data config (``mixup`` and ``cutmix`` Beta-distribution alphas, ``mixup_prob``: probability to mix
            a batch, ``mixup_switch_prob``: probability of cutmix instead of mixup when both are on).
        num_classes: classes of the model's head (the width of the soft targets).
    """
    check_augmentation(cfg)
    mixup, cutmix = float(getattr(cfg, "mixup", 0.0) or 0.0), float(getattr(cfg, "cutmix", 0.0) or 0.0)
    if mixup <= 0.0 and cutmix <= 0.0:
        return None
    from timm.data import Mixup

    return BatchMixup(
        Mixup(
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            prob=float(getattr(cfg, "mixup_prob", 1.0)),
            switch_prob=float(getattr(cfg, "mixup_switch_prob", 0.5)),
            mode="batch",
            label_smoothing=0.0,
            num_classes=int(num_classes),
        )
    )
