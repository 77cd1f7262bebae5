"""Users' own data: ImageFolder trees, path,label CSVs, any-name VTAB folders, list-file encodings, 16-bit PNGs,
timm augmentation and mixup (off by default), all through ``build_datasets`` of a data config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data import load_digits
from visionpeft.data.augment import BatchMixup, build_mixup, train_transform
from visionpeft.data.build import build_datasets, vtab_transform
from visionpeft.data.files import ImageReadError, load_rgb
from visionpeft.data.folders import CSVDataset, ImageFolderDataset
from visionpeft.data.vtab import VTABDataset, make_vtab_task_from_arrays
from visionpeft.engine.experiment import ConfigError, DataConfig, load_config

NAMES = ("zero", "one", "two")  # the folder of digit d is NAMES[d]
CLASSES = sorted(NAMES)  # ImageFolder numbers the class folders in sorted order: one=0, two=1, zero=2


@pytest.fixture(scope="module")
def digit_images() -> dict[int, list[np.ndarray]]:
    """Real MNIST digits (uint8 28 x 28), 12 of each of the digits 0, 1, 2."""
    x, y = load_digits()
    out = {}
    for d in range(3):
        idx = torch.nonzero(y == d).flatten()[:12]
        out[d] = [(x[i, 0] * 255).round().to(torch.uint8).numpy() for i in idx]
    return out


def write_image_folder(root: Path, digit_images, n_train: int = 8, n_val: int = 4, val: str = "val") -> Path:
    for d, name in enumerate(NAMES):
        for split, sl in (("train", slice(0, n_train)), (val, slice(n_train, n_train + n_val))):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(digit_images[d][sl]):
                Image.fromarray(img).save(folder / f"{name}_{k:02d}.png")
    return root


def data_cfg(**kw) -> DataConfig:
    base = dict(img_size=32, num_workers=0, mean=[0.5] * 3, std=[0.5] * 3)
    return DataConfig(**{**base, **kw})


# ImageFolder ----------------------------------------------------------------------------------------------------


def test_imagefolder_classes_labels_and_pixels(tmp_path, digit_images):
    root = write_image_folder(tmp_path / "mine", digit_images)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders and files are no classes / images
    Image.fromarray(digit_images[0][0]).save(root / "train" / "one" / "._hidden.png")
    train, evaluation, n, task = build_datasets(data_cfg(dataset="imagefolder", root=str(root)))
    assert (n, task, train.classes, evaluation.classes) == (3, "mine", CLASSES, CLASSES)
    assert (len(train), len(evaluation), evaluation.split) == (24, 12, "val")
    assert sorted(set(train.targets)) == [0, 1, 2] and train.targets.count(1) == 8
    # labels follow the class folders, pixels the files
    path, label = train.samples[9]
    assert CLASSES[label] == Path(path).parent.name
    x, y = evaluation[5]
    ref = torch.from_numpy(np.asarray(Image.open(evaluation.samples[5][0]), dtype=np.float32) / 255)
    assert y == evaluation.samples[5][1] and x.shape == (3, 32, 32)
    raw = ImageFolderDataset(root / "val", transform=lambda im: im, class_to_idx=train.class_to_idx)[5][0]
    assert raw.mode == "RGB" and np.array_equal(np.asarray(raw)[..., 0], (ref.numpy() * 255).round())


def test_imagefolder_eval_uses_training_labels_and_test_fallback(tmp_path, digit_images, capsys):
    root = write_image_folder(tmp_path / "d", digit_images, val="test")
    for p in (root / "test" / "one").iterdir():  # the evaluation split lacks a class: labels must not shift
        p.unlink()
    (root / "test" / "one").rmdir()
    train, evaluation, n, _ = build_datasets(data_cfg(dataset="imagefolder", root=str(root)))
    assert "evaluating on test/" in capsys.readouterr().out and evaluation.split == "test"
    assert n == 3 and evaluation.classes == CLASSES
    assert sorted(set(evaluation.targets)) == [1, 2]  # 'two' keeps label 1 although 'one' (0) is absent
    (root / "test" / "seven").mkdir()
    Image.fromarray(digit_images[0][0]).save(root / "test" / "seven" / "a.png")
    with pytest.raises(ValueError, match=r"class folders 'seven' do not exist in the training split"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root)))


def test_imagefolder_errors_show_the_layout(tmp_path, digit_images):
    with pytest.raises(FileNotFoundError, match=r"(?s)'.*nope' does not exist.*<root>/train/<class name>"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(tmp_path / "nope")))
    root = write_image_folder(tmp_path / "d", digit_images)
    with pytest.raises(ValueError, match=r"data.num_classes=5, but .* holds 3 class folders"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root), num_classes=5))
    with pytest.raises(FileNotFoundError, match=r"no 'train' folder \(folders found: one, two, zero\)\..*parent"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root / "train")))
    (root / "train" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)no valid file for the classes empty.*expected ImageFolder"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root)))
    (root / "train" / "empty").rmdir()
    for p in (root / "val").rglob("*.png"):
        p.rename(p.with_suffix(".txt"))
    with pytest.raises(FileNotFoundError, match=r"'.*val' holds no image files"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root)))
    with pytest.raises(ValueError, match=r"data.root is not set: data.dataset=imagefolder"):
        build_datasets(data_cfg(dataset="imagefolder"))


# CSV ------------------------------------------------------------------------------------------------------------


def _csv_tree(tmp_path: Path, digit_images) -> Path:
    root = write_image_folder(tmp_path / "csvdata", digit_images)
    return root


def test_csv_names_integers_header_and_bom(tmp_path, digit_images):
    root = _csv_tree(tmp_path, digit_images)
    rows = [(f"train/{n}/{n}_{k:02d}.png", n) for n in NAMES for k in range(8)]
    text = "path,label\n" + "".join(f"{p},{n}\n" for p, n in rows)
    (root / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8": a byte-order mark
    (root / "val.csv").write_text("".join(f"val/{n}/{n}_{k:02d}.png,{n}\n" for n in ("two", "one") for k in range(4)))
    cfg = data_cfg(dataset="csv", root=str(root), train_csv="train.csv", eval_csv="val.csv")
    train, evaluation, n, task = build_datasets(cfg)
    assert (n, task, train.classes, len(train), len(evaluation)) == (3, "csvdata", ["one", "two", "zero"], 24, 8)
    assert evaluation.targets == [1] * 4 + [0] * 4  # names numbered in sorted order from the training CSV
    assert train.samples[0][0] == root / "train/zero/zero_00.png" and train.targets[0] == 2
    assert train[0][0].shape == (3, 32, 32)
    # integer labels, no header, absolute CSV paths; class count read from the labels
    (tmp_path / "t.csv").write_text("".join(f"{root}/{p},{NAMES.index(n)}\n" for p, n in rows))
    cfg = data_cfg(dataset="csv", train_csv=str(tmp_path / "t.csv"), eval_csv=str(tmp_path / "t.csv"))
    train, _, n, _ = build_datasets(cfg)
    assert n == 3 and train.classes is None and train.targets[:9] == [0] * 8 + [1]
    assert build_datasets(dataclasses.replace(cfg, num_classes=10))[2] == 10


def test_csv_errors_name_file_and_line(tmp_path, digit_images):
    root = _csv_tree(tmp_path, digit_images)
    good = "train/one/one_00.png,one\ntrain/two/two_00.png,two\n"
    (root / "train.csv").write_text(good)

    def build(eval_text: str | bytes, **kw):
        f = root / "val.csv"
        f.write_bytes(eval_text if isinstance(eval_text, bytes) else eval_text.encode())
        return build_datasets(data_cfg(dataset="csv", root=str(root), train_csv="train.csv", eval_csv="val.csv", **kw))

    with pytest.raises(FileNotFoundError, match=r"val\.csv:2: image 'val/one/gone\.png' not found.*1 of 2"):
        build("val/one/one_00.png,one\nval/one/gone.png,one\n")
    with pytest.raises(ValueError, match=r"val\.csv:1: class 'three' is not a class of the training data"):
        build("val/one/one_00.png,three\n")
    with pytest.raises(ValueError, match=r"val\.csv:2: expected 2 cells 'path,label', got 3"):
        build("val/one/one_00.png,one\nval/one/one_01.png,one,x\n")
    with pytest.raises(ValueError, match=r"'.*val\.csv' is not UTF-8 \(line 1: bytes b'\\xe9"):
        build("val/one/caf\xe9.png,one\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"'.*val\.csv' is UTF-16 encoded"):
        build("val/one/one_00.png,one\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"'.*val\.csv' lists no images"):
        build("path,label\n\n")
    with pytest.raises(ValueError, match=r"data\.num_classes=4, but the training CSV .* names 2 classes"):
        build("val/one/one_00.png,one\n", num_classes=4)
    (root / "train.csv").write_text("train/one/one_00.png,0\ntrain/two/two_00.png,1\n")
    with pytest.raises(ValueError, match=r"val\.csv:1: label 'one' is not an integer"):
        build("val/one/one_00.png,one\n")
    with pytest.raises(ValueError, match=r"val\.csv:1: label 3 outside \[0, 2\)"):
        build("val/one/one_00.png,3\n", num_classes=2)
    with pytest.raises(FileNotFoundError, match=r"data\.eval_csv: CSV file '.*nothere\.csv' not found \(relative"):
        build_datasets(data_cfg(dataset="csv", root=str(root), train_csv="train.csv", eval_csv="nothere.csv"))
    with pytest.raises(ValueError, match=r"data\.train_csv is not set"):
        build_datasets(data_cfg(dataset="csv", eval_csv="x.csv"))
    with pytest.raises(ValueError, match=r"data\.train_csv is only read with data\.dataset=csv"):
        build_datasets(data_cfg(dataset="imagefolder", root=str(root), train_csv="train.csv"))
    with pytest.raises(ValueError, match=r"data\.dataset: unknown dataset 'folder'; use one of vtab, digits"):
        build_datasets(data_cfg(dataset="folder"))


# VTAB layout with any name, list-file encodings -------------------------------------------------------------------


def _vtab_task(tmp_path: Path, digit_images, name: str = "my_scans") -> Path:
    images = np.stack([digit_images[d][k] for k in range(6) for d in range(3)])  # 18 images, classes interleaved
    labels = np.array([d for _ in range(6) for d in range(3)])
    make_vtab_task_from_arrays(tmp_path, name, images, labels, splits=(6, 6, 6))
    return tmp_path / name


def test_vtab_layout_with_any_name_reads_its_class_count(tmp_path, digit_images):
    _vtab_task(tmp_path, digit_images)
    train, evaluation, n, task = build_datasets(data_cfg(dataset="vtab", root=str(tmp_path), task="my_scans"))
    assert (n, task, len(train), len(evaluation)) == (3, "my_scans", 12, 6)
    assert build_datasets(data_cfg(dataset="vtab", root=str(tmp_path), task="my_scans", num_classes=7))[2] == 7
    with pytest.raises(ValueError, match=r"train800val200\.txt:\d+: label 2 outside \[0, 2\).*data\.num_classes"):
        build_datasets(data_cfg(dataset="vtab", root=str(tmp_path), task="my_scans", num_classes=2))
    with pytest.raises(ValueError, match=r"data\.num_classes: a class count >= 1"):
        build_datasets(data_cfg(dataset="vtab", root=str(tmp_path), task="my_scans", num_classes=0))
    with pytest.raises(FileNotFoundError, match=r"(?s)no folder for VTAB task 'cifar10' .*did you mean 'cifar100'"):
        build_datasets(data_cfg(dataset="vtab", root=str(tmp_path), task="cifar10"))


def test_vtab_list_with_byte_order_mark_is_read(tmp_path, digit_images):
    task = _vtab_task(tmp_path, digit_images, "eurosat")
    f = task / "test.txt"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())  # failed before: "\ufeffimages/test/000000.png" not found
    ds = VTABDataset(tmp_path, "eurosat", "test")
    assert ds.samples[0][0] == task / "images/test/000000.png" and len(ds) == 6


def test_vtab_list_in_another_encoding_is_refused_naming_the_file(tmp_path, digit_images):
    task = _vtab_task(tmp_path, digit_images, "eurosat")
    (task / "images/test/caf\xe9.png").write_bytes((task / "images/test/000000.png").read_bytes())
    (task / "test.txt").write_bytes("images/test/caf\xe9.png 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"VTAB list file '.*test\.txt' is not UTF-8 \(line 1.*iconv"):
        VTABDataset(tmp_path, "eurosat", "test")


# 16-bit images ----------------------------------------------------------------------------------------------------


def _png16(path: Path) -> np.ndarray:
    ramp = (np.arange(64 * 64, dtype=np.int64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    return ramp


def test_16bit_png_keeps_its_range(tmp_path, digit_images):
    task = _vtab_task(tmp_path, digit_images, "eurosat")
    ramp = _png16(task / "images/test/000000.png")  # a 16-bit scan in place of the first test image
    ds = VTABDataset(tmp_path, "eurosat", "test", transform=lambda im: im)
    img = np.asarray(ds[0][0])
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert np.array_equal(img[..., 0], np.rint(ramp / 257.0).astype(np.uint8))  # scaled, not clipped at 255
    assert len(np.unique(img)) > 200  # a plain convert("RGB") leaves 17 grey levels
    # the same through the default transform and the user-data loader
    x = VTABDataset(tmp_path, "eurosat", "test")[0][0]
    assert abs(x.max().item() - 1.0) < 1e-6 and x.min().item() == 0.0 and len(torch.unique(x)) > 200
    assert np.array_equal(np.asarray(load_rgb(task / "images/test/000000.png")), img)


def test_unreadable_and_unsupported_images_name_the_file(tmp_path):
    big = tmp_path / "i32.tif"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(big)
    with pytest.raises(ImageReadError, match=r"'.*i32\.tif' is a 32-bit integer image with values in \[70000"):
        load_rgb(big)
    flt = tmp_path / "f.tif"
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(flt)
    with pytest.raises(ImageReadError, match=r"'.*f\.tif' has floating-point pixels"):
        load_rgb(flt)
    broken = tmp_path / "broken.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(broken)
    broken.write_bytes(broken.read_bytes()[:500])  # truncated in the middle of its pixel data
    with pytest.raises(ImageReadError, match=r"cannot read image '.*broken\.png'"):
        load_rgb(broken)
    (tmp_path / "list.csv").write_text("broken.png,0\n")
    ds = CSVDataset(tmp_path / "list.csv", num_classes=1)
    with pytest.raises(OSError, match=r"broken\.png.*listed in .*list\.csv"):
        ds[0]


# augmentation and mixup -------------------------------------------------------------------------------------------


def test_default_training_transform_is_the_vtab_protocol(tmp_path, digit_images):
    cfg = data_cfg()
    tf, ref = train_transform(cfg), vtab_transform(32, [0.5] * 3, [0.5] * 3)
    assert repr(tf) == repr(ref)
    img = Image.fromarray(np.stack([digit_images[1][0]] * 3, axis=-1)).resize((40, 50))
    assert torch.equal(tf(img), ref(img))
    assert build_mixup(cfg, 3) is None
    # the shipped configs keep it exact too
    shipped = load_config(Path(__file__).resolve().parents[1] / "configs/_base_/vtab_vit-b16.yaml").data
    assert repr(train_transform(shipped)) == repr(vtab_transform(224, shipped.mean, shipped.std))


def test_augmentation_is_timm_and_for_training_only(tmp_path, digit_images):
    root = write_image_folder(tmp_path / "d", digit_images)
    cfg = data_cfg(
        dataset="imagefolder", root=str(root), auto_augment="rand-m9-mstd0.5", hflip=0.5,
        random_resized_crop=[0.5, 1.0], random_erasing=0.25,
    )  # fmt: skip
    train, evaluation, _, _ = build_datasets(cfg)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing"
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])  # random
    assert repr(evaluation.transform) == repr(vtab_transform(32, cfg.mean, cfg.std))
    assert torch.equal(evaluation[0][0], evaluation[0][0])
    no_crop = train_transform(data_cfg(vflip=1.0))  # without a crop: the protocol's square resize, then flips
    assert [type(t).__name__ for t in no_crop.transforms][:2] == ["Resize", "RandomVerticalFlip"]
    img = Image.fromarray(np.stack([digit_images[2][0]] * 3, axis=-1))
    assert torch.equal(no_crop(img), vtab_transform(32, [0.5] * 3, [0.5] * 3)(img).flip(1))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.auto_augment=rand-x9", r"data\.auto_augment: timm cannot read the policy 'rand-x9'"),
        ("data.auto_augment=nonsense", r"data\.auto_augment: timm cannot read the policy 'nonsense'"),
        ("data.hflip=1.5", r"data\.hflip: a probability in \[0, 1\], got 1\.5"),
        ("data.random_resized_crop=[0.5]", r"data\.random_resized_crop: \[min, max\]"),
        ("data.random_resized_crop=[0.9, 0.2]", r"data\.random_resized_crop: \[min, max\]"),
        ("data.mixup=-1", r"data\.mixup: must be >= 0"),
        ("data.mixup_prob=2", r"data\.mixup_prob: a probability in \[0, 1\]"),
    ],
)
def test_bad_augmentation_settings_name_the_key(override, message):
    cfg = load_config(None, ["data.dataset=digits", "data.img_size=32", override])
    with pytest.raises(ValueError, match=message):
        train_transform(cfg.data)
    if "mixup" in override:
        with pytest.raises(ValueError, match=message):
            build_mixup(cfg.data, 5)


def test_config_keys_are_typed():
    cfg = load_config(None, ["data.random_resized_crop=[0.08, 1]", "data.num_classes=12", "data.cutmix=1"])
    assert cfg.data.random_resized_crop == [0.08, 1.0] and cfg.data.num_classes == 12 and cfg.data.cutmix == 1.0
    with pytest.raises(ConfigError, match=r"data\.hflip: expected float"):
        load_config(None, ["data.hflip=often"])


def test_mixup_soft_targets_odd_batches_and_numpy_state():
    from timm.loss import SoftTargetCrossEntropy

    mix = build_mixup(data_cfg(mixup=0.8, cutmix=1.0), 4)
    assert isinstance(mix, BatchMixup)
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    torch.manual_seed(0)
    xm, t = mix(x, y)
    assert np.array_equal(np.random.get_state()[1], before)  # the global NumPy stream is left alone
    assert xm.shape == x.shape and t.shape == (7, 4) and torch.allclose(t.sum(1), torch.ones(7))
    assert not torch.equal(xm[:6], x[:6]) and torch.equal(xm[6], x[6])  # odd batch: the last image unmixed
    assert torch.equal(t[6], torch.eye(4)[2])
    assert (t[:6].max(1).values < 1).all()  # mixed targets are soft
    torch.manual_seed(0)
    xm2, t2 = mix(x, y)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)  # reproducible from torch's RNG (saved by checkpoints)
    logits = torch.randn(7, 4)
    assert mix.loss(logits, t) == pytest.approx(SoftTargetCrossEntropy()(logits, t).item())
    ref = -(t * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert mix.loss(logits, t).item() == pytest.approx(ref.item(), rel=1e-6)


def test_trainer_mixes_training_batches_only(tmp_path, digit_images):
    from visionpeft.engine.trainer import Trainer

    root = write_image_folder(tmp_path / "d", digit_images)
    cfg = load_config(
        None,
        [
            "model.name=test_vit", "model.kwargs={img_size: 32}", "method.name=lora", "method.rank=2",
            "data.dataset=imagefolder", f"data.root={root}", "data.img_size=32", "data.batch_size=8",
            "data.num_workers=0", "data.mixup=0.8", "data.cutmix=1.0", "data.hflip=0.5",
            "schedule.epochs=1", "schedule.warmup_epochs=0", "runtime.device=cpu", "runtime.threads=1",
            f"runtime.out_dir={tmp_path / 'run'}", "runtime.log_every=1",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    calls: list[tuple[int, ...]] = []
    mix = trainer.mixup

    def counting(x, y):
        calls.append(tuple(x.shape))
        return mix(x, y)

    counting.loss = mix.loss
    trainer.mixup = counting
    result = trainer.fit()
    assert calls == [(8, 3, 32, 32)] * 3  # 24 training images, batches of 8; the 12 evaluation images never
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logs if "loss" in r)
    assert result["eval_samples"] == 12
    assert json.loads((tmp_path / "run" / "adapter" / "classes.json").read_text()) == CLASSES
