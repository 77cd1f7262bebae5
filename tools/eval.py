#!/usr/bin/env python
"""Evaluate a saved adapter on the evaluation split of a config's task.

Example::

    python tools/eval.py --config configs/vtab/lora-r8_vit-b16_linear_100ep_vtab-cifar100-224.yaml \\
        --adapter out/run1/adapter --data-root /data/vtab-1k
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's YAML config (or its resolved config.yaml)")
    p.add_argument(
        "--adapter",
        required=True,
        help="adapter folder (adapter.safetensors + adapter_config.json), or a run folder holding adapter/",
    )
    p.add_argument("--data-root", help="dataset root (sets data.root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="write the metrics as JSON here")
    args = p.parse_args(argv)

    import torch

    import visionpeft as vp
    from visionpeft.engine.build import build_backbone
    from visionpeft.engine.experiment import ConfigError, load_config
    from visionpeft.engine.tasks import build_dense_backbone, make_task
    from visionpeft.engine.trainer import error_message, json_safe, seed_everything

    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    adapter = Path(args.adapter)
    if (adapter / "adapter").is_dir() and not (adapter / "adapter_config.json").exists():
        adapter = adapter / "adapter"
    try:
        cfg = load_config(args.config, overrides)
        kind = make_task(cfg)
        seed_everything(cfg.runtime.seed)  # the same base weights as training when they are random
        _, eval_set, num_classes, task = kind.datasets()
        seed_everything(cfg.runtime.seed)
        if cfg.task.sam:  # the base SAM of the config (official checkpoint, embedded, or random weights)
            from visionpeft.engine.sam_tasks import build_sam_base

            base = build_sam_base(cfg)
        else:
            base = build_dense_backbone(cfg) if cfg.task.dense else build_backbone(cfg.model, num_classes)
        model = vp.load_adapter(base, adapter)
        kinds = {vp.DenseModel: "dense", vp.sam.SamModel: "SAM"}
        have = next((v for k, v in kinds.items() if isinstance(model, k)), "classification")
        want = "SAM" if cfg.task.sam else "dense" if cfg.task.dense else "classification"
        if have != want:
            raise ConfigError(
                f"the adapter {adapter} is a {have} adapter, the config's task is {cfg.task.name}: use the run's "
                "own config.yaml"
            )
        device = "cuda" if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu"
        model.to(device)
        loader = torch.utils.data.DataLoader(
            eval_set,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            collate_fn=kind.collate(train=False),
        )
        metrics = kind.evaluate(model, loader, torch.device(device), contextlib.nullcontext)
    except (ConfigError, OSError, ValueError) as e:  # OSError: missing or unreadable files, corrupt images
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    peft = model.peft if isinstance(model, (vp.DenseModel, vp.sam.SamModel)) else model
    method = peft.peft_config[peft.active_adapter].method  # the adapter file decides, not the config
    metrics = {
        "task": task,
        "kind": kind.name,
        "method": method,
        "adapter": str(adapter),
        "metric": kind.main_metric,
        **metrics,
    }
    main = kind.main_metric
    print(f"{task}: {main} {metrics[main]:.2f} on {metrics['eval_samples']} images ({method}, {adapter})")
    for key in ("point_mIoU", "mAcc", "aAcc", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50"):
        if key in metrics:
            print(f"  {key} {metrics[key]:.2f}")
    if "per_class_IoU" in metrics:
        print(
            "  per-class IoU: "
            + ", ".join(f"{name} {'-' if v is None else f'{v:.1f}'}" for name, v in metrics["per_class_IoU"].items())
        )
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
