"""The zoo: every method on every family, on small random-weight models of 26 timm architectures and
torchvision's four classification families.

For each architecture and each method variant: a method that declares support attaches, is the identity at
init where it promises so, changes the output when initialised at random, merges exactly (mergeable
methods) and saves / loads; a method that does not support the family raises its declared reason.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import rows

import visionpeft as vp

IMG = 32
V = dict(embed_dim=32, depth=2, num_heads=2, img_size=IMG, patch_size=8, num_classes=5)


def _metaformer(attention: bool) -> torch.nn.Module:
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    if attention:  # CAFormer: two ConvFormer stages, two attention stages
        mixers, norms = [SepConv, SepConv, Attention, Attention], [LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2
    else:  # ConvFormer
        mixers, norms = SepConv, LayerNorm2dNoBias
    return MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 64),
        token_mixers=mixers,
        norm_layers=norms,
        res_scale_init_values=(None, None, 1.0, 1.0),
        num_classes=5,
    )


def _mobilenetv3() -> torch.nn.Module:
    from timm.layers import get_act_layer
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.mobilenetv3 import MobileNetV3

    arch = [
        ["ds_r1_k3_s2_e1_c16_se0.25_nre"],
        ["ir_r1_k3_s2_e4.5_c24_nre"],
        ["ir_r1_k5_s2_e4_c40"],
        ["cn_r1_k1_s1_c48"],
    ]
    return MobileNetV3(
        decode_arch_def(arch), num_classes=5, stem_size=16, num_features=64, act_layer=get_act_layer("hard_swish")
    )


def _regnet() -> torch.nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8, se_ratio=0.25), num_classes=5)


def _swin(arch: str) -> torch.nn.Module:
    return timm.create_model(
        arch, embed_dim=16, depths=(1, 1), num_heads=(2, 2), img_size=IMG, window_size=4, num_classes=5
    )


def _convnext(arch: str) -> torch.nn.Module:
    return timm.create_model(arch, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_classes=5)


# architecture -> (builder, the spec it must be detected as)
ZOO = {
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224", **V), "timm_vit"),
    "deit3_small_patch16_224": (lambda: timm.create_model("deit3_small_patch16_224", **V), "timm_vit"),
    "vit_small_patch14_reg4_dinov2": (lambda: timm.create_model("vit_small_patch14_reg4_dinov2", **V), "timm_vit"),
    "vit_base_patch16_clip_224": (lambda: timm.create_model("vit_base_patch16_clip_224", **V), "timm_vit"),
    "vit_base_patch16_siglip_224": (lambda: timm.create_model("vit_base_patch16_siglip_224", **V), "timm_vit"),
    "samvit_base_patch16": (
        lambda: timm.create_model(
            "samvit_base_patch16",
            embed_dim=32,
            depth=2,
            num_heads=2,
            img_size=IMG,
            global_attn_indexes=(1,),
            window_size=2,
            num_classes=5,
            neck_chans=16,
        ),
        "timm_samvit",
    ),
    "eva02_tiny_patch14_224": (lambda: timm.create_model("eva02_tiny_patch14_224", **V), "timm_eva"),
    "eva02_base_patch14_224": (lambda: timm.create_model("eva02_base_patch14_224", **V), "timm_eva"),
    "eva02_post_norm": (
        lambda: timm.create_model("eva02_tiny_patch14_224", use_post_norm=True, **V),
        "timm_eva_post_norm",
    ),
    "vit_small_patch16_rope_224": (lambda: timm.create_model("vit_small_patch16_rope_224", **V), "timm_eva"),
    "vit_medium_patch16_rope_reg1_gap_256": (
        lambda: timm.create_model("vit_medium_patch16_rope_reg1_gap_256", **V),
        "timm_eva",
    ),
    "beit_base_patch16_224": (lambda: timm.create_model("beit_base_patch16_224", **V), "timm_beit"),
    "beitv2_base_patch16_224": (lambda: timm.create_model("beitv2_base_patch16_224", **V), "timm_beit"),
    "swin_tiny_patch4_window7_224": (lambda: _swin("swin_tiny_patch4_window7_224"), "timm_swin"),
    "swinv2_tiny_window8_256": (lambda: _swin("swinv2_tiny_window8_256"), "timm_swinv2"),
    "convnext_tiny": (lambda: _convnext("convnext_tiny"), "timm_convnext"),
    "convnext_atto": (lambda: _convnext("convnext_atto"), "timm_convnext"),
    "convnextv2_atto": (lambda: _convnext("convnextv2_atto"), "timm_convnext"),
    "resnet18": (lambda: timm.create_model("resnet18", layers=(1, 1, 1, 1), num_classes=5), "timm_resnet"),
    "resnet50": (lambda: timm.create_model("test_resnet", num_classes=5), "timm_resnet"),
    "efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=5), "timm_efficientnet"),
    "efficientnet_ln": (lambda: timm.create_model("test_efficientnet_ln", num_classes=5), "timm_efficientnet"),
    "mobilenetv3": (_mobilenetv3, "timm_mobilenetv3"),
    "regnety": (_regnet, "timm_regnet"),
    "caformer": (lambda: _metaformer(True), "timm_caformer"),
    "convformer": (lambda: _metaformer(False), "timm_metaformer"),
}


def _tv_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=IMG, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )


def _tv_swin() -> torch.nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=5
    )


def _tv_convnext() -> torch.nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)


def _tv_resnet() -> torch.nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=8)


# torchvision's classification backbones (vit_b_16, swin_t, convnext_tiny, resnet50 at small sizes)
ZOO.update(
    {
        "tv_vit_b_16": (_tv_vit, "tv_vit"),
        "tv_swin_t": (_tv_swin, "tv_swin"),
        "tv_convnext_tiny": (_tv_convnext, "tv_convnext"),
        "tv_resnet50": (_tv_resnet, "tv_resnet"),
    }
)


def _sam_encoder() -> torch.nn.Module:
    from visionpeft.sam import TINY_SAM, build_sam

    return build_sam("sam_vit_b", img_size=IMG, **TINY_SAM).image_encoder


ZOO["sam_image_encoder"] = (_sam_encoder, "sam")  # segment_anything's ImageEncoderViT (SAM's own module names)

ROWS = rows()


@pytest.fixture(autouse=True)
def _one_thread():
    """Models this small run fastest on one thread (two threads on a loaded 2-core machine: ~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def liven(model: torch.nn.Module, spec) -> torch.nn.Module:  # noqa: ANN001
    """Random weights where timm initialises constants (LayerScale 1e-5, zero-init last BN, zero biases,
    a 0.001-scaled head), so that every adapter's effect reaches the output."""
    g = torch.Generator().manual_seed(0)
    heads = tuple(spec.head(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.squeeze().dim() == 1 and bool((p == p.flatten()[0]).all()):  # (C,) or (C, 1, 1) constants
                zero = bool((p == 0).all())
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 if zero else torch.rand(p.shape, generator=g) + 0.5)
            if name.startswith(heads) and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def build(arch: str) -> torch.nn.Module:
    make, spec_name = ZOO[arch]
    torch.manual_seed(0)
    model = make().eval()
    spec = vp.detect_backbone(model)
    assert spec.name == spec_name
    return liven(model, spec)


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def check_row(base: torch.nn.Module, row, tmp_path) -> str:  # noqa: ANN001
    """Run one method variant on one model; returns ``"unsupported"`` or ``"supported"``."""
    pristine = copy.deepcopy(base.state_dict())
    spec = vp.detect_backbone(base)
    cls = row.cls
    x = image()
    ref = base(x)  # (computed per row: a row must not depend on what the previous one did to the base)
    reason = cls.unsupported_reason(base, spec, row.config())
    if reason is not None:
        with pytest.raises(ValueError) as err:
            vp.get_peft_model(copy.deepcopy(base), row.config())
        assert str(err.value) == reason
        return "unsupported"
    if cls.identity_at_init:
        pm = vp.get_peft_model(copy.deepcopy(base), row.config())
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-5, msg=f"{row.id}: not the identity at init")
    model = copy.deepcopy(base)
    torch.manual_seed(2)
    cfg = row.config(init_weights=False, modules_to_save=[])
    pm = vp.get_peft_model(model, cfg)
    out = pm(x)
    assert torch.isfinite(out).all()
    if len(pm.peft_modules["default"]) or cls.trains_base:
        if not cls.trains_base:
            assert (out - ref).abs().max() > 1e-4, f"{row.id}: the adapter changes nothing"
        pm.save_adapter(tmp_path / row.id)
        fresh = copy.deepcopy(base)
        fresh.load_state_dict(pristine)
        torch.testing.assert_close(vp.load_adapter(fresh, tmp_path / row.id)(x), out, rtol=1e-5, atol=1e-5)
    if cls.mergeable:
        keys = list(model.state_dict())
        plain = pm.merge_and_unload()
        torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4, msg=f"{row.id}: merge is not exact")
        assert list(plain.state_dict()) == keys or row.method == "ssf"  # SSF gives bias-free layers a bias
    return "supported"


@pytest.mark.parametrize("arch", list(ZOO))
def test_every_method_on_the_zoo(arch, tmp_path):
    base = build(arch)
    outcome = {row.id: check_row(base, row, tmp_path) for row in ROWS}
    # the common methods reach every family of the zoo
    for method in ("lora", "dora", "ssf", "bitfit"):
        assert outcome[method] == "supported", f"{method} on {arch}"


def test_every_spec_is_in_the_readme_backbone_table_and_in_the_zoo():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("### Backbones") :]
    zoo_specs = {spec for _, spec in ZOO.values()}
    for name in vp.list_backbones():
        assert f"| `{name}` |" in table, f"README's backbone table misses {name}"
        assert name in zoo_specs or name == "generic", f"the zoo test has no model of {name}"
