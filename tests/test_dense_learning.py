"""Dense learning on real data: the embedded digit scenes (real MNIST digits on cluttered canvases).

Each segmentation head on the frozen, LoRA-adapted embedded backbone (and the ViT-Adapter neck) trains for a
short CPU run: the training loss falls and the mIoU beats the predict-background baseline of the same scenes
by a stated margin. The detector's box mAP rises above zero.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visionpeft.engine.experiment import load_config
from visionpeft.engine.tasks import segmentation_metrics
from visionpeft.heads import SEG_HEADS

ROOT = Path(__file__).resolve().parents[1]
SEG_CONFIG = sorted((ROOT / "configs" / "demo-seg").glob("*.yaml"))[0]
DET_CONFIG = sorted((ROOT / "configs" / "demo-det").glob("*.yaml"))[0]
SHORT = [
    "data.num_train=320",
    "data.num_eval=64",
    "data.batch_size=16",
    "schedule.warmup_epochs=1",
    "runtime.threads=2",
    "runtime.ckpt_every=100",
]
# a short run: 300 AdamW steps at a constant learning rate
SEG_RUN = ["schedule.epochs=15", "schedule.warmup_epochs=0", "optimizer.lr=0.003", "schedule.min_lr=0.003"]
# mIoU points above predicting background everywhere (about 8.2 on these scenes) after the short run. Measured
# (2 threads, runtime.seed 0): upernet 15.8 (seeds 1 and 2: 11.5 and 11.3), fpn 13.1, linear 11.7, vit_adapter
# 11.9, segformer 9.3. The run is short and the task hard (10 digit classes, thin strokes), so the bars are low but
# above what no learning gives (the baseline itself, or less); upernet (the demo's head) runs by default, the
# others (20-80 s each) under `make test-all`.
MARGINS = {"upernet": 2.5, "fpn": 1.5, "linear": 1.5, "vit_adapter": 1.5, "segformer": 0.5}


def background_baseline(eval_set, ignore_index: int, num_classes: int) -> float:
    """mIoU of predicting class 0 (background) at every pixel of ``eval_set``."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for i in range(len(eval_set)):
        mask = eval_set[i][1]
        labels = mask[mask != ignore_index]
        conf[:, 0] += torch.bincount(labels.flatten(), minlength=num_classes).double()
    return segmentation_metrics(conf)["mIoU"]


def _fit(tmp_path: Path, config: Path, *extra: str) -> tuple[dict, list[float], object]:
    from visionpeft.engine.trainer import Trainer

    cfg = load_config(config, [*SHORT, f"runtime.out_dir={tmp_path}", *extra])
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    losses = [rec["train_loss"] for rec in trainer.history]
    return result, losses, trainer


@pytest.mark.parametrize(
    "setting",
    [pytest.param(name, marks=() if name == "upernet" else pytest.mark.slow) for name in (*SEG_HEADS, "vit_adapter")],
)
def test_segmentation_learns_the_digit_scenes(tmp_path, setting):
    """The frozen embedded backbone with LoRA: the loss falls and the mIoU beats predicting background."""
    if setting == "vit_adapter":
        extra = ["task.neck=vit_adapter", "task.neck_kwargs={}"]
    else:
        extra = [
            f"task.head={setting}",
            "task.head_kwargs={}" if setting == "linear" else "task.head_kwargs={channels: 32}",
        ]
    result, losses, trainer = _fit(tmp_path, SEG_CONFIG, *SEG_RUN, *extra)
    baseline = background_baseline(trainer.eval_set, 255, trainer.num_classes)
    assert losses[-1] < 0.8 * losses[0], losses
    assert result["mIoU"] > baseline + MARGINS[setting], (result["mIoU"], baseline, result["per_class_IoU"])


def test_detection_map_rises_above_zero(tmp_path):
    result, losses, _ = _fit(tmp_path, DET_CONFIG, "schedule.epochs=6", "data.batch_size=8")
    assert losses[-1] < losses[0], losses
    assert result["bbox_mAP"] > 0.0 and result["bbox_mAP_50"] > 0.0, result
