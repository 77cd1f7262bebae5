"""The registry is the single source of the method table: tests, configs and benchmarks follow it."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from conftest import BACKBONES, matrix, rows, seeded

import visionpeft as vp
from visionpeft._registry import unregister_method

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


TOY = '''
"""A toy method: a learned per-channel gain on the outputs of the MLP's first Linear."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from visionpeft._registry import register_method
from visionpeft.config import MethodConfig
from visionpeft.methods import AdapterLayer, Method, Variant


@dataclasses.dataclass
class ToyGainConfig(MethodConfig):
    pass


class ToyGainLayer(AdapterLayer):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.toy_gain_scale = nn.Parameter(torch.ones(channels))

    def after(self, module, args, kwargs, output):
        return output * self.toy_gain_scale


@register_method("toy_gain")
class ToyGain(Method):
    config_cls = ToyGainConfig
    paper = "a toy"
    default_roles = (("mlp_in",),)
    accepts = (nn.Linear,)
    variants = (Variant("toy_gain", {}, lr=1e-2, paper={}, stem="toy-gain"),)

    @classmethod
    def make_layer(cls, site, cfg):
        return ToyGainLayer(site.module.out_features)

    @classmethod
    def site_params(cls, site, cfg):
        return site.module.out_features
'''


@pytest.fixture
def toy_method(tmp_path):
    path = tmp_path / "toy_gain.py"
    path.write_text(textwrap.dedent(TOY), encoding="utf-8")
    module = _load(path, "toy_gain_method")
    yield module
    unregister_method("toy_gain")
    sys.modules.pop("toy_gain_method", None)


def test_a_method_in_a_new_file_reaches_the_matrix_configs_benchmark_and_recipes(toy_method):
    assert "toy_gain" in vp.list_methods()
    assert [r.id for r in rows() if r.method == "toy_gain"] == ["toy_gain"]
    pairs = {p.id for p in matrix()}
    assert {"toy_gain-timm_vit", "toy_gain-timm_swin", "toy_gain-timm_convnext"} <= pairs
    assert "toy_gain-timm_resnet" not in pairs  # no mlp_in role there: declared unsupported
    gen = _load(ROOT / "tools" / "gen_configs.py", "gen_configs_under_test")
    assert ("toy-gain", {"name": "toy_gain"}, None) in gen.method_list("vit-b16")
    bench = _load(ROOT / "tools" / "benchmark.py", "benchmark_under_test")
    assert bench.configs()["toy_gain"] == ("toy_gain", {})
    from visionpeft.engine.adapt import recipes

    assert recipes()["toy_gain"].method == "toy_gain"
    # and the toy really works end to end through the public API
    pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"]), "toy_gain")
    assert pm.get_nb_trainable_parameters()[0] == sum(
        m.out_features for n, m in pm.base_model.named_modules() if n.endswith("mlp.fc1")
    ) + sum(p.numel() for p in pm.base_model.head.parameters())


@pytest.mark.parametrize("name", vp.list_methods())
def test_every_method_declares_its_table_entries(name):
    method = vp.get_method(name)
    assert method.paper, f"{name}: paper reference missing"
    assert method.__module__.rsplit(".", 1)[-1] == name, f"{name} must live in visionpeft/methods/{name}.py"
    assert method.variants, f"{name}: declare at least one Variant (test row, recipe, configs, benchmark)"
    assert any(v.paper is not None for v in method.variants), f"{name}: no variant with paper-scale options"
    assert len({v.id for v in method.variants}) == len(method.variants)
    supported_somewhere = False
    for backbone in BACKBONES:
        base = seeded(BACKBONES[backbone])
        spec = vp.detect_backbone(base)
        for v in method.variants:
            cfg = method.config_cls.from_dict(v.options)
            if method.unsupported_reason(base, spec, cfg) is not None:
                continue
            supported_somewhere = True
            count = method.param_count(base, method.sites(base, spec, cfg), cfg)  # raises if undeclared
            assert isinstance(count, int) and count >= 0
    assert supported_somewhere, f"{name}: no variant runs on any test backbone"
    doc = sys.modules[method.__module__].__doc__ or ""
    assert "arXiv" in doc or "baseline" in doc, f"{name}: the module docstring names the paper"


def test_variant_ids_are_unique_across_methods():
    ids = [r.id for r in rows()]
    assert len(ids) == len(set(ids))


def test_shipped_vtab_configs_are_what_the_generator_writes(tmp_path):
    gen = _load(ROOT / "tools" / "gen_configs.py", "gen_configs_under_test")
    gen.main(tmp_path)
    shipped = {p.name: p.read_text() for p in (ROOT / "configs" / "vtab").glob("*.yaml")}
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    assert sorted(fresh) == sorted(shipped), "run tools/gen_configs.py and commit configs/vtab"
    assert fresh == shipped


def test_weight_decay_follows_the_layers_declarations():
    from visionpeft.engine.optim import param_groups

    pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"]), "vpt", num_tokens=2, deep=True)
    groups = param_groups(pm, 1e-3, 0.05)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert (id(p) in no_decay) == (p.ndim <= 1 or n.endswith("vpt_prompts")), n
    full = vp.get_peft_model(seeded(BACKBONES["timm_vit"]), "full")
    names = {id(p): n for n, p in full.named_parameters()}
    no_decay = {names[id(p)] for g in param_groups(full, 1e-3, 0.05) if g["weight_decay"] == 0.0 for p in g["params"]}
    assert "base_model.pos_embed" in no_decay and "base_model.cls_token" in no_decay  # timm's declaration
    assert "base_model.blocks.0.attn.qkv.weight" not in no_decay


def test_adapter_parameter_names_carry_the_method_prefix():
    """Every method's parameters are named ``<method>_...`` (full fine-tuning and the linear probe train base
    weights and the head, which keep their own names)."""
    for name in vp.list_methods():
        if name in ("full", "linear_probe"):
            continue
        method = vp.get_method(name)
        for backbone in BACKBONES:
            base = seeded(BACKBONES[backbone])
            cfg = method.config_cls.from_dict({**method.variants[0].options, "modules_to_save": []})
            if method.unsupported_reason(base, vp.detect_backbone(base), cfg) is not None:
                continue
            pm = vp.get_peft_model(base, cfg)
            keys = list(pm.adapter_state_dict())
            assert keys, name
            for key in keys:
                assert key.rsplit(".", 1)[-1].startswith(name + "_"), f"{name}: {key}"
            break


def test_format_1_files_are_converted(tmp_path):
    """An adapter file of format 1 (old parameter names, AdaptFormer at the MLP input) loads and computes
    what it computed; a format-1 Conv-Adapter file, a different module then, is refused with a reason."""
    import json

    from safetensors.torch import load_file, save_file

    x = torch.randn(2, 3, 64, 64)
    for method, cfg, old in (
        ("adaptformer", vp.AdaptFormerConfig(placement="mlp", bottleneck=4, init_weights=False), ".adapter.down."),
        ("ln_tune", vp.LNTuneConfig(init_weights=False), ".ln_weight"),
        ("dora", vp.DoRAConfig(rank=2, init_weights=False), ".lora_A"),
    ):
        pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"]), cfg)
        out = pm(x)
        folder = tmp_path / method
        pm.save_adapter(folder)
        tensors = load_file(str(folder / "adapter.safetensors"))
        new_to_old = {v: k for k, v in vp.get_method(method).renamed_keys.items()}
        renamed = {}
        for k, v in tensors.items():
            for new, before in new_to_old.items():
                if k.endswith(new):
                    k = k[: -len(new)] + before
            renamed[k] = v
        assert any(old in k or k.endswith(old) for k in renamed)
        save_file(renamed, str(folder / "adapter.safetensors"))
        meta = json.loads((folder / "adapter_config.json").read_text())
        meta["format_version"] = 1
        meta.pop("weights_sha256", None)
        meta["config"].pop("placement", None)
        (folder / "adapter_config.json").write_text(json.dumps(meta))
        loaded = vp.load_adapter(seeded(BACKBONES["timm_vit"]), folder)
        torch.testing.assert_close(loaded(x), out)
    pm = vp.get_peft_model(seeded(BACKBONES["timm_resnet"]), vp.ConvAdapterConfig())
    pm.save_adapter(tmp_path / "ca")
    meta = json.loads((tmp_path / "ca" / "adapter_config.json").read_text())
    meta["format_version"] = 1
    (tmp_path / "ca" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(vp.AdapterFileError, match="format 1.*retrain"):
        vp.load_adapter(seeded(BACKBONES["timm_resnet"]), tmp_path / "ca")


def test_sites_are_resolved_by_the_base_class():
    method = vp.get_method("lora")
    base = timm.create_model("test_vit", num_classes=5, img_size=64)
    sites = method.sites(base, vp.detect_backbone(base), vp.LoRAConfig(layers=[1]))
    assert [(s.name, s.role, s.layout) for s in sites] == [("blocks.1.attn.qkv", "qkv", "NLC")]
