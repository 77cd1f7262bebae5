"""The two Segment Anything tasks of the trainer: promptable (``sam_prompt``) and semantic (``sam_semantic``).

"Segment Anything" (Kirillov et al., arXiv 2304.02643): SAM's image encoder carries the adapter, the mask decoder
trains as the head (``task.decoder: train``) or stays frozen, the prompt encoder stays frozen.

* ``sam_prompt`` trains SAM's own task on the objects of a segmentation dataset (connected components of the
  label map, :func:`visionpeft.sam.objects_from_mask`): per image a box (jittered) or one point per object, then
  ``task.refine_iters`` corrective iterations as in SAM's training (appendix A): a point drawn from the error region
  and the previous low-resolution logits as the mask input; the loss (focal : dice 20 : 1, or BCE + dice, plus the
  IoU head's MSE) is summed over the iterations; a single point asks for three masks (ambiguity) on the first
  iteration and the best one is supervised. Evaluation prompts every object of every evaluation image once with its
  tight box (``mIoU``, the main metric) and once with one point, the mask pixel farthest from the object's boundary
  (``point_mIoU``; the best of SAM's three masks by predicted IoU), as SAM's single-point protocol does; IoUs are
  computed at the masks' original resolution and averaged over objects (percent).
* ``sam_semantic`` is SAMed's mode (Zhang & Liu, arXiv 2304.13785): one mask per class from the decoder without
  prompts, trained with the segmentation loss (cross-entropy + ``task.dice_weight`` dice) and evaluated exactly as
  the ``segmentation`` task (mIoU / mAcc / aAcc from a confusion matrix at the original resolution).

SAM takes ``S x S`` inputs (``S`` = ``model.img_size``): training crops have that size (``data.crop_size``), and an
evaluation image (resized by the data's ``scale``) is resized to fit ``S`` when it is larger, padded at the bottom
/ right with zeros (the mean of a normalised image, as SAM pads), and its logits are cut back to the image and
resized to the mask, as ``SamPredictor`` does.

The trainer sees a :class:`SamTrainModel`: its ``forward(fn, *args)`` runs ``fn(sam_model, *args)``, so that the
whole loss (image embeddings, several decoder calls) is computed inside one forward call of a
``DistributedDataParallel`` wrapper, and every trainable parameter takes part in the graph (a zero-weighted term),
so DDP needs no ``find_unused_parameters``. Its adapter folder is :meth:`visionpeft.sam.SamModel.save_adapter`'s
(``sam_config.json``), which ``vp.load_adapter`` and ``tools/eval.py`` read.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_sum
from .experiment import ConfigError, ExperimentConfig
from .tasks import AutocastFactory, SegmentationTask, Task, pad_collate

__all__ = ["SamPromptTask", "SamSemanticTask", "SamTrainModel", "build_sam_base", "fit_to_model"]


# building ----------------------------------------------------------------------------------------------------------
def build_sam_base(cfg: ExperimentConfig) -> nn.Module:
    """The base ``Sam`` of a config: ``model.name`` (a SAM size), ``model.img_size`` (default 1024),
    ``model.kwargs`` (size overrides) and ``model.pretrained_file`` (the official checkpoint, or
    ``embedded:<kind>``; ``None``: random weights)."""
    from ..backbones.sam import build_sam
    from .build import resolve_weights_file

    m = cfg.model
    checkpoint = resolve_weights_file(m.pretrained_file) if m.pretrained_file else None
    try:
        return build_sam(m.name, checkpoint=checkpoint, img_size=m.img_size or 1024, **m.kwargs)
    except (TypeError, ValueError) as e:
        where = "model.pretrained_file" if checkpoint and "checkpoint" in str(e) else "model.name / model.kwargs"
        raise ConfigError(f"{where}: {e}") from e


def sam_method_config(cfg: ExperimentConfig) -> Any:
    """The method config with ``task.decoder`` applied: ``frozen`` sets ``modules_to_save=[]`` unless the method
    config names its own ``modules_to_save``."""
    method = cfg.method
    if cfg.task.decoder == "frozen" and method.modules_to_save is None:
        if method.method == "linear_probe":
            raise ConfigError(
                "method linear_probe trains only the mask decoder, and task.decoder=frozen freezes it: nothing "
                "would train; set task.decoder=train (decoder-only training) or choose an encoder method"
            )
        method = dataclasses.replace(method, modules_to_save=[])
        if method.method == "full":  # full fine-tuning trains base weights in place: leave the decoder out
            method = dataclasses.replace(method, exclude=[*(method.exclude or []), r"mask_decoder\..*"])
    return method


def build_sam_model(
    cfg: ExperimentConfig, mode: str, num_classes: int | None = None, classes: list[str] | None = None
) -> SamTrainModel:
    """The trainable model of a SAM task (see the module docstring)."""
    from ..backbones.sam import set_grad_checkpointing
    from ..sam import SamModel

    t = cfg.task
    sam = build_sam_base(cfg)
    if t.grad_checkpointing:
        set_grad_checkpointing(sam, True)
    try:
        model = SamModel.from_sam(
            sam, sam_method_config(cfg), mode=mode, num_classes=num_classes, classes=classes, cache_size=0
        )
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method: cannot attach {cfg.method.method} to {cfg.model.name}: {e}") from e
    if t.cache_embeddings:
        if model.encoder_trains:
            raise ConfigError(
                f"task.cache_embeddings={t.cache_embeddings} caches the embeddings of a frozen image encoder, but "
                f"method {cfg.method.method} trains the encoder: set task.cache_embeddings=0 (or train the decoder "
                "only: method linear_probe)"
            )
        model.cache_size = t.cache_embeddings
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"nothing trains: method {cfg.method.method} with task.decoder={t.decoder}")
    return SamTrainModel(model)


class SamTrainModel(nn.Module):
    """A :class:`~visionpeft.sam.SamModel` as the trainer sees it (the API it calls on a model: trainable
    parameters, ``adapter_state_dict``, ``save_adapter``, ``no_weight_decay``).

    ``forward(fn, *args)`` returns ``fn(self.sam_model, *args)`` plus a zero-weighted sum over the trainable
    parameters (one element each), so that every one of them receives a gradient (zero when unused) and a
    ``DistributedDataParallel`` wrapper reduces the same set on every process."""

    def __init__(self, sam_model: nn.Module) -> None:
        super().__init__()
        self.sam_model = sam_model

    @property
    def spec(self) -> Any:
        return self.sam_model.spec

    @property
    def peft(self) -> Any:
        return self.sam_model.peft

    def forward(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        out = fn(self.sam_model, *args)
        touch = [p.view(-1)[:1].sum() for p in self.parameters() if p.requires_grad]
        return out + 0.0 * torch.stack(touch).sum() if touch else out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What the run trains (the adapter and the decoder copy): the tensors of :meth:`save_adapter`."""
        return self.peft.adapter_state_dict()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts: adapter and decoder / SAM with its adapter."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def adapter_parameters(self) -> int:
        """Trainable parameters outside the saved decoder copy (the encoder's adapter; full: the base weights)."""
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and "modules_to_save-" not in n)

    def print_trainable_parameters(self) -> str:
        return self.sam_model.print_trainable_parameters()

    def no_weight_decay(self) -> set[str]:
        return {f"sam_model.peft.{n}" for n in self.peft.no_weight_decay()}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """The SAM adapter folder (``adapter.safetensors``, ``adapter_config.json``, ``sam_config.json``)."""
        return self.sam_model.save_adapter(directory)


