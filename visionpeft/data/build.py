"""Datasets and transforms from a :class:`~visionpeft.engine.experiment.DataConfig`."""

from __future__ import annotations

from typing import Any

from torchvision import transforms as T


def vtab_transform(img_size: int, mean: list[float], std: list[float]) -> Any:
    """The VTAB-1k convention of the PEFT papers (VPT, NOAH, SSF): resize to a square with bicubic
    interpolation, no crop, no augmentation, normalise."""
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_datasets(cfg: Any) -> tuple[Any, Any, int, str]:
    """``(train, eval, num_classes, task)`` for ``cfg.dataset`` in ``vtab`` / ``digits``."""
    from .vtab import splits_for, vtab_datasets

    tf = vtab_transform(cfg.img_size, cfg.mean, cfg.std)
    if cfg.dataset == "digits":
        from .embedded import NUM_CLASSES, TASK, ensure_digits_task

        root = ensure_digits_task(cfg.root)
        train, evaluation = vtab_datasets(root, TASK, cfg.mode, tf, num_classes=NUM_CLASSES)
        return train, evaluation, NUM_CLASSES, TASK
    if cfg.dataset == "vtab":
        if not cfg.root:
            raise ValueError("data.root is not set: pass --data-root /path/to/vtab-1k (or --set data.root=...)")
        splits_for(cfg.mode)  # validates the mode
        train, evaluation = vtab_datasets(cfg.root, cfg.task, cfg.mode, tf)
        return train, evaluation, train.num_classes, train.task
    raise ValueError(f"unknown data.dataset {cfg.dataset!r}; use 'vtab' or 'digits'")
