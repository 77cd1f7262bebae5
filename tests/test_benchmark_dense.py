"""tools/benchmark.py --dense: the settings follow configs/ade20k, a tiny worker measures in-process, and the dense
section of docs/benchmarks.md is rewritten without touching the rest of the page."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from visionpeft.engine.experiment import read_yaml

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("benchmark_dense_under_test", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench()
TINY = ["--dense", "--dense-model", "vit=test_vit", "--dense-channels", "8", "--img-size", "32"]
TINY += ["--steps", "1", "--warmup", "0", "--threads", "1"]


def _family(model_name: str) -> str:
    return next(f for f, (m, _) in bench.DENSE_MODELS.items() if model_name.split(".")[0] == m)


def test_settings_use_the_options_of_the_ade20k_configs():
    """Every configs/ade20k file whose backbone, method and neck a setting has carries that setting's options, and
    the settings' model size flag, head and auxiliary head are the configs' own."""
    matched = set()
    for path in sorted((ROOT / "configs" / "ade20k").glob("*.yaml")):
        data = read_yaml(path)
        family = _family(data["model"]["name"])
        method = dict(data["method"])
        name = method.pop("name")
        neck = (data.get("task") or {}).get("neck") or ("simple_pyramid" if family == "vit" else "native")
        same = [k for k, s in bench.DENSE_SETTINGS.items() if (s.family, s.method, s.neck) == (family, name, neck)]
        for k in same:
            assert bench.DENSE_SETTINGS[k].options == method, f"{k} differs from {path.name}"
            assert ("img_size" in data["model"]) == bench.DENSE_MODELS[family][1], path.name
            matched.add(k)
    assert len(matched) >= 9, matched
    for k, s in bench.DENSE_SETTINGS.items():
        ref = bench.DENSE_SETTINGS[s.reference]
        assert (ref.method, ref.family, ref.neck) == ("full", s.family, s.neck), k
    base = read_yaml(ROOT / bench.DENSE_BASE)["task"]
    assert (base["name"], base["head"], base["head_kwargs"]["channels"], base["aux_weight"]) == (
        "segmentation",
        "upernet",
        512,
        0.4,
    )


@pytest.mark.parametrize("name", ["vit_adapter", "vit_lora"])
def test_tiny_dense_worker_measures_in_process(name):
    """A tiny worker: the keys the table reads, the neck of the setting, and what trains (nothing in the ViT for the
    frozen ViT-Adapter; LoRA's factors besides the neck and heads)."""
    _, args = bench.parse_args(TINY)
    r = bench.dense_worker(name, args)
    assert {"trainable", "total", "step_ms", "peak_train_increase_mb", "peak_rss_mb", "model", "neck"} <= set(r)
    assert r["model"] == "test_vit" and r["neck"] == bench.DENSE_SETTINGS[name].neck
    assert r["step_ms"] > 0 and r["head"] == "upernet" and r["head_channels"] == 8 and r["aux_weight"] == 0.4
    cfg = bench.dense_config(name, args)
    from visionpeft.engine.tasks import SegmentationTask

    model = SegmentationTask(cfg).build_model(bench.DENSE_CLASSES)
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("peft."))
    in_vit = r["trainable"] - dense
    assert r["total"] == sum(p.numel() for p in model.parameters())
    if name == "vit_adapter":
        assert in_vit == 0
    else:
        assert 0 < in_vit < 0.2 * (r["total"] - dense)


def test_dense_section_replaces_only_itself_and_survives_a_classification_run(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\nclassification table\n\n## Reading the misses\n\nnotes\n")
    results = {
        "vit_full": {"error": "worker killed by SIGKILL (out of memory?): |x|"},
        "vit_lora": {
            "model": "test_vit.tag",
            "neck": "simple_pyramid",
            "method": "lora",
            "options": {"rank": 8},
            "trainable": 2_000_000,
            "total": 3_000_000,
            "step_ms": 100.0,
            "peak_train_increase_mb": 50.0,
            "peak_rss_mb": 800.0,
            "other_cores": 0.1,
        },
    }
    tbl = bench.dense_table(results)
    assert "| vit_full | error: worker killed by SIGKILL (out of memory?): /x/ |" in tbl
    row = next(ln for ln in tbl.splitlines() if ln.startswith("| vit_lora |"))
    assert "| test_vit | simple_pyramid | lora (rank 8) | 2.000M | 3.00M | - | 100 | - | 50 | - | 800 | 0.10 |" in row
    assert any(n.startswith("NOTE  vit_lora: no ratios") for n in bench.dense_notes(results))
    bench.write_dense_docs(page, "## Dense\n\nfirst")
    bench.write_dense_docs(page, "## Dense\n\nsecond")
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nclassification table\n\n## Reading the misses\n\nnotes\n")
    assert text.count(bench.DENSE_BEGIN) == 1 and "second" in text and "first" not in text
    _, args = bench.parse_args(["--steps", "1"])
    bench.write_docs(page, "new classification table", [], bench.machine_facts(args), args)
    text = page.read_text()
    assert "new classification table" in text and "## Reading the misses" not in text  # its own part: rewritten
    assert bench.dense_section(text) == f"{bench.DENSE_BEGIN}\n## Dense\n\nsecond\n{bench.DENSE_END}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--dense-channels", "8"],  # a dense option without --dense
        ["--dense", "--methods", "lora"],  # a classification option with --dense
    ],
)
def test_mixed_modes_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--dense" in capsys.readouterr().err


def test_dense_defaults_and_bad_family_override():
    _, args = bench.parse_args(["--dense"])
    assert (args.img_size, args.batch, args.steps, args.warmup) == (512, 2, 2, 1)
    _, args = bench.parse_args(["--dense", "--dense-model", "vitt=test_vit"])
    with pytest.raises(ValueError, match="FAMILY one of vit, swin, convnext"):
        bench.dense_config("vit_lora", args)