def _unwrap(model: nn.Module) -> nn.Module:
    """The SamModel of a :class:`SamTrainModel` (or of a DDP wrapper of one), or ``model`` itself (a SamModel
    loaded by ``vp.load_adapter``)."""
    model = getattr(model, "module", model)
    return getattr(model, "sam_model", model)


def fit_to_model(x: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """Bring images to SAM's ``size x size`` input: resize (bilinear) to fit when a side is larger, keeping the
    ratio, then pad with zeros at the bottom / right.

    Args:
        x: ``(B, 3, H, W)`` normalised images.
        size: the model's input side.

    Returns:
        ``(images (B, 3, size, size), factor)``; the image content fills ``round(H * factor) x round(W * factor)``.
    """
    h, w = x.shape[-2:]
    factor = min(1.0, size / max(h, w))
    if factor < 1.0:
        x = F.interpolate(x, size=(_scaled(h, factor), _scaled(w, factor)), mode="bilinear", align_corners=False)
    return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2])), factor


def _scaled(n: int, factor: float) -> int:
    """A side ``n`` resized by ``factor`` (as :func:`fit_to_model` resizes it)."""
    return max(1, int(n * factor + 0.5))


class _SamTask(Task):
    """Shared by the two SAM tasks: the dense segmentation datasets and the model."""

    mode = "prompt"

    def datasets(self) -> tuple[Any, Any, int, str]:
        from ..data.dense import build_dense_datasets

        train, evaluation, classes = build_dense_datasets(self.cfg.data, "segmentation")
        self.classes = list(classes)
        return train, evaluation, len(self.classes), self.cfg.data.dataset

    def build_model(self, num_classes: int) -> nn.Module:
        if self.mode == "semantic":
            return build_sam_model(self.cfg, "semantic", num_classes, self.classes)
        return build_sam_model(self.cfg, "prompt")

    def collate(self, train: bool) -> Callable | None:
        return None if train else pad_collate

    def to_device(self, batch: Any, device: torch.device) -> Any:
        if len(batch) == 3:  # evaluation: (images, [masks], [sizes])
            x, masks, sizes = batch
            return x.to(device), [m.to(device) for m in masks], sizes
        return super().to_device(batch, device)

    def result_extras(self, model: nn.Module) -> dict[str, Any]:
        return {"adapter_params": model.adapter_parameters()}


