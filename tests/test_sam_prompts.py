"""SAM training helpers: prompt sampling (visionpeft.sam.prompts) and losses (visionpeft.sam.losses)."""

from __future__ import annotations

import pytest
import torch

from visionpeft.sam import (
    dice_loss,
    focal_loss,
    mask_iou,
    objects_from_mask,
    pad_points,
    refine_points,
    sam_loss,
    sample_boxes,
    sample_points,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def label_map() -> torch.Tensor:
    """12x12 map: class 1 in two components (3x3 and 1 pixel), class 2 one 2x4 block, 255 ignore, 0 background."""
    m = torch.zeros(12, 12, dtype=torch.int64)
    m[1:4, 1:4] = 1
    m[8, 10] = 1
    m[6:8, 2:6] = 2
    m[10:12, 0:3] = 255
    return m


def square_masks() -> torch.Tensor:
    """Three non-empty masks of different shapes on a 32x32 canvas."""
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 4:20, 6:30] = True
    masks[1, 10, 10] = True
    masks[2, 0:32:3, 5] = True  # a dotted column: not convex, points must still fall on it
    return masks


# ---------------------------------------------------------------------------------------------- objects_from_mask


def test_objects_split_components_and_skip_ignore_and_background():
    masks, labels = objects_from_mask(label_map(), ignore_index=255, background=0)
    assert masks.dtype == torch.bool and masks.shape == (3, 12, 12)
    assert labels.tolist() == [1, 1, 2]
    assert sorted(int(a) for a in masks.flatten(1).sum(1)) == [1, 8, 9]
    m = label_map()
    for mask, cls in zip(masks, labels, strict=True):
        assert (m[mask] == cls).all()
    # no object covers an ignored pixel, and the objects are disjoint
    assert not masks[:, 10:12, 0:3].any()
    assert masks.sum(0).max() == 1


def test_objects_background_none_keeps_class_zero_and_min_area_drops_small():
    masks, labels = objects_from_mask(label_map(), background=None, min_area=2)
    assert labels.tolist() == [0, 1, 2]  # the 1-pixel component of class 1 is gone, class 0 (one component) is kept
    assert masks[0].sum() == 144 - 9 - 1 - 8 - 6


def test_objects_per_class_and_connectivity():
    masks, labels = objects_from_mask(label_map(), background=0, instances=False)
    assert labels.tolist() == [1, 2] and masks[0].sum() == 10
    diag = torch.zeros(4, 4, dtype=torch.int64)
    diag[0, 0] = diag[1, 1] = 3
    assert objects_from_mask(diag, background=0)[0].shape[0] == 1
    assert objects_from_mask(diag, background=0, connectivity=4)[0].shape[0] == 2


def test_objects_none_and_bad_input():
    masks, labels = objects_from_mask(torch.zeros(5, 7, dtype=torch.int64), background=0)
    assert masks.shape == (0, 5, 7) and labels.shape == (0,)
    with pytest.raises(ValueError, match="integer class ids"):
        objects_from_mask(torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        objects_from_mask(torch.zeros(1, 5, 7, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------- boxes


def test_boxes_without_noise_are_tight():
    boxes = sample_boxes(square_masks(), gen(), noise=0.0)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[6, 4, 29, 19], [10, 10, 10, 10], [5, 0, 5, 30]]


def test_boxes_noise_bounded_ordered_and_in_image():
    masks = torch.zeros(200, 64, 64, dtype=torch.bool)
    masks[:, 5:62, 2:50] = True  # side 47 x 56: std 4.7 / 5.6 px before the clip
    tight = torch.tensor([2.0, 5.0, 49.0, 61.0])
    boxes = sample_boxes(masks, gen(), noise=0.1, max_noise=3.0)
    shift = boxes - tight
    assert shift.abs().max() <= 3.0 + 1e-5  # clipped (the image clamp only shrinks shifts)
    assert (shift.abs() > 0.5).float().mean() > 0.5  # the noise is really there
    assert (boxes[:, :2] <= boxes[:, 2:]).all()
    assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= 63 and boxes[:, [1, 3]].max() <= 63
    assert (boxes[:, 3] == 63).any()  # y1 = 61 + noise hits the image border and is clamped


def test_boxes_noise_scales_with_side():
    masks = torch.zeros(400, 128, 128, dtype=torch.bool)
    masks[:200, 50:60, 50:60] = True  # side 9
    masks[200:, 10:110, 10:110] = True  # side 99
    shift = sample_boxes(masks, gen(1), noise=0.1, max_noise=1e9) - sample_boxes(masks, gen(1), noise=0.0)
    small, large = shift[:200].std(), shift[200:].std()
    assert 0.6 < small < 1.2 and 7.0 < large < 12.0  # std 0.1 * side


def test_boxes_refuse_empty_mask():
    masks = square_masks()
    masks[1] = False
    with pytest.raises(ValueError, match=r"masks \[1\] are empty"):
        sample_boxes(masks, gen())


# ---------------------------------------------------------------------------------------------------- points


def test_points_fall_inside_masks_and_cover_them():
    masks = square_masks()
    coords, labels = sample_points(masks, gen(), n=50)
    assert coords.shape == (3, 50, 2) and labels.shape == (3, 50)
    assert labels.dtype == torch.int64 and (labels == 1).all()
    assert (coords == coords.round()).all()  # pixel indices: SAM's encoder adds the half-pixel shift itself
    x, y = coords[..., 0].long(), coords[..., 1].long()
    assert masks[torch.arange(3)[:, None], y, x].all()
    assert len(set(y[2].tolist())) >= 8  # uniform over the 11 dots, not stuck on the first one


def test_points_uniform_over_foreground():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 7, 7] = True
    coords, _ = sample_points(masks, gen(), n=2000)
    share = (coords[0, :, 0] == 0).float().mean()
    assert 0.45 < share < 0.55


def test_points_and_boxes_are_deterministic_per_seed():
    masks = square_masks()
    a, b = sample_points(masks, gen(3), n=5)[0], sample_points(masks, gen(3), n=5)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_points(masks, gen(4), n=5)[0])
    assert torch.equal(sample_boxes(masks, gen(3)), sample_boxes(masks, gen(3)))
    assert not torch.equal(sample_boxes(masks, gen(3)), sample_boxes(masks, gen(4)))


