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

``--dense`` benchmarks semantic segmentation instead (:data:`DENSE_SETTINGS`: the methods and options of the
``configs/ade20k`` files, and full fine-tuning of each backbone). Each setting is built from
``configs/_base_/ade20k.yaml`` (UperNet, 512 channels, auxiliary FCN head) with random weights and 150 classes by
the trainer's own segmentation task; a worker measures the parameter counts, the median training-step time
(forward, ``seg_loss`` + 0.4 x the auxiliary head's, backward, AdamW step) and the peak RSS increase during
training. The ratios compare each setting with full fine-tuning of the same backbone with the same neck and head.
Its table goes into its own section of ``docs/benchmarks.md`` (between :data:`DENSE_BEGIN` and :data:`DENSE_END`).

Usage::

    python tools/benchmark.py --threads 2
    python tools/benchmark.py --methods lora,peft_lora,full --steps 3
    python tools/benchmark.py --dense --threads 2
    python tools/benchmark.py --dense --dense-settings vit_full,vit_lora --dense-model vit=test_vit \
        --dense-channels 16 --img-size 64 --steps 1 --warmup 0 --idle-wait 0 --retries 0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def measure_training(step: Callable[[], None], args: argparse.Namespace) -> dict[str, float]:
    """Time ``step`` (``args.warmup`` + ``args.steps`` calls) while sampling this process's RSS.

    Returns:
        ``step_ms`` (median), ``baseline_rss_mb`` (RSS before the first step), ``peak_rss_mb`` (``ru_maxrss``
        afterwards) and ``peak_train_increase_mb`` (peak RSS during the steps minus the baseline).
    """
    sampler = RSSSampler()
    baseline = sampler.rss()
    with sampler:
        step_ms = timed_median(step, args.warmup, args.steps)
    return {
        "step_ms": step_ms,
        "baseline_rss_mb": baseline / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_train_increase_mb": (sampler.peak - baseline) / 2**20,
    }


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
        import peft  # here, not at the top: it adds ~1.5 s to the start of every worker (SAM, dense)

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

    out: dict[str, Any] = {
        "name": name,
        "method": CONFIGS[name][0],
        "options": CONFIGS[name][1],
        "trainable": trainable,
        "total": total,
        **measure_training(step, args),
    }
    opt.state.clear()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        infer = lambda m: timed_median(lambda: m.eval()(x), args.warmup, args.steps)  # noqa: E731
        out["infer_unmerged_ms"] = infer(model)
        out["infer_merged_ms"] = infer(merge()) if merge else None
        out["infer_plain_ms"] = infer(make_model(args))
    return out


# the dense settings live in their own file beside this one (found when this file is loaded by path, too)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_dense import (  # noqa: E402  (DENSE_MODELS, family_overrides: read by the tests through here)
    DENSE_BASE,
    DENSE_BEGIN,
    DENSE_CLASSES,
    DENSE_END,
    DENSE_FAMILIES,
    DENSE_MODELS,  # noqa: F401
    DENSE_SETTINGS,
    dense_config,
    family_overrides,  # noqa: F401
)


