"""tools/benchmark_sam.py: a tiny run measures each setting in its own worker, the counts follow what trains, and the
SAM section of the benchmarks page is written between its markers and replaced by the next run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visionpeft.backbones.sam import TINY_SAM, build_sam

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "benchmark_sam.py"
TINY = ["--tiny", "--img-size", "64", "--steps", "1", "--warmup", "0", "--threads", "1"]
TINY += ["--idle-wait", "0", "--retries", "0"]


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_sam_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def _run(tmp_path: Path, settings: str, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(SCRIPT), *TINY, "--settings", settings]
    cmd += ["--out", str(tmp_path / out), "--docs", str(tmp_path / "benchmarks.md")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / out).read_text())


def test_tiny_run_measures_and_writes_its_section(tmp_path):
    page = tmp_path / "benchmarks.md"
    dense = (
        "<!-- dense benchmark: begin (written by tools/benchmark.py --dense) -->\nDENSE\n<!-- dense benchmark: end -->"
    )
    page.write_text(f"# Benchmarks\n\nclassification table\n\n{dense}\n")

    data = _run(tmp_path, "lora,decoder_only,full,lora_ckpt", "first.json")
    r = data["results"]
    assert list(r) == ["lora", "decoder_only", "full", "lora_ckpt"]
    assert all("error" not in v and v["step_ms"] > 0 and v["peak_rss_mb"] > 0 for v in r.values()), r
    # what trains: the mask decoder alone, LoRA's factors besides it, and everything outside the prompt encoder
    sam = build_sam("sam_vit_b", img_size=64, **TINY_SAM)
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    prompt = sum(p.numel() for p in sam.prompt_encoder.parameters())
    total = sum(p.numel() for p in sam.parameters())
    assert r["decoder_only"]["trainable"] == decoder
    assert r["full"]["trainable"] == total - prompt
    assert r["decoder_only"]["trainable"] < r["lora"]["trainable"] < r["full"]["trainable"]
    assert {v["sam_params"] for v in r.values()} == {total}
    assert r["lora"]["adapter_bytes"] < r["full"]["adapter_bytes"]
    assert r["full"]["adapter_bytes"] > 4 * (total - prompt)  # every trained float32 weight is in the file
    assert set(r["lora"]["adapter_files"]) == {"adapter.safetensors", "adapter_config.json"}
    assert r["lora_ckpt"]["checkpointing"] and not r["lora"]["checkpointing"]
    assert r["lora_ckpt"]["trainable"] == r["lora"]["trainable"]
    assert r["lora"]["options"] == {"rank": 8, "alpha": 8, "qkv_slices": "qv"}
    assert data["machine"]["loadavg"]["start"] and data["args"]["tiny"]

    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nclassification table") and dense in text  # the rest is kept
    section = bench.sam_section(text)
    assert section is not None and text.count(bench.SAM_BEGIN) == 1
    rows = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| ")}
    assert {"lora", "decoder_only", "full"} <= set(rows)
    lora = [c.strip() for c in rows["lora"].split("|")[1:-1]]
    assert lora[7] != "-" and lora[11] != "-"  # the checkpointed run sits beside the plain one
    assert [c.strip() for c in rows["full"].split("|")[1:-1]][6] == "1.00x"

    # a second run (in this process, its worker in another) replaces the section
    argv = [*TINY, "--settings", "decoder_only", "--out", str(tmp_path / "second.json"), "--docs", str(page)]
    assert bench.main(argv) == 0
    again = page.read_text()
    section = bench.sam_section(again)
    assert again.count(bench.SAM_BEGIN) == 1 and again.count(bench.SAM_END) == 1
    assert "| decoder_only |" in section and "| lora |" not in section and "--settings decoder_only" in section
    assert again.startswith("# Benchmarks\n\nclassification table") and dense in again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--settings", "lora,nope"], "nope"),
        (["--tiny", "--img-size", "60"], "patch size 8"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_options_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err
    if "nope" in argv[-1]:
        assert "lora_ckpt" in err  # the valid settings are listed


def test_every_method_appears_with_and_without_checkpointing():
    assert bench.SAM_SETTINGS[:2] == ["full", "full_ckpt"]
    assert len(bench.SAM_SETTINGS) == 2 * len(bench.SAM_METHODS)
    assert bench.split_setting("lora_qkv_proj_ckpt") == ("lora_qkv_proj", True)
    assert bench.split_setting("lora") == ("lora", False)
    methods = {m for m, _ in bench.SAM_METHODS.values()}
    assert {"full", "linear_probe", "lora", "dora", "adaptformer", "adapter", "parallel_adapter"} <= methods
    assert {"bitfit", "ssf", "ln_tune"} <= methods
