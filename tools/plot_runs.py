#!/usr/bin/env python
"""Draw the loss, accuracy (top-1) and learning-rate curves of one or several runs into one PNG.

Examples::

    python tools/plot_runs.py out/demo/lora-r4-qv                  # -> out/demo/lora-r4-qv/curves.png
    python tools/plot_runs.py out/demo/* --out demo.png            # several runs overlaid, named by folder

Reads each run folder's ``log.jsonl`` as the training tool writes it: step records (``step``, ``loss``,
``lr``) and epoch records (``train_loss``, and ``top1`` / ``eval_loss`` on evaluation epochs); after a resume,
the records that the resumed run wrote again replace the earlier ones. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


class PlotError(Exception):
    """Bad input: the message names the run folder or file."""


def read_log(run: Path) -> dict[str, list[dict[str, Any]]]:
    """``{"steps": [...], "epochs": [...]}`` records of ``run/log.jsonl``, in order, resumes resolved.

    Raises:
        PlotError: no ``log.jsonl`` in the folder, or no record in it.
    """
    log = run / "log.jsonl"
    if not log.is_file():
        what = "does not exist" if not run.exists() else "holds no log.jsonl"
        raise PlotError(
            f"run folder {str(run)!r} {what}; expected a folder written by tools/train.py (runtime.out_dir), "
            "with log.jsonl in it"
        )
    steps: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    bad = 0
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a killed run
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        if rec.get("event") == "resume":  # what the killed run logged after its checkpoint is replaced
            step, epoch = rec.get("step", math.inf), rec.get("epoch", math.inf)
            steps = [r for r in steps if r.get("step", 0) <= step]
            epochs = [r for r in epochs if r.get("epoch", 0) <= epoch]
        elif "train_loss" in rec:
            epochs.append(rec)
        elif "loss" in rec:
            steps.append(rec)
    if bad:
        print(f"warning: {log}: skipped {bad} unreadable line(s)", file=sys.stderr)
    if not steps and not epochs:
        raise PlotError(f"{log} holds no training record yet")
    return {"steps": steps, "epochs": epochs}


def _finite(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _labels(runs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [r.resolve().name for r in runs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(runs, names, strict=True)]


# the main metric of each task (classification, segmentation, detection) and its name in the plot
METRICS = {"top1": "top-1 accuracy", "mIoU": "mIoU", "bbox_mAP": "box mAP"}


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Write the curves of ``runs`` to ``out`` (PNG): loss, top-1 accuracy and learning rate against the step."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("tools/plot_runs.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [read_log(r) for r in runs]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_acc, metrics = False, set()
    for k, (label, log) in enumerate(zip(_labels(runs), logs, strict=True)):
        c = colors[k % len(colors)]
        st, ep = log["steps"], log["epochs"]
        x, y = _finite([r.get("step") for r in st], [r.get("loss") for r in st])
        if x:
            ax_loss.plot(x, y, color=c, alpha=0.35, linewidth=1)
        x, y = _finite([r.get("step") for r in ep], [r.get("train_loss") for r in ep])
        ax_loss.plot(x, y, color=c, marker="o", markersize=3, label=f"{label} train")
        x, y = _finite([r.get("step") for r in ep], [r.get("eval_loss") for r in ep])
        if x:
            ax_loss.plot(x, y, color=c, marker="s", markersize=4, linestyle="--", label=f"{label} eval")
        key = next((k for k in METRICS if any(k in r for r in ep)), "top1")  # the run's task decides
        metrics.add(key)
        x, y = _finite([r.get("step") for r in ep], [r.get(key) for r in ep])
        if x:
            any_acc = True
            ax_acc.plot(x, y, color=c, marker="o", markersize=4, label=f"{label} {key}")
            ax_acc.annotate(f"{y[-1]:.1f}", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4), color=c)
        x, y = _finite([r.get("step") for r in st], [r.get("lr") for r in st])
        if x:
            ax_lr.plot(x, y, color=c, label=label)
    ax_loss.set(title="loss (thin: logged steps, dashed: eval)", xlabel="step", ylabel="loss")
    names = " / ".join(METRICS[k] for k in METRICS if k in metrics) or METRICS["top1"]
    ax_acc.set(title=f"evaluation: {names}", xlabel="step", ylabel="%")
    if not any_acc:
        ax_acc.text(0.5, 0.5, "no evaluation logged yet", ha="center", va="center", transform=ax_acc.transAxes)
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each holding log.jsonl)")
    p.add_argument("--out", help="PNG to write (default: <run>/curves.png for one run, curves.png for several)")
    args = p.parse_args(argv)
    runs = [Path(r).expanduser() for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    try:
        plot_runs(runs, out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
