"""Adapter files: inference mode on load, consistent pairs under concurrent saves, checked values and
configs, one wrapper per model, failed loads that change nothing, usual file permissions."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import image, make_vit, seeded
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft import _io
from visionpeft.engine.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _snapshot(pm: vp.PeftVisionModel, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = pm(x)
    return {
        "out": out,
        "state": {k: v.clone() for k, v in pm.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in pm.named_parameters()},
        "hooks": _hooks(pm),
        "adapters": list(pm.adapters),
        "active": pm.active_adapter,
        "training": [m.training for m in pm.modules()],
    }


def _assert_same(before: dict, after: dict) -> None:
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["hooks"] == before["hooks"]
    assert after["grads"] == before["grads"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert torch.equal(after["out"], before["out"])


def _save(tmp_path: Path, name: str, seed: int = 0, **lora) -> Path:
    torch.manual_seed(seed)
    pm = vp.get_peft_model(make_vit().eval(), vp.LoRAConfig(rank=2, init_weights=False, **lora))
    return pm.save_adapter(tmp_path / name)


def _rewrite_tensors(directory: Path, change) -> None:
    """Replace the adapter's tensors by ``change(tensors)`` and record the new file's checksum, so that
    only the values (not the pair check) can make a load fail."""
    tensors = load_file(str(directory / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "adapter.safetensors"))
    meta = json.loads((directory / "adapter_config.json").read_text())
    if "weights_sha256" in meta:
        meta["weights_sha256"] = hashlib.sha256((directory / "adapter.safetensors").read_bytes()).hexdigest()
        (directory / "adapter_config.json").write_text(json.dumps(meta))


# 1. loading for inference -------------------------------------------------------------------------


def test_load_for_inference_is_eval_and_deterministic(tmp_path):
    d = _save(tmp_path, "a", dropout=0.1)
    x = image()
    base = seeded(make_vit).train()
    loaded = vp.load_adapter(base, d)
    assert not any(m.training for m in loaded.modules())
    torch.testing.assert_close(loaded(x), loaded(x), rtol=0, atol=0)

    pm = vp.get_peft_model(seeded(make_vit), vp.BitFitConfig()).train()
    pm.load_adapter(d, "b")
    assert not any(m.training for m in pm.modules())
    torch.testing.assert_close(pm(x), pm(x), rtol=0, atol=0)


def test_load_trainable_keeps_mode(tmp_path):
    d = _save(tmp_path, "a", dropout=0.1)
    loaded = vp.load_adapter(seeded(make_vit).train(), d, is_trainable=True)
    assert loaded.training and all(m.training for m in loaded.modules())
    assert any(p.requires_grad for p in loaded.peft_modules["default"].parameters())
    loaded = vp.load_adapter(seeded(make_vit).eval(), d, is_trainable=True)
    assert not loaded.training


# 2. the two files of an adapter are one save --------------------------------------------------------


def test_concurrent_save_never_mixes_two_saves(tmp_path):
    # two adapters with equal shapes: a mix (JSON of one, tensors of the other) would load silently
    d = tmp_path / "shared"
    saves = {}
    models = {}
    for alpha, seed in ((2.0, 0), (8.0, 1)):
        torch.manual_seed(seed)
        pm = vp.get_peft_model(make_vit().eval(), vp.LoRAConfig(rank=2, alpha=alpha, init_weights=False))
        models[alpha] = pm
        saves[alpha] = {k: v.detach().clone() for k, v in pm.adapter_state_dict().items()}
    models[2.0].save_adapter(d)
    stop = threading.Event()
    errors = []

    def writer() -> None:
        try:
            while not stop.is_set():
                for pm in models.values():
                    pm.save_adapter(d)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    base = seeded(make_vit)
    loaded_ok, refused, mixed = 0, 0, []
    try:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and loaded_ok + refused < 80:
            try:
                pm = vp.load_adapter(base, d)
            except vp.AdapterFileError as e:
                assert "shared" in str(e)
                refused += 1
                continue
            alpha = pm.peft_config["default"].alpha
            state = pm.adapter_state_dict()
            if not all(torch.equal(state[k], v) for k, v in saves[alpha].items()):
                mixed.append(alpha)
            loaded_ok += 1
            base = pm.unload()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors
    assert not mixed, f"{len(mixed)} of {loaded_ok} loads combined the config of one save with another's tensors"
    assert loaded_ok >= 10, (loaded_ok, refused)


def test_tensors_of_another_save_are_refused(tmp_path):
    a = _save(tmp_path, "a", seed=0, alpha=2.0)
    b = _save(tmp_path, "b", seed=1, alpha=8.0)
    (a / "adapter.safetensors").write_bytes((b / "adapter.safetensors").read_bytes())
    base = seeded(make_vit)
    with pytest.raises(vp.AdapterFileError, match=r"adapter files in .*a do not belong together"):
        vp.load_adapter(base, a)
    assert _hooks(base) == 0 and all(p.requires_grad for p in base.parameters())
    # a file of an older version (no checksum) still loads
    meta = json.loads((b / "adapter_config.json").read_text())
    del meta["weights_sha256"]
    (b / "adapter_config.json").write_text(json.dumps(meta))
    assert vp.load_adapter(base, b).peft_config["default"].alpha == 8.0


# 3. checked values and configs -----------------------------------------------------------------------


def _first_lora_b(tensors: dict) -> str:
    return sorted(k for k in tensors if k.endswith("lora_B"))[0]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t, k: t[k].view(-1).__setitem__(0, float("nan")), r"NaN or infinite values in {key} \(1 of"),
        (lambda t, k: t[k].view(-1).__setitem__(1, float("inf")), r"NaN or infinite values in {key} \(1 of"),
        (lambda t, k: t.__setitem__(k, (t[k] * 100).to(torch.int64)), r"not floating-point in the file: {key} "),
    ],
    ids=["nan", "inf", "int64"],
)
def test_bad_tensor_values_refused(tmp_path, change, match):
    d = _save(tmp_path, "a")
    key = _first_lora_b(load_file(str(d / "adapter.safetensors")))
    _rewrite_tensors(d, lambda t: change(t, key))
    base = seeded(make_vit)
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(vp.AdapterFileError, match=r"adapter\.safetensors.*" + match.format(key=key)):
        vp.load_adapter(base, d)
    assert _hooks(base) == 0
    assert all(torch.equal(pristine[k], v) for k, v in base.state_dict().items())
    pm = vp.get_peft_model(seeded(make_vit), vp.BitFitConfig())
    with pytest.raises(vp.AdapterFileError, match=match.format(key=key)):
        pm.load_adapter(d, "b")
    assert pm.adapters == ["default"]


def _edit(meta: dict, path: list, value) -> dict:
    target = meta
    for p in path[:-1]:
        target = target[p]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return meta


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (["config", "rank"], "2", r"rank: expected int, got \"2\""),
        (["config", "dropout"], "high", r"dropout: expected float, got \"high\""),
        (["config", "targets"], 5, r"targets: expected .*list.*got 5"),
        (["config", "init_weights"], 1, r"init_weights: expected bool, got 1"),
        (["config", "rnak"], 2, r"unknown option 'rnak'.*did you mean 'rank'"),
        (["config", "rank"], 0, r"rank must be > 0"),
        (["config", "method"], "bitfit", r"'config' is for method 'bitfit' but 'method' is 'lora'"),
        (["method"], "loraa", r"loraa"),
        (["method"], 3, r"wrong type for 'method'"),
        (["config"], [1, 2], r"wrong type for 'config'"),
        (["backbone"], KeyError, r"missing key\(s\) backbone"),
        (["config"], KeyError, r"missing key\(s\) config"),
    ],
)
def test_bad_config_names_the_file(tmp_path, path, value, match):
    d = _save(tmp_path, "a")
    meta = _edit(json.loads((d / "adapter_config.json").read_text()), path, value)
    (d / "adapter_config.json").write_text(json.dumps(meta))
    base = seeded(make_vit)
    with pytest.raises(vp.AdapterFileError, match=r"adapter_config\.json.*" + match):
        vp.load_adapter(base, d)
    assert _hooks(base) == 0 and "_visionpeft_wrapped" not in base.__dict__


@pytest.mark.parametrize("method", vp.list_methods())
def test_type_check_accepts_every_default_config(method):
    cls = vp.get_method(method).config_cls
    assert _io.check_field_types(cls, json.loads(json.dumps(cls().to_dict()))) == []
    assert _io.check_field_types(cls, {"init_weights": "yes"}) == ['init_weights: expected bool, got "yes"']


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null"])
def test_config_not_an_object(tmp_path, content):
    d = _save(tmp_path, "a")
    (d / "adapter_config.json").write_text(content)
    with pytest.raises(vp.AdapterFileError, match=r"adapter_config\.json is not a visionpeft adapter config"):
        vp.load_adapter(seeded(make_vit), d)


def test_config_that_fits_no_module_names_the_folder(tmp_path):
    d = _save(tmp_path, "a")
    meta = json.loads((d / "adapter_config.json").read_text())
    meta["config"]["modules_to_save"] = ["haed"]
    (d / "adapter_config.json").write_text(json.dumps(meta))
    base = seeded(make_vit)
    with pytest.raises(vp.AdapterFileError, match=r"adapter in .*a cannot be attached.*no module named 'haed'"):
        vp.load_adapter(base, d)
    assert _hooks(base) == 0
    vp.get_peft_model(base, vp.LoRAConfig())  # the base model is not left marked as wrapped


# 4. one wrapper per base model ------------------------------------------------------------------------


def test_second_wrapper_on_the_same_model_refused(tmp_path):
    base = seeded(make_vit)
    keys = set(base.state_dict())
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=2, init_weights=False))
    x = image()
    out, hooks = pm(x), _hooks(base)
    with pytest.raises(ValueError, match=r"already carries visionpeft adapters.*add_adapter.*unload\(\)"):
        vp.get_peft_model(base, vp.AdaptFormerConfig(bottleneck=4, init_weights=False))
    assert _hooks(base) == hooks
    torch.testing.assert_close(pm(x), out, rtol=0, atol=0)
    assert set(base.state_dict()) == keys  # the mark is a plain attribute

    d = _save(tmp_path, "a")
    with pytest.raises(
        ValueError, match=r"already carries visionpeft adapters.*load the adapter through that wrapper"
    ):
        vp.load_adapter(base, d)
    assert _hooks(base) == hooks
    assert vp.load_adapter(pm, d, "b") is pm and pm.adapters == ["default", "b"]

    plain = pm.unload()
    again = vp.get_peft_model(plain, vp.AdaptFormerConfig(bottleneck=4))
    merged = vp.get_peft_model(again.unload(), vp.LoRAConfig(rank=2)).merge_and_unload()
    assert vp.load_adapter(merged, d).adapters == ["default"]


def test_submodule_of_a_wrapped_model_refused():
    base = seeded(make_vit)
    vp.get_peft_model(base, vp.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already carries visionpeft adapters"):
        vp.get_peft_model(base.blocks[0], vp.LoRAConfig(rank=2, targets=["attn.qkv"]))


# 5. a failed load changes nothing -------------------------------------------------------------------


def test_failed_load_onto_merged_model_changes_nothing(tmp_path):
    d = _save(tmp_path, "a", seed=3)
    pm = vp.get_peft_model(seeded(make_vit), vp.LoRAConfig(rank=2, init_weights=False))
    pm.merge()
    x = image()
    before = _snapshot(pm, x)
    with pytest.raises(RuntimeError, match=r"'default' is merged.*unmerge\(\) before loading"):
        pm.load_adapter(d, "b")
    _assert_same(before, _snapshot(pm, x))
    pm.unmerge()
    pm.load_adapter(d, "b")
    assert pm.adapters == ["default", "b"] and pm.active_adapter == "b"


def test_failed_load_shape_mismatch_changes_nothing(tmp_path):
    d = _save(tmp_path, "a")  # head of 5 classes
    pm = vp.get_peft_model(seeded(make_vit, num_classes=7), vp.BitFitConfig(init_weights=False)).train()
    x = image()
    before = _snapshot(pm, x)
    with pytest.raises(vp.AdapterFileError, match=r"shape mismatches: modules_to_save-head"):
        pm.load_adapter(d, "other")
    _assert_same(before, _snapshot(pm, x))
    good = vp.get_peft_model(seeded(make_vit, num_classes=7), vp.LoRAConfig(rank=2, init_weights=False))
    good.save_adapter(tmp_path / "good")
    pm.load_adapter(tmp_path / "good", "other")
    assert pm.adapters == ["default", "other"]
    torch.testing.assert_close(pm(x), good.eval()(x))


def test_late_failure_is_rolled_back(tmp_path, monkeypatch):
    d = _save(tmp_path, "a")
    pm = vp.get_peft_model(seeded(make_vit), vp.LoRAConfig(rank=2, init_weights=False))
    pm.add_adapter("second", vp.AdaptFormerConfig(bottleneck=4, init_weights=False))
    pm.set_adapter("second")
    pm.base_model.blocks[1].train()  # a mixed train / eval state must come back as it was
    x = image()
    before = _snapshot(pm, x)

    def broken(self, name):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(vp.PeftVisionModel, "set_adapter", broken)
    with pytest.raises(RuntimeError, match="injected failure"):
        pm.load_adapter(d, "b")
    monkeypatch.undo()
    _assert_same(before, _snapshot(pm, x))
    pm.load_adapter(d, "b")
    assert pm.adapters == ["default", "second", "b"]


# 6. files get the usual permissions; no temporary file survives the next save -----------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        d = _save(tmp_path, "a")
        save_checkpoint(tmp_path / "run" / "last.ckpt", {"x": torch.zeros(2)})
        _io.save_json(tmp_path / "run" / "results.json", {"acc": 1.0})
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for f in (d / "adapter.safetensors", d / "adapter_config.json", tmp_path / "run" / "last.ckpt"):
        assert stat.S_IMODE(f.stat().st_mode) == want, f
    assert stat.S_IMODE((tmp_path / "run" / "results.json").stat().st_mode) == want


_KILLED_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("vp_io", sys.argv[1])
io = importlib.util.module_from_spec(spec)
spec.loader.exec_module(io)

def write(tmp):
    with open(tmp, "w") as fh:
        fh.write("{half a")
        fh.flush()
    print("writing", flush=True)
    time.sleep(60)

io.atomic_write(sys.argv[2], write)
"""