# ---------------------------------------------------------------------------------------------------- refine


def test_refine_false_negative_and_false_positive():
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    pred = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, 2:10, 2:10] = True
    pred[0, 2:10, 2:6] = True  # FN region: columns 6..9
    gt[1, 2:6, 2:6] = True
    pred[1, 2:12, 2:6] = True  # FP region: rows 6..11
    for seed in range(10):
        coords, labels = refine_points(pred, gt, gen(seed))
        assert coords.shape == (2, 1, 2) and labels.shape == (2, 1)
        assert labels[:, 0].tolist() == [1, 0]
        (x0, y0), (x1, y1) = coords[0, 0].long().tolist(), coords[1, 0].long().tolist()
        assert gt[0, y0, x0] and not pred[0, y0, x0]
        assert pred[1, y1, x1] and not gt[1, y1, x1]


def test_refine_mixed_error_labels_follow_the_pixel():
    gt = torch.zeros(1, 8, 8, dtype=torch.bool)
    pred = torch.zeros(1, 8, 8, dtype=torch.bool)
    gt[0, 0, :4] = True  # 4 FN pixels
    pred[0, 7, :4] = True  # 4 FP pixels
    seen = set()
    for seed in range(40):
        coords, labels = refine_points(pred, gt, gen(seed))
        x, y = coords[0, 0].long().tolist()
        assert int(labels[0, 0]) == int(gt[0, y, x]) and (pred ^ gt)[0, y, x]
        seen.add(int(labels[0, 0]))
    assert seen == {0, 1}


def test_refine_perfect_and_empty():
    gt = torch.zeros(2, 10, 12, dtype=torch.bool)
    gt[0, 3:5, 7:9] = True
    coords, labels = refine_points(gt.clone(), gt, gen())
    x, y = coords[0, 0].long().tolist()
    assert labels[0, 0] == 1 and gt[0, y, x]
    assert labels[1, 0] == -1 and coords[1, 0].tolist() == [5.5, 4.5]


def test_refine_shape_mismatch():
    with pytest.raises(ValueError, match="resize"):
        refine_points(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool), gen())


def test_pad_points():
    a = (torch.ones(2, 1, 2), torch.ones(2, 1, dtype=torch.int64))
    b = (torch.full((1, 3, 2), 7.0), torch.tensor([[1, 0, 1]]))
    coords, labels = pad_points([a, b])
    assert coords.shape == (3, 3, 2) and labels.shape == (3, 3)
    assert labels.tolist() == [[1, -1, -1], [1, -1, -1], [1, 0, 1]]
    assert coords[0, 0].tolist() == [1.0, 1.0] and coords[0, 1:].abs().sum() == 0 and (coords[2] == 7).all()
    with pytest.raises(ValueError, match="no"):
        pad_points([])
    with pytest.raises(ValueError, match="entry 1"):
        pad_points([a, (torch.ones(1, 3, 2), torch.ones(1, 2))])


# ---------------------------------------------------------------------------------------------------- losses


def blob_target(n: int = 2, size: int = 16) -> torch.Tensor:
    t = torch.zeros(n, size, size, dtype=torch.bool)
    t[:, 4:12, 3:10] = True
    return t