# promptable --------------------------------------------------------------------------------------------------------
class SamPromptTask(_SamTask):
    """Promptable segmentation (SAM's own task); see the module docstring."""

    name = "sam_prompt"
    main_metric = "mIoU"
    mode = "prompt"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.prompt_ids: list[int] | None = None
        data = cfg.data
        rzl = data.reduce_zero_label if data.reduce_zero_label is not None else data.dataset == "ade20k"
        # with reduce_zero_label the background is ignore_index already; otherwise label 0 is the background
        self.background: int | None = None if rzl else 0

    def datasets(self) -> tuple[Any, Any, int, str]:
        out = super().datasets()
        self.prompt_ids = self.resolve_prompt_classes(self.classes or [])
        return out

    def resolve_prompt_classes(self, classes: list[str]) -> list[int] | None:
        """``task.prompt_classes`` as label ids (names looked up in ``classes``; integers are label ids)."""
        wanted = self.cfg.task.prompt_classes
        if wanted is None:
            return None
        ids = []
        for i, c in enumerate(wanted):
            if isinstance(c, str):
                if c not in classes:
                    close = difflib.get_close_matches(c, classes, n=3, cutoff=0.5)
                    hint = f"; did you mean {close}?" if close else f"; the classes: {classes[:20]}"
                    raise ConfigError(
                        f"task.prompt_classes[{i}]: no class named {c!r} in the data{hint} (integers are label ids)"
                    )
                ids.append(classes.index(c))
            else:
                if not 0 <= c < len(classes):
                    raise ConfigError(
                        f"task.prompt_classes[{i}]: label id {c} is outside the data's labels 0..{len(classes) - 1}"
                    )
                ids.append(int(c))
        if self.background is not None and self.background in ids:
            raise ConfigError(
                f"task.prompt_classes names the background ({classes[self.background]!r}, label {self.background}), "
                "which has no objects: remove it"
            )
        return sorted(set(ids))

    def objects(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objects of one label map ``(H, W)``: ``(N, H, W)`` bool masks of the prompted classes and their
        ``(N,)`` labels."""
        from ..sam import objects_from_mask

        masks, labels = objects_from_mask(
            mask, ignore_index=self.cfg.data.ignore_index, background=self.background, min_area=self.cfg.task.min_area
        )
        if self.prompt_ids is not None:
            keep = torch.isin(labels, torch.tensor(self.prompt_ids, device=labels.device))
            masks, labels = masks[keep], labels[keep]
        return masks, labels

    # training --------------------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        images, masks = batch
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global RNG: resumable, one stream per run
        return model(self.prompt_loss, images, masks, seed, autocast)

    def prompt_loss(
        self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor, seed: int, autocast: AutocastFactory
    ) -> torch.Tensor:
        """The mean over the images that have objects of the loss summed over SAM's iterations; a batch without
        any object gives a zero that still depends on the trainable parameters.

        Args:
            model: the SamModel. images: ``(B, 3, S, S)`` normalised. masks: ``(B, S, S)`` label maps.
            seed: seed of the prompt sampling. autocast: the trainer's autocast factory.
        """
        t = self.cfg.task
        g = torch.Generator().manual_seed(seed)
        with autocast():
            embeddings = model.image_embeddings(images)
        total, count = None, 0
        for b in range(images.shape[0]):
            objs, _ = self.objects(masks[b])
            if objs.shape[0] == 0:
                continue
            if objs.shape[0] > t.max_objects:
                objs = objs[torch.randperm(objs.shape[0], generator=g)[: t.max_objects].to(objs.device)]
            use_box = "point" not in t.prompts or (
                "box" in t.prompts and torch.rand((), generator=g).item() < t.box_prob
            )
            loss = self.iterate(model, embeddings[b : b + 1], objs, use_box, g, autocast)
            total = loss if total is None else total + loss
            count += 1
        if total is None:
            return embeddings.float().sum() * 0.0 if embeddings.requires_grad else images.new_zeros(())
        return total / count

    def iterate(
        self,
        model: nn.Module,
        embedding: torch.Tensor,
        objs: torch.Tensor,
        use_box: bool,
        g: torch.Generator,
        autocast: AutocastFactory,
    ) -> torch.Tensor:
        """SAM's iterative training on one image's objects ``(N, S, S)``: the first prompt, then
        ``task.refine_iters`` corrections; the loss is summed over the iterations."""
        from ..sam import mask_iou, refine_points, sample_boxes, sample_points

        t = self.cfg.task
        boxes = sample_boxes(objs, g) if use_box else None
        points = None if use_box else sample_points(objs, g, 1)
        mask_input, total = None, None
        for it in range(1 + t.refine_iters):
            with autocast():
                logits, iou = model.decode(
                    embedding, points=points, boxes=boxes, mask_input=mask_input, multimask=it == 0 and not use_box
                )
            loss = self.mask_loss(logits.float(), iou.float(), objs)
            total = loss if total is None else total + loss
            if it == t.refine_iters:
                break
            with torch.no_grad():  # the next input: the candidate closest to the object, and a corrective point
                n, m = logits.shape[:2]
                size = objs.shape[-2:]
                up = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
                target = objs[:, None].expand(n, m, *size).reshape(n * m, *size)
                best = mask_iou(up.reshape(n * m, *size), target).view(n, m).argmax(dim=1)
                rows = torch.arange(n, device=logits.device)
                mask_input = logits[rows, best][:, None].detach()
                coords, labels = refine_points(up[rows, best] > 0, objs, g)
                if points is not None:
                    coords, labels = torch.cat([points[0], coords], 1), torch.cat([points[1], labels], 1)
                points = (coords, labels)
        return total

    def mask_loss(self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``task.mask_loss`` of one decoder call: logits ``(N, M, h, w)``, IoU ``(N, M)``, target ``(N, H, W)``."""
        from ..sam import dice_loss, mask_iou, sam_loss

        if self.cfg.task.mask_loss == "focal_dice":
            return sam_loss(logits, iou_pred, target)["loss"]
        # bce: binary cross-entropy + dice of the best candidate, and the IoU head's MSE (as sam_loss)
        n, m = logits.shape[:2]
        size = target.shape[-2:]
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).reshape(n * m, *size)
        tgt = target[:, None].expand(n, m, *size).reshape(n * m, *size).float()
        bce = F.binary_cross_entropy_with_logits(logits, tgt, reduction="none").flatten(1).mean(1).view(n, m)
        per = bce + dice_loss(logits, tgt).view(n, m)
        chosen = per.detach().argmin(dim=1, keepdim=True)
        iou_mse = F.mse_loss(iou_pred, mask_iou(logits, tgt).view(n, m))
        return per.gather(1, chosen).mean() + iou_mse

    # evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        from ..sam import dice_loss, focal_loss, mask_iou

        model.eval()
        sam_model = _unwrap(model)
        size = sam_model.img_size
        k = len(self.classes) if self.classes else 1
        # [box IoU sum, point IoU sum, objects, images, loss sum], then per class: box IoU sums, objects
        stats = torch.zeros(5 + 2 * k, dtype=torch.float64)
        for batch in loader:
            x, masks, sizes = self.to_device(batch, device)
            x_fit, factor = fit_to_model(x, size)
            with autocast():
                embeddings = sam_model.image_embeddings(x_fit)
            stats[3] += len(masks)
            for b, (mask, (h, w)) in enumerate(zip(masks, sizes, strict=True)):
                objs, labels = self.objects(mask)
                if objs.shape[0] == 0:
                    continue
                frame = (_scaled(h, factor), _scaled(w, factor))  # the image's content in the input
                scale = torch.tensor([frame[1] / mask.shape[1], frame[0] / mask.shape[0]], device=device)
                for lo in range(0, objs.shape[0], 32):
                    gt = objs[lo : lo + 32]
                    boxes = (_tight_boxes(gt) * scale.repeat(2)).clamp(0, size)
                    with autocast():
                        logits, _ = sam_model.decode(embeddings[b : b + 1], boxes=boxes)
                    box_logits = _to_mask(logits[:, :1].float(), size, frame, gt.shape[-2:])[:, 0]
                    box_iou = mask_iou(box_logits, gt)
                    points = (_centre_points(gt) * scale).clamp(0, size)[:, None]
                    ones = torch.ones(points.shape[:2], dtype=torch.int64, device=device)
                    with autocast():
                        logits, pred_iou = sam_model.decode(
                            embeddings[b : b + 1], points=(points, ones), multimask=True
                        )
                    best = pred_iou.float().argmax(dim=1)
                    chosen = logits[torch.arange(len(gt), device=device), best][:, None].float()
                    point_iou = mask_iou(_to_mask(chosen, size, frame, gt.shape[-2:])[:, 0], gt)
                    loss = 20.0 * focal_loss(box_logits, gt) + dice_loss(box_logits, gt)
                    stats[0] += box_iou.sum().item()
                    stats[1] += point_iou.sum().item()
                    stats[2] += len(gt)
                    stats[4] += loss.sum().item()
                    lab = labels[lo : lo + 32].cpu()
                    stats[5 : 5 + k] += torch.bincount(lab, weights=box_iou.double().cpu(), minlength=k)[:k]
                    stats[5 + k :] += torch.bincount(lab, minlength=k)[:k].double()
        stats = all_reduce_sum(stats.to(device)).cpu()
        n = max(stats[2].item(), 1.0)
        names = self.classes or ["object"]
        per_class = {
            names[i]: (100.0 * stats[5 + i].item() / stats[5 + k + i].item() if stats[5 + k + i] > 0 else None)
            for i in range(k)
        }
        return {
            "mIoU": 100.0 * stats[0].item() / n,
            "point_mIoU": 100.0 * stats[1].item() / n,
            "per_class_IoU": {c: v for c, v in per_class.items() if v is not None},
            "eval_loss": stats[4].item() / n,
            "eval_objects": int(stats[2].item()),
            "eval_samples": int(stats[3].item()),
        }


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` x0, y0, x1, y1 pixel indices of the first and last pixel of each non-empty mask ``(N, H, W)``."""
    from ..sam import sample_boxes

    return sample_boxes(masks, torch.Generator(), noise=0.0)


def _centre_points(masks: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` xy of each mask's pixel farthest from its boundary (the first such pixel in scan order)."""
    from scipy import ndimage

    out = []
    for m in masks.cpu().numpy():
        dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(dist.argmax()), dist.shape)
        out.append((float(x), float(y)))
    return torch.tensor(out, dtype=torch.float32, device=masks.device)


