"""Tasks: what differs between classification, semantic segmentation and detection, so that the trainer stays
one loop.

A task builds the datasets and the model (backbone + neck + head), batches samples (``collate``), computes the
training loss of a batch, evaluates (its metrics, reduced over every process) and names its main metric. The
trainer calls these and never branches on the kind of task. :func:`make_task` picks one from ``task.name``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .build import build_backbone, build_model
from .distributed import all_reduce_sum
from .experiment import ExperimentConfig

AutocastFactory = Callable[[], contextlib.AbstractContextManager]


class Task:
    """The interface (see the module docstring); ``name`` is the config's ``task.name``."""

    name = ""
    main_metric = ""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.mixup = None
        self.classes: list[str] | None = None

    def datasets(self) -> tuple[Any, Any, int, str]:
        """``(train, eval, num_classes, dataset name)``; sets :attr:`classes` when the data names them."""
        raise NotImplementedError

    def build_model(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def collate(self, train: bool) -> Callable | None:
        """The DataLoader's ``collate_fn`` (``None``: PyTorch's default)."""
        return None

    def to_device(self, batch: Any, device: torch.device) -> Any:
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        raise NotImplementedError

    def sync_batchnorm(self, model: nn.Module) -> None:
        """Several CUDA processes: make the BatchNorm layers that train (a dense model's neck and heads) normalise
        over the global batch (``SyncBatchNorm``). The frozen backbone keeps its own layers."""
        for name in ("neck", "head", "aux_head"):
            part = getattr(model, name, None)
            if isinstance(part, nn.Module):
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(part))

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        """Metrics over the evaluation split (every sample counted once across processes); ``eval_loss`` when the
        task has one (a non-finite one stops the run)."""
        raise NotImplementedError

    def result_extras(self, model: nn.Module) -> dict[str, Any]:
        """Task-specific entries of ``results.json`` (e.g. the adapter's own parameter count)."""
        return {}


# ---------------------------------------------------------------------------------------------------------------
class ClassificationTask(Task):
    """Image classification: timm's head on the adapted backbone, cross-entropy (soft with mixup), top-1."""

    name = "classification"
    main_metric = "top1"

    def datasets(self) -> tuple[Any, Any, int, str]:
        from ..data.build import build_datasets, build_mixup

        train, evaluation, num_classes, name = build_datasets(self.cfg.data)
        self.classes = list(getattr(train, "classes", None) or []) or None
        self.mixup = build_mixup(self.cfg.data, self.cfg.model.num_classes or num_classes)
        return train, evaluation, num_classes, name

    def build_model(self, num_classes: int) -> nn.Module:
        return build_model(self.cfg, num_classes)

    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None:  # soft targets (B, num_classes)
            x, y = self.mixup(x, y)
        with autocast():
            logits = model(x)
        return self.mixup.loss(logits.float(), y) if self.mixup else F.cross_entropy(logits.float(), y)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        from .trainer import evaluation_sums, summarize

        return summarize(all_reduce_sum(evaluation_sums(model, loader, device, autocast)))


# ---------------------------------------------------------------------------------------------------------------
def build_dense_backbone(cfg: ExperimentConfig) -> nn.Module:
    """The timm backbone of a dense model: no classifier; plain ViTs with ``dynamic_img_size`` and Swin with
    ``strict_img_size=False``, so that any input size works (a family without these options is built without)."""
    import dataclasses

    model_cfg = cfg.model
    for option in ("dynamic_img_size", "strict_img_size"):
        if option in model_cfg.kwargs:
            continue
        value = option == "dynamic_img_size"
        trial = dataclasses.replace(model_cfg, kwargs={**model_cfg.kwargs, option: value})
        try:
            return build_backbone(trial, 0)
        except TypeError as e:  # a family without the option (ConvNeXt, ResNet, ...)
            if option not in str(e):
                raise
    return build_backbone(model_cfg, 0)


def dense_spec(cfg: ExperimentConfig, num_classes: int, classes: list[str] | None) -> Any:
    from ..dense import DenseSpec

    t = cfg.task
    head_kwargs = dict(t.head_kwargs)
    if t.name == "detection":  # torchvision's detectors normalise inside: with the data's statistics
        head_kwargs.setdefault("image_mean", list(cfg.data.mean))
        head_kwargs.setdefault("image_std", list(cfg.data.std))
    try:
        return DenseSpec(
            task=t.name,
            num_classes=num_classes,
            neck=t.neck,
            neck_kwargs=dict(t.neck_kwargs),
            head=t.head,
            head_kwargs=head_kwargs,
            aux_weight=t.aux_weight if t.name == "segmentation" else 0.0,
            classes=list(classes) if classes else None,
            ignore_index=cfg.data.ignore_index,
        )
    except ValueError as e:
        from .experiment import ConfigError

        raise ConfigError(f"task: {e}") from None


