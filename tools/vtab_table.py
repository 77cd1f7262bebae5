"""Collect VTAB-1k results from run folders into one table (markdown or CSV).

Usage::

    python tools/vtab_table.py out/vtab/
    python tools/vtab_table.py out/vtab/ other_runs/ --format csv --out vtab.csv

Every ``results.json`` found (recursively) under the given folders is one run. It must hold::

    {"task": "cifar100", "method": "lora", "top1": 71.3}

* ``top1`` is the test top-1 accuracy **in percent** (0-100). Values in (0, 1] are still read as percent,
  with a warning, because a fraction is the usual mistake.
* ``task`` may be any alias (``cifar``, ``oxford_pet``, ``clevr-count`` ...); when absent it is read from
  the saved experiment config, ``{"config": {"data": {"task": ...}}}``.
* ``method`` may instead come from ``{"config": {"method": {"name": ...}}}``; an optional ``label`` names the
  row instead of the method (e.g. ``"lora r=4"``).
* Runs whose ``mode`` (or ``config.data.mode``) is ``tune`` report val200, not test: they are skipped.
* Several runs of the same (row, task) are averaged (reported on stderr).

One row per method and one column per task (19, in the papers' order), then the three group means
(Natural, Specialized, Structured), ``Mean (groups)`` = mean of the three group means (VPT, NOAH, SSF ...)
and ``Mean (tasks)`` = mean of the 19 tasks (the VTAB paper's score). A group mean is shown only when the
group is complete and the overall means only when all 19 tasks are present; otherwise ``-`` (empty in CSV)
and a footnote lists the missing tasks. Exit status 1 when no usable result is found.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from visionpeft.data.vtab import GROUPS, VTAB_GROUPS, VTAB_INFO, VTAB_TASKS, resolve_task

GROUP_TITLES = {"natural": "Natural", "specialized": "Specialized", "structured": "Structured"}
MEAN_COLUMNS = ("Mean (groups)", "Mean (tasks)")


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def parse_result(path: Path) -> dict[str, Any]:
    """One ``results.json`` -> ``{"row", "task", "top1", "path"}``.

    Raises:
        ValueError: unreadable JSON, missing fields, an unknown task or a ``top1`` outside [0, 100]; the
            message names the file. Tune-mode runs raise ``LookupError`` (skipped, not an error).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    mode = data.get("mode") or _get(data, "config", "data", "mode")
    if mode == "tune":
        raise LookupError(f"{path}: a tune-mode run (val200 accuracy), not a test result")
    task = data.get("task") or _get(data, "config", "data", "task")
    method = data.get("method")
    if isinstance(method, dict):
        method = method.get("name")
    method = method or _get(data, "config", "method", "name")
    row = data.get("label") or method
    top1 = data.get("top1")
    if not task or not row:
        raise ValueError(f"{path}: needs 'task' (or config.data.task) and 'method' (or config.method.name)")
    try:
        task = resolve_task(str(task))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        raise ValueError(f"{path}: 'top1' must be a number (percent), got {top1!r}")
    if not 0.0 <= top1 <= 100.0:
        raise ValueError(f"{path}: 'top1' = {top1} is outside [0, 100] (top1 is in percent)")
    return {"row": str(row), "task": task, "top1": float(top1), "path": path}


def collect(paths: list[Path], warn=None) -> list[dict[str, Any]]:
    """Parse every ``results.json`` under ``paths`` (folders, searched recursively, or files); bad files are
    reported through ``warn`` (default: stderr) and skipped."""
    warn = warn or (lambda msg: print(f"vtab_table: {msg}", file=sys.stderr))
    files: list[Path] = []
    for p in paths:
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("results.json")))
        else:
            warn(f"{p}: no such file or folder")
    records, fractions = [], []
    for f in files:
        try:
            rec = parse_result(f)
        except (LookupError, ValueError) as e:  # tune-mode runs and bad files
            warn(f"skipped {e}")
            continue
        if 0.0 < rec["top1"] <= 1.0:
            fractions.append(f)
        records.append(rec)
    if fractions:
        warn(
            f"{len(fractions)} result(s) have top1 <= 1 (e.g. {fractions[0]}); top1 is read as percent, "
            "write 71.3 rather than 0.713"
        )
    return records


