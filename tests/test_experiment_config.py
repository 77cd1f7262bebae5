"""Experiment configs: YAML <-> dataclasses, one level of _base_, type-checked --set overrides."""

from __future__ import annotations

import pytest
import yaml

from visionpeft.engine.experiment import ConfigError, load_config


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_and_overrides(tmp_path):
    _write(
        tmp_path / "base.yaml", {"model": {"name": "test_vit"}, "optimizer": {"lr": 0.01}, "method": {"name": "lora"}}
    )
    cfg_file = _write(
        tmp_path / "run.yaml", {"_base_": "base.yaml", "method": {"name": "adaptformer", "bottleneck": 8}}
    )
    cfg = load_config(
        cfg_file, ["optimizer.lr=3e-4", "schedule.epochs=5", "schedule.warmup_epochs=1", "method.scale=0.5"]
    )
    assert cfg.model.name == "test_vit"
    assert cfg.optimizer.lr == 3e-4 and cfg.schedule.epochs == 5
    assert cfg.method.method == "adaptformer" and cfg.method.bottleneck == 8 and cfg.method.scale == 0.5
    again = load_config(_write(tmp_path / "resolved.yaml", cfg.to_dict()))
    assert again == cfg


def test_misspelt_keys_suggest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'optimizer.lrr'; did you mean 'lr'"):
        load_config(None, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="unknown section 'optimiser'; did you mean 'optimizer'"):
        load_config(_write(tmp_path / "a.yaml", {"optimiser": {"lr": 1}}))
    msg = r"unknown key 'method.rnak' \(options of the method 'lora'\); did you mean 'rank'"
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["method.rnak=4"])
    with pytest.raises(ConfigError, match="method.name: unknown PEFT method 'lorra'"):
        load_config(None, ["method.name=lorra"])


def test_override_types_checked():
    with pytest.raises(ConfigError, match=r"schedule.epochs: expected int, got 'many'"):
        load_config(None, ["schedule.epochs=many"])
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected float"):
        load_config(None, ["optimizer.lr=[1]"])
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    assert load_config(None, ["optimizer.clip_grad=null"]).optimizer.clip_grad is None
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="rank must be > 0"):
        load_config(None, ["method.rank=0"])


def test_base_only_one_level_and_missing_files(tmp_path):
    _write(tmp_path / "root.yaml", {})
    _write(tmp_path / "mid.yaml", {"_base_": "root.yaml"})
    with pytest.raises(ConfigError, match="one level at most"):
        load_config(_write(tmp_path / "leaf.yaml", {"_base_": "mid.yaml"}))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="_base_ file not found"):
        load_config(_write(tmp_path / "x.yaml", {"_base_": "gone.yaml"}))
