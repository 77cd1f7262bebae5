"""Adapt a pretrained embedded backbone to the unseen digits with one PEFT method, and measure it.

:func:`adapt` gives a fresh copy of a backbone from :mod:`visionpeft.engine.pretrain` a new head for the
transfer task of :func:`visionpeft.data.digit_split`, wraps it with :func:`visionpeft.get_peft_model` and
trains only the trainable parameters. Given a trained head (:func:`trained_head` of a linear probe), it
freezes that head, so that only the method's own parameters can lower the loss: the learning tests use this
to compare each method with the head-only baseline. :data:`RECIPES` holds one tuned setting per method
variant.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .._registry import get_method, list_methods
from ..backbones import detect_backbone
from ..data.digits import IMAGE_SIZE, DigitSet, as_rgb
from ..model import PeftVisionModel, get_peft_model
from .pretrain import evaluate, num_threads, train_steps

Split = DigitSet | tuple[torch.Tensor, torch.Tensor]


def trained_head(model: PeftVisionModel) -> dict[str, torch.Tensor]:
    """The classification head's weights as the adapted model computes them (its trained copy, if any).

    Args:
        model: a wrapped model whose method is mergeable (a linear probe, for example).

    Returns:
        The head's state dict, keyed by full parameter / buffer names of the base model (``head.weight``).
    """
    names = model.spec.head(model.base_model)
    if not names:
        raise ValueError(f"{type(model.base_model).__name__} has no classification head")
    model.merge()  # copies the trained head copy into the base head
    try:
        return {
            f"{n}.{k}": v.detach().clone()
            for n in names
            for k, v in model.base_model.get_submodule(n).state_dict().items()
        }
    finally:
        model.unmerge()


def _load_head(base: nn.Module, head: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy ``head`` into ``base``'s classification head; the head's module names."""
    names = detect_backbone(base).head(base)
    expected = {f"{n}.{k}" for n in names for k in base.get_submodule(n).state_dict()}
    if set(head) != expected:
        raise ValueError(
            f"head weights do not fit the model's head: expected keys {sorted(expected)}, got {sorted(head)}"
        )
    with torch.no_grad():
        state = base.state_dict()
        for k, v in head.items():
            if state[k].shape != v.shape:
                raise ValueError(f"head weight {k}: shape {tuple(v.shape)} != the model's {tuple(state[k].shape)}")
            state[k].copy_(v)
    return names


