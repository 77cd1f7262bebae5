#!/usr/bin/env python
"""Regenerate the VTAB-1k experiment configs in ``configs/vtab/`` from one table.

One file per (method, task) for ViT-B/16 (the papers' main table) and one per method for Swin-B and
ConvNeXt-B (choose the task with ``--set data.task=...``). Names follow
``<method>-<hp>_<backbone>_<head>_<schedule>_<dataset>-<res>.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# (file stem, method section) per backbone; hyper-parameters as in the papers' VTAB-1k settings
VIT_METHODS = [
    ("lora-r8-qv", {"name": "lora", "rank": 8, "alpha": 8, "qkv_slices": "qv"}),
    ("dora-r8-qv", {"name": "dora", "rank": 8, "alpha": 8, "qkv_slices": "qv"}),
    ("adaptformer-b64", {"name": "adaptformer", "bottleneck": 64, "scale": 0.1}),
    ("parallel_adapter-b8", {"name": "parallel_adapter", "bottleneck": 8, "scale": 1.0}),
    ("adapter-houlsby-b8", {"name": "adapter", "bottleneck": 8, "placement": "houlsby"}),
    ("adapter-pfeiffer-b8", {"name": "adapter", "bottleneck": 8, "placement": "pfeiffer"}),
    ("vpt-shallow-t10", {"name": "vpt", "num_tokens": 10, "deep": False, "dropout": 0.1}),
    ("vpt-deep-t10", {"name": "vpt", "num_tokens": 10, "deep": True, "dropout": 0.1}),
    ("bitfit", {"name": "bitfit"}),
    ("ssf", {"name": "ssf"}),
    ("ln_tune", {"name": "ln_tune"}),
    ("linear_probe", {"name": "linear_probe"}),
    ("full", {"name": "full"}),
]
_NOT_ON_HIERARCHICAL = ("vpt",)
CNN_ONLY = [
    ("conv_adapter-block-par", {"name": "conv_adapter", "level": "block", "mode": "parallel", "reduction": 4}),
    ("conv_adapter-stage-seq", {"name": "conv_adapter", "level": "stage", "mode": "sequential", "reduction": 4}),
]
BACKBONES = {
    "vit-b16": "../_base_/vtab_vit-b16.yaml",
    "swin-b": "../_base_/vtab_swin-b.yaml",
    "convnext-b": "../_base_/vtab_convnext-b.yaml",
}
LR = {"full": 1e-4, "linear_probe": 1e-2}


def method_list(backbone: str) -> list[tuple[str, dict]]:
    if backbone == "vit-b16":
        return VIT_METHODS
    out = [(s, m) for s, m in VIT_METHODS if m["name"] not in _NOT_ON_HIERARCHICAL]
    if backbone == "convnext-b":
        out = [(s, m) for s, m in out if m["name"] != "adapter" and "qkv_slices" not in m]
        lora = [
            ("lora-r8", {"name": "lora", "rank": 8, "alpha": 8}),
            ("dora-r8", {"name": "dora", "rank": 8, "alpha": 8}),
        ]
        out = lora + out
        out += CNN_ONLY
    return out


def write(path: Path, base: str, method: dict, task: str | None) -> None:
    data: dict = {"_base_": base, "method": method}
    if task:
        data["data"] = {"task": task}
    if method["name"] in LR:
        data["optimizer"] = {"lr": LR[method["name"]]}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def main() -> None:
    from visionpeft.data.vtab import VTAB_TASKS

    out = ROOT / "configs" / "vtab"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    n = 0
    for backbone, base in BACKBONES.items():
        for stem, method in method_list(backbone):
            tasks = VTAB_TASKS if backbone == "vit-b16" else [None]
            for task in tasks:
                ds = f"vtab-{task}" if task else "vtab"
                write(out / f"{stem}_{backbone}_linear_100ep_{ds}-224.yaml", base, method, task)
                n += 1
    print(f"wrote {n} configs to {out}")


if __name__ == "__main__":
    main()
