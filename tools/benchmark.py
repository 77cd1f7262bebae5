"""Benchmark every visionpeft method against full fine-tuning and Hugging Face peft's LoRA.

For each configuration a fresh worker process (``benchmark.py --worker NAME``) builds a random-weight
timm model, attaches the adapter and measures, on CPU:

* trainable and total parameters;
* the median training-step time (forward, cross-entropy, backward, AdamW step on the trainable
  parameters) over ``--steps`` steps after ``--warmup`` warm-up steps;
* memory: ``ru_maxrss`` of the process after training, and the peak RSS increase over the
  model-loaded baseline during the training steps (a thread samples ``/proc/self/statm`` every 5 ms);
* median inference time (``eval``, ``torch.no_grad``): unmerged, merged (mergeable methods, after
  ``merge_and_unload()``) and a plain timm model without adapters, all in the same process.

The parent prints a table of same-run ratios, checks the performance targets (PASS / MISS), writes
the raw results to ``--out`` and the table to ``docs/benchmarks.md``.

Usage::

    python tools/benchmark.py --threads 2
    python tools/benchmark.py --methods lora,peft_lora,full --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import timm
import torch
import torch.nn.functional as F

import visionpeft as vp

ROOT = Path(__file__).resolve().parents[1]
OTHER_LIMIT = 0.25  # CPU cores other processes may use while a worker measures


def configs() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (method, options): every method variant with full-scale options (the method table), plus
    ``peft_lora``, Hugging Face peft's LoRA on the same model."""
    out: dict[str, tuple[str, dict[str, Any]]] = {"peft_lora": ("peft_lora", {})}
    for method in vp.list_methods():
        for v in vp.get_method(method).variants:
            if v.paper is not None:
                out[v.id] = (method, dict(v.paper))
    return out


CONFIGS = configs()


def supported(name: str, model_name: str, img_size: int) -> bool:
    """Whether configuration ``name`` runs on the benchmark model (as its method declares)."""
    method, options = CONFIGS[name]
    if method == "peft_lora":
        return True
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=100, img_size=img_size)
    cls = vp.get_method(method)
    return cls.unsupported_reason(model, vp.detect_backbone(model), cls.config_cls.from_dict(options)) is None


class RSSSampler:
    """Samples the resident set size of this process from ``/proc/self/statm`` in a thread.

    Args:
        interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        """Current resident set size in bytes."""
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RSSSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def timed_median(fn: Callable[[], None], warmup: int, steps: int) -> float:
    """Run ``fn`` ``warmup`` times untimed, then ``steps`` times; return the median time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    """The random-weight timm model (seeded, so every process builds the same weights)."""
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img_size)