def test_interrupted_write_leaves_no_temp_after_next_save(tmp_path):
    target = tmp_path / "a" / "adapter_config.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(ROOT / "visionpeft" / "_io.py"), str(target)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    left = list(target.parent.glob(".adapter_config.json.*.tmp"))
    assert len(left) == 1 and not target.exists()  # the kill left its temporary file
    old = time.time() - 3600
    os.utime(left[0], (old, old))
    # kept: a live writer's file (this process), a fresh file, and another target's temporary file
    live = target.parent / f".adapter_config.json.{os.getpid()}.0123456789ab.tmp"
    fresh = target.parent / f".adapter_config.json.{proc.pid}.ba9876543210.tmp"
    other = target.parent / f".adapter.safetensors.{proc.pid}.0123456789ab.tmp"
    legacy = target.parent / ".adapter_config.json.ab12cd_4.tmp"  # tempfile.mkstemp's name: judged by age
    for f in (live, fresh, other, legacy):
        f.write_text("x")
    for f in (live, other, legacy):
        os.utime(f, (old, old))

    torch.manual_seed(0)
    vp.get_peft_model(make_vit(), vp.LoRAConfig(rank=2)).save_adapter(target.parent)
    assert not left[0].exists() and not legacy.exists()
    assert live.exists() and fresh.exists()
    assert not other.exists()  # the tensors file was saved too: its dead writer's old file is gone
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(
        ["adapter.safetensors", "adapter_config.json", live.name, fresh.name]
    )
    assert vp.load_adapter(seeded(make_vit), target.parent).adapters == ["default"]