class _DenseTask(Task):
    def datasets(self) -> tuple[Any, Any, int, str]:
        from ..data.dense import build_dense_datasets

        train, evaluation, classes = build_dense_datasets(self.cfg.data, self.name)
        self.classes = list(classes)
        return train, evaluation, len(self.classes), self.cfg.data.dataset

    def build_model(self, num_classes: int) -> nn.Module:
        from ..dense import DenseModel
        from ..model import get_peft_model

        if self.cfg.model.num_classes not in (None, num_classes):
            from .experiment import ConfigError

            raise ConfigError(
                f"model.num_classes={self.cfg.model.num_classes}, but the data has {num_classes} classes; "
                "a dense task takes its class count from the data: remove model.num_classes"
            )
        method = self.cfg.method
        if method.method == "linear_probe" and method.modules_to_save is None:
            # a dense model has no classifier: the probe of a frozen backbone is the neck and the head
            import dataclasses

            method = dataclasses.replace(method, modules_to_save=[])
        peft = get_peft_model(build_dense_backbone(self.cfg), method)
        try:
            return DenseModel(peft, dense_spec(self.cfg, num_classes, self.classes))
        except (TypeError, ValueError) as e:
            from .experiment import ConfigError

            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"task: cannot build the {self.name} model on {self.cfg.model.name}: {e}") from e

    def result_extras(self, model: nn.Module) -> dict[str, Any]:
        # a dense model's trainable parameters inside the backbone (the adapter), the rest being neck and heads
        return {"adapter_params": model.peft.get_nb_trainable_parameters()[0]}


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list, list]:
    """Evaluation batches of images of different sizes: ``(images padded with 0 to the largest (B, 3, H, W),
    masks at their own (original) sizes, the images' own (h, w))``."""
    images = [b[0] for b in batch]
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for k, img in enumerate(images):
        out[k, :, : img.shape[-2], : img.shape[-1]] = img
    return out, [b[1] for b in batch], [tuple(i.shape[-2:]) for i in images]


