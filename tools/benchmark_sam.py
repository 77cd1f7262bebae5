"""Benchmark SAM adaptation: every method against full fine-tuning and decoder-only tuning, with and without
activation checkpointing of the image encoder.

Each setting runs in a fresh worker process (``benchmark_sam.py --worker NAME``, through ``tools/benchmark.py``'s
``run_worker``) that builds SAM (``build_sam``, random weights, no download) of ``--size`` at ``--img-size``,
attaches the method to the whole ``Sam`` (``vp.get_peft_model``; the mask decoder trains with it, the prompt encoder
stays frozen) and measures on CPU, batch 1, one promptable training step as the SAM adapters train it:

* ``sam.image_encoder(x)`` on a ``(1, 3, S, S)`` image (the adapters' hooks run inside it),
* ``sam.prompt_encoder`` on one box prompt, ``sam.mask_decoder`` with ``multimask_output=False``
  (``Sam.forward`` is not used: it runs under ``torch.no_grad``),
* loss = BCE-with-logits of the low-resolution mask logits ``(1, 1, S/4, S/4)`` against a fixed random binary mask
  + MSE of the IoU prediction against a fixed random target; backward; AdamW step on the trainable parameters.

Columns: trainable parameters (and their share of SAM's parameters), the size of the files ``save_adapter`` writes,
the peak RSS increase during the training steps, the median step time, and the ratios of memory and time to full
fine-tuning (without checkpointing) measured in the same run; each method with and without
``set_grad_checkpointing`` side by side. The table is printed, the raw results go to ``--out`` and the section
between :data:`SAM_BEGIN` and :data:`SAM_END` of ``--docs`` is rewritten (the rest of the page is kept).

Usage::

    python tools/benchmark_sam.py --threads 2 --steps 2 --warmup 1
    python tools/benchmark_sam.py --settings lora,lora_ckpt,full --size sam_vit_l
    python tools/benchmark_sam.py --tiny --img-size 64 --steps 1 --warmup 0 --settings lora,full --idle-wait 0
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.backbones.sam import SAM_ARCHS, TINY_SAM, build_sam, sam_options, set_grad_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (  # noqa: E402
    OTHER_LIMIT,
    dense_section,
    fmt,
    machine_facts,
    measure_training,
    ratio,
    run_all,
    run_worker,
    write_dense_docs,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
SAM_BEGIN = "<!-- sam benchmark: begin (written by tools/benchmark_sam.py) -->"
SAM_END = "<!-- sam benchmark: end -->"
CKPT = "_ckpt"  # suffix of a setting with the image encoder's activations recomputed in the backward pass
REFERENCE = "full"  # the ratios' denominator: full fine-tuning without checkpointing


def _paper(variant: str) -> dict[str, Any]:
    """The options of a method-table variant (``lora_qv`` -> rank 8, alpha 8, q and v slices)."""
    for method in vp.list_methods():
        for v in vp.get_method(method).variants:
            if v.id == variant and v.paper is not None:
                return dict(v.paper)
    raise KeyError(f"no method variant {variant!r} with published options")


def sam_methods() -> dict[str, tuple[str, dict[str, Any]]]:
    """setting -> (method, options): the method table's options, LoRA and DoRA on q and v of the fused qkv as in
    SAMed, LoRA on all of qkv and the attention projection, decoder-only (``linear_probe``: only the mask decoder
    trains) and full fine-tuning (image encoder and mask decoder)."""
    lora = _paper("lora_qv")
    return {
        "full": ("full", {}),
        "decoder_only": ("linear_probe", {}),
        "lora": ("lora", lora),
        "lora_qkv_proj": ("lora", {"rank": lora["rank"], "alpha": lora["alpha"], "targets": ["qkv", "attn_out"]}),
        "dora": ("dora", _paper("dora_qv")),
        "adaptformer": ("adaptformer", _paper("adaptformer")),
        "adapter": ("adapter", _paper("adapter_houlsby")),
        "parallel_adapter": ("parallel_adapter", _paper("parallel_adapter")),
        "bitfit": ("bitfit", _paper("bitfit")),
        "ssf": ("ssf", _paper("ssf")),
        "ln_tune": ("ln_tune", _paper("ln_tune")),
    }


SAM_METHODS = sam_methods()
SAM_SETTINGS = [s for m in SAM_METHODS for s in (m, m + CKPT)]  # each method, then with checkpointing


def split_setting(name: str) -> tuple[str, bool]:
    """``lora_ckpt`` -> ``("lora", True)``; ``lora`` -> ``("lora", False)``."""
    if name.endswith(CKPT) and name[: -len(CKPT)] in SAM_METHODS:
        return name[: -len(CKPT)], True
    return name, False


def make_sam(args: argparse.Namespace) -> nn.Module:
    """The random-weight SAM of this run (seeded: every worker builds the same weights)."""
    torch.manual_seed(0)
    return build_sam(args.size, img_size=args.img_size, **(TINY_SAM if args.tiny else {}))


def sam_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure setting ``name`` in this process: parameter counts, training step (time, memory), adapter files."""
    torch.set_num_threads(args.threads)
    key, checkpointing = split_setting(name)
    method, options = SAM_METHODS[key]
    sam = make_sam(args)
    sam_params = sum(p.numel() for p in sam.parameters())
    model = vp.get_peft_model(sam, method, **options)
    trainable, total = model.get_nb_trainable_parameters()
    if checkpointing:
        set_grad_checkpointing(sam)
    model.train()

    s = args.img_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, s, s, generator=gen)  # a normalised image
    box = torch.tensor([[0.25 * s, 0.25 * s, 0.75 * s, 0.75 * s]])  # one box prompt, xyxy in input pixels
    low_res = 4 * (s // int(sam.image_encoder.patch_embed.proj.kernel_size[0]))
    target = (torch.rand(1, 1, low_res, low_res, generator=gen) > 0.5).float()
    iou_target = torch.rand(1, 1, generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        embeddings = sam.image_encoder(x)  # (1, C, S/16, S/16)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        logits, iou = sam.mask_decoder(
            image_embeddings=embeddings,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )  # (1, 1, S/4, S/4), (1, 1)
        loss = F.binary_cross_entropy_with_logits(logits, target) + F.mse_loss(iou, iou_target)
        loss.backward()
        opt.step()

    measured = measure_training(step, args)
    opt.state.clear()
    opt.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_adapter(tmp)
        files = {p.name: p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    return {
        "name": name,
        "method": method,
        "options": options,
        "checkpointing": bool(getattr(sam.image_encoder, "grad_checkpointing", False)),  # as the model runs
        "trainable": trainable,
        "total": total,
        "sam_params": sam_params,
        "adapter_bytes": sum(files.values()),
        "adapter_files": files,
        **measured,
    }


def sam_worker_args(name: str, args: argparse.Namespace) -> list[str]:
    """The command-line arguments of the worker that measures ``name`` with this run's settings."""
    out = ["--worker", name, "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
    out += ["--img-size", str(args.img_size), "--size", args.size]
    return [*out, "--tiny"] if args.tiny else out


def run_sam_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``name`` in a fresh worker process of this script."""
    return run_worker(name, args, script=Path(__file__).resolve(), argv=sam_worker_args(name, args))


def size_text(n: int) -> str:
    """Bytes as ``12.3 KiB`` / ``4.56 MiB`` / ``345 MiB``."""
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    mib = n / 2**20
    return f"{mib:.2f} MiB" if mib < 100 else f"{mib:.0f} MiB"


def sam_table(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown row per method: counts, adapter file, memory and time without / with checkpointing, and their
    ratios to full fine-tuning without checkpointing."""
    head = [
        "setting",
        "method",
        "trainable",
        "% of SAM",
        "adapter file",
        "train +MB",
        "mem/full",
        "train +MB ckpt",
        "mem/full ckpt",
        "step s",
        "time/full",
        "step s ckpt",
        "time/full ckpt",
        "other load",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = results.get(REFERENCE, {})
    ref = {} if "error" in ref else ref
    for key, (method, options) in SAM_METHODS.items():
        plain, ckpt = results.get(key), results.get(key + CKPT)
        if plain is None and ckpt is None:
            continue
        runs = [r for r in (plain, ckpt) if r is not None and "error" not in r]
        first = runs[0] if runs else {}
        opts = ", ".join(f"{k} {v}" for k, v in options.items())

        def value(r: dict[str, Any] | None, field: str, scale: float, spec: str) -> str:
            return "-" if r is None else "error" if "error" in r else fmt(r[field] * scale, spec)

        def to_full(r: dict[str, Any] | None, field: str) -> str:
            return "-" if r is None else "error" if "error" in r else fmt(ratio(r[field], ref.get(field)), ".2f", "x")

        loads = [fmt(r.get("other_cores"), ".2f") for r in (plain, ckpt) if r is not None and "error" not in r]
        cells = [
            key,
            method + (f" ({opts})" if opts else ""),
            f"{first['trainable'] / 1e6:.3f}M" if first else "-",
            f"{100 * first['trainable'] / first['sam_params']:.3f}%" if first else "-",
            size_text(first["adapter_bytes"]) if first else "-",
            value(plain, "peak_train_increase_mb", 1, ".0f"),
            to_full(plain, "peak_train_increase_mb"),
            value(ckpt, "peak_train_increase_mb", 1, ".0f"),
            to_full(ckpt, "peak_train_increase_mb"),
            value(plain, "step_ms", 1e-3, ".2f"),
            to_full(plain, "step_ms"),
            value(ckpt, "step_ms", 1e-3, ".2f"),
            to_full(ckpt, "step_ms"),
            " / ".join(loads) or "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sam_notes(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per failed setting, per measurement disturbed by other processes, and for a missing reference."""
    lines = []
    for name, r in results.items():
        if "error" in r:
            lines.append(f"ERROR {name}: {r['error']}")
        elif r["other_cores"] > OTHER_LIMIT:
            lines.append(f"NOTE  {name}: other processes used {r['other_cores']:.2f} cores meanwhile (unreliable)")
    if "error" in results.get(REFERENCE, {"error": ""}):
        lines.append(f"NOTE  no ratios: the reference {REFERENCE} (full fine-tuning) was not measured")
    return lines


def sam_docs(tbl: str, notes: list[str], facts: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> str:
    """The SAM section of the benchmarks page: command (``argv``), setup, machine facts and load, columns, table,
    notes."""
    command = "python tools/benchmark_sam.py " + shlex.join(argv)
    model = f"`build_sam({args.size!r}, img_size={args.img_size}{', **TINY_SAM' if args.tiny else ''})`"
    sam = facts.get("sam_params")
    size = f" ({sam / 1e6:.1f}M parameters)" if sam else ""
    load = facts["loadavg"]
    return f"""## SAM: promptable segmentation, adapters vs full fine-tuning and decoder-only

Generated by `tools/benchmark_sam.py`; every setting ran in its own process, and all ratios come from this single
run.

Command:

```
{command.strip()}
```

Setup: {model}{size}, random weights (no download); batch 1, one box prompt; CPU; {args.warmup} warm-up +
{args.steps} measured steps (medians). A step: `sam.image_encoder` (the adapters' hooks on the `PeftVisionModel`
over the whole `Sam`), `sam.prompt_encoder` (frozen) on the box, `sam.mask_decoder` (`multimask_output=False`),
BCE-with-logits of the low-resolution mask logits against a fixed random mask + MSE of the IoU prediction,
backward, AdamW step on the trainable parameters. Every setting trains the mask decoder (the SAM spec's head);
`decoder_only` (`linear_probe`) trains nothing else; `full` trains the image encoder and the mask decoder.
Machine: {facts["cpu"]}, {facts["cores"]} cores, torch {facts["torch"]} ({facts["threads"]} threads), Python
{facts["python"]}; load average {load["start"]} at the start, {load["end"]} at the end (the machine is shared).

Columns: *trainable* = parameters AdamW updates (adapter + mask decoder); *% of SAM* = of SAM's own parameters;
*adapter file* = bytes `save_adapter` writes (`adapter.safetensors` + `adapter_config.json`; for `full` every
trained weight); *train +MB* = peak RSS increase over the model-loaded baseline during the training steps (sampled
every 5 ms; includes AdamW's state); *step s* = median step time; *ckpt* = the same setting with
`set_grad_checkpointing(sam)` (each encoder block's activations recomputed in the backward pass); *mem/full*,
*time/full* = ratios to `{REFERENCE}` (full fine-tuning without checkpointing) in this run; *other load* = mean CPU
cores used by other processes while the worker(s) ran (without / with checkpointing; a worker disturbed by more than
{OTHER_LIMIT} cores is rerun, up to `--retries` times). The raw results are in `{args.out}`.

{tbl}

Notes:

```
{chr(10).join(notes) or "none: every setting ran undisturbed"}
```
"""


def sam_section(text: str) -> str | None:
    """The SAM section of a benchmarks page (markers included), or ``None`` when it has none."""
    return dense_section(text, SAM_BEGIN, SAM_END)


def loadavg() -> str:
    """The 1 / 5 / 15 minute load averages of the machine."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and the parsed, checked command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="sam_vit_b", choices=sorted(SAM_ARCHS), help="SAM size (default sam_vit_b)")
    p.add_argument("--tiny", action="store_true", help="TINY_SAM overrides (a seconds-long smoke run)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 1024; --tiny: 64)")
    p.add_argument("--settings", default=None, help=f"comma-separated subset of {', '.join(SAM_SETTINGS)}")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    p.add_argument("--steps", type=int, default=2, help="measured steps (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/benchmark_sam.json", help="raw results (JSON)")
    p.add_argument("--docs", default="docs/benchmarks.md", help="page whose SAM section is rewritten")
    p.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        help="seconds to wait, before each worker, for other processes to leave the CPUs (default 60)",
    )
    p.add_argument("--retries", type=int, default=1, help="reruns of a worker that other processes disturbed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.img_size is None:
        args.img_size = 64 if args.tiny else 1024
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    patch = int(sam_options(args.size, **(TINY_SAM if args.tiny else {}))["patch_size"])
    if args.img_size <= 0 or args.img_size % patch:
        p.error(f"--img-size {args.img_size} must be a positive multiple of the patch size {patch}")
    if args.settings is None:
        args.settings = ",".join(SAM_SETTINGS)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAM_SETTINGS]
    if unknown or not names:
        p.error(f"--settings: unknown or no setting(s) {unknown}; choose from {', '.join(SAM_SETTINGS)}")
    args.settings = ",".join(names)
    return p, args


def main(argv: list[str] | None = None) -> int:
    """Parse the command line; run one worker or the whole benchmark."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _, args = parse_args(argv)
    if args.worker:
        print(json.dumps(sam_worker(args.worker, args)), flush=True)
        return 0
    start, t0 = loadavg(), time.perf_counter()
    results = run_all(args.settings.split(","), args, runner=run_sam_worker)
    facts = machine_facts(args)
    facts["loadavg"] = {"start": start, "end": loadavg()}
    facts["wall_s"] = round(time.perf_counter() - t0, 1)
    facts["sam_params"] = next((r["sam_params"] for r in results.values() if "sam_params" in r), None)
    tbl, notes = sam_table(results), sam_notes(results)
    print(tbl + "\n\n" + "\n".join(notes))
    write_json(args, {"machine": facts, "results": results, "notes": notes})
    write_dense_docs(Path(args.docs), sam_docs(tbl, notes, facts, args, argv), SAM_BEGIN, SAM_END)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
