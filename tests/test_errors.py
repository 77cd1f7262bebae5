"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import image, make_convnext, make_resnet, make_vit, seeded

import visionpeft as vp


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def _unchanged(model, snap):
    state, grads, hooks = snap
    now = _snapshot(model)
    assert all(torch.equal(state[k], now[0][k]) for k in state)
    assert grads == now[1]
    assert hooks == now[2]


def test_unknown_method_lists_registered():
    base = seeded(make_vit)
    snap = _snapshot(base)
    with pytest.raises(KeyError, match=r"lora.*Registered: .*adaptformer"):
        vp.get_peft_model(base, "loraa")
    _unchanged(base, snap)


def test_unknown_option_suggests():
    with pytest.raises(ValueError, match="did you mean 'rank'"):
        vp.get_peft_model(seeded(make_vit), "lora", rnak=4)


def test_targets_matching_nothing_list_close_names():
    base = seeded(make_vit)
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"match no suitable module.*Roles of timm_vit.*qkv"):
        vp.get_peft_model(base, vp.LoRAConfig(targets=["qvk"]))
    with pytest.raises(ValueError, match=r"Close module names: .*fc1"):
        vp.get_peft_model(base, vp.LoRAConfig(targets=["fc11"]))
    with pytest.raises(ValueError, match=r"layers=\[40\]; the backbone has 6 blocks"):
        vp.get_peft_model(base, vp.LoRAConfig(layers=[40]))
    _unchanged(base, snap)


def test_vpt_on_backbones_without_tokens():
    for make in (make_convnext, make_resnet):  # (Swin takes window prompts: tests/test_vpt_swin.py)
        base = seeded(make)
        snap = _snapshot(base)
        with pytest.raises(ValueError, match="vpt needs a backbone whose blocks see a token sequence"):
            vp.get_peft_model(base, vp.VPTConfig(deep=True))
        _unchanged(base, snap)


def test_merge_of_unmergeable_method_names_it():
    pm = vp.get_peft_model(seeded(make_vit), vp.AdaptFormerConfig(bottleneck=4))
    with pytest.raises(ValueError, match="'adaptformer' cannot be merged.*mergeable methods: .*lora"):
        pm.merge_and_unload()


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="rank must be > 0"):
        vp.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="qkv_slices"):
        vp.LoRAConfig(qkv_slices="qx")
    with pytest.raises(ValueError, match="placement"):
        vp.AdapterConfig(placement="middle")
    with pytest.raises(TypeError, match="only accepted with a method name"):
        vp.get_peft_model(seeded(make_vit), vp.LoRAConfig(), rank=3)


@pytest.fixture
def saved(tmp_path):
    pm = vp.get_peft_model(seeded(make_vit), vp.LoRAConfig(rank=2, init_weights=False))
    pm.save_adapter(tmp_path / "a")
    return tmp_path / "a"


def test_load_into_other_backbone(saved):
    base = seeded(make_resnet)
    snap = _snapshot(base)
    with pytest.raises(vp.AdapterFileError, match=r"saved for 'test_vit'.*this model is 'test_resnet'"):
        vp.load_adapter(base, saved)
    _unchanged(base, snap)


def test_load_with_other_shapes(saved):
    base = seeded(make_vit, num_classes=7)  # head shape differs
    snap = _snapshot(base)
    with pytest.raises(
        vp.AdapterFileError, match=r"shape mismatches: modules_to_save-head.module.bias: file \(5,\) vs model \(7,\)"
    ):
        vp.load_adapter(base, saved)
    _unchanged(base, snap)


def test_load_rank_mismatch_in_config(saved):
    meta = json.loads((saved / "adapter_config.json").read_text())
    meta["config"]["rank"] = 3
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    base = seeded(make_vit)
    snap = _snapshot(base)
    with pytest.raises(vp.AdapterFileError, match="lora_A: file"):
        vp.load_adapter(base, saved)
    _unchanged(base, snap)


def test_truncated_and_corrupted_files(saved):
    f = saved / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    base = seeded(make_vit)
    snap = _snapshot(base)
    with pytest.raises(vp.AdapterFileError, match=r"adapter.safetensors \(truncated or corrupted"):
        vp.load_adapter(base, saved)
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(vp.AdapterFileError, match="truncated or corrupted"):
        vp.load_adapter(base, saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(vp.AdapterFileError, match="adapter_config.json"):
        vp.load_adapter(base, saved)
    _unchanged(base, snap)


def test_missing_directory_named(tmp_path):
    with pytest.raises(vp.AdapterFileError, match="nowhere"):
        vp.load_adapter(seeded(make_vit), tmp_path / "nowhere")


def test_existing_peft_model_load_failure_keeps_it_working(saved):
    pm = vp.get_peft_model(seeded(make_vit, num_classes=7), vp.BitFitConfig(init_weights=False))
    x = image()
    out = pm(x)
    with pytest.raises(vp.AdapterFileError):
        pm.load_adapter(saved, "other")
    assert pm.adapters == ["default"]
    torch.testing.assert_close(pm(x), out)


def test_wrapping_twice_and_bad_adapter_names():
    pm = vp.get_peft_model(seeded(make_vit), vp.LoRAConfig())
    with pytest.raises(TypeError, match="already a PeftVisionModel"):
        vp.get_peft_model(pm, vp.LoRAConfig())
    with pytest.raises(ValueError, match="exists already"):
        pm.add_adapter("default", vp.LoRAConfig())
    with pytest.raises(KeyError, match=r"no adapter named 'x'; adapters: \['default'\]"):
        pm.set_adapter("x")
    with pytest.raises(ValueError, match="modules_to_save: no module named 'haed'.*head"):
        pm.add_adapter("b", vp.LoRAConfig(modules_to_save=["haed"]))


def test_a_second_full_finetuning_adapter_is_refused():
    pm = vp.get_peft_model(seeded(make_vit), "full")
    with pytest.raises(ValueError, match="only one full fine-tuning adapter"):
        pm.add_adapter("again", vp.FullFinetuneConfig())
    assert pm.adapters == ["default"]
