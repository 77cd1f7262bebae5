"""Dense heads (issue 8): segmentation heads, seg_loss, sliding-window inference, torchvision detectors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionpeft.heads import (
    DETECTORS,
    SEG_HEADS,
    FCNHead,
    build_detector,
    build_seg_head,
    seg_loss,
    slide_inference,
    whole_inference,
)

STRIDES = [4, 8, 16, 32]
CHANNELS = [8, 12, 16, 20]
HEAD_KWARGS = {"upernet": {"channels": 16}, "fpn": {"channels": 8, "fpn_channels": 16}, "segformer": {"channels": 16}}


def _pyramid(b: int, h: int, w: int, channels: list[int] = CHANNELS) -> list[torch.Tensor]:
    return [torch.randn(b, c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, STRIDES, strict=True)]


# ---------------------------------------------------------------- segmentation heads


@pytest.mark.parametrize("name", SEG_HEADS)
@pytest.mark.parametrize("hw", [(64, 96), (70, 45)])
def test_seg_head_shape_and_gradients(name, hw):
    torch.manual_seed(0)
    head = build_seg_head(name, CHANNELS, STRIDES, num_classes=5, **HEAD_KWARGS.get(name, {})).train()
    feats = _pyramid(2, *hw)
    out = head(feats)
    assert out.shape == (2, 5, math.ceil(hw[0] / 4), math.ceil(hw[1] / 4))
    (out * torch.randn_like(out)).sum().backward()
    for n, p in head.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), n
        if p.dim() > 1:  # weights (biases in front of a train-mode BatchNorm get an exactly-cancelling gradient)
            assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {n}"


def test_upernet_head_uses_every_level_and_pool_scales():
    torch.manual_seed(0)
    head = build_seg_head("upernet", CHANNELS, STRIDES, 3, channels=8, pool_scales=(1, 2)).eval()
    assert len(head.psp_modules) == 2 and len(head.lateral_convs) == 3 and len(head.fpn_convs) == 3
    feats = _pyramid(1, 64, 64)
    base = head(feats)
    for i in range(4):  # each level changes the output (a dropped level would not)
        changed = [f.clone() for f in feats]
        changed[i] = changed[i] + 1
        assert not torch.allclose(head(changed), base), f"level {i} is ignored"


def test_fcn_aux_head_reads_in_index():
    torch.manual_seed(0)
    head = FCNHead(CHANNELS[2], num_classes=4, channels=8).train()
    feats = _pyramid(2, 70, 45)
    out = head(feats)
    assert out.shape == (2, 4, math.ceil(70 / 16), math.ceil(45 / 16))
    loss = seg_loss(out, torch.randint(0, 4, (2, 70, 45)))
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="channels"):
        FCNHead(CHANNELS[1], num_classes=4, channels=8)(feats)


def test_seg_head_errors_list_choices():
    with pytest.raises(KeyError, match="upernet"):
        build_seg_head("upernett", CHANNELS, STRIDES, 3)
    with pytest.raises(TypeError, match="channels"):
        build_seg_head("upernet", CHANNELS, STRIDES, 3, chanels=8)
    with pytest.raises(ValueError, match="same length"):
        build_seg_head("linear", CHANNELS, STRIDES[:3], 3)
    head = build_seg_head("linear", CHANNELS, STRIDES, 3)
    with pytest.raises(ValueError, match="feature_info"):
        head(_pyramid(2, 32, 32, channels=[8, 12, 16, 24]))


# ---------------------------------------------------------------- seg_loss


def test_seg_loss_equals_cross_entropy_with_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9, 11)
    target = torch.randint(0, 6, (2, 9, 11))
    target[0, :3] = 255
    ref = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(seg_loss(logits, target), ref, atol=1e-6)
    target[target == 255] = 7  # another ignore label
    assert torch.allclose(seg_loss(logits, target, ignore_index=7), ref, atol=1e-6)


def test_seg_loss_resizes_logits_to_target():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 19, 23))
    up = F.interpolate(logits, size=(19, 23), mode="bilinear", align_corners=False)
    assert torch.allclose(seg_loss(logits, target), F.cross_entropy(up, target), atol=1e-6)
    seg_loss(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_seg_loss_all_ignored_is_zero_with_finite_grad(dice_weight):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = seg_loss(logits, torch.full((2, 8, 8), 255), dice_weight=dice_weight)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _dice_reference(logits, target, ignore):
    probs = logits.softmax(1)
    valid = target != ignore
    losses = []
    for c in range(logits.shape[1]):
        t = ((target == c) & valid).float()
        if t.sum() == 0:
            continue
        p = probs[:, c] * valid
        losses.append(1 - 2 * (p * t).sum() / (p.sum() + t.sum()))
    return torch.stack(losses).mean()


def test_seg_loss_dice_term():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 10, 12))  # classes 0..2 of 5 present
    target[:, :2] = 255
    perfect = F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float() * 100
    perfect[:, :, :2] = torch.randn(2, 5, 2, 12) * 100  # anything on ignored pixels
    dice = seg_loss(perfect, target, dice_weight=1.0) - seg_loss(perfect, target)
    assert abs(dice.item()) < 1e-5
    logits = torch.randn(2, 5, 10, 12)
    dice = seg_loss(logits, target, dice_weight=0.5) - seg_loss(logits, target)
    assert dice.item() > 0.01
    assert torch.allclose(dice, 0.5 * _dice_reference(logits, target, 255), atol=1e-5)


def test_seg_loss_rejects_labels_beyond_classes():
    with pytest.raises(ValueError, match="num_classes"):
        seg_loss(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3))


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize(
    "shape,crop,stride",
    [
        ((1, 3, 64, 64), 32, 16),
        ((2, 3, 70, 45), 32, 20),
        ((1, 3, 20, 25), 32, 16),
        ((1, 3, 50, 40), (24, 32), (16, 8)),
    ],
)
def test_slide_equals_whole_for_per_pixel_fn(shape, crop, stride):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    img = torch.randn(shape)
    with torch.no_grad():
        whole = whole_inference(conv, img)
        slide = slide_inference(conv, img, num_classes=4, crop=crop, stride=stride)
    assert slide.shape == (shape[0], 4, *shape[2:])
    assert torch.allclose(slide, whole, atol=1e-5)


def test_slide_inference_averages_overlaps_and_resizes_low_res_logits():
    img = torch.randn(1, 3, 70, 45)
    ones = slide_inference(lambda x: torch.ones(x.shape[0], 2, 8, 8), img, 2, crop=32, stride=12)
    assert ones.shape == (1, 2, 70, 45)
    assert torch.allclose(ones, torch.ones_like(ones))  # a wrong count map would not give exactly 1
    # a window-dependent fn: each pixel gets the mean over the windows covering it
    calls = []

    def fn(x):
        calls.append(x.shape[-2:])
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(len(calls)))

    out = slide_inference(fn, torch.zeros(1, 3, 40, 20), 1, crop=(32, 20), stride=(8, 20))
    # windows start at rows 0 and 8 (the second clamped to end at 40): rows 0-7 see window 1 only, rows 32-39
    # window 2 only, rows 8-31 both
    assert calls == [(32, 20), (32, 20)]
    assert torch.allclose(out[0, 0, :8], torch.tensor(1.0))
    assert torch.allclose(out[0, 0, 8:32], torch.tensor(1.5))
    assert torch.allclose(out[0, 0, 32:], torch.tensor(2.0))


def test_whole_inference_resizes_to_image():
    img = torch.randn(2, 3, 70, 45)
    out = whole_inference(lambda x: F.avg_pool2d(x[:, :2], 4, ceil_mode=True), img)
    assert out.shape == (2, 2, 70, 45)


# ---------------------------------------------------------------- detection


class _FakeFeatures(nn.Module):
    """A tiny conv net returning 4 maps at strides 4, 8, 16, 32."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.downs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in range(3))

    def forward(self, x):
        y = self.stem(x)
        out = [y]
        for d in self.downs:
            y = d(y)
            out.append(y)
        return out