def dense_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure dense setting ``name`` in this process: the model the trainer builds for its config, trained on a
    random ``(batch, 3, S, S)`` image batch with random 150-class masks by the segmentation task's own loss."""
    from visionpeft.engine.tasks import SegmentationTask

    torch.set_num_threads(args.threads)
    cfg = dense_config(name, args)
    task = SegmentationTask(cfg)
    torch.manual_seed(0)
    model = task.build_model(DENSE_CLASSES)
    trainable, total = model.get_nb_trainable_parameters()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
    y = torch.randint(0, DENSE_CLASSES, (args.batch, args.img_size, args.img_size), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task.loss(model, (x, y), contextlib.nullcontext).backward()
        opt.step()

    return {
        "name": name,
        "model": cfg.model.name,
        "method": cfg.method.method,
        "options": DENSE_SETTINGS[name].options,
        "neck": model.neck_name,
        "head": cfg.task.head,
        "head_channels": cfg.task.head_kwargs.get("channels"),
        "aux_weight": cfg.task.aux_weight,
        "trainable": trainable,
        "total": total,
        **measure_training(step, args),
    }


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


def worker_args(name: str, args: argparse.Namespace) -> list[str]:
    """The command-line arguments of the worker that measures ``name`` with this run's settings."""
    out = ["--worker", name, "--warmup", str(args.warmup), "--steps", str(args.steps), "--batch", str(args.batch)]
    out += ["--img-size", str(args.img_size), "--threads", str(args.threads)]
    if not args.dense:
        return [*out, "--model", args.model]
    out.append("--dense")
    for item in args.dense_model or []:
        out += ["--dense-model", item]
    for item in args.dense_model_kwargs or []:
        out += ["--dense-model-kwargs", item]
    if args.dense_channels is not None:
        out += ["--dense-channels", str(args.dense_channels)]
    return out


def run_worker(name: str, args: argparse.Namespace, script: Path | None = None, argv: list[str] | None = None) -> dict:
    """Run ``--worker name`` in a subprocess and parse the JSON line it prints (``script`` with ``argv``: another
    benchmark's worker, by default this file with :func:`worker_args`).

    Also records ``other_cores``: the mean CPU load (in cores) of every other process on the
    machine while the worker ran, so that a contended measurement is visible.
    """
    cmd = [sys.executable, str(script or Path(__file__).resolve()), *(argv or worker_args(name, args))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    wait_idle(args.idle_wait)
    b0, c0, t0 = cpu_busy(), children_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    other = (cpu_busy() - b0 - (children_cpu() - c0)) / (time.perf_counter() - t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        how = f"worker exit {proc.returncode}"
        if proc.returncode < 0:  # killed by a signal: SIGKILL is usually the kernel's out-of-memory killer
            how = f"worker killed by {signal.Signals(-proc.returncode).name}"
            how += " (out of memory?)" if proc.returncode == -signal.SIGKILL else ""
        last = tail[-1] if tail else "no output"  # the exception's own line
        return {"name": name, "error": f"{how}: {last}", "stderr_tail": tail}
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
        "peft": importlib.metadata.version("peft"),
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
    old = path.read_text() if path.is_file() else ""  # keep the marked sections of other runs (--dense, SAM)
    for kept in re.finditer(r"<!-- (\w+) benchmark: begin.*?-->.*?<!-- \1 benchmark: end -->", old, flags=re.S):
        text = text.rstrip("\n") + "\n\n" + kept.group(0) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def dense_section(text: str, begin: str = DENSE_BEGIN, end: str = DENSE_END) -> str | None:
    """The dense (or another marked) section of a benchmarks page (markers included), or ``None`` when it has none."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        return None
    return text[start : stop + len(end)]


def write_dense_docs(path: Path, section: str, begin: str = DENSE_BEGIN, end: str = DENSE_END) -> None:
    """Put ``section`` (the dense markers around it) into the page at ``path``: in place of its dense section,
    after the rest of the page when it has none, or as a new page; the rest of the page is left as it is."""
    block = f"{begin}\n{section.strip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    old = dense_section(text, begin, end)
    if old is not None:
        text = text.replace(old, block, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def dense_table(results: dict[str, dict[str, Any]]) -> str:
    """Render dense results as a Markdown table; ratios against each setting's full fine-tuning reference."""
    head = [
        "setting",
        "backbone",
        "neck",
        "method",
        "trainable",
        "total",
        "trainable/full",
        "step ms",
        "step/full",
        "train +MB",
        "mem/full",
        "peak RSS MB",
        "other load",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "error" in r:
            err = r["error"][:300].replace("|", "/")
            rows.append(f"| {name} | error: {err} |" + " |" * (len(head) - 2))
            continue
        ref = results.get(DENSE_SETTINGS[name].reference, {})
        ref = {} if "error" in ref else ref
        options = ", ".join(f"{k} {v}" for k, v in r["options"].items())
        inc = r["peak_train_increase_mb"]
        cells = [
            name,
            r["model"].split(".")[0],
            r["neck"],
            r["method"] + (f" ({options})" if options else ""),
            f"{r['trainable'] / 1e6:.3f}M",
            f"{r['total'] / 1e6:.2f}M",
            fmt(ratio(r["trainable"], ref.get("trainable")), ".3f"),
            fmt(r["step_ms"], ".0f"),
            fmt(ratio(r["step_ms"], ref.get("step_ms")), ".2f", "x"),
            fmt(inc, ".0f"),
            fmt(ratio(inc, ref.get("peak_train_increase_mb")), ".2f", "x"),
            fmt(r["peak_rss_mb"], ".0f"),
            fmt(r.get("other_cores"), ".2f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def dense_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per failed setting, per measurement disturbed by other processes and per missing reference."""
    lines = []
    for name, r in results.items():
        ref = DENSE_SETTINGS[name].reference
        if "error" in r:
            lines.append(f"ERROR {name}: {r['error']}")
            continue
        if r["other_cores"] > OTHER_LIMIT:
            lines.append(f"NOTE  {name}: other processes used {r['other_cores']:.2f} cores meanwhile (unreliable)")
        if ref != name and "error" in results.get(ref, {"error": ""}):
            lines.append(f"NOTE  {name}: no ratios, its reference {ref} was not measured")
    return lines


def dense_docs(tbl: str, notes: list[str], facts: dict[str, Any], args: argparse.Namespace, head: str) -> str:
    """The dense section of the benchmarks page: command, setup, machine facts, columns, table, notes."""
    command = "python tools/benchmark.py " + shlex.join(sys.argv[1:])
    channels = "512" if args.dense_channels is None else str(args.dense_channels)
    models = ", ".join(f"`{m}`" for m in facts["dense_models"])
    return f"""## Semantic segmentation: UperNet on frozen, adapted backbones

Generated by `tools/benchmark.py --dense`; every setting ran in its own process, and all ratios come from this
single run.

Command:

```
{command.strip()}
```

Setup: the methods and options of the `configs/ade20k` files, and full fine-tuning, on random-weight
{models} (no download); 150 classes; `{head}` ({channels} channels) + auxiliary FCN head (loss weight 0.4) as in
`{DENSE_BASE}`; each model built by the trainer's segmentation task. Input: {args.img_size}x{args.img_size}
random images and masks, batch {args.batch}; CPU; {args.warmup} warm-up + {args.steps} measured steps (medians).
Machine: {facts["cpu"]}, {facts["cores"]} cores, torch {facts["torch"]} ({facts["threads"]} threads), timm
{facts["timm"]}, Python {facts["python"]}.

Columns: *setting* = backbone_method; `vit_adapter` is ViT-Adapter on a frozen ViT (`linear_probe`: nothing in the
ViT trains), `vit_adapter_full` the paper's mode (the ViT trains too); *trainable* = parameters AdamW updates
(adapter, neck, UperNet and auxiliary head; the backbone too under `full`); *total* = every parameter of backbone,
adapter, neck and heads; *step* = forward + `seg_loss` (cross-entropy) + 0.4 x the auxiliary head's + backward +
AdamW step; *train +MB* = peak RSS increase over the model-loaded baseline during the training steps (sampled
every 5 ms; includes AdamW's state); *peak RSS* = `ru_maxrss` after training; */full* = ratio to full fine-tuning
of the same backbone with the same neck and head in this run (`vit_full`, `vit_adapter_full`, `swin_full`,
`convnext_full`); *other load* = mean CPU cores used by other processes while the worker ran (a worker disturbed
by more than {OTHER_LIMIT} cores is rerun, up to `--retries` times). The raw results are in `{args.out}`.

{tbl}

Notes:

```
{chr(10).join(notes) or "none: every setting ran"}
```
"""


MODE_DEFAULTS = {  # option -> (classification default, --dense default)
    "warmup": (2, 1),
    "steps": (5, 2),
    "batch": (8, 2),
    "img_size": (224, 512),
    "out": ("out/benchmark.json", "out/benchmark_dense.json"),
}


def run_all(names: list[str], args: argparse.Namespace, runner: Callable[..., dict] = run_worker) -> dict[str, dict]:
    """Measure each configuration in its own worker process; rerun a worker that other processes disturbed."""
    results = {}
    for name in names:
        for attempt in range(1 + args.retries):
            t0 = time.perf_counter()
            r = results[name] = dict(runner(name, args), attempt=attempt + 1)
            status = r.get("error") or f"step {r['step_ms']:.0f} ms, other load {r['other_cores']:.2f} cores"
            print(f"[{name}] {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if "error" in r or r["other_cores"] <= OTHER_LIMIT:
                break
    return results


def write_json(args: argparse.Namespace, payload: dict[str, Any]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **payload}, indent=2))


def main_dense(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The dense benchmark: every selected setting, its table into the dense section of ``--docs``."""
    if args.dense_settings is None:
        names = list(DENSE_SETTINGS)
    else:
        names = [n.strip() for n in args.dense_settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in DENSE_SETTINGS]
    if unknown:
        p.error(f"--dense-settings: unknown setting(s) {unknown}; choose from {', '.join(DENSE_SETTINGS)}")
    try:
        for n in names:  # bad overrides fail here, not in every worker
            dense_config(n, args)
    except ValueError as e:
        p.error(str(e))
    results = run_all(names, args)
    facts = machine_facts(args)
    ok = [r for r in results.values() if "error" not in r]
    facts["dense_models"] = sorted({r["model"].split(".")[0] for r in ok})
    heads = sorted({str(r["head"]) for r in ok}) or ["upernet"]
    tbl, notes = dense_table(results), dense_notes(results)
    print(tbl + "\n\n" + "\n".join(notes))
    write_json(args, {"machine": facts, "results": results, "notes": notes})
    write_dense_docs(Path(args.docs), dense_docs(tbl, notes, facts, args, ", ".join(heads)))
    return 1 if any("error" in r for r in results.values()) else 0


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and the parsed command line, with the defaults of its mode (classification or ``--dense``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; --dense: 1)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 5; --dense: 2)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --dense: 2)")
    p.add_argument("--model", default=None, help="timm model (default vit_base_patch16_224; not with --dense)")
    p.add_argument("--img-size", type=int, default=None, help="image size (default 224; --dense: 512)")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: those the model supports)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="raw results (default out/benchmark.json; --dense: *_dense.json)")
    p.add_argument("--docs", default="docs/benchmarks.md")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=3600.0,
        help="seconds to wait, before each worker, for other processes to leave the CPUs",
    )
    p.add_argument("--retries", type=int, default=3, help="reruns of a worker that other processes disturbed")
    d = p.add_argument_group("dense prediction (semantic segmentation, configs/ade20k)")
    d.add_argument("--dense", action="store_true", help="benchmark the dense settings instead of classification")
    d.add_argument("--dense-settings", default=None, help=f"comma-separated subset of {', '.join(DENSE_SETTINGS)}")
    d.add_argument(
        "--dense-model",
        action="append",
        metavar="FAMILY=NAME",
        help=f"replace the timm model of a family ({', '.join(DENSE_FAMILIES)}), e.g. vit=test_vit (smoke tests)",
    )
    d.add_argument(
        "--dense-model-kwargs",
        action="append",
        metavar="FAMILY=JSON",
        help='extra timm.create_model arguments of a family, e.g. swin=\'{"embed_dim": 16, "depths": [1,1,1,1]}\'',
    )
    d.add_argument("--dense-channels", type=int, default=None, help="UperNet channels (default: the configs' 512)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dense_only = {
        "--dense-settings": args.dense_settings,
        "--dense-model": args.dense_model,
        "--dense-model-kwargs": args.dense_model_kwargs,
        "--dense-channels": args.dense_channels,
    }
    given = [flag for flag, value in dense_only.items() if value is not None]
    if args.dense and (args.model is not None or args.methods is not None):
        p.error("--model and --methods are for classification; with --dense use --dense-settings / --dense-model")
    if not args.dense and given:
        p.error(f"{', '.join(given)} need --dense")
    for key, (cls_default, dense_default) in MODE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, dense_default if args.dense else cls_default)
    if args.model is None and not args.dense:
        args.model = "vit_base_patch16_224"
    return p, args


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; run one worker or the whole benchmark."""
    p, args = parse_args(argv)
    if args.worker:
        result = dense_worker(args.worker, args) if args.dense else worker(args.worker, args)
        print(json.dumps(result), flush=True)
        return 0
    if args.dense:
        return main_dense(p, args)
    if args.methods is None:
        names = [n for n in CONFIGS if supported(n, args.model, args.img_size)]
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    results = run_all(names, args)
    facts = machine_facts(args)
    tbl, checks = table(results), check_targets(results)
    print(tbl + "\n\n" + "\n".join(checks))
    write_json(args, {"machine": facts, "results": results, "checks": checks})
    write_docs(Path(args.docs), tbl, checks, facts, args)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
