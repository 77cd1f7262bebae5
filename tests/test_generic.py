"""Models without a spec work with explicit module-name patterns; registries list what exists."""

from __future__ import annotations

import pytest
import timm
import torch

import visionpeft as vp


def test_registries_list_everything():
    methods = vp.list_methods()
    for name in ("lora", "dora", "adaptformer", "parallel_adapter", "adapter", "conv_adapter", "vpt", "bitfit", "ssf"):
        assert name in methods
    assert {"ln_tune", "linear_probe", "full"} <= set(methods)
    backbones = vp.list_backbones()
    assert backbones[-1] == "generic"
    assert {"timm_vit", "timm_samvit", "timm_swin", "timm_convnext", "timm_resnet"} <= set(backbones)
    for name in methods:
        cfg_cls = vp.get_method(name).config_cls
        assert cfg_cls.method == name and getattr(vp, cfg_cls.__name__) is cfg_cls


def test_timm_model_without_spec_uses_patterns(tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("test_byobnet", num_classes=4).eval()  # (EfficientNet has a spec now)
    assert vp.detect_backbone(base).name == "generic"
    with pytest.raises(ValueError, match="needs blocks with a pre-norm MLP"):
        vp.get_peft_model(base, "adaptformer")
    with pytest.raises(ValueError, match="needs the role"):
        vp.get_peft_model(base, "adaptformer", placement="mlp")
    pm = vp.get_peft_model(
        base, vp.LoRAConfig(rank=2, targets=[r"stages\.\d+\.\d+\.conv\w+\.conv"], init_weights=False)
    )
    sites = list(pm._targets["default"].values())
    assert sites and all(s.endswith(".conv") for s in sites[:-1]) and sites[-1] == "head.fc"
    x = torch.randn(2, 3, 64, 64)
    out = pm(x)
    pm.save_adapter(tmp_path / "a")
    torch.manual_seed(0)
    other = timm.create_model("test_byobnet", num_classes=4).eval()
    torch.testing.assert_close(vp.load_adapter(other, tmp_path / "a")(x), out)
    plain = pm.merge_and_unload()
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)


def test_plain_torch_module():
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    pm = vp.get_peft_model(net, vp.LoRAConfig(rank=2, targets=["0", "2"]))
    assert pm.get_nb_trainable_parameters()[0] == 2 * (6 + 8) + 2 * (8 + 3)
    assert pm(torch.randn(5, 6)).shape == (5, 3)


def test_method_by_name_with_keywords_equals_config():
    a = vp.get_peft_model(timm.create_model("test_vit", num_classes=3), "adaptformer", bottleneck=16, scale=0.5)
    b = vp.get_peft_model(timm.create_model("test_vit", num_classes=3), vp.AdaptFormerConfig(bottleneck=16, scale=0.5))
    assert a.peft_config["default"] == b.peft_config["default"]
    assert a.get_nb_trainable_parameters() == b.get_nb_trainable_parameters()


def test_config_json_round_trip():
    cfg = vp.LoRAConfig(rank=3, qkv_slices="qv", layers=[0, 2], exclude=["blocks.1"])
    data = cfg.to_dict()
    assert data["method"] == "lora"
    assert vp.LoRAConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="config is for method 'lora', not 'dora'"):
        vp.DoRAConfig.from_dict(data)


def test_unload_restores_the_users_requires_grad_flags():
    net = timm.create_model("test_vit", num_classes=3)
    net.patch_embed.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    pm = vp.get_peft_model(net, "lora", rank=2)
    assert not any(p.requires_grad for p in net.parameters())
    plain = pm.merge_and_unload()
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


def test_deit_distilled_saves_both_heads_and_vpt_keeps_two_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    make = lambda: timm.create_model(  # noqa: E731
        "deit_tiny_distilled_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=4
    ).eval()
    base = make()
    spec = vp.detect_backbone(base)
    assert spec.name == "timm_vit" and spec.head(base) == ["head", "head_dist"] and spec.num_prefix_tokens(base) == 2
    pm = vp.get_peft_model(base, vp.VPTConfig(num_tokens=3, deep=True, init_weights=False))
    x = torch.randn(2, 3, 32, 32)
    out = pm(x)
    pm.save_adapter(tmp_path / "a")
    torch.manual_seed(0)
    loaded = vp.load_adapter(make(), tmp_path / "a")
    torch.testing.assert_close(loaded(x), out)
    assert {"modules_to_save-head", "modules_to_save-head_dist"} <= set(loaded.peft_modules["default"].keys())