def build(name: str, args: argparse.Namespace) -> tuple[Any, Callable[[], Any] | None, tuple[int, int]]:
    """Build configuration ``name`` on a fresh model.

    Returns:
        ``(model, merge_and_unload or None, counts)``: the trainable model, a callable returning the
        merged plain model (``None`` when the method cannot merge), and (trainable, total) counts.
    """
    model = make_model(args)
    method, options = CONFIGS[name]
    if method == "peft_lora":
        cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"])
        pm = peft.get_peft_model(model, cfg)
        params = list(pm.parameters())
        counts = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        return pm, pm.merge_and_unload, counts
    pm = vp.get_peft_model(model, method, **options)
    merge = pm.merge_and_unload if vp.get_method(method).mergeable else None
    return pm, merge, pm.get_nb_trainable_parameters()


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration in this process and return its results."""
    torch.set_num_threads(args.threads)
    model, merge, (trainable, total) = build(name, args)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
    y = torch.randint(0, 100, (args.batch,), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    sampler = RSSSampler()
    baseline = sampler.rss()
    with sampler:
        step_ms = timed_median(step, args.warmup, args.steps)
    out: dict[str, Any] = {
        "name": name,
        "method": CONFIGS[name][0],
        "options": CONFIGS[name][1],
        "trainable": trainable,
        "total": total,
        "step_ms": step_ms,
        "baseline_rss_mb": baseline / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_train_increase_mb": (sampler.peak - baseline) / 2**20,
    }
    opt.state.clear()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        infer = lambda m: timed_median(lambda: m.eval()(x), args.warmup, args.steps)  # noqa: E731
        out["infer_unmerged_ms"] = infer(model)
        out["infer_merged_ms"] = infer(merge()) if merge else None
        out["infer_plain_ms"] = infer(make_model(args))
    return out


def cpu_busy() -> float:
    """Busy CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds used by the finished child processes of this process."""
    return sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), k) for k in ("ru_utime", "ru_stime"))


def wait_idle(max_wait: float, limit: float = OTHER_LIMIT) -> float:
    """Wait until other processes use under ``limit`` cores (1 s samples); return that load."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = cpu_busy()
        time.sleep(1.0)
        load = cpu_busy() - b0
        if load < limit or time.monotonic() > deadline:
            return load
        print(f"  waiting: other processes use {load:.1f} cores", file=sys.stderr, flush=True)
        time.sleep(4.0)


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--worker name`` in a subprocess and parse the JSON line it prints.

    Also records ``other_cores``: the mean CPU load (in cores) of every other process on the
    machine while the worker ran, so that a contended measurement is visible.
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--model",
        args.model,
        "--img-size",
        str(args.img_size),
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    wait_idle(args.idle_wait)
    b0, c0, t0 = cpu_busy(), children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    other = (cpu_busy() - b0 - (children_cpu() - c0)) / (time.perf_counter() - t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"name": name, "error": f"worker exit {proc.returncode}: " + " | ".join(tail)}
    return dict(json.loads(lines[-1]), other_cores=max(other, 0.0))


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing."""
    return a / b if a is not None and b else None


def fmt(v: Any, spec: str = ".1f", suffix: str = "") -> str:
    """Format a number for the table; ``-`` for missing values."""
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Render the results as a Markdown table with same-run ratios."""
    full, hf = results.get("full", {}), results.get("peft_lora", {})
    head = [
        "config",
        "trainable",
        "total",
        "step ms",
        "step/full",
        "step/peft",
        "peak RSS MB",
        "train +MB",
        "mem/peft",
        "mem/full",
        "infer ms",
        "merged ms",
        "plain ms",
        "merged/plain",
        "other load",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | error: {r['error'][:200]} |" + " |" * (len(head) - 2))
            continue
        inc = r["peak_train_increase_mb"]
        cells = [
            name,
            f"{r['trainable'] / 1e6:.3f}M",
            f"{r['total'] / 1e6:.2f}M",
            fmt(r["step_ms"], ".0f"),
            fmt(ratio(r["step_ms"], full.get("step_ms")), ".2f", "x"),
            fmt(ratio(r["step_ms"], hf.get("step_ms")), ".2f", "x"),
            fmt(r["peak_rss_mb"], ".0f"),
            fmt(inc, ".0f"),
            fmt(ratio(inc, hf.get("peak_train_increase_mb")), ".2f", "x"),
            fmt(ratio(inc, full.get("peak_train_increase_mb")), ".2f", "x"),
            fmt(r["infer_unmerged_ms"], ".0f"),
            fmt(r["infer_merged_ms"], ".0f"),
            fmt(r["infer_plain_ms"], ".0f"),
            fmt(ratio(r["infer_merged_ms"], r["infer_plain_ms"]), ".3f", "x"),
            fmt(r.get("other_cores"), ".2f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def check_targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """Compare the results with the performance targets; one ``PASS``/``MISS`` line per check."""
    ok = {n: r for n, r in results.items() if "error" not in r}
    lines = []

    def check(label: str, value: float | None, limit: float) -> None:
        if value is None:
            lines.append(f"SKIP  {label}: not measured")
        else:
            lines.append(f"{'PASS' if value <= limit else 'MISS'}  {label}: {value:.3f}x (target <= {limit:.2f}x)")

    ours, hf, full = ok.get("lora"), ok.get("peft_lora"), ok.get("full")
    if ours and hf:
        check("lora step / peft_lora step", ratio(ours["step_ms"], hf["step_ms"]), 1.00)
        check(
            "lora train-memory increase / peft_lora's",
            ratio(ours["peak_train_increase_mb"], hf["peak_train_increase_mb"]),
            1.00,
        )
    for name, r in ok.items():
        if name not in ("full", "peft_lora") and full:
            check(f"{name} step / full step", ratio(r["step_ms"], full["step_ms"]), 0.75)
    for name, r in ok.items():
        if r["infer_merged_ms"] is not None:
            check(f"{name} merged inference / plain", ratio(r["infer_merged_ms"], r["infer_plain_ms"]), 1.02)
    for name, r in results.items():
        if "error" in r:
            lines.append(f"MISS  {name}: worker failed: {r['error']}")
        elif r["other_cores"] > OTHER_LIMIT:
            lines.append(f"NOTE  {name}: other processes used {r['other_cores']:.2f} cores meanwhile (unreliable)")
    return lines


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    """CPU, core count and library versions of this machine."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
    }


def write_docs(path: Path, tbl: str, checks: list[str], facts: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the Markdown report: command, machine facts, table, target checks."""
    command = "python tools/benchmark.py " + shlex.join(sys.argv[1:])
    text = f"""# Benchmarks

Generated by `tools/benchmark.py`; every configuration ran in its own process, and all ratios come
from this single run.

Command:

```
{command.strip()}
```

Setup: `{args.model}` (random weights, 100 classes), {args.img_size}x{args.img_size}, batch {args.batch},
CPU, {args.warmup} warm-up + {args.steps} measured steps (medians). Machine: {facts["cpu"]}, {facts["cores"]}
cores, torch {facts["torch"]} with {facts["threads"]} threads, timm {facts["timm"]}, peft {facts["peft"]},
Python {facts["python"]}.

Columns: *step* = forward + cross-entropy + backward + AdamW step; *peak RSS* = `ru_maxrss` after
training; *train +MB* = peak RSS increase over the model-loaded baseline during the training steps
(sampled every 5 ms); *mem/peft*, *mem/full* compare that increase; *infer* = unmerged inference,
*merged* = after `merge_and_unload()`, *plain* = timm model without adapters, same process;
*other load* = mean CPU cores used by other processes while the worker ran; a worker disturbed
by more than {OTHER_LIMIT} cores is rerun (up to `--retries` times) after the machine is idle again.

{tbl}

Targets:

```
{chr(10).join(checks)}
```
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; run one worker or the whole benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: those the model supports)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/benchmark.json")
    p.add_argument("--docs", default="docs/benchmarks.md")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=3600.0,
        help="seconds to wait, before each worker, for other processes to leave the CPUs",
    )
    p.add_argument("--retries", type=int, default=3, help="reruns of a worker that other processes disturbed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    if args.methods is None:
        names = [n for n in CONFIGS if supported(n, args.model, args.img_size)]
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    results = {}
    for name in names:
        for attempt in range(1 + args.retries):  # rerun a worker that other processes disturbed
            t0 = time.perf_counter()
            r = results[name] = dict(run_worker(name, args), attempt=attempt + 1)
            status = r.get("error") or f"step {r['step_ms']:.0f} ms, other load {r['other_cores']:.2f} cores"
            print(f"[{name}] {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if "error" in r or r["other_cores"] <= OTHER_LIMIT:
                break
    facts = machine_facts(args)
    tbl, checks = table(results), check_targets(results)
    print(tbl + "\n\n" + "\n".join(checks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": facts, "args": vars(args), "results": results, "checks": checks}, indent=2))
    write_docs(Path(args.docs), tbl, checks, facts, args)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