def _targets(name, sizes, boxes):
    out = []
    for (h, w), b in zip(sizes, boxes, strict=True):
        b = torch.tensor(b, dtype=torch.float32).reshape(-1, 4)
        t = {"boxes": b, "labels": torch.randint(1, 4, (len(b),))}
        if name == "mask_rcnn":
            m = torch.zeros(len(b), h, w, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(b.int().tolist()):
                m[i, y1:y2, x1:x2] = 1
            t["masks"] = m
        out.append(t)
    return out


def _build(name, feats, **kwargs):
    if name in ("faster_rcnn", "mask_rcnn"):  # keep every detection (so the eval output is not empty), few of them
        kwargs = {"box_score_thresh": 0.0, "box_detections_per_img": 10, "box_batch_size_per_image": 64, **kwargs}
    else:
        kwargs = {"score_thresh": 0.0, "detections_per_img": 10, "topk_candidates": 100, **kwargs}
    # fpn_channels 64: the one-stage heads' GroupNorm(32) needs 2 channels a group on P7's 1x1 map of a 64 image
    return build_detector(name, lambda x: feats(x), [8] * 4, 3, fpn_channels=64, min_size=64, max_size=128, **kwargs)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_trains_and_predicts(name):
    torch.manual_seed(0)
    feats = _FakeFeatures()
    det = _build(name, feats).train()
    sizes = [(64, 80), (70, 64)]
    images = [torch.rand(3, *s) for s in sizes]
    targets = _targets(name, sizes, [[[5, 6, 40, 50], [30, 10, 60, 40]], []])  # the second image has no boxes
    assert targets[1]["boxes"].shape == (0, 4)
    losses = det(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    for n, p in feats.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches features.{n}"

    det.eval()
    with torch.no_grad():
        preds = det(images)
    assert len(preds) == 2
    keys = {"boxes", "labels", "scores"} | ({"masks"} if name == "mask_rcnn" else set())
    for p, (h, w) in zip(preds, sizes, strict=True):
        assert keys <= set(p)
        n = len(p["boxes"])
        assert n > 0 and p["boxes"].shape == (n, 4) and p["scores"].shape == (n,) and p["labels"].shape == (n,)
        assert ((p["labels"] >= 1) & (p["labels"] <= 3)).all()  # foreground labels only
        if name == "mask_rcnn":
            assert p["masks"].shape == (n, 1, h, w)

    feature_keys = set(feats.state_dict())
    state = det.state_dict()
    assert not any(k.split("features.")[-1] in feature_keys or "stem" in k or "downs" in k for k in state)
    assert not {id(p) for p in feats.parameters()} & {id(p) for p in det.parameters()}


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_batch_without_boxes(name):
    torch.manual_seed(0)
    feats = _FakeFeatures()
    det = _build(name, feats).train()
    targets = _targets(name, [(64, 64)], [[]])
    losses = det([torch.rand(3, 64, 64)], targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in det.parameters() if p.grad is not None)


def test_detector_pyramid_levels_and_anchors_follow_torchvision():
    feats = _FakeFeatures()
    rcnn = _build("faster_rcnn", feats)
    assert rcnn.backbone.feature_names == ["0", "1", "2", "3", "pool"]
    assert rcnn.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert rcnn.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert rcnn.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    retina = _build("retinanet", feats)
    assert retina.backbone.feature_names == ["0", "1", "2", "p6", "p7"]
    ref = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    assert retina.anchor_generator.sizes == ref
    fcos = _build("fcos", feats)
    assert fcos.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    with torch.no_grad():
        pyramid = fcos.backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in pyramid.values()] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]