def summarize(scores: dict[str, float]) -> dict[str, Any]:
    """Group and overall means of one method's ``{canonical task: top1}``.

    Returns:
        ``{"groups": {group: mean or None}, "mean_groups": float or None, "mean_tasks": float or None,
        "missing": {group: [tasks]}}``; a mean is ``None`` unless all of its tasks are present.
    """
    groups: dict[str, float | None] = {}
    missing: dict[str, list[str]] = {}
    for g in GROUPS:
        absent = [t for t in VTAB_GROUPS[g] if t not in scores]
        if absent:
            missing[g] = absent
        groups[g] = None if absent else sum(scores[t] for t in VTAB_GROUPS[g]) / len(VTAB_GROUPS[g])
    complete = not missing
    return {
        "groups": groups,
        "mean_groups": sum(groups.values()) / len(GROUPS) if complete else None,
        "mean_tasks": sum(scores[t] for t in VTAB_TASKS) / len(VTAB_TASKS) if complete else None,
        "missing": missing,
    }


def build_rows(records: list[dict[str, Any]], warn=None) -> list[dict[str, Any]]:
    """One row per method label (sorted): ``{"row", "scores", **summarize(scores)}``; repeated (row, task)
    runs are averaged."""
    warn = warn or (lambda msg: print(f"vtab_table: {msg}", file=sys.stderr))
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        runs[rec["row"]][rec["task"]].append(rec["top1"])
    rows = []
    for name in sorted(runs):
        scores = {}
        for task, values in runs[name].items():
            if len(values) > 1:
                warn(f"{name} / {task}: mean of {len(values)} runs ({', '.join(f'{v:g}' for v in values)})")
            scores[task] = sum(values) / len(values)
        rows.append({"row": name, "scores": scores, **summarize(scores)})
    return rows


def _cells(row: dict[str, Any], decimals: int, blank: str) -> list[str]:
    def fmt(v: float | None) -> str:
        return blank if v is None else f"{v:.{decimals}f}"

    cells = [fmt(row["scores"].get(t)) for t in VTAB_TASKS]
    cells += [fmt(row["groups"][g]) for g in GROUPS]
    return cells + [fmt(row["mean_groups"]), fmt(row["mean_tasks"])]


def render_markdown(rows: list[dict[str, Any]], decimals: int = 1) -> str:
    """The markdown table plus a footnote per method with missing tasks."""
    header = ["Method", *(VTAB_INFO[t].title for t in VTAB_TASKS), *(GROUP_TITLES[g] for g in GROUPS), *MEAN_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join([r["row"], *_cells(r, decimals, "-")]) + " |" for r in rows]
    notes = []
    for r in rows:
        if r["missing"]:
            parts = [f"{', '.join(ts)} ({GROUP_TITLES[g]})" for g, ts in r["missing"].items()]
            notes.append(f"- {r['row']}: missing {'; '.join(parts)}")
    if notes:
        lines += [
            "",
            "Missing tasks (a group mean needs the whole group, the overall means all 19 tasks; shown as -):",
        ]
        lines += notes
    lines.append("")
    lines.append(
        "Top-1 accuracy (%) on test (final mode). Mean (groups): mean of the three group means; "
        "Mean (tasks): mean of the 19 tasks."
    )
    return "\n".join(lines) + "\n"


def render_csv(rows: list[dict[str, Any]], decimals: int = 1) -> str:
    """CSV with canonical task names as headers; missing values are empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", *VTAB_TASKS, *GROUPS, "mean_groups", "mean_tasks"])
    for r in rows:
        writer.writerow([r["row"], *_cells(r, decimals, "")])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders (searched recursively) or results.json files")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="output format (default: md)")
    parser.add_argument("--out", type=Path, default=None, help="write the table to FILE instead of stdout")
    parser.add_argument("--decimals", type=int, default=1, help="decimal places (default: 1)")
    args = parser.parse_args(argv)

    records = collect(args.paths)
    if not records:
        where = ", ".join(str(p) for p in args.paths)
        print(
            f"vtab_table: no usable results.json under {where}; each run needs a results.json with "
            '{"task": <VTAB task>, "method": <name>, "top1": <test top-1 in percent>}',
            file=sys.stderr,
        )
        return 1
    rows = build_rows(records)
    text = render_markdown(rows, args.decimals) if args.format == "md" else render_csv(rows, args.decimals)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"vtab_table: wrote {args.out} ({len(rows)} method(s), {len(records)} run(s))", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
