"""The embedded SAM (kind ``"sam_scenes"``): a small Segment Anything trained by the project on digit scenes.

Without an official checkpoint (and on a CPU) the SAM demo and the tests need a SAM that already segments
something. :func:`pretrain_sam_scenes` builds SAM's architecture at a small size (:data:`SAM_SCENES_ARGS`, 64 x 64
inputs, a 16 x 16 embedding grid) with random weights and trains every weight (image encoder, prompt encoder, mask
decoder) on promptable segmentation of digit scenes (:func:`visionpeft.data.scenes.render_scene`) whose objects are
the digits 0-4 only, with SAM's recipe ("Segment Anything", Kirillov et al., 2023, arXiv:2304.02643, appendix A:
a noisy box or a foreground point per object, focal + dice + IoU loss), plus an auxiliary per-pixel objectness
loss on the image embedding that gets the tiny model off the ground within its budget (about a minute on one core).
The result is cached (name with steps, seed and format version; written atomically), and :func:`embedded_sam_file`
writes it in the official key format, so that::

    sam = build_sam("sam_vit_b", checkpoint=embedded_sam_file(), img_size=SAM_SCENES_IMG, **SAM_SCENES_ARGS)

and configs name it ``model.pretrained_file: embedded:sam_scenes``. The adaptation task is the digits 5-9 drawn in
the :data:`TARGET_STYLE` (``"striped"``: soft stripes of a random angle, period and colour over the whole scene):
the pretrained model's box mIoU there is clearly lower than on the digits 0-4 (the digits 5-9 alone, in the plain
style, are segmented about as well as 0-4: SAM's task does not depend on which digit it is).

:func:`prompt_training_steps`, :func:`prompt_miou` and :func:`scene_data` are small plain-torch loops and data
helpers that the demo notebook reuses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.digits import default_cache_dir
from ..sam import (
    SamModel,
    build_sam,
    dice_loss,
    mask_iou,
    objects_from_mask,
    refine_points,
    sam_loss,
    sample_boxes,
    sample_points,
    save_sam_checkpoint,
)
from .optim import cosine_factor
from .pretrain import SAM_SCENES_KIND, _load_cached, _save_atomic, num_threads

__all__ = [
    "SAM_SCENES_ARGS",
    "SAM_SCENES_IMG",
    "SAM_SCENES_KIND",
    "SAM_SCENES_NAME",
    "SOURCE_DIGITS",
    "TARGET_DIGITS",
    "TARGET_STYLE",
    "embedded_sam_file",
    "embedded_sam_path",
    "prompt_miou",
    "prompt_training_steps",
    "pretrain_sam_scenes",
    "scene_data",
]

SAM_SCENES_NAME = "sam_vit_b"  # the official size whose options the small ones override
SAM_SCENES_IMG = 64
# SAM's architecture at a small size: 64 x 64 inputs on 4 x 4 patches give a 16 x 16 embedding grid (windows of
# 4 x 4 in blocks 0 and 2, global attention in blocks 1 and 3) and 64 x 64 low-resolution masks; ~0.42M weights
SAM_SCENES_ARGS: dict[str, Any] = {
    "encoder_embed_dim": 64,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_global_attn_indexes": [1, 3],
    "window_size": 4,
    "patch_size": 4,
    "prompt_embed_dim": 64,
    "decoder_depth": 2,
    "decoder_mlp_dim": 128,
    "decoder_num_heads": 4,
    "iou_head_hidden_dim": 64,
    "mask_in_chans": 8,
}
SOURCE_DIGITS = (0, 1, 2, 3, 4)  # the pretraining objects
TARGET_DIGITS = (5, 6, 7, 8, 9)  # the adaptation task
TARGET_STYLE = "striped"  # how the target scenes look (see :func:`scene_data`)
STYLES = ("plain", TARGET_STYLE)
# SAM's pixel normalisation (pixel_mean / pixel_std of segment_anything's Sam, divided by 255)
SAM_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
SAM_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

DEFAULT_STEPS = 250
# the pretraining recipe (from random weights, within about a minute on one core): batches of 8 scenes, up to 4
# objects each (several objects per image teach the decoder to follow the prompt), a dice-heavy mask loss (focal
# 20 : dice 20; SAM's 20 : 1 stays for a long time at "predict nothing") and the auxiliary objectness read-out of
# :func:`prompt_training_steps`; no refinement iteration (it would halve the steps in the time budget)
_HPARAMS = {
    "lr": 2e-3,
    "weight_decay": 0.05,
    "batch": 8,
    "max_objects": 4,
    "focal_weight": 20.0,
    "dice_weight": 20.0,
    "objectness_weight": 5.0,
    "refine_iters": 0,
    "num_scenes": 1500,
    "val_scenes": 100,
}
_FORMAT = 1  # bump when the architecture, the data or the recipe change: old cache files are then ignored


# data ----------------------------------------------------------------------------------------------------------------
def digit_labels(digits: Sequence[int]) -> tuple[int, ...]:
    """The label ids of ``digits`` in a digit-scenes mask (``1 + d``; 0 is the background)."""
    return tuple(1 + int(d) for d in digits)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 RGB -> ``(N, 3, H, W)`` float, normalised as SAM expects (:data:`SAM_MEAN`)."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - SAM_MEAN) / SAM_STD


def denormalize(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` normalised images -> ``(N, H, W, 3)`` uint8 RGB (for pictures and ``SamPredictor``)."""
    x = (images.detach().cpu() * SAM_STD + SAM_MEAN).clamp(0, 1).mul(255).round().byte()
    return x.permute(0, 2, 3, 1).numpy()