def adapt(
    model_factory_or_base: nn.Module | Callable[[], nn.Module],
    method: str,
    options: dict[str, Any] | None = None,
    train: Split | None = None,
    test: Split | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    threads: int | None = None,
    image_size: int = IMAGE_SIZE,
    head: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Adapt a pretrained backbone to a new task with one PEFT method and measure it.

    A fresh copy of the backbone (``model_factory_or_base()`` or a deep copy of the given module, which is
    never modified) gets a new ``k``-way head (timm's ``reset_classifier``), is wrapped with
    :func:`visionpeft.get_peft_model` and trained with AdamW on the trainable parameters only (linear
    warm-up, cosine decay). Without ``head`` the new head trains as a saved copy; with ``head`` it holds
    those weights and stays frozen (``modules_to_save=[]``; full fine-tuning excludes it), so only the
    method's own parameters train. Deterministic for a given seed; the global RNG state is left untouched.

    Args:
        model_factory_or_base: a pretrained ``nn.Module`` or a callable returning one.
        method: registered method name (``"lora"``, ``"vpt"`` ...).
        options: the method's config options (``{"rank": 4}``).
        train: training images and labels (``(x, y)`` or a :class:`visionpeft.data.DigitSet`); grey
            (N, 1, H, W) images go through :func:`visionpeft.data.to_rgb`, 3-channel ones are used as they are.
        test: test images and labels, in the same form.
        steps: optimisation steps. lr: peak learning rate. batch: batch size.
        seed: seed of the new head, the adapter initialisation and the batch order.
        weight_decay: AdamW weight decay.
        threads: ``torch.set_num_threads`` while adapting (restored afterwards).
        image_size: side of the RGB inputs made from grey images.
        head: trained head weights (:func:`trained_head` of an earlier result's ``"model"``) to load and
            freeze; ``None`` trains a new head along with the method.

    Returns:
        ``{"method", "loss_first", "loss_last", "losses", "acc", "test_loss", "trainable", "total", "seconds",
        "model"}``: ``loss_first`` / ``loss_last`` are the mean training losses of the first / last 10 steps,
        ``acc`` / ``test_loss`` the test accuracy and mean cross-entropy, ``trainable`` / ``total`` the
        parameter counts of the wrapped model, ``seconds`` the wall time of building, training and testing,
        ``model`` the adapted model (eval mode).
    """
    if train is None or test is None:
        raise ValueError("adapt needs train=(x, y) and test=(x, y)")
    if steps <= 0 or batch <= 0:
        raise ValueError(f"steps and batch must be > 0, got steps={steps}, batch={batch}")
    (x_train, y_train), (x_test, y_test) = train, test
    num_classes = int(torch.cat([y_train, y_test]).max()) + 1
    options = dict(options or {})
    t0 = time.perf_counter()
    with num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model_factory_or_base, nn.Module):
            base = copy.deepcopy(model_factory_or_base)
        else:
            base = model_factory_or_base()
        if not hasattr(base, "reset_classifier"):
            raise TypeError(f"adapt needs a timm model with reset_classifier(); got {type(base).__name__}")
        base.reset_classifier(num_classes)
        if head is not None:
            head_names = _load_head(base, head)
            options["modules_to_save"] = []
            if get_method(method).trains_base:  # full fine-tuning trains every base parameter not excluded
                options["exclude"] = [*(options.get("exclude") or []), *head_names]
        pm = get_peft_model(base, method, **options)
        if head is not None:
            trained = [n for n, p in pm.named_parameters() if p.requires_grad]
            leaked = [n for n in trained if any(n.startswith(f"base_model.{h}.") for h in head_names)]
            if leaked:
                raise RuntimeError(f"the frozen head trains with {method!r}: {leaked}")
        trainable, total = pm.get_nb_trainable_parameters()
        losses = train_steps(
            pm, as_rgb(x_train, image_size), y_train, steps, lr, batch, weight_decay, seed, warmup=max(1, steps // 20)
        )
        acc, test_loss = evaluate(pm, x_test, y_test, size=image_size)
    n = min(10, len(losses))
    return {
        "method": method,
        "loss_first": sum(losses[:n]) / n,
        "loss_last": sum(losses[-n:]) / n,
        "losses": losses,
        "acc": acc,
        "test_loss": test_loss,
        "trainable": trainable,
        "total": total,
        "seconds": time.perf_counter() - t0,
        "model": pm,
    }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One method setting tuned for the tiny digits backbones (a method's :class:`~visionpeft.methods.Variant`).

    Args:
        method: registered method name. options: its config options. lr: peak AdamW learning rate.
        backbone: ``"vit"`` or ``"resnet"`` (conv-only methods use the ResNet).
        gain: the learning test's bars over the head-only baseline, ``(accuracy points, share of the test
            loss removed)``; ``None`` for the baseline itself. why: why the accuracy bar is ``None``.
    """

    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 5e-3
    backbone: str = "vit"
    gain: tuple[float | None, float] | None = None
    why: str = ""


def recipes() -> dict[str, Recipe]:
    """Every variant of every registered method, by variant id (the registry is the one source)."""
    out = {}
    for name in list_methods():
        for v in get_method(name).variants:
            out[v.id] = Recipe(name, dict(v.options), v.lr, v.backbone, v.gain, v.why)
    return out


RECIPES: dict[str, Recipe] = recipes()