class SegmentationTask(_DenseTask):
    """Semantic segmentation: pixel cross-entropy with ignore index (+ dice, + an auxiliary head); mIoU, mAcc and
    aAcc from a confusion matrix summed over every process, at the masks' original resolution."""

    name = "segmentation"
    main_metric = "mIoU"

    def collate(self, train: bool) -> Callable | None:
        return None if train else pad_collate

    def to_device(self, batch: Any, device: torch.device) -> Any:
        if len(batch) == 3:  # evaluation: (images, [masks], [sizes])
            x, masks, sizes = batch
            return x.to(device), [m.to(device) for m in masks], sizes
        return super().to_device(batch, device)

    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        from ..heads import seg_loss

        x, y = batch
        t, ignore = self.cfg.task, self.cfg.data.ignore_index
        with autocast():
            out = model(x)
        loss = seg_loss(out["out"].float(), y, ignore_index=ignore, dice_weight=t.dice_weight)
        if "aux" in out:
            loss = loss + t.aux_weight * seg_loss(out["aux"].float(), y, ignore_index=ignore)
        return loss

    def logits(self, model: nn.Module, x: torch.Tensor, autocast: AutocastFactory) -> torch.Tensor:
        """``(B, K, H, W)`` logits at the input size, whole-image or sliding-window as configured."""
        from ..heads import slide_inference, whole_inference

        def fn(t: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(t)["out"].float()

        t = self.cfg.task
        if t.inference == "slide":
            crop = t.slide_crop or self.cfg.data.crop_size
            stride = t.slide_stride or max(1, crop * 2 // 3)
            return slide_inference(fn, x, num_classes=model.spec.num_classes, crop=crop, stride=stride)
        return whole_inference(fn, x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        model.eval()
        k, ignore = model.spec.num_classes, self.cfg.data.ignore_index
        conf = torch.zeros(k * k, dtype=torch.float64)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (summed pixel loss, pixels)
        for batch in loader:
            x, masks, sizes = self.to_device(batch, device)
            logits = self.logits(model, x, autocast)
            for b, (mask, (h, w)) in enumerate(zip(masks, sizes, strict=True)):
                lg = F.interpolate(logits[b : b + 1, :, :h, :w], size=mask.shape[-2:], mode="bilinear")
                valid = mask != ignore
                if valid.any():
                    loss_sum[0] += F.cross_entropy(lg, mask[None], ignore_index=ignore, reduction="sum").item()
                    loss_sum[1] += valid.sum().item()
                pred = lg.argmax(1)[0]
                idx = mask[valid] * k + pred[valid]
                conf += torch.bincount(idx.flatten().cpu(), minlength=k * k).double()
        conf = all_reduce_sum(conf.to(device)).cpu().view(k, k)
        loss_sum = all_reduce_sum(loss_sum.to(device)).cpu()
        return segmentation_metrics(conf, self.classes) | {
            "eval_loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item(),
            "eval_samples": len(loader.dataset) if hasattr(loader, "dataset") else None,
        }


def segmentation_metrics(conf: torch.Tensor, classes: list[str] | None = None) -> dict[str, Any]:
    """mmseg's metrics from a confusion matrix ``conf[true, pred]`` (pixels): mIoU and mAcc are means over the
    classes that occur in the ground truth (percent), aAcc the pixel accuracy; ``per_class`` the IoU of each."""
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    union = gt + conf.sum(0) - tp
    present = gt > 0
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(present, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    names = classes or [str(i) for i in range(conf.shape[0])]
    return {
        "mIoU": 100.0 * iou[present].mean().item() if present.any() else 0.0,
        "mAcc": 100.0 * acc[present].mean().item() if present.any() else 0.0,
        "aAcc": 100.0 * (tp.sum() / conf.sum().clamp(min=1)).item(),
        "per_class_IoU": {
            n: (100.0 * v.item() if present[i] else None) for i, (n, v) in enumerate(zip(names, iou, strict=True))
        },
    }


def detection_collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


class DetectionTask(_DenseTask):
    """Object detection / instance segmentation with a torchvision detector on the adapted backbone's pyramid;
    COCO box (and mask) mAP from torchmetrics' ``MeanAveragePrecision``."""

    name = "detection"
    main_metric = "bbox_mAP"

    def collate(self, train: bool) -> Callable | None:
        return detection_collate

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, targets = batch
        moved = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()} for t in targets]
        return [i.to(device) for i in images], moved

    def loss(self, model: nn.Module, batch: Any, autocast: AutocastFactory) -> torch.Tensor:
        images, targets = batch
        with autocast():
            losses = model(images, targets)
        return sum(v.float() for v in losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, autocast: AutocastFactory) -> dict:
        from torchmetrics.detection import MeanAveragePrecision

        model.eval()
        masks = model.spec.head == "mask_rcnn"
        metric = MeanAveragePrecision(iou_type=["bbox", "segm"] if masks else "bbox", backend="pycocotools")
        n = 0
        for batch in loader:
            images, targets = self.to_device(batch, device)
            with autocast():
                preds = model(images)
            preds = [{k: v.float() if v.is_floating_point() else v for k, v in p.items()} for p in preds]
            if masks:
                for p in preds:
                    p["masks"] = (p["masks"][:, 0] > 0.5).to(torch.uint8)
            gts = [{k: t[k] for k in ("boxes", "labels", "masks") if k in t} for t in targets]
            if masks:
                for g in gts:
                    g["masks"] = g["masks"].to(torch.uint8)
            metric.update([_cpu(p) for p in preds], [_cpu(g) for g in gts])
            n += len(images)
        res = metric.compute()
        out: dict[str, Any] = {}
        for kind in ("bbox", "segm") if masks else ("bbox",):
            prefix = f"{kind}_" if masks else ""
            for key in ("map", "map_50", "map_75"):
                value = res[prefix + key].item()
                out[f"{kind}_{key.replace('map', 'mAP')}"] = 100.0 * max(value, 0.0)  # -1: no objects at all
        out["eval_samples"] = int(all_reduce_sum(torch.tensor([n], dtype=torch.float64, device=device)).item())
        return out


def _cpu(d: dict) -> dict:
    return {k: v.cpu() for k, v in d.items()}


TASK_CLASSES = {t.name: t for t in (ClassificationTask, SegmentationTask, DetectionTask)}


def make_task(cfg: ExperimentConfig) -> Task:
    """The task object of ``cfg.task.name`` (the SAM tasks live in :mod:`.sam_tasks`)."""
    if cfg.task.name not in TASK_CLASSES:
        from .sam_tasks import SamPromptTask, SamSemanticTask

        TASK_CLASSES.update({t.name: t for t in (SamPromptTask, SamSemanticTask)})
    return TASK_CLASSES[cfg.task.name](cfg)
