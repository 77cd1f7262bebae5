"""Dense-prediction data: digit scenes in both layouts, the ADE20K / folder / COCO readers, joint transforms, and
the errors on bad input (each names the file)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data.coco import CocoDetection
from visionpeft.data.dense import build_dense_datasets
from visionpeft.data.dense_transforms import (
    CatMaxRatioCrop,
    det_train_transform,
    keep_ratio_size,
    seg_eval_transform,
    seg_train_transform,
)
from visionpeft.data.files import ImageReadError
from visionpeft.data.scenes import SCENE_CLASSES, SCENES_VERSION, digit_pools, ensure_digit_scenes, write_digit_scenes
from visionpeft.data.segmentation import ADE20K, ADE20K_CLASSES, SegFolder

N_TRAIN, N_VAL = 24, 8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_digit_scenes(tmp_path_factory.mktemp("scenes") / "digit_scenes", N_TRAIN, N_VAL, size=64, seed=3)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _seg_folder(tmp_path: Path, masks: dict[str, np.ndarray], size: tuple[int, int] = (12, 16)) -> tuple[Path, Path]:
    images, mask_dir = tmp_path / "images", tmp_path / "masks"
    rng = np.random.default_rng(0)
    for stem, mask in masks.items():
        _save(images / f"{stem}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        if mask is not None:
            _save(mask_dir / f"{stem}.png", mask.astype(np.uint8), "L")
    mask_dir.mkdir(exist_ok=True)
    return images, mask_dir


# ---------------------------------------------------------------- digit scenes


@pytest.mark.parametrize("split,coco_split", [("training", "train2017"), ("validation", "val2017")])
def test_scenes_layouts_agree(scenes: Path, split: str, coco_split: str) -> None:
    seg = ADE20K(scenes, split, reduce_zero_label=False, classes=scenes / "classes.txt")
    det = CocoDetection(
        scenes / "coco" / coco_split, scenes / "coco" / "annotations" / f"instances_{coco_split}.json", masks=True
    )
    assert seg.classes == list(SCENE_CLASSES) and det.classes == [str(d) for d in range(10)]
    assert len(seg) == len(det) == (N_TRAIN if split == "training" else N_VAL)
    for i in range(len(seg)):
        image, mask = seg[i]
        det_image, target = det[i]
        assert torch.allclose(image, det_image)  # the same picture in both layouts
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"].bool()
        assert 1 <= len(labels) <= 4 and labels.min() >= 1 and labels.max() <= 10
        assert int(mask.max()) <= 10
        union = torch.zeros_like(mask, dtype=torch.bool)
        for box, label, inst in zip(boxes, labels, masks, strict=True):
            assert inst.any() and (mask[inst] == label).all()  # each digit's pixels carry its class (1 + digit)
            assert not (union & inst).any()
            union |= inst
            ys, xs = torch.nonzero(inst, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(box, tight)  # the box is the mask's tight extent, so it contains the mask
        assert torch.equal(union, mask > 0)  # no labelled pixel outside a digit instance


def test_scenes_train_and_val_use_disjoint_digits(scenes: Path) -> None:
    used = {}
    for split in ("train2017", "val2017"):
        data = json.loads((scenes / "coco" / "annotations" / f"instances_{split}.json").read_text())
        used[split] = {a["mnist_index"] for a in data["annotations"]}
        assert used[split]
    assert not used["train2017"] & used["val2017"]
    train_pool, val_pool = digit_pools(3)
    assert not set(train_pool) & set(val_pool) and used["val2017"] <= set(val_pool)


def test_scenes_are_written_once_deterministically(scenes: Path, tmp_path: Path, monkeypatch) -> None:
    stamp = (scenes / "scenes.json").stat().st_mtime_ns
    assert ensure_digit_scenes(scenes, N_TRAIN, N_VAL, size=64, seed=3) == scenes
    assert (scenes / "scenes.json").stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(ValueError, match="already holds digit scenes"):
        ensure_digit_scenes(scenes, N_TRAIN + 1, N_VAL, size=64, seed=3)
    again = write_digit_scenes(tmp_path / "again", N_TRAIN, N_VAL, size=64, seed=3)
    for rel in (
        "coco/annotations/instances_train2017.json",
        "ADEChallengeData2016/annotations/training/scene_00005.png",
    ):
        assert (again / rel).read_bytes() == (scenes / rel).read_bytes()
    monkeypatch.setenv("VISIONPEFT_CACHE", str(tmp_path / "cache"))
    root = ensure_digit_scenes(num_train=3, num_val=2)
    assert root == tmp_path / "cache" / f"{SCENES_VERSION}-n3x2-s64-seed0"
    assert (root / "classes.txt").read_text().split() == list(SCENE_CLASSES)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [root.name]  # no temporary folder left


# ---------------------------------------------------------------- transforms


def test_keep_ratio_size_is_mmseg_rescale() -> None:
    assert keep_ratio_size(512, 683, (2048, 512)) == (512, 683)
    assert keep_ratio_size(50, 100, (2048, 512)) == (512, 1024)
    assert keep_ratio_size(100, 5000, (2048, 512)) == (41, 2048)  # the long edge binds


def test_train_transform_crops_and_pads_with_ignore() -> None:
    rng = np.random.default_rng(0)
    image, mask = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 5, (20, 30)).astype(np.uint8)
    tf = seg_train_transform(64, scale=(40, 20), ratio_range=(1.0, 1.0), hflip=0.0, photometric=False, seed=0)
    out_image, out_mask = tf(image, mask)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert out_mask.shape == (64, 64) and out_mask.dtype == torch.long
    assert (out_mask[20:] == 255).all() and (out_mask[:, 30:] == 255).all()
    assert (out_image[:, 20:] == 0).all() and (out_image[:, :, 30:] == 0).all()
    assert torch.equal(out_mask[:20, :30], torch.from_numpy(mask).long())
    big = seg_train_transform((24, 32), scale=(2048, 512), seed=1)  # default resize range, photometric on
    for _ in range(3):
        a, b = big(image, mask)
        assert a.shape == (3, 24, 32) and b.shape == (24, 32)
        assert set(b.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_train_transform_respects_cat_max_ratio() -> None:
    mask = np.zeros((128, 128), np.uint8)
    mask[:48, :48] = 1  # few 64x64 windows hold enough of class 1 for the 0.75 rule
    image = np.zeros((128, 128, 3), np.uint8)
    rule = CatMaxRatioCrop(64, 64, 0.75)

    def accepted_share(cat_max_ratio: float) -> float:
        tf = seg_train_transform(
            64, scale=(128, 128), ratio_range=(1.0, 1.0), cat_max_ratio=cat_max_ratio, hflip=0, photometric=False
        )
        tf.compose.set_random_seed(0)
        torch.manual_seed(0)  # the pipeline draws each sample's seed from torch's generator
        return float(np.mean([rule.accepts(tf(image, mask)[1].numpy()) for _ in range(200)]))

    plain, checked = accepted_share(1.0), accepted_share(0.75)
    assert plain < 0.15 and checked > 0.3  # retrying (up to 10 times) finds the rare acceptable windows
    assert rule.accepts(np.array([[1, 2], [255, 255]]))  # ignore pixels are not counted
    assert not rule.accepts(np.array([[1, 1], [1, 2]])) and not rule.accepts(np.array([[1, 255], [255, 255]]))


def test_train_flip_moves_image_and_mask_together() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    mask = (image[..., 0] > 127).astype(np.uint8)  # the mask is a function of the pixels
    tf = seg_train_transform((16, 24), scale=(24, 16), ratio_range=(1, 1), hflip=1.0, photometric=False)
    out_image, out_mask = tf(image, mask)
    pixels = (out_image.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)) * 255
    assert np.abs(pixels - image[:, ::-1]).max() < 0.01  # flipped ...
    assert torch.equal(out_mask, torch.from_numpy(mask[:, ::-1].copy()).long())  # ... with its mask


def test_each_dataloader_worker_draws_its_own_augmentations(monkeypatch) -> None:
    # forked workers start from copies of one albumentations state; without a reseed they repeat each other
    image = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    tf = seg_train_transform(32, scale=(64, 32), seed=7)  # a seeded pipeline: reseeded from each worker's seed
    draws = {}
    for worker_seed in (11, 12, 11):
        copy = pickle.loads(pickle.dumps(tf))  # what a worker process holds
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda s=worker_seed: SimpleNamespace(seed=s))
        draws.setdefault(worker_seed, []).append(torch.stack([copy(image, mask)[0] for _ in range(3)]))
    assert not torch.equal(draws[11][0], draws[12][0])
    assert torch.equal(draws[11][0], draws[11][1])  # reproducible from the worker's seed


def test_unseeded_augmentation_follows_torch_random_state() -> None:
    """Without a seed, each sample's draw comes from torch's generator (a worker's own one in a DataLoader): the
    same torch seed repeats the augmentations exactly (so a resumed run matches an uninterrupted one), another
    seed (another worker) changes them."""
    image = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.random.default_rng(4).integers(0, 3, (40, 60), dtype=np.uint8)

    tf = seg_train_transform(32, scale=(64, 32))

    def draw(seed: int) -> torch.Tensor:  # the same pipeline object throughout, as in a resumed run
        torch.manual_seed(seed)
        return torch.stack([tf(image, mask)[0] for _ in range(4)])

    first = draw(1)
    assert torch.equal(draw(1), first)  # the pipeline's own stream does not carry over
    assert not torch.equal(draw(2), first)


def test_eval_transform_keeps_the_mask_at_original_size() -> None:
    rng = np.random.default_rng(2)
    image, mask = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), rng.integers(0, 3, (60, 90)).astype(np.uint8)
    out_image, out_mask = seg_eval_transform(scale=(64, 32), mean=MEAN, std=STD)(image, mask)
    assert out_image.shape == (3, 32, 48)
    assert torch.equal(out_mask, torch.from_numpy(mask).long())
    same, _ = seg_eval_transform(scale=(90, 60), mean=MEAN, std=STD)(image, mask)  # no resize: normalise only
    expect = (torch.from_numpy(image).permute(2, 0, 1) / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[
        :, None, None
    ]
    assert torch.allclose(same, expect, atol=1e-5)


def test_det_train_flip_keeps_boxes_and_masks_consistent() -> None:
    image = np.zeros((20, 30, 3), np.uint8)
    masks = np.zeros((1, 20, 30), np.uint8)
    masks[0, 2:8, 3:10] = 1
    target = {"boxes": np.array([[3, 2, 10, 8]], np.float32), "labels": np.array([4]), "masks": masks, "image_id": 9}
    out_image, out = det_train_transform(hflip=1.0)(image, target)
    assert out_image.shape == (3, 20, 30) and out_image.max() <= 1.0
    assert torch.allclose(out["boxes"], torch.tensor([[20.0, 2.0, 27.0, 8.0]]), atol=1e-4)
    ys, xs = torch.nonzero(out["masks"][0], as_tuple=True)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (20, 27, 2, 8)
    assert out["labels"].tolist() == [4] and out["image_id"] == 9


# ---------------------------------------------------------------- segmentation readers and errors


def test_reduce_zero_label_mapping(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 150, 255]] * 3, np.uint8)
    images, masks = _seg_folder(tmp_path, {"a": raw}, size=(3, 4))
    _, mask = SegFolder(images, masks, list(ADE20K_CLASSES), reduce_zero_label=True)[0]
    assert mask[0].tolist() == [255, 0, 149, 255]
    _, mask = SegFolder(images, masks, [str(i) for i in range(151)], reduce_zero_label=False)[0]
    assert mask[0].tolist() == [0, 1, 150, 255]


def test_ade20k_layout_and_classes(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        _save(base / "images" / split / "ADE_1.jpg", np.full((8, 8, 3), 90, np.uint8))
        _save(base / "annotations" / split / "ADE_1.png", np.full((8, 8), 150, np.uint8), "L")
    ds = ADE20K(tmp_path, "validation")  # the parent folder works too
    assert len(ADE20K_CLASSES) == 150 and ds.num_classes == 150 and ds.classes[0] == "wall"
    assert ds[0][1].unique().tolist() == [149]
    with pytest.raises(FileNotFoundError, match="images/training"):
        ADE20K(tmp_path / "elsewhere")


def test_missing_mask_and_missing_image_are_named(tmp_path: Path) -> None:
    images, masks = _seg_folder(tmp_path, {"a": np.zeros((12, 16)), "lonely": None})
    with pytest.raises(FileNotFoundError, match="lonely.png"):
        SegFolder(images, masks, ["x", "y"])
    (images / "lonely.png").unlink()
    _save(masks / "orphan.png", np.zeros((12, 16), np.uint8), "L")
    with pytest.raises(FileNotFoundError, match="orphan.png"):
        SegFolder(images, masks, ["x", "y"])


def test_label_beyond_classes_is_named_at_construction_and_lazily(tmp_path: Path) -> None:
    bad = np.zeros((12, 16))
    bad[0, :3] = [5, 7, 255]
    images, masks = _seg_folder(tmp_path, {"a": np.zeros((12, 16)), "b": bad})
    with pytest.raises(ValueError, match=r"b\.png.*\[5, 7\].*num_classes=3.*reduce_zero_label"):
        SegFolder(images, masks, ["x", "y", "z"])
    ds = SegFolder(images, masks, ["x", "y", "z"], check_samples=1)  # the cheap check stops before b.png
    ds[0]
    with pytest.raises(ValueError, match=r"b\.png"):
        ds[1]
    with pytest.raises(ValueError, match=r"b\.png.*reduce_zero_label is on"):
        SegFolder(images, masks, ["x", "y", "z"], reduce_zero_label=True)


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    images, masks = _seg_folder(tmp_path, {"a": np.zeros((10, 16))})
    with pytest.raises(ValueError, match=r"a\.png' is 16x12.*masks/a\.png' is 16x10"):
        SegFolder(images, masks, ["x", "y"])


def test_unreadable_image_and_colour_mask_are_named(tmp_path: Path) -> None:
    images, masks = _seg_folder(tmp_path, {"a": np.zeros((12, 16))})
    (images / "a.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"images/a\.png"):
        SegFolder(images, masks, ["x", "y"])
    images, masks = _seg_folder(tmp_path / "rgb", {"c": np.zeros((12, 16))})
    _save(masks / "c.png", np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(ImageReadError, match=r"c\.png.*single-channel"):
        SegFolder(images, masks, ["x", "y"])


def test_classes_file_with_bom_and_duplicates(tmp_path: Path) -> None:
    images, masks = _seg_folder(tmp_path, {"a": np.ones((12, 16))})
    names = tmp_path / "classes.txt"
    names.write_bytes("\ufeffsky\nroad\n\n".encode())
    assert SegFolder(images, masks, names).classes == ["sky", "road"]
    names.write_text("sky\nsky\n")
    with pytest.raises(ValueError, match="classes.txt.*'sky'"):
        SegFolder(images, masks, names)


# ---------------------------------------------------------------- COCO reader and errors


def _coco(tmp_path: Path, **overrides) -> tuple[Path, Path]:
    images = tmp_path / "imgs"
    for name in ("one.png", "empty.png"):
        _save(images / name, np.full((20, 30, 3), 128, np.uint8))
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "empty.png", "width": 30, "height": 20},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 7,
                "bbox": [2, 3, 10, 5],
                "segmentation": [[2, 3, 12, 3, 12, 8, 2, 8]],
            },
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [15, 1, 4, 6], "segmentation": [[15, 1, 19, 1, 19, 7]]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1, "segmentation": []},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [5, 5, 1, 8], "segmentation": [[5, 5, 6, 5, 6, 13]]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    data.update(overrides)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return images, ann


def test_coco_reads_boxes_labels_masks_and_empty_images(tmp_path: Path) -> None:
    images, ann = _coco(tmp_path)
    ds = CocoDetection(images, ann, masks=True)
    assert ds.classes == ["cat", "dog"] and ds.cat_ids == [3, 7] and sorted(ds.coco_api.getCatIds()) == [3, 7]
    image, target = ds[0]
    assert image.shape == (3, 20, 30) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # xywh -> xyxy; the crowd box and the 1-pixel-wide box are skipped; category 7 -> label 2, 3 -> 1
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0], [15.0, 1.0, 19.0, 7.0]]))
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (2, 20, 30) and target["masks"].dtype == torch.uint8
    assert target["masks"][0, 4:7, 3:11].all() and not target["masks"][0, 12:].any()
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 20, 30)
    assert empty["image_id"] == 2


def test_coco_errors_name_the_file(tmp_path: Path) -> None:
    images, ann = _coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(images, tmp_path / "nope.json")
    ann.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"instances\.json.*not valid JSON \(line 1"):
        CocoDetection(images, ann)
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"instances\.json.*\['categories'\]"):
        CocoDetection(images, ann)
    _, ann = _coco(tmp_path, categories=[])
    with pytest.raises(ValueError, match=r"instances\.json.*empty 'categories'"):
        CocoDetection(images, ann)
    _, ann = _coco(tmp_path, annotations=[])
    with pytest.raises(ValueError, match=r"instances\.json.*empty 'annotations'"):
        CocoDetection(images, ann)
    assert len(CocoDetection(images, ann, allow_empty=True)) == 2
    _, ann = _coco(tmp_path)
    (images / "empty.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 image.*instances\.json.*empty\.png"):
        CocoDetection(images, ann)
    bad = [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5]}]
    _, ann = _coco(tmp_path, annotations=bad)
    with pytest.raises(ValueError, match="annotation 1 has category_id 99"):
        CocoDetection(images, ann)


# ---------------------------------------------------------------- build_dense_datasets


def _cfg(**kw) -> SimpleNamespace:
    base = {"crop_size": 32, "scale": [64, 32], "hflip": 0.5, "mean": list(MEAN), "std": list(STD)}
    return SimpleNamespace(**{**base, **kw})


def test_build_dense_datasets_on_digit_scenes(scenes: Path) -> None:
    cfg = _cfg(dataset="digit_scenes", root=str(scenes), num_train=N_TRAIN, num_eval=N_VAL)
    train, evaluation, classes = build_dense_datasets(cfg, "segmentation")
    assert classes == list(SCENE_CLASSES) and len(train) == N_TRAIN and len(evaluation) == N_VAL
    image, mask = train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
    image, mask = evaluation[0]
    assert image.shape == (3, 32, 32) and mask.shape == (64, 64)  # eval mask at the original size
    train, evaluation, classes = build_dense_datasets(_cfg(**{**vars(cfg), "masks": True}), "detection")
    assert classes == [str(d) for d in range(10)] and len(evaluation) == N_VAL
    assert train[0][1]["masks"].shape[0] == len(train[0][1]["boxes"]) > 0


def test_build_dense_datasets_segfolder_and_coco(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _seg_folder(tmp_path / "seg" / "_" / split, {"a": np.ones((12, 16))})
        (tmp_path / "seg" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "seg" / "_" / split / "images").rename(tmp_path / "seg" / "images" / split)
        (tmp_path / "seg" / "masks").mkdir(exist_ok=True)
        (tmp_path / "seg" / "_" / split / "masks").rename(tmp_path / "seg" / "masks" / split)
    with pytest.raises(ValueError, match="classes.txt"):
        build_dense_datasets(_cfg(dataset="segfolder", root=str(tmp_path / "seg")), "segmentation")
    (tmp_path / "seg" / "classes.txt").write_text("bg\nthing\n")
    _, _, classes = build_dense_datasets(_cfg(dataset="segfolder", root=str(tmp_path / "seg")), "segmentation")
    assert classes == ["bg", "thing"]
    images, ann = _coco(tmp_path)
    cfg = _cfg(
        dataset="coco",
        root=str(tmp_path),
        train_ann=ann.name,
        eval_ann=str(ann),
        train_images="imgs",
        eval_images="imgs",
    )
    train, _, classes = build_dense_datasets(cfg, "detection")
    assert classes == ["cat", "dog"] and len(train) == 2


def test_build_dense_datasets_rejects_wrong_dataset_or_task() -> None:
    with pytest.raises(ValueError, match="ade20k, segfolder, digit_scenes"):
        build_dense_datasets(_cfg(dataset="voc"), "segmentation")
    with pytest.raises(ValueError, match="ade20k serves the segmentation task, not detection.*coco, digit_scenes"):
        build_dense_datasets(_cfg(dataset="ade20k", root="/x"), "detection")
    with pytest.raises(ValueError, match="unknown dense task"):
        build_dense_datasets(_cfg(dataset="coco"), "classification")


def test_binary_masks_of_0_and_255_are_background_and_object(tmp_path: Path) -> None:
    mask = np.zeros((12, 16))
    mask[3:8, 4:10] = 255  # a binary PNG as image tools save it
    for split in ("train", "val"):
        images, masks = _seg_folder(tmp_path / "_" / split, {"a": mask})
        for kind, folder in (("images", images), ("masks", masks)):
            (tmp_path / "seg" / kind).mkdir(parents=True, exist_ok=True)
            folder.rename(tmp_path / "seg" / kind / split)
    cfg = _cfg(dataset="segfolder", root=str(tmp_path / "seg"), binary_masks=True, hflip=0.0)
    _, evaluation, classes = build_dense_datasets(cfg, "segmentation")
    assert classes == ["background", "object"]
    labels = evaluation[0][1]
    assert set(labels.unique().tolist()) == {0, 1} and int((labels == 1).sum()) == 30
    # without the option the 255 pixels are the ignore index: nothing would be labelled
    plain = SegFolder(tmp_path / "seg" / "images" / "val", tmp_path / "seg" / "masks" / "val", ["bg", "x"])
    assert set(np.unique(plain.read(0)[1]).tolist()) == {0, 255}
    with pytest.raises(ValueError, match="2 classes"):
        SegFolder(plain.images_dir, plain.masks_dir, ["a", "b", "c"], binary=True)
