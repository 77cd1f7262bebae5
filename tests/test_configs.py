"""Every shipped experiment config loads, and its method fits its backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import visionpeft as vp
from visionpeft.data.vtab import VTAB_TASKS, resolve_task
from visionpeft.engine.build import build_backbone
from visionpeft.engine.experiment import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))
CONFIGS = [c for c in CONFIGS if c.parent.name != "_base_"]


def test_every_config_loads_and_is_named_by_convention():
    assert len(CONFIGS) > 250
    vit_tasks = set()
    for path in CONFIGS:
        cfg = load_config(path)
        parts = path.stem.split("_")
        resolution = {  # the input size in the name: the crop (segmentation), the short side (detection)
            "classification": cfg.data.img_size,
            "segmentation": cfg.data.crop_size,
            "detection": cfg.task.head_kwargs.get("min_size"),
            "sam_prompt": cfg.data.crop_size,
            "sam_semantic": cfg.data.crop_size,
        }[cfg.task.name]
        assert parts[-1].split("-")[-1] == str(resolution), path.name
        assert path.stem.startswith(cfg.method.method), path.name
        if "vit-b16" in path.stem:
            vit_tasks.add((cfg.method.method, resolve_task(cfg.data.task)))
    methods = {m for m, _ in vit_tasks}
    assert methods >= set(vp.list_methods()) - {"conv_adapter"}
    for m in methods:
        assert {t for mm, t in vit_tasks if mm == m} == set(VTAB_TASKS)


def _one_per_method_and_backbone():
    seen, out = set(), []
    for path in CONFIGS:
        cfg = load_config(path)
        key = (cfg.method.method, cfg.model.name, str(cfg.method), str(cfg.task))
        if key not in seen:
            seen.add(key)
            out.append(path)
    return out


@pytest.mark.parametrize("path", _one_per_method_and_backbone(), ids=lambda p: p.stem)
def test_config_builds_on_meta_device(path):
    cfg = load_config(path, ["model.pretrained=false", "model.pretrained_file=null"])
    with torch.device("meta"):
        if cfg.task.sam:  # the whole SAM (1024: ViT-B) with its adapter and decoder, as the task builds it
            from visionpeft.engine.tasks import make_task

            model = make_task(cfg).build_model(150)
        elif cfg.task.dense:  # the whole dense model: adapted backbone, neck, head (150 classes, as ADE20K)
            from visionpeft.engine.tasks import SegmentationTask, build_dense_backbone, dense_spec

            task = SegmentationTask(cfg) if cfg.task.name == "segmentation" else None
            if task is not None:  # the task's own builder (linear_probe: the frozen backbone)
                model = task.build_model(150)
            else:
                model = vp.DenseModel(
                    vp.get_peft_model(build_dense_backbone(cfg), cfg.method), dense_spec(cfg, 80, None)
                )
        else:
            model = vp.get_peft_model(build_backbone(cfg.model, 10), cfg.method)
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable <= total


def test_demo_configs_rebuild_the_embedded_backbone():
    from visionpeft.engine.pretrain import BACKBONE_ARGS

    demo = CONFIGS[0].parents[1]
    for path in sorted([*demo.glob("demo/*.yaml"), *demo.glob("demo-seg/*.yaml"), *demo.glob("demo-det/*.yaml")]):
        cfg = load_config(path)
        name, kwargs = BACKBONE_ARGS[cfg.model.pretrained_file.split(":", 1)[1]]
        assert (cfg.model.name, cfg.model.kwargs) == (name, kwargs), path.name
