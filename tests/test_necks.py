"""Necks: maps at the channels and strides feature_info declares, deformable attention against a direct
bilinear loop, ViT-Adapter's identity at init and what trains with a frozen backbone, clear errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import visionpeft as vp
from visionpeft.necks import NECKS, MSDeformAttn, build_neck, ms_deform_attn
from visionpeft.necks.deform_attn import level_start_index

SIZES = [(64, 64), (72, 88)]


def _tiny_swin(name: str, **kw):
    return timm.create_model(
        name,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        img_size=64,
        window_size=4,
        num_classes=0,
        **kw,
    )


def swin(**kw):
    return _tiny_swin("swin_tiny_patch4_window7_224", **kw)


def swinv2(**kw):
    return _tiny_swin("swinv2_tiny_window8_256", **kw)


def vit16(**kw):
    return timm.create_model("test_vit", img_size=64, num_classes=0, **kw)


def vit8(**kw):
    """The project's embedded ViT shape (configs/_base_/digits.yaml), as the dense builder creates it."""
    kw = {"dynamic_img_size": True, **kw}
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=0,
        **kw,
    )


def eva(**kw):
    return timm.create_model(
        "eva02_tiny_patch14_224",
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=0,
        dynamic_img_size=True,
        **kw,
    )


def beit(**kw):
    return timm.create_model(
        "beit_base_patch16_224", img_size=64, embed_dim=32, depth=4, num_heads=2, num_classes=0, **kw
    )


HIERARCHICAL = {
    "resnet": lambda: timm.create_model("test_resnet", num_classes=0),
    "convnext": lambda: timm.create_model("test_convnext", num_classes=0),
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=0),
    "mobilenetv3": lambda: timm.create_model("mobilenetv3_small_050", num_classes=0),  # stride 2 stem: 2/4/8/16/32
    "swin": lambda: swin(strict_img_size=False),
    "swinv2": lambda: swinv2(strict_img_size=False),
}
PLAIN = {"vit16": vit16, "vit8": vit8, "eva": eva}


def seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn().eval()


def img(h, w, batch=2, seed=1):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def check_maps(neck, maps, size):
    """Channels and reductions exactly as feature_info declares, spatial size ceil(H / r)."""
    assert [f["reduction"] for f in neck.feature_info] == [4, 8, 16, 32]
    assert len(maps) == 4
    for m, f in zip(maps, neck.feature_info, strict=True):
        r = f["reduction"]
        assert tuple(m.shape) == (2, f["num_chs"], math.ceil(size[0] / r), math.ceil(size[1] / r))
        assert torch.isfinite(m).all()


# ---------------------------------------------------------------- native


@pytest.mark.parametrize("family", list(HIERARCHICAL))
def test_native_maps_match_feature_info(family):
    model = seeded(HIERARCHICAL[family])
    neck = build_neck(None, model)
    assert type(neck).__name__ == "NativeNeck"
    assert len(neck.state_dict()) == 0 and not list(neck.parameters())
    with torch.no_grad():
        for size in SIZES:
            check_maps(neck, neck(model, img(*size)), size)


def test_native_reads_the_deepest_stage_of_each_stride():
    """At a multiple of 32 (no padding) the maps are timm's own intermediates of the last stage at each
    reduction (ResNet: layer1..layer4, not the stride-2 stem)."""
    model = seeded(HIERARCHICAL["resnet"])
    neck = build_neck("native", model)
    x = img(64, 96)
    with torch.no_grad():
        maps = neck(model, x)
        ref = model.forward_intermediates(x, intermediates_only=True)  # act1, layer1, ..., layer4
    for m, r in zip(maps, ref[1:], strict=True):
        torch.testing.assert_close(m, r, rtol=0, atol=0)


def test_native_pads_then_crops():
    """A ConvNeXt map of a padded input, cropped, equals the top-left of the map of the zero-padded input."""
    model = seeded(HIERARCHICAL["convnext"])
    neck = build_neck("native", model)
    x = img(72, 88)
    with torch.no_grad():
        maps = neck(model, x)
        padded = model.forward_intermediates(torch.nn.functional.pad(x, (0, 8, 0, 24)), intermediates_only=True)
    for m, p in zip(maps, padded, strict=True):
        torch.testing.assert_close(m, p[..., : m.shape[-2], : m.shape[-1]])


