"""AdamW parameter groups and the cosine schedule with linear warm-up."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """Trainable parameters in up to four groups: (head | body) x (decay | no decay).

    No weight decay on 1-d tensors (norms, biases, scales) and on what the model declares through timm's
    ``no_weight_decay()`` convention (prompts, position / class tokens). Head parameters (the
    ``modules_to_save`` copies) get ``head_lr`` when it is given.
    """
    declared = getattr(model, "no_weight_decay", None)
    skip = set(declared()) if callable(declared) else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # the classifier copy of a classification model; the heads of a dense model (its neck trains at lr)
        head = "modules_to_save-" in name or name.startswith(("head.", "aux_head."))
        no_decay = p.ndim <= 1 or name in skip
        groups.setdefault((head, no_decay), []).append(p)
    out = []
    for (head, no_decay), params in sorted(groups.items()):
        group_lr = head_lr if (head and head_lr is not None) else lr
        out.append(
            {"params": params, "lr": group_lr, "base_lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay}
        )
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def poly_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0, power: float = 1.0) -> float:
    """LR multiplier of mmseg's poly schedule: linear warm-up to 1, then ``(1 - t) ** power`` down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * (1.0 - t) ** power


def lr_factor(
    step: int, total: int, warmup: int, min_ratio: float = 0.0, name: str = "cosine", power: float = 1.0
) -> float:
    """The multiplier of schedule ``name`` (``cosine`` or ``poly``) at ``step``."""
    if name == "poly":
        return poly_factor(step, total, warmup, min_ratio, power)
    return cosine_factor(step, total, warmup, min_ratio)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its ``base_lr`` times ``factor``."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


class EMA:
    """Exponential moving average of the trainable parameters (a copy of each, swapped in for eval)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the live and the averaged values (call twice to restore)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
