#!/usr/bin/env python
"""Regenerate the VTAB-1k experiment configs in ``configs/vtab/`` from the method table.

Every variant that a method declares with full-scale (``paper``) options becomes one file per task for
ViT-B/16 (the papers' main table) and one file per backbone for Swin-B and ConvNeXt-B (choose the task
with ``--set data.task=...``), on each backbone that the method declares it supports. Names follow
``<method>-<hp>_<backbone>_<head>_<schedule>_<dataset>-<res>.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

import visionpeft as vp
from visionpeft.data.vtab import VTAB_TASKS
from visionpeft.engine.experiment import read_yaml

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {
    "vit-b16": "../_base_/vtab_vit-b16.yaml",
    "swin-b": "../_base_/vtab_swin-b.yaml",
    "convnext-b": "../_base_/vtab_convnext-b.yaml",
}


def _meta_model(base: str) -> torch.nn.Module:
    """The backbone of a base config, built on the meta device (no memory, no weights)."""
    import timm

    model = read_yaml(ROOT / "configs" / "vtab" / base)["model"]
    kwargs = dict(model.get("kwargs") or {})
    if model.get("img_size"):
        kwargs["img_size"] = model["img_size"]
    with torch.device("meta"):
        return timm.create_model(model["name"], pretrained=False, num_classes=10, **kwargs)


def method_list(backbone: str) -> list[tuple[str, dict, float | None]]:
    """``(file stem, method section, lr)`` of every variant with paper options that runs on ``backbone``."""
    model = _meta_model(BACKBONES[backbone])
    spec = vp.detect_backbone(model)
    out = []
    for name in vp.list_methods():
        method = vp.get_method(name)
        for v in method.variants:
            if v.paper is None:
                continue
            cfg = method.config_cls.from_dict(v.paper)
            if method.unsupported_reason(model, spec, cfg) is not None:
                continue
            try:
                method.sites(model, spec, cfg)
            except ValueError:  # e.g. qkv_slices on a backbone without a fused qkv
                continue
            out.append((v.stem or name, {"name": name, **v.paper}, v.paper_lr))
    return out


def write(path: Path, base: str, method: dict, task: str | None, lr: float | None) -> None:
    data: dict = {"_base_": base, "method": method}
    if task:
        data["data"] = {"task": task}
    if lr is not None:
        data["optimizer"] = {"lr": lr}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def main(out: Path | None = None) -> int:
    """Write every config into ``out`` (default ``configs/vtab``), replacing the old ones; returns the count."""
    out = out or ROOT / "configs" / "vtab"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    n = 0
    for backbone, base in BACKBONES.items():
        for stem, method, lr in method_list(backbone):
            tasks = VTAB_TASKS if backbone == "vit-b16" else [None]
            for task in tasks:
                ds = f"vtab-{task}" if task else "vtab"
                write(out / f"{stem}_{backbone}_linear_100ep_{ds}-224.yaml", base, method, task, lr)
                n += 1
    print(f"wrote {n} configs to {out}")
    return n


if __name__ == "__main__":
    main()