def test_native_fixed_size_swin_pads_smaller_inputs_and_refuses_larger():
    model = seeded(lambda: swin())  # strict_img_size=True (timm's default): fixed 64x64
    neck = build_neck("native", model)
    with torch.no_grad():
        check_maps(neck, neck(model, img(40, 56)), (40, 56))
        with pytest.raises(ValueError, match="strict_img_size=False"):
            neck(model, img(72, 88))


def test_native_with_adapters_on_swin_gets_gradients():
    """Adapter hooks on the very modules forward_intermediates runs: LoRA on Swin's qkv gets gradients."""
    torch.manual_seed(0)
    peft = vp.get_peft_model(swin(strict_img_size=False), vp.LoRAConfig(rank=2, init_weights=False))
    neck = build_neck("native", peft)
    maps = neck(peft.base_model, img(40, 56))
    sum(m.square().mean() for m in maps).backward()
    lora = [(n, p) for n, p in peft.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)


# ---------------------------------------------------------------- simple pyramid


@pytest.mark.parametrize("family", list(PLAIN))
def test_simple_pyramid_maps_match_feature_info(family):
    model = seeded(PLAIN[family])
    neck = build_neck(None, model, out_channels=32).eval()
    assert type(neck).__name__ == "SimplePyramidNeck"
    assert not any(k.startswith(("blocks.", "patch_embed.")) for k in neck.state_dict())
    with torch.no_grad():
        for size in SIZES:
            check_maps(neck, neck(model, img(*size)), size)


def test_simple_pyramid_on_fixed_size_beit():
    """BEiT has a fixed grid (relative position biases): smaller inputs are padded, larger ones refused."""
    model = seeded(beit)
    neck = build_neck("simple_pyramid", model, out_channels=16).eval()
    with torch.no_grad():
        check_maps(neck, neck(model, img(64, 64)), (64, 64))
        check_maps(neck, neck(model, img(40, 56)), (40, 56))
        with pytest.raises(ValueError, match="fixed img_size 64x64"):
            neck(model, img(72, 88))


def test_simple_pyramid_reads_the_last_normed_patch_tokens():
    """Patch 16: the stride-16 level is the identity scale of the final-normed last-block patch tokens."""
    model = seeded(vit16)
    neck = build_neck("simple_pyramid", model, out_channels=16).eval()
    x = img(64, 64)
    with torch.no_grad():
        maps = neck(model, x)
        tokens = model.forward_features(x)[:, -16:]  # (B, 4*4, D) after the final norm
        feat = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
        torch.testing.assert_close(maps[2], neck.scales[2](feat))
    kinds = [[type(m).__name__ for m in s] for s in neck.scales]
    assert kinds[0][:4] == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]  # 4x up
    assert kinds[1][0] == "ConvTranspose2d" and kinds[2][0] == "Conv2d" and kinds[3][0] == "MaxPool2d"


def test_simple_pyramid_patch8_factors():
    """Patch 8: factors 2, 1, 1/2, 1/4."""
    neck = build_neck("simple_pyramid", seeded(vit8), out_channels=16)
    firsts = [type(s[0]).__name__ for s in neck.scales]
    assert firsts == ["ConvTranspose2d", "Conv2d", "MaxPool2d", "MaxPool2d"]
    assert neck.scales[2][0].kernel_size == 2 and neck.scales[3][0].kernel_size == 4


ADAPTERS = {
    "lora": lambda: vp.LoRAConfig(rank=2, init_weights=False),
    "vpt_shallow": lambda: vp.VPTConfig(num_tokens=2, deep=False),
    "vpt_deep": lambda: vp.VPTConfig(num_tokens=2, deep=True),
}


@pytest.mark.parametrize("neck_name", ["simple_pyramid", "vit_adapter"])
@pytest.mark.parametrize("method", list(ADAPTERS))
@pytest.mark.parametrize("family", ["vit16", "vit8"])
def test_plain_vit_necks_with_adapters(family, method, neck_name):
    """On a peft model's base_model (LoRA, VPT shallow and deep) the maps keep their shapes and every adapter
    parameter receives a gradient through the neck."""
    torch.manual_seed(0)
    peft = vp.get_peft_model(PLAIN[family](), ADAPTERS[method]())
    kw = {"out_channels": 16} if neck_name == "simple_pyramid" else {"conv_inplane": 8}
    neck = build_neck(neck_name, peft.base_model, **kw)
    size = (40, 56)
    maps = neck(peft.base_model, img(*size))
    check_maps(neck, maps, size)
    sum(m.square().mean() for m in maps).backward()
    adapter = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    assert adapter
    for n, p in adapter:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------- deformable attention


