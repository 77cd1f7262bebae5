"""Dense prediction end to end: the DenseModel (adapted backbone + neck + head) on every backbone family and
head, its adapter folder (save, reload to identical predictions, bad files), the segmentation metrics, the
trainer and the tools on the embedded digit scenes (train, exact resume, eval, predict pictures)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import visionpeft as vp
from visionpeft import AdapterFileError
from visionpeft.dense import DENSE_WEIGHTS, DenseModel, DenseSpec
from visionpeft.engine.experiment import ConfigError, load_config
from visionpeft.engine.tasks import segmentation_metrics
from visionpeft.heads import DETECTORS, SEG_HEADS

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=0, dynamic_img_size=True)


def _convnext() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_convnext", num_classes=0)


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=0)


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        window_size=4,
        strict_img_size=False,
    )


# (backbone factory, method config, neck): each family with a method that suits it
SETTINGS = {
    "vit-lora-simple_pyramid": (_vit, lambda: vp.LoRAConfig(rank=2), None),
    "vit-vpt-vit_adapter": (_vit, lambda: vp.VPTConfig(num_tokens=2, deep=True), "vit_adapter"),
    "convnext-conv_adapter-native": (_convnext, lambda: vp.ConvAdapterConfig(), None),
    "resnet-lora-native": (_resnet, lambda: vp.LoRAConfig(rank=2), None),
    "swin-lora-native": (_swin, lambda: vp.LoRAConfig(rank=2), None),
}
SMALL = {"upernet": {"channels": 16}, "fpn": {"channels": 16, "fpn_channels": 16}, "segformer": {"channels": 16}}


def _neck_kwargs(neck: str | None, make) -> dict:
    return {"out_channels": 16} if neck is None and make is _vit else {}


@pytest.mark.parametrize("head", SEG_HEADS)
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_each_head_on_each_backbone(setting, head):
    """Logits at the head's stride for an input that is not a multiple of 32, the predict() output at the input
    size, and gradients into the adapter, the neck and the head (the base stays frozen)."""
    make, method, neck = SETTINGS[setting]
    peft = vp.get_peft_model(make(), method())
    model = DenseModel(
        peft,
        "segmentation",
        num_classes=5,
        neck=neck,
        neck_kwargs=_neck_kwargs(neck, make),
        head=head,
        head_kwargs=SMALL.get(head, {}),
        aux_weight=0.4,
    )
    x = torch.randn(2, 3, 72, 88)
    out = model(x)
    assert out["out"].shape == (2, 5, 18, 22)
    assert out["aux"].shape[:2] == (2, 5)
    (out["out"].square().mean() + out["aux"].square().mean()).backward()
    adapter = [p for n, p in model.named_parameters() if n.startswith("peft.") and p.requires_grad]
    assert adapter and all(p.grad is not None for p in adapter)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    model.eval()
    assert model.predict(x).shape == (2, 5, 72, 88)


@pytest.mark.parametrize("neck", ["simple_pyramid", "vit_adapter"])
def test_dense_adapter_reloads_to_identical_predictions(tmp_path, neck):
    """The folder holds both halves; vp.load_adapter rebuilds the DenseModel (frozen, eval mode) and predicts the
    same logits; BatchNorm statistics travel with the neck and the head."""
    model = DenseModel(
        vp.get_peft_model(_vit(), vp.LoRAConfig(rank=2, init_weights=False)),
        "segmentation",
        num_classes=4,
        neck=neck,
        neck_kwargs={"out_channels": 16} if neck == "simple_pyramid" else {},
        head_kwargs={"channels": 16},
        aux_weight=0.4,
        classes=["bg", "a", "b", "c"],
    )
    model.train()
    for _ in range(2):  # move the BatchNorm running statistics away from their init
        model(torch.randn(2, 3, 64, 64))
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    want = model.predict(x)
    model.save_adapter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "dense.safetensors",
        "dense_config.json",
    ]
    loaded = vp.load_adapter(_vit(), tmp_path)
    assert isinstance(loaded, DenseModel) and not loaded.training
    assert loaded.spec.classes == ["bg", "a", "b", "c"] and loaded.aux_head is not None
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.predict(x), want, rtol=0, atol=0)
    # a base model with a classifier (the same backbone weights): the classifier is removed, the predictions match
    with_head = timm.create_model("test_vit", num_classes=10, dynamic_img_size=True)
    assert not with_head.load_state_dict(_vit().state_dict(), strict=False).missing_keys[2:]  # head.weight, bias
    torch.testing.assert_close(vp.load_adapter(with_head, tmp_path).predict(x), want, rtol=0, atol=0)
    trainable = vp.load_adapter(_vit(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.head.parameters())


def test_dense_detector_saves_and_reloads(tmp_path):
    model = DenseModel(
        vp.get_peft_model(_vit(), vp.LoRAConfig(rank=2, init_weights=False)),
        "detection",
        num_classes=3,
        neck_kwargs={"out_channels": 16},
        head_kwargs={"min_size": 64, "max_size": 64, "fpn_channels": 32, "box_score_thresh": 0.0},
    )
    model.eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    want = model(images)
    model.save_adapter(tmp_path)
    loaded = vp.load_adapter(_vit(), tmp_path)
    got = loaded(images)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    assert not any(k.startswith("peft") for k in loaded.dense_state_dict())


def test_bad_dense_files_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = DenseModel(
        vp.get_peft_model(_vit(), vp.LoRAConfig(rank=2)),
        "segmentation",
        num_classes=3,
        neck_kwargs={"out_channels": 16},
        head_kwargs={"channels": 16},
    )
    model.save_adapter(tmp_path)
    # into a PeftVisionModel: refused (the neck and head need the base model)
    with pytest.raises(AdapterFileError, match="dense adapter"):
        vp.load_adapter(vp.get_peft_model(_vit(), vp.LoRAConfig(rank=2)), tmp_path)
    # a head tensor of another shape: the file and the tensor are named (after fixing the checksum)
    tensors = load_file(tmp_path / DENSE_WEIGHTS)
    key = next(k for k in tensors if k.startswith("head.") and tensors[k].ndim == 4)
    tensors[key] = torch.zeros(1, *tensors[key].shape[1:])
    save_file(tensors, tmp_path / DENSE_WEIGHTS)
    meta = json.loads((tmp_path / "dense_config.json").read_text())
    meta.pop("weights_sha256", None)
    for k in [k for k in meta if k.endswith("sha256")]:
        meta.pop(k)
    (tmp_path / "dense_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match=f"{DENSE_WEIGHTS}.*{key}"):
        vp.load_adapter(_vit(), tmp_path)
    # an unknown head in the config
    meta["spec"]["head"] = "upernett"
    (tmp_path / "dense_config.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterFileError, match="upernet"):
        vp.load_adapter(_vit(), tmp_path)


def test_dense_spec_and_task_config_errors():
    with pytest.raises(ValueError, match="upernet, fpn, segformer, linear"):
        DenseSpec(task="segmentation", num_classes=3, head="faster_rcnn")
    with pytest.raises(ValueError, match=", ".join(DETECTORS)):
        DenseSpec(task="detection", num_classes=3, head="upernet")
    with pytest.raises(ValueError, match="task must be one of"):
        DenseSpec(task="depth", num_classes=3)
    with pytest.raises(TypeError, match="PeftVisionModel"):
        DenseModel(_vit(), "segmentation", num_classes=3)
    with pytest.raises(ConfigError, match="task.name must be one of classification, segmentation, detection"):
        load_config(None, ["task.name=segmentaton"])
    with pytest.raises(ConfigError, match="task.head is for dense tasks"):
        load_config(None, ["task.head=upernet"])
    with pytest.raises(ConfigError, match="did you mean 'neck'"):
        load_config(None, ["task.nek=native"])
    with pytest.raises(ConfigError, match="schedule.name must be one of cosine, poly"):
        load_config(None, ["schedule.name=step"])


def test_segmentation_metrics_by_hand():
    """conf[true, pred] pixels: class 0: 8 right, 2 taken for 1; class 1: 3 right, 1 taken for 0; class 2 never in
    the ground truth (a false positive of 1 pixel): it counts in no mean."""
    conf = torch.tensor([[8, 2, 0], [1, 3, 1], [0, 0, 0]], dtype=torch.float64)
    m = segmentation_metrics(conf, ["a", "b", "c"])
    iou_a, iou_b = 8 / (10 + 9 - 8), 3 / (5 + 5 - 3)
    assert m["mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 2)
    assert m["mAcc"] == pytest.approx(100 * (8 / 10 + 3 / 5) / 2)
    assert m["aAcc"] == pytest.approx(100 * 11 / 15)
    assert m["per_class_IoU"]["c"] is None and m["per_class_IoU"]["a"] == pytest.approx(100 * iou_a)


# ------------------------------------------------------------------------------------------------------------
# the trainer and the tools on the embedded digit scenes
SCENES = [
    "data.num_train=48",
    "data.num_eval=16",
    "data.batch_size=8",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "runtime.eval_every=1",
    "runtime.ckpt_every=1",
    "runtime.threads=2",
]
SEG_CONFIG = sorted((ROOT / "configs" / "demo-seg").glob("*.yaml"))[0]


def _train(tmp_path: Path, name: str, *extra: str, max_epochs: int | None = None, resume: Path | None = None):
    from visionpeft.engine.trainer import Trainer

    cfg = load_config(SEG_CONFIG, [*SCENES, f"runtime.out_dir={tmp_path / name}", *extra])
    trainer = Trainer(cfg, resume=resume, progress=False)
    return trainer, trainer.fit(max_epochs=max_epochs)


def test_segmentation_run_resumes_exactly_and_the_tools_read_it(tmp_path):
    """Two epochs straight equal one epoch, a stop and a resume (adapter, neck, head and BatchNorm statistics
    in the checkpoint); tools/eval.py on the run folder reproduces the run's mIoU; tools/predict.py draws the
    masks."""
    _, straight = _train(tmp_path, "a")
    assert straight["metric"] == "mIoU" and 0.0 <= straight["mIoU"] <= 100.0
    assert set(straight["per_class_IoU"]) == {"background", *map(str, range(10))}
    _train(tmp_path, "b", max_epochs=1)
    _, resumed = _train(tmp_path, "b", resume=tmp_path / "b" / "last.ckpt")
    assert resumed["mIoU"] == straight["mIoU"] and resumed["eval_loss"] == straight["eval_loss"]
    a = vp.load_adapter(_tiny_vit(), tmp_path / "a" / "adapter")
    b = vp.load_adapter(_tiny_vit(), tmp_path / "b" / "adapter")
    for (ka, va), (kb, vb) in zip(a.adapter_state_dict().items(), b.adapter_state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka

    out = tmp_path / "eval.json"
    r = subprocess.run(
        [sys.executable, str(TOOLS / "eval.py"), "--config", str(tmp_path / "a" / "config.yaml")]
        + ["--adapter", str(tmp_path / "a"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(straight["mIoU"], abs=1e-6)
    assert "per-class IoU: background" in r.stdout

    from visionpeft.data.scenes import ensure_digit_scenes

    scenes = ensure_digit_scenes(None, 48, 16)
    images = sorted((scenes / "ADEChallengeData2016" / "images" / "validation").iterdir())[:2]
    r = subprocess.run(
        [sys.executable, str(TOOLS / "predict.py"), "--adapter", str(tmp_path / "a"), *map(str, images)]
        + ["--out-dir", str(tmp_path / "pics")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    from PIL import Image

    for img in images:
        mask = Image.open(tmp_path / "pics" / f"{img.stem}_mask.png")
        assert mask.size == Image.open(img).size
        assert (tmp_path / "pics" / f"{img.stem}_overlay.png").stat().st_size > 1000


def _tiny_vit() -> torch.nn.Module:
    from visionpeft.engine.tasks import build_dense_backbone

    cfg = load_config(SEG_CONFIG)
    return build_dense_backbone(cfg)


def test_classification_adapter_and_task_mismatch_is_refused(tmp_path):
    """tools/eval.py with a segmentation config on a classification adapter says which is which."""
    model = vp.get_peft_model(_tiny_vit(), vp.LoRAConfig(rank=2))
    model.save_adapter(tmp_path / "cls")
    r = subprocess.run(
        [sys.executable, str(TOOLS / "eval.py"), "--config", str(SEG_CONFIG), "--adapter", str(tmp_path / "cls")]
        + ["--set", "data.num_train=48", "--set", "data.num_eval=16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "classification adapter" in r.stderr, r.stderr


def test_detection_task_trains_and_evaluates(tmp_path):
    """Faster R-CNN on the digit scenes' COCO layout: finite losses, mAP keys, a reloadable adapter."""
    from visionpeft.engine.trainer import Trainer

    cfg = load_config(
        ROOT / "configs" / "demo-det" / "lora-r4_vit-tiny_faster-rcnn_digit-scenes-64.yaml",
        [*SCENES, "schedule.epochs=1", f"runtime.out_dir={tmp_path / 'det'}"],
    )
    result = Trainer(cfg, progress=False).fit()
    assert result["metric"] == "bbox_mAP" and 0.0 <= result["bbox_mAP"] <= 100.0
    assert result["eval_samples"] == 16
    model = vp.load_adapter(_tiny_vit(), tmp_path / "det" / "adapter")
    assert isinstance(model, DenseModel) and model.task == "detection"
    assert dataclasses.asdict(model.spec)["head"] == "faster_rcnn"


def test_mask_rcnn_trains_on_instance_masks(tmp_path):
    """data.masks: the COCO reader gives instance masks, Mask R-CNN trains on them, mask mAP is reported."""
    from visionpeft.engine.trainer import Trainer

    cfg = load_config(
        ROOT / "configs" / "demo-det" / "lora-r4_vit-tiny_faster-rcnn_digit-scenes-64.yaml",
        [
            "data.num_train=16",
            "data.num_eval=8",
            "data.batch_size=8",
            "data.masks=true",
            "task.head=mask_rcnn",
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
            "runtime.threads=2",
            f"runtime.out_dir={tmp_path / 'mask'}",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    batch = next(iter(trainer.train_loader))
    assert all(t["masks"].shape[0] == t["boxes"].shape[0] for t in batch[1])
    result = trainer.fit()
    assert {"bbox_mAP", "segm_mAP", "segm_mAP_50"} <= set(result)
    assert 0.0 <= result["segm_mAP"] <= 100.0 and result["eval_samples"] == 8
