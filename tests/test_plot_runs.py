"""tools/plot_runs.py: loss / accuracy / learning-rate curves of run folders (their log.jsonl) in one PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("plot_runs_tool", ROOT / "tools" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, epochs: int = 6, steps_per_epoch: int = 4, peak: float = 1e-2, acc: float = 60.0) -> Path:
    """A log.jsonl as the trainer writes it: step records, epoch records with top1 every 2 epochs."""
    folder.mkdir(parents=True)
    lines, step = [], 0
    total = epochs * steps_per_epoch
    for e in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            lr = peak * (step / 4 if step < 4 else 0.5 * (1 + math.cos(math.pi * step / total)))
            lines.append({"epoch": e, "step": step, "loss": 2.0 / (1 + 0.3 * step), "lr": lr, "img_per_s": 900.0})
        rec = {"epoch": e, "step": step, "train_loss": 2.0 / (1 + 0.3 * step)}
        if e % 2 == 0:
            rec.update(top1=acc * (1 - 0.5**e), eval_loss=1.8 / (1 + 0.2 * step), eval_samples=200)
        lines.append(rec)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_two_runs_overlaid_in_one_png(tmp_path):
    a = write_run(tmp_path / "lora-r4", acc=80.0)
    b = write_run(tmp_path / "vpt-deep", peak=3e-3, acc=55.0)
    out = tmp_path / "both.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "tools/plot_runs.py", str(a), str(b), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[1] > 2 * img.shape[0] > 800  # three panels side by side
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's first two colours: both runs drawn
        close = (np.abs(img - np.array(color)).sum(-1) < 30).sum()
        assert close > 500, color


def test_read_log_resume_and_bad_lines(tmp_path, capsys):
    tool = _tool()
    run = write_run(tmp_path / "r", epochs=4)
    with open(run / "log.jsonl", "a") as fh:  # killed after epoch 4, resumed from the epoch-2 checkpoint
        fh.write('{"epoch": 5, "step": 17, "loss": 0.1, "lr"')  # half-written line of the killed run
        fh.write("\n" + json.dumps({"event": "resume", "from": "last.ckpt", "epoch": 2, "step": 8}) + "\n")
        fh.write(json.dumps({"epoch": 3, "step": 9, "loss": 5.0, "lr": 1e-3}) + "\n")
        fh.write(json.dumps({"epoch": 3, "step": 12, "train_loss": 4.0}) + "\n")
    log = tool.read_log(run)
    assert [r["step"] for r in log["steps"]] == list(range(1, 9)) + [9]  # the lost steps 9..16 replaced
    assert [r["epoch"] for r in log["epochs"]] == [1, 2, 3] and log["epochs"][-1]["train_loss"] == 4.0
    assert "skipped 1 unreadable line" in capsys.readouterr().err


def test_default_output_labels_and_errors(tmp_path, capsys):
    tool = _tool()
    run = write_run(tmp_path / "one")
    assert tool.main([str(run)]) == 0 and (run / "curves.png").is_file()
    assert Image.open(run / "curves.png").format == "PNG"
    assert tool._labels([tmp_path / "a" / "run", tmp_path / "b" / "run", run]) == [
        str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "one",
    ]  # fmt: skip
    assert tool.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "'" + str(tmp_path / "nope") + "' does not exist; expected a folder written by" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert tool.main([str(tmp_path / "empty")]) == 2
    assert "holds no log.jsonl" in capsys.readouterr().err
    (tmp_path / "empty" / "log.jsonl").write_text("\n")
    assert tool.main([str(tmp_path / "empty")]) == 2
    assert "holds no training record yet" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