def _to_mask(low_res: torch.Tensor, size: int, frame: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """SAM's post-processing: low-resolution logits ``(N, M, h, w)`` -> the input size, the image's content
    ``frame`` cut out, resized to ``out`` (bilinear) -> ``(N, M, *out)`` logits."""
    up = F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)
    up = up[..., : frame[0], : frame[1]]
    return F.interpolate(up, size=tuple(out), mode="bilinear", align_corners=False)


# semantic ----------------------------------------------------------------------------------------------------------
class SamSemanticTask(_SamTask, SegmentationTask):
    """SAMed's multi-class mode: ``(B, K, S, S)`` logits from the decoder's class tokens; the segmentation loss and
    metrics (see the module docstring)."""

    name = "sam_semantic"
    main_metric = "mIoU"
    mode = "semantic"

    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        images, masks = batch
        return model(self.semantic_loss, images, masks, autocast)

    def semantic_loss(
        self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor, autocast: AutocastFactory
    ) -> torch.Tensor:
        from ..heads import seg_loss

        with autocast():
            logits = model(images)
        return seg_loss(
            logits.float(), masks, ignore_index=self.cfg.data.ignore_index, dice_weight=self.cfg.task.dice_weight
        )

    def logits(self, model: nn.Module, x: torch.Tensor, autocast: AutocastFactory) -> torch.Tensor:
        """``(B, K, H, W)`` logits of ``(B, 3, H, W)`` images: fit to the model's input (:func:`fit_to_model`),
        run it, cut the padding off and resize back to ``H x W``."""
        sam_model = _unwrap(model)
        h, w = x.shape[-2:]
        x_fit, factor = fit_to_model(x, sam_model.img_size)
        with autocast():
            out = sam_model(x_fit).float()
        out = out[..., : _scaled(h, factor), : _scaled(w, factor)]
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        return super().evaluate(_unwrap(model), loader, device, autocast)