def bilinear_loop(value, shapes, starts, loc, weights):
    """Direct per-point bilinear sampling (pixel centres at i + 0.5, zeros outside), no grid_sample."""
    b_, _, heads, dh = value.shape
    _, q_, _, levels, points, _ = loc.shape
    rows = []
    for b in range(b_):
        per_q = []
        for q in range(q_):
            per_head = []
            for m in range(heads):
                acc = value.new_zeros(dh)
                for lvl in range(levels):
                    h, w = shapes[lvl]
                    for p in range(points):
                        x = loc[b, q, m, lvl, p, 0] * w - 0.5
                        y = loc[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(float(x.detach())), math.floor(float(y.detach()))
                        fx, fy = x - x0, y - y0
                        for yy, xx, c in (
                            (y0, x0, (1 - fy) * (1 - fx)),
                            (y0, x0 + 1, (1 - fy) * fx),
                            (y0 + 1, x0, fy * (1 - fx)),
                            (y0 + 1, x0 + 1, fy * fx),
                        ):
                            if 0 <= yy < h and 0 <= xx < w:
                                acc = acc + weights[b, q, m, lvl, p] * c * value[b, starts[lvl] + yy * w + xx, m]
                per_head.append(acc)
            per_q.append(torch.cat(per_head))
        rows.append(torch.stack(per_q))
    return torch.stack(rows)


def deform_inputs(b, q, heads, dh, shapes, points, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(b, s, heads, dh, generator=g, dtype=torch.float64)
    loc = (
        torch.rand(b, q, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15
    )  # some outside
    weights = torch.rand(b, q, heads, len(shapes), points, generator=g, dtype=torch.float64)
    return value, loc, weights


def test_ms_deform_attn_equals_bilinear_loop_values_and_gradients():
    shapes = [(3, 4), (2, 3)]
    value, loc, weights = deform_inputs(2, 3, 2, 3, shapes, 2)
    ss = torch.tensor(shapes)
    start = level_start_index(shapes, value.device)
    ins = [t.clone().requires_grad_() for t in (value, loc, weights)]
    refs = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out = ms_deform_attn(ins[0], ss, start, ins[1], ins[2])
    ref = bilinear_loop(refs[0], shapes, start.tolist(), refs[1], refs[2])
    assert out.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(out, ref)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * cot).sum().backward()
    (ref * cot).sum().backward()
    for name, a, r in zip(("value", "sampling_locations", "attention_weights"), ins, refs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, msg=name)
        assert r.grad.abs().sum() > 0, name


def test_ms_deform_attn_gradcheck():
    shapes = [(2, 3), (1, 2)]
    value, loc, weights = deform_inputs(1, 2, 1, 2, shapes, 2, seed=3)
    ss, start = torch.tensor(shapes), level_start_index(shapes, value.device)
    fn = lambda v, lo, w: ms_deform_attn(v, ss, start, lo, w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()))


def test_msdeformattn_init_and_shapes():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 (90 degrees) along +y, point k at k + 1 pixels, on every level
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    shapes = [(4, 5), (2, 3)]
    out = attn(
        torch.randn(2, 7, 16),
        torch.rand(2, 7, 2, 2),
        torch.randn(2, 26, 16),
        torch.tensor(shapes),
        level_start_index(shapes, torch.device("cpu")),
    )
    assert out.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MSDeformAttn(d_model=16, n_heads=3)


# ---------------------------------------------------------------- ViT-Adapter


@pytest.mark.parametrize("family", ["vit16", "vit8", "eva"])
def test_vit_adapter_shapes(family):
    model = seeded(PLAIN[family])
    neck = build_neck("vit_adapter", model, conv_inplane=8).eval()
    d = model.embed_dim
    assert neck.feature_info == [{"num_chs": d, "reduction": r} for r in (4, 8, 16, 32)]
    with torch.no_grad():
        for size in SIZES:
            check_maps(neck, neck(model, img(*size)), size)


def test_vit_adapter_leaves_vit_tokens_unchanged_at_init():
    model = seeded(vit16)
    neck = build_neck("vit_adapter", model, conv_inplane=8).eval()
    assert neck.groups == [[0, 1], [2, 3], [4, 4], [5, 5]]  # 6 blocks in 4 groups
    x = img(64, 64)
    with torch.no_grad():
        _, vit_maps, tokens, grid = neck.interact(model, x)
        torch.testing.assert_close(model.norm(tokens), model.forward_features(x))
        for inj in neck.injectors:
            inj.gamma.fill_(1.0)
        _, _, injected, _ = neck.interact(model, x)
    assert grid == (4, 4) and len(vit_maps) == 4
    assert not torch.allclose(injected, tokens)  # the check above can fail once the injectors act


def test_vit_adapter_frozen_backbone_trains_only_lora_and_neck():
    torch.manual_seed(0)
    peft = vp.get_peft_model(vit8(), vp.LoRAConfig(rank=2, init_weights=False))
    neck = build_neck("vit_adapter", peft, conv_inplane=8, interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]])
    maps = neck(peft, img(40, 56))
    sum(m.square().mean() for m in maps).backward()
    for n, p in peft.base_model.named_parameters():
        if "lora_" in n:
            continue
        assert p.grad is None, n
    lora = [(n, p) for n, p in peft.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    for n, p in neck.named_parameters():
        assert p.grad is not None, n
    assert not any("blocks." in k for k in neck.state_dict())


# ---------------------------------------------------------------- errors


def test_unknown_neck_lists_choices():
    with pytest.raises(ValueError) as e:
        build_neck("fpn", seeded(vit16))
    for name in NECKS:
        assert name in str(e.value)


def test_bad_option_is_named():
    with pytest.raises(TypeError, match="out_chans"):
        build_neck("simple_pyramid", seeded(vit16), out_chans=8)
    with pytest.raises(TypeError, match="no options"):
        build_neck("native", seeded(HIERARCHICAL["resnet"]), out_channels=8)
    with pytest.raises(ValueError, match="interaction_indexes"):
        build_neck("vit_adapter", seeded(vit8), interaction_indexes=[[0, 1], [3, 3]], add_vit_feature=False)
    with pytest.raises(ValueError, match="n_points"):
        build_neck("vit_adapter", seeded(vit8), n_points=0)
    with pytest.raises(ValueError, match="block_index"):
        build_neck("simple_pyramid", seeded(vit8), block_index=7)


def test_simple_pyramid_on_resnet_is_refused():
    with pytest.raises(ValueError, match="native"):
        build_neck("simple_pyramid", seeded(HIERARCHICAL["resnet"]))
    with pytest.raises(ValueError, match="native"):
        build_neck("vit_adapter", seeded(HIERARCHICAL["convnext"]))


def test_native_on_plain_vit_suggests_simple_pyramid():
    with pytest.raises(ValueError, match="simple_pyramid"):
        build_neck("native", seeded(vit16))


def test_plain_vit_necks_read_the_patch_tokens_behind_vpt_prompts():
    """VPT deep keeps 2 prompts between the class token and the patches in every block but the last (whose
    post-hook strips them): the necks read the patches, not the prompts (checked against the captured block
    outputs with the prompts cut explicitly)."""
    torch.manual_seed(0)
    nt = 2
    peft = vp.get_peft_model(vit16(), vp.VPTConfig(num_tokens=nt, deep=True)).eval()
    model = peft.base_model
    x = img(64, 64)
    captured = {}
    handles = [
        blk.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, out))
        for i, blk in enumerate(model.blocks)
    ]
    with torch.no_grad():
        model.forward_features(x)
    for h in handles:
        h.remove()
    last = len(model.blocks) - 1

    def patches(i):
        t = captured[i][:, 1 + nt :] if i != last else captured[i][:, 1:]
        assert t.shape[1] == 16
        return t

    sp = build_neck("simple_pyramid", model, out_channels=16, block_index=-2).eval()
    va = build_neck("vit_adapter", model, conv_inplane=8).eval()
    with torch.no_grad():
        feat = model.norm(patches(last - 1)).transpose(1, 2).reshape(2, -1, 4, 4)
        torch.testing.assert_close(sp(model, x)[2], sp.scales[2](feat))
        _, vit_maps, tokens, _ = va.interact(model, x)  # gamma = 0: the ViT runs as without the neck
        for (_, end), m in zip(va.groups, vit_maps, strict=True):
            torch.testing.assert_close(m, patches(end).transpose(1, 2).reshape(2, -1, 4, 4))