def test_focal_and_dice_perfect_near_zero_wrong_large():
    t = blob_target().float()
    perfect = (t * 2 - 1) * 12
    for fn in (focal_loss, dice_loss):
        good, bad, soso = fn(perfect, t), fn(-perfect, t), fn(perfect * 0.05, t)
        assert good.shape == (2,)
        assert good.max() < 1e-3 and (bad > 1.5 * soso).all() and (soso > 10 * good).all()
    assert (focal_loss(-perfect, t) > 10 * focal_loss(perfect * 0.05, t)).all()
    # inverted: |P T| ~ 0, |P| ~ 200 background pixels, |T| = 56, so dice = 1 - eps / 257
    assert torch.allclose(dice_loss(-perfect, t), torch.full((2,), 1 - 1 / 257), atol=1e-3)


def test_focal_matches_formula_and_gamma_zero_is_weighted_bce():
    logits = torch.tensor([[2.0, -1.0]])
    t = torch.tensor([[1.0, 1.0]])
    p = logits.sigmoid()
    expected = (-0.25 * (1 - p) ** 2 * p.log()).mean(dim=1)
    assert torch.allclose(focal_loss(logits, t), expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(dim=1)
    assert torch.allclose(focal_loss(logits, t, alpha=-1, gamma=0.0), bce)


def test_mask_iou():
    t = torch.zeros(3, 4, 4, dtype=torch.bool)
    t[0, :2] = True  # 8 pixels
    t[1, :2] = True
    logits = torch.full((3, 4, 4), -5.0)
    logits[0, :2] = 5.0  # exact
    logits[1, :4, :2] = 5.0  # 8 predicted, 4 shared: IoU 4 / 12
    iou = mask_iou(logits, t)  # mask 2: empty with empty
    assert torch.allclose(iou, torch.tensor([1.0, 1 / 3, 1.0]))


def test_sam_loss_backprops_only_the_best_candidate():
    t = blob_target(n=2)
    good = (t.float() * 2 - 1) * 8
    logits = torch.stack([-good, good, good * 0.1], dim=1).clone().requires_grad_(True)  # best: candidate 1
    logits.data[1] = torch.stack([good[1] * 0.1, -good[1], good[1]])  # best for prompt 1: candidate 2
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    out = sam_loss(logits, iou_pred, t)
    out["loss"].backward()
    touched = logits.grad.flatten(2).abs().sum(-1) > 0
    assert touched.tolist() == [[False, True, False], [False, False, True]]
    assert out["iou"] > 0.99 and out["loss"].ndim == 0 and out["focal"] < 1e-3
    # the IoU head sees every candidate: target IoU of the inverted candidate is 0, of the others 1
    assert iou_pred.grad is not None and (iou_pred.grad != 0).all()
    assert iou_pred.grad[0, 0] > 0 and iou_pred.grad[0, 1] < 0
    assert torch.allclose(out["iou_mse"], torch.tensor(0.25))


def test_sam_loss_resizes_low_res_logits_and_lower_for_better_logits():
    t = torch.zeros(3, 32, 32, dtype=torch.bool)
    t[:, 8:24, 4:20] = True  # aligned with the 4x4 cells of the 8x8 logits
    low = torch.nn.functional.interpolate(((t.float() * 2 - 1) * 8)[:, None], size=(8, 8), mode="area")
    iou_pred = torch.ones(3, 1)
    good = sam_loss(low, iou_pred, t)
    bad = sam_loss(-low, iou_pred, t)
    assert good["loss"] < bad["loss"] / 10 and good["iou"] > 0.95 and bad["iou"] < 0.05
    up = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(good["loss"], sam_loss(up, iou_pred, t)["loss"])


def test_sam_loss_empty_target_finite_and_bad_input():
    t = torch.zeros(2, 8, 8, dtype=torch.bool)
    logits = torch.randn(2, 3, 8, 8, generator=gen(), requires_grad=True)
    iou_pred = torch.rand(2, 3, generator=gen(), requires_grad=True)
    out = sam_loss(logits, iou_pred, t)
    out["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(logits.grad).all() and torch.isfinite(iou_pred.grad).all()
    with pytest.raises(ValueError, match="N == 0"):
        sam_loss(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1), torch.zeros(0, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="iou_pred"):
        sam_loss(logits, torch.zeros(2, 1), t)
    with pytest.raises(ValueError, match="target"):
        sam_loss(logits, iou_pred, t[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_one_cpu_generator():
    masks = square_masks()
    cpu = sample_points(masks, gen(5), n=4)[0], sample_boxes(masks, gen(5))
    cuda = sample_points(masks.cuda(), gen(5), n=4)[0], sample_boxes(masks.cuda(), gen(5))
    assert cuda[0].is_cuda and torch.equal(cpu[0], cuda[0].cpu()) and torch.allclose(cpu[1], cuda[1].cpu())
    gcuda = torch.Generator(device="cuda").manual_seed(0)
    coords, _ = refine_points(masks.cuda(), masks.cuda() & False, gcuda)
    x, y = coords[:, 0, 0].long(), coords[:, 0, 1].long()
    assert masks.cuda()[torch.arange(3, device="cuda"), y, x].all()
