#!/usr/bin/env python
"""Train (and evaluate) PEFT runs from YAML configs, on one process or many (torchrun).

Examples::

    python tools/train.py --config configs/vtab/adaptformer-b64_vit-b16_linear_100ep_vtab-cifar100-224.yaml \\
        --data-root /data/vtab-1k --set model.pretrained_file=/ckpt/vit_b16_in21k.safetensors
    torchrun --nproc-per-node 8 tools/train.py --config ...
    python tools/train.py --config ... --resume out/run1/last.ckpt
    python tools/train.py --config ... --restart                # start over in a run folder that has a checkpoint
    python tools/train.py --config configs/demo/*.yaml          # several runs, compared side by side

Each run writes into its ``runtime.out_dir``: ``config.yaml`` (resolved), ``log.jsonl``, ``tb/``,
``last.ckpt``, ``adapter/`` and ``results.json``. A run folder that already holds ``last.ckpt`` is
continued only with ``--resume`` and started over only with ``--restart``.

Exit codes: 0 done, 2 bad input (config, data, weights file, unreadable image, existing run folder),
3 the run went non-finite (the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", required=True, help="YAML config file(s); several run one after another")
    p.add_argument("--data-root", help="dataset root (sets data.root)")
    p.add_argument("--out", help="run folder (sets runtime.out_dir; with several configs, a parent folder)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=1e-3 (repeatable)",
    )
    p.add_argument("--resume", help="checkpoint (last.ckpt) to continue from; only with one config")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start over in a run folder that already holds a checkpoint (deletes its checkpoint, logs, results)",
    )
    p.add_argument(
        "--max-epochs",
        type=int,
        help="stop after this many more epochs (the schedule keeps its length); last.ckpt is written on stopping",
    )
    p.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from visionpeft.engine.distributed import shutdown_distributed

    ok = False
    try:
        code = run(parse_args(argv))
        ok = code == 0
        return code
    finally:
        shutdown_distributed(wait=ok)


def run(args: argparse.Namespace) -> int:
    from visionpeft.engine.experiment import ConfigError, load_config
    from visionpeft.engine.trainer import NonFiniteLossError, Trainer, error_message

    if args.resume and len(args.config) > 1:
        print("error: --resume takes exactly one --config", file=sys.stderr)
        return 2
    if args.resume and args.restart:
        print("error: --resume and --restart exclude each other (continue a run, or start it over)", file=sys.stderr)
        return 2
    if args.max_epochs is not None and args.max_epochs < 1:
        print(f"error: --max-epochs must be >= 1, got {args.max_epochs}", file=sys.stderr)
        return 2
    results = []
    for path in args.config:
        overrides = list(args.overrides)
        if args.data_root:
            overrides.append(f"data.root={args.data_root}")
        if args.out:
            out = Path(args.out) if len(args.config) == 1 else Path(args.out) / Path(path).stem
            overrides.append(f"runtime.out_dir={out}")
        try:
            cfg = load_config(path, overrides)
            trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, restart=args.restart)
            if trainer.main:
                t, n = trainer.peft.get_nb_trainable_parameters()
                print(
                    f"== {path}: {cfg.method.method} on {cfg.model.name}, task {trainer.task} "
                    f"({len(trainer.train_set)} train / {len(trainer.eval_set)} eval images), "
                    f"trainable {t:,} / {n:,}, {trainer.world} process(es), out {cfg.runtime.out_dir}",
                    flush=True,
                )
            result = trainer.fit(max_epochs=args.max_epochs)
        except (ConfigError, OSError, ValueError) as e:  # OSError: missing or unreadable files, corrupt images
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 2
        except NonFiniteLossError as e:
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 3
        if result and trainer.main:
            results.append(result)
            key = result["metric"]
            print(
                f"== {result['method']}: {key} {result[key]:.2f}% on {result['eval_samples']} images "
                f"in {result['seconds']:.1f}s",
                flush=True,
            )
    if len(results) > 1:
        print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    """Side-by-side summary of several runs."""
    rows = [("method", "task", "trainable", "% of total", "metric", "value (%)", "time (s)")]
    for r in results:
        rows.append(
            (
                r["method"],
                r["task"],
                f"{r['trainable_params']:,}",
                f"{100 * r['trainable_params'] / r['total_params']:.2f}",
                r["metric"],
                f"{r[r['metric']]:.2f}",
                f"{r['seconds']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