def test_detector_keeps_a_features_module_out_of_its_state():
    feats = _FakeFeatures()
    det = build_detector("faster_rcnn", feats, [8] * 4, 3, fpn_channels=32)  # the module itself, no closure
    assert det.backbone.features is feats
    assert not [k for k in det.state_dict() if "stem" in k or "downs" in k]
    assert not {id(p) for p in feats.parameters()} & {id(p) for p in det.parameters()}
    det.eval()
    assert feats.training  # the caller owns the features' mode


def test_detector_errors_list_choices():
    feats = _FakeFeatures()
    with pytest.raises(KeyError, match="faster_rcnn"):
        build_detector("faster-rcnn", feats, [8] * 4, 3)
    with pytest.raises(TypeError, match="box_score_thresh"):
        build_detector("faster_rcnn", feats, [8] * 4, 3, box_score_threshold=0.1)
    with pytest.raises(ValueError, match="anchor size"):
        build_detector("retinanet", feats, [8] * 4, 3, fpn_channels=32, anchor_sizes=((32,),) * 4)
    det = build_detector("fcos", lambda x: feats(x)[:3], [8] * 4, 3, fpn_channels=32, min_size=64, max_size=64)
    with pytest.raises(ValueError, match="in_channels"):
        det.eval()([torch.rand(3, 64, 64)])