def _restyle(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """The ``"striped"`` style: soft stripes (a sine of random angle, period 4-8 pixels, phase, amplitude 60-90 and
    colour direction) added over the whole ``(H, W, 3)`` uint8 scene, digits included."""
    h, w = image.shape[:2]
    theta, period, phase = rng.uniform(0, np.pi), rng.uniform(4.0, 8.0), rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase)
    direction = np.abs(rng.normal(size=3))
    direction = direction / np.linalg.norm(direction) * np.sqrt(3)
    out = image.astype(np.float32) + rng.uniform(60, 90) * stripes[..., None] * direction.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def scene_data(
    count: int,
    digits: Sequence[int] = SOURCE_DIGITS,
    pool: str = "train",
    seed: int = 0,
    size: int = SAM_SCENES_IMG,
    style: str = "plain",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit scenes holding only ``digits``, drawn from the digit scenes' training or validation MNIST pool.

    Args:
        count: scenes. digits: the digits drawn (the clutter fragments come from them too).
        pool: ``"train"`` or ``"val"``: the disjoint MNIST pools of :func:`visionpeft.data.scenes.digit_pools`.
        seed: seed of the pools and the scenes (``pool`` picks another stream, so train and val differ).
        size: canvas side. style: ``"plain"`` (the digit scenes as written on disk) or ``"striped"``
            (:data:`TARGET_STYLE`).

    Returns:
        ``(images (count, 3, size, size) normalised as SAM expects, masks (count, size, size) int64)``; mask labels
        as in the digit scenes (0 background, ``1 + d`` digit ``d``).
    """
    from ..data.digits import _mnist_arrays
    from ..data.scenes import digit_pools, render_scene

    if pool not in ("train", "val"):
        raise ValueError(f"pool must be 'train' or 'val', got {pool!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    digits = tuple(sorted({int(d) for d in digits}))
    if not digits or any(d < 0 or d > 9 for d in digits):
        raise ValueError(f"digits must be a non-empty subset of 0-9, got {digits}")
    labels = _mnist_arrays()[1]
    indices = digit_pools(seed)[0 if pool == "train" else 1]
    indices = indices[np.isin(labels[indices], digits)]
    rng = np.random.default_rng([seed, 21 if pool == "train" else 22, STYLES.index(style)])
    images, masks = [], []
    for _ in range(int(count)):
        image, semantic, _ = render_scene(rng, indices, size)
        if style != "plain":
            image = _restyle(rng, image)
        images.append(image)
        masks.append(semantic)
    x = normalize(torch.from_numpy(np.stack(images)))
    return x, torch.from_numpy(np.stack(masks)).long()


def _objects(masks: torch.Tensor, objects: Sequence[int] | None, min_area: int = 8) -> list[torch.Tensor]:
    """Per image, the ``(n, H, W)`` bool masks of its objects (connected components of the allowed labels)."""
    out = []
    for mask in masks:
        obj, lab = objects_from_mask(mask, ignore_index=None, background=0, min_area=min_area)
        if objects is not None:
            obj = obj[torch.isin(lab, torch.tensor(list(objects), dtype=lab.dtype))]
        out.append(obj)
    return out


# training and evaluation loops ---------------------------------------------------------------------------------------
def _resized(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def prompt_training_steps(
    model: SamModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    batch: int = 8,
    objects: Sequence[int] | None = None,
    refine_iters: int = 1,
    generator: torch.Generator | None = None,
    weight_decay: float = 0.05,
    warmup: int | None = None,
    max_objects: int = 4,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    objectness_weight: float = 0.0,
) -> list[float]:
    """Promptable-segmentation training with SAM's recipe: AdamW on ``model``'s trainable parameters.

    Every step draws ``batch`` images; each object of an image (a connected component of a label in ``objects``;
    at most ``max_objects`` per image) is prompted, 50/50 per image, by a noisy box
    (:func:`visionpeft.sam.sample_boxes`; one mask out) or by one foreground point (three candidate masks, the
    best one supervised). Each of ``refine_iters`` refinement iterations then adds a point from the error region of
    the previous prediction (:func:`visionpeft.sam.refine_points`) and feeds that prediction back as
    ``mask_input``. The loss (:func:`visionpeft.sam.sam_loss`: focal 20 : dice 1, IoU-head MSE) is averaged over
    the iterations. The learning rate warms up linearly and decays along a cosine to 5%.

    Args:
        model: a :class:`SamModel` in ``"prompt"`` mode, trained in place (left in eval mode).
        images: ``(N, 3, S, S)`` normalised images at the model's input size.
        masks: ``(N, S, S)`` int64 label maps.
        steps: optimisation steps. lr: peak learning rate. batch: images per step.
        objects: label ids that are objects (``None``: every non-zero label).
        refine_iters: corrective-point iterations after the first prediction (0: none).
        generator: source of every random draw (images, prompt kinds, boxes, points); ``None``: seed 0.
        weight_decay: AdamW weight decay. warmup: warm-up steps (``None``: 5% of ``steps``).
        max_objects: objects prompted per image at most (a random subset beyond).
        focal_weight, dice_weight: the mask loss's weights (SAM: 20 and 1).
        objectness_weight: weight of an auxiliary per-pixel loss for training from scratch (0: off): a 1 x 1
            convolution reads every pixel's "is any object" logit out of the image embedding (``p x p`` pixels per
            embedding cell, pixel-shuffled), trained with BCE + dice against the union of the objects; it teaches
            the encoder to outline strokes before the decoder has learnt to use prompts. The read-out is dropped
            afterwards.

    Returns:
        The loss of every step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} do not pair up")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    per_image = _objects(masks, objects)
    usable = torch.tensor([i for i, o in enumerate(per_image) if len(o)], dtype=torch.long)
    if not len(usable):
        raise ValueError(f"no image holds an object with a label in {objects}: nothing to train on")
    size = tuple(masks.shape[-2:])
    readout = None
    if objectness_weight > 0:
        with torch.no_grad():
            dim, grid = model.image_embeddings(images[:1]).shape[1:3]
        scale = size[0] // grid
        readout = nn.Conv2d(dim, scale * scale, 1).to(images.device)
        params += list(readout.parameters())
        union = torch.stack([o.any(dim=0) if len(o) else torch.zeros(size, dtype=torch.bool) for o in per_image])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else int(warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, steps, warmup, 0.05))
    losses = []
    model.train()
    for _ in range(int(steps)):
        idx = usable[torch.randint(0, len(usable), (min(batch, len(usable)),), generator=g)]
        embeddings = model.image_embeddings(images[idx])
        total, terms = 0.0, 0
        if readout is not None:
            logits = nn.functional.pixel_shuffle(readout(embeddings), scale)[:, 0]
            target = union[idx].float()
            aux = nn.functional.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target).mean()
        for emb, i in zip(embeddings, idx.tolist(), strict=True):
            gt = per_image[i]
            if len(gt) > max_objects:
                gt = gt[torch.randperm(len(gt), generator=g)[:max_objects]]
            use_box = bool(torch.rand((), generator=g) < 0.5)
            if use_box:
                boxes, points = sample_boxes(gt, g), None
            else:
                boxes, points = None, sample_points(gt, g)
            low, iou = model.decode(emb[None], points=points, boxes=boxes, multimask=not use_box)
            out = sam_loss(low, iou, gt, focal_weight, dice_weight)
            total, terms = total + out["loss"], terms + 1
            for _ in range(int(refine_iters)):
                best = iou.detach().argmax(dim=1)
                prev = low.detach()[torch.arange(len(gt)), best][:, None]  # (n, 1, 4h, 4w)
                pred = _resized(prev, size)[:, 0] > 0
                new = refine_points(pred, gt, g)
                if points is None:
                    points = new
                else:
                    points = (torch.cat([points[0], new[0]], dim=1), torch.cat([points[1], new[1]], dim=1))
                low, iou = model.decode(emb[None], points=points, boxes=boxes, mask_input=prev)
                out = sam_loss(low, iou, gt, focal_weight, dice_weight)
                total, terms = total + out["loss"], terms + 1
        loss = total / terms
        if readout is not None:
            loss = loss + objectness_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def prompt_miou(
    model: SamModel,
    images: torch.Tensor,
    masks: torch.Tensor,
    objects: Sequence[int] | None = None,
    prompt: str = "box",
    generator: torch.Generator | None = None,
    batch: int = 32,
) -> float:
    """Mean IoU over the objects of ``images`` of the masks ``model`` predicts for one prompt per object.

    Args:
        model: a :class:`SamModel` (its training mode is restored afterwards).
        images: ``(N, 3, S, S)`` normalised. masks: ``(N, S, S)`` int64 label maps.
        objects: label ids that are objects (``None``: every non-zero label).
        prompt: ``"box"``: the object's tight box (no noise), one mask out; ``"point"``: one foreground point
            drawn from ``generator``, three candidates, the one with the highest predicted IoU kept (as
            ``SamPredictor`` users do).
        generator: source of the points (``None``: seed 0).
        batch: images per encoder call.

    Returns:
        The mean IoU in ``[0, 1]`` (``nan`` when there is no object).
    """
    if prompt not in ("box", "point"):
        raise ValueError(f"prompt must be 'box' or 'point', got {prompt!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    per_image = _objects(masks, objects)
    size = tuple(masks.shape[-2:])
    ious = []
    for start in range(0, len(images), batch):
        embeddings = model.image_embeddings(images[start : start + batch])
        for k, emb in enumerate(embeddings):
            gt = per_image[start + k]
            if not len(gt):
                continue
            if prompt == "box":
                low, _ = model.decode(emb[None], boxes=sample_boxes(gt, g, noise=0.0))
            else:
                low, iou = model.decode(emb[None], points=sample_points(gt, g), multimask=True)
                low = low[torch.arange(len(gt)), iou.argmax(dim=1)][:, None]
            ious.append(mask_iou(_resized(low, size)[:, 0], gt))
    model.train(was_training)
    return float(torch.cat(ious).mean()) if ious else float("nan")


# the embedded SAM ----------------------------------------------------------------------------------------------------
def build_sam_scenes(checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A ``Sam`` of the embedded architecture (:data:`SAM_SCENES_ARGS`, 64 x 64 inputs), random weights or
    ``checkpoint`` (e.g. :func:`embedded_sam_file`)."""
    return build_sam(SAM_SCENES_NAME, checkpoint=checkpoint, img_size=SAM_SCENES_IMG, **SAM_SCENES_ARGS)


def trainable_sam(sam: nn.Module) -> SamModel:
    """``sam`` wrapped for full training of every weight (encoder, prompt encoder, decoder in place)."""
    model = SamModel.from_sam(sam, "full", modules_to_save=[])
    for p in model.sam.parameters():
        p.requires_grad_(True)
    return model


def pretrain_sam_scenes(
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """The embedded SAM: trained on digit scenes of the digits 0-4 (see the module docstring), or loaded from the
    cache.

    Args:
        steps: steps of :func:`prompt_training_steps` (batches of 8 scenes); ``None``: :data:`DEFAULT_STEPS`
            (about a minute on one core).
        cache_dir: where to keep the weights; ``None`` = :func:`visionpeft.data.default_cache_dir`.
        seed: seed of the initialisation, the scenes and the prompts.
        threads: ``torch.set_num_threads`` during training (restored afterwards); ``None`` leaves it.
        verbose: print what happens (training with the time and both mIoUs, or cache hit).

    Returns:
        ``(sam, miou)``: the ``Sam`` in eval mode and its box-prompt mIoU on validation scenes of the digits 0-4.
        ``sam.pretrain_metrics`` holds that and the mIoU on validation scenes of the digits 5-9 in the
        :data:`TARGET_STYLE` (the adaptation gap).
    """
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    hp = _HPARAMS
    name = f"sam-scenes-d{''.join(map(str, SOURCE_DIGITS))}-steps{steps}-seed{seed}-v{_FORMAT}.pt"
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    meta = {"kind": SAM_SCENES_KIND, "steps": steps, "seed": seed, "format": _FORMAT, **hp}

    def fresh() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_sam_scenes()

    sam = fresh()
    blob = _load_blob(path, sam, meta)
    if blob is not None:
        if verbose:
            print(f"loaded the pretrained {SAM_SCENES_KIND} from {path}")
        sam.pretrain_metrics = blob
        return sam.eval(), blob["miou"]
    sam = fresh()  # a failed load may have filled some tensors already
    t0 = time.perf_counter()
    with num_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x, y = scene_data(hp["num_scenes"], SOURCE_DIGITS, "train", seed)
        model = trainable_sam(sam)
        g = torch.Generator().manual_seed(seed)
        train = {k: v for k, v in hp.items() if k not in ("num_scenes", "val_scenes")}
        prompt_training_steps(model, x, y, steps, objects=digit_labels(SOURCE_DIGITS), generator=g, **train)
        sam = model.peft.merge_and_unload().eval()
        metrics = sam_scenes_metrics(sam, seed, hp["val_scenes"])
    if verbose:
        print(
            f"pretrained the {SAM_SCENES_KIND} SAM on scenes of digits {SOURCE_DIGITS} in "
            f"{time.perf_counter() - t0:.1f}s: box mIoU {metrics['miou']:.3f} on validation scenes of those digits, "
            f"{metrics['miou_target']:.3f} on {TARGET_STYLE} scenes of digits {TARGET_DIGITS}; cached at {path}"
        )
    _save_atomic({"meta": meta, "state_dict": sam.state_dict(), "accuracy": metrics["miou"], **metrics}, path)
    sam.pretrain_metrics = metrics
    return sam, metrics["miou"]


def sam_scenes_metrics(sam: nn.Module, seed: int = 0, count: int = 100) -> dict[str, float]:
    """Box-prompt mIoU of ``sam`` on ``count`` validation scenes of the source digits (``"miou"``) and of the target
    digits in the target style (``"miou_target"``)."""
    model = SamModel.from_sam(sam, "full", modules_to_save=[])
    try:
        src = scene_data(count, SOURCE_DIGITS, "val", seed)
        tgt = scene_data(count, TARGET_DIGITS, "val", seed, style=TARGET_STYLE)
        return {
            "miou": prompt_miou(model, *src, digit_labels(SOURCE_DIGITS)),
            "miou_target": prompt_miou(model, *tgt, digit_labels(TARGET_DIGITS)),
        }
    finally:
        model.peft.unload()


def _load_blob(path: Path, sam: nn.Module, meta: dict[str, Any]) -> dict[str, float] | None:
    if _load_cached(path, sam, meta) is None:
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return {"miou": float(blob["miou"]), "miou_target": float(blob["miou_target"])}


def embedded_sam_path() -> Path:
    """Where :func:`embedded_sam_file` keeps the embedded SAM (``$VISIONPEFT_CACHE``); nothing is trained."""
    return default_cache_dir() / f"digits-{SAM_SCENES_KIND}-sam-v{_FORMAT}.pth"


def embedded_sam_file() -> Path:
    """Path of the embedded SAM in the official key format (pretrained and cached on first use, on one thread:
    about a minute). Load it with :func:`build_sam_scenes` (``build_sam("sam_vit_b", checkpoint=path,
    img_size=SAM_SCENES_IMG, **SAM_SCENES_ARGS)``)."""
    path = embedded_sam_path()
    if path.is_file():
        return path
    sam, _ = pretrain_sam_scenes(cache_dir=default_cache_dir(), threads=1, verbose=True)
    return save_sam_checkpoint(sam, path)