def test_atomic_write_failure_leaves_nothing(tmp_path):
    def write(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(tmp_path / "f.json", write)
    assert list(tmp_path.iterdir()) == []


def test_a_new_adapter_follows_the_models_mode():
    """Wrapping a model in eval mode gives an adapter in eval mode: its dropout is off, outputs repeat."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=2, dropout=0.5, init_weights=False))
    assert not any(m.training for m in pm.peft_modules.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pm(x), pm(x))
    pm.add_adapter("b", vp.LoRAConfig(rank=2, dropout=0.5, init_weights=False))
    assert not any(m.training for m in pm.peft_modules["b"].modules())


def test_a_file_saved_under_the_generic_spec_loads_once_the_family_has_a_spec(tmp_path):
    """Adapters saved before a family had its spec recorded ``generic``; the same architecture still loads them."""
    import json

    import timm

    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=2, targets=["qkv"], init_weights=False))
    x = torch.randn(2, 3, 32, 32)
    out = pm(x)
    pm.save_adapter(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["backbone"] = "generic"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    other = timm.create_model("test_vit", num_classes=3, img_size=32).eval()
    torch.testing.assert_close(vp.load_adapter(other, tmp_path / "a")(x), out)
    meta["backbone"] = "timm_swin"  # another family's spec is still refused
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(vp.AdapterFileError, match="saved for"):
        vp.load_adapter(timm.create_model("test_vit", num_classes=3, img_size=32), tmp_path / "a")
