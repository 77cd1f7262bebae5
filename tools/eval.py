#!/usr/bin/env python
"""Evaluate a saved adapter on the evaluation split of a config's task.

Example::

    python tools/eval.py --config configs/vtab/lora-r8_vit-b16_linear_100ep_vtab-cifar100-224.yaml \\
        --adapter out/run1/adapter --data-root /data/vtab-1k
"""

from __future__ import annotations

import argparse
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
    from visionpeft.data.build import build_datasets
    from visionpeft.engine.build import build_backbone
    from visionpeft.engine.experiment import ConfigError, load_config
    from visionpeft.engine.trainer import error_message, evaluation_sums, json_safe, seed_everything, summarize

    overrides = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    adapter = Path(args.adapter)
    if (adapter / "adapter").is_dir() and not (adapter / "adapter_config.json").exists():
        adapter = adapter / "adapter"
    try:
        cfg = load_config(args.config, overrides)
        seed_everything(cfg.runtime.seed)  # the same base weights as training when they are random
        _, eval_set, num_classes, task = build_datasets(cfg.data)
        model = vp.load_adapter(build_backbone(cfg.model, num_classes), adapter)
        device = "cuda" if torch.cuda.is_available() and cfg.runtime.device != "cpu" else "cpu"
        model.to(device)
        loader = torch.utils.data.DataLoader(
            eval_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers
        )
        metrics = summarize(evaluation_sums(model, loader, torch.device(device)))
    except (ConfigError, OSError, ValueError) as e:  # OSError: missing or unreadable files, corrupt images
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    method = model.peft_config[model.active_adapter].method  # the adapter file decides, not the config
    metrics = {
        "task": task,
        "method": method,
        "adapter": str(adapter),
        **metrics,
    }
    print(f"{task}: top1 {metrics['top1']:.2f}% on {metrics['eval_samples']} images ({method}, {adapter})")
    if args.out:
        Path(args.out).write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
