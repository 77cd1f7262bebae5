"""tools/predict.py end to end: train on a tiny ImageFolder of real digits, then classify images with the adapter."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import visionpeft as vp
from visionpeft.data import load_digits
from visionpeft.data.build import eval_transform
from visionpeft.data.files import load_rgb
from visionpeft.engine.build import build_backbone
from visionpeft.engine.experiment import load_config
from visionpeft.engine.trainer import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
NAMES = ("zero", "one", "two")
CLASSES = sorted(NAMES)


def _tool():
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A LoRA run (dropout 0.1) of 2 epochs on 3 digit classes in an ImageFolder tree (8 train, 4 val each)."""
    tmp = tmp_path_factory.mktemp("predict")
    x, y = load_digits()
    for d, name in enumerate(NAMES):
        idx = torch.nonzero(y == d).flatten()[:12]
        for k, i in enumerate(idx.tolist()):
            folder = tmp / "images" / ("train" if k < 8 else "val") / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy()).save(folder / f"{k:02d}.png")
    cfg = {
        "model": {"name": "test_vit", "kwargs": {"img_size": 32}},
        "method": {"name": "lora", "rank": 2, "dropout": 0.1},
        "data": {
            "dataset": "imagefolder", "root": str(tmp / "images"), "img_size": 32, "batch_size": 8,
            "num_workers": 0, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        },
        "optimizer": {"lr": 0.01},
        "schedule": {"epochs": 2, "warmup_epochs": 0},
        "runtime": {"out_dir": str(tmp / "run"), "device": "cpu", "threads": 1, "seed": 3},
    }  # fmt: skip
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    Trainer(load_config(tmp / "cfg.yaml"), progress=False).fit()
    return tmp / "run"


def reference(run: Path, images: list[Path]) -> torch.Tensor:
    """Class probabilities (N, 3) of the trained adapter, computed here without the tool (hooks, eval mode)."""
    cfg = load_config(run / "config.yaml")
    seed_everything(cfg.runtime.seed)
    model = vp.load_adapter(build_backbone(cfg.model, 3), run / "adapter").eval()
    tf = eval_transform(cfg.data)
    with torch.no_grad():
        return model(torch.stack([tf(load_rgb(p)) for p in images])).softmax(-1)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(path.open(encoding="utf-8")))
    return rows[0], rows[1:]


def test_predict_cli_top_k_with_class_names(run, tmp_path):
    val = run.parent / "images" / "val"
    single = val / "two" / "08.png"
    out = tmp_path / "preds.csv"
    r = subprocess.run(
        [sys.executable, "tools/predict.py", "--adapter", str(run), str(val), str(single), "--top-k", "2"]
        + ["--out", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "lora, merged into the weights" in r.stdout and f"wrote {out}" in r.stdout
    header, rows = read_csv(out)
    assert header == ["image", "class_1", "index_1", "prob_1", "class_2", "index_2", "prob_2"]
    images = sorted(val.rglob("*.png")) + [single]
    assert [Path(row[0]) for row in rows] == images and len(rows) == 13
    probs = reference(run, images)
    for row, p in zip(rows, probs, strict=True):
        top = p.argsort(descending=True)[:2].tolist()
        assert [int(row[2]), int(row[5])] == top  # the model's argmax, then the runner-up
        assert [row[1], row[4]] == [CLASSES[top[0]], CLASSES[top[1]]]  # names from classes.json
        assert float(row[3]) == pytest.approx(p[top[0]].item(), abs=2e-6)
        assert float(row[6]) == pytest.approx(p[top[1]].item(), abs=2e-6)
    top1 = CLASSES[int(probs[-1].argmax())]
    assert f"{single}: {top1} {100 * probs[-1].max().item():.1f}%, " in r.stdout  # printed too
    assert len(set(int(row[2]) for row in rows)) > 1  # not a constant answer


def test_predict_with_model_name_no_merge_and_index_names(run, tmp_path, capsys):
    adapter = tmp_path / "adapter"  # the adapter alone: no config.yaml, no classes.json
    shutil.copytree(run / "adapter", adapter)
    (adapter / "classes.json").unlink()
    images = sorted((run.parent / "images" / "val" / "one").glob("*.png"))
    out = tmp_path / "p.csv"
    args = ["--adapter", str(adapter), *map(str, images), "--model", "test_vit", "--img-size", "32"]
    code = _tool().main(args + ["--seed", "3", "--no-merge", "--top-k", "9", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "lora, kept as hooks" in capsys.readouterr().out
    header, rows = read_csv(out)
    assert len(header) == 1 + 3 * 3  # top-k capped at the 3 classes of the head (read from the adapter)
    probs = reference(run, images)
    for row, p in zip(rows, probs, strict=True):
        assert row[1] == row[2] == str(int(p.argmax()))  # no class names: the index
        assert float(row[3]) == pytest.approx(p.max().item(), abs=2e-6)
        assert sum(float(v) for v in row[3::3]) == pytest.approx(1.0, abs=1e-5)


def test_predict_errors_name_the_input(run, tmp_path, capsys):
    tool = _tool()
    image = run.parent / "images" / "val" / "one" / "08.png"

    def err(*args: str) -> str:
        assert tool.main([*args, "--out", str(tmp_path / "x.csv")]) == 2
        return capsys.readouterr().err

    assert f"image {str(tmp_path / 'gone.png')!r} not found" in err("--adapter", str(run), str(tmp_path / "gone.png"))
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in err("--adapter", str(run), str(tmp_path / "empty"))
    msg = err("--adapter", str(tmp_path / "empty"), str(image))
    assert "is not an adapter folder: expected adapter_config.json" in msg and "run folder holding adapter/" in msg
    shutil.copytree(run / "adapter", tmp_path / "lone")
    assert "pass --config" in err("--adapter", str(tmp_path / "lone"), str(image))
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:40])
    assert f"cannot read image {str(broken)!r}" in err("--adapter", str(run), str(image), str(broken))
    assert not (tmp_path / "x.csv").exists()
