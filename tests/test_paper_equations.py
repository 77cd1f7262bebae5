"""Each method against an independent forward pass written here from its paper's equation, in float64.

The adapter tensors are copied out of the wrapped model into leaf tensors; the reference computes the
logits from the frozen base modules and those tensors, following the paper (not our modules); logits and
the gradients of every adapter tensor must agree.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck, ResNet
from torch.func import functional_call

import visionpeft as vp

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this file's tests only: a default dtype set at import leaked into every test collected with it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _vit(**kw):
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4, **kw}
    return timm.create_model("vit_tiny_patch16_224", **kw).double().eval()


def _adapter_tensors(pm):
    return {k: v.detach().clone().requires_grad_(True) for k, v in pm.peft_modules["default"].named_parameters()}


def _compare(pm, reference, x=X, train=False):
    """Logits and gradients of the wrapped model vs ``reference(tensors, x)``."""
    pm.train(train)
    tensors = _adapter_tensors(pm)
    w = torch.linspace(-1, 1, 4, dtype=torch.float64)
    out = pm(x)
    (out * w).sum().backward()
    with pm.disable_adapters():  # the reference runs the bare base modules
        ref = reference(tensors, x)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for k, p in pm.peft_modules["default"].named_parameters():
        if "modules_to_save" in k:
            continue
        torch.testing.assert_close(p.grad, tensors[k].grad, rtol=1e-8, atol=1e-12, msg=f"gradient of {k}")


def _vit_forward(model, block_fn, x):
    """timm ViT forward with ``block_fn(i, block, x)`` in place of each block."""
    x = model._pos_embed(model.patch_embed(x))
    for i, blk in enumerate(model.blocks):
        x = block_fn(i, blk, x)
    return model.forward_head(model.norm(x))


# DoRA on q / v slices --------------------------------------------------------------------------------


def test_dora_on_qv_slices_is_dora_on_separate_q_and_v_layers():
    base = _vit()
    pm = vp.get_peft_model(base, vp.DoRAConfig(rank=2, qkv_slices="qv", init_weights=False, modules_to_save=[]))
    c = base.embed_dim
    for key, layer in pm.peft_modules["default"].items():
        assert layer.magnitude.shape == (2 * c,), f"{key}: one magnitude per adapted (q and v) row only"
    scaling = pm.peft_config["default"].scaling

    def reference(t, x):
        weights = {}
        for i, blk in enumerate(base.blocks):
            key = f"blocks-{i}-attn-qkv"
            a, b, m = t[f"{key}.dora_A"], t[f"{key}.dora_B"], t[f"{key}.dora_magnitude"]
            w = blk.attn.qkv.weight
            parts = [w[:c], w[c : 2 * c], w[2 * c :]]
            for j, (rows, m_part) in enumerate(((0, m[:c]), (2, m[c:]))):
                w0 = parts[rows]
                adapted = w0 + scaling * b[j * c : (j + 1) * c] @ a[j * 2 : (j + 1) * 2]
                norm = adapted.norm(dim=1, keepdim=True).detach()  # paper 4.3: the norm is a constant
                parts[rows] = m_part[:, None] * adapted / norm
            weights[f"blocks.{i}.attn.qkv.weight"] = torch.cat(parts)  # k rows untouched
        return functional_call(base, weights, (x,), strict=False)

    _compare(pm, reference)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == len(base.blocks) * 2 * (2 * (c + c) + c)  # per layer: q and v, each r(C + C) + C


def test_dora_qv_merge_is_exact_and_leaves_k_rows():
    base = _vit()
    k_rows = [blk.attn.qkv.weight[32:64].clone() for blk in base.blocks]
    pm = vp.get_peft_model(base, vp.DoRAConfig(rank=2, qkv_slices="qv", init_weights=False))
    out = pm(X)
    pm.merge()
    torch.testing.assert_close(pm(X), out, rtol=1e-10, atol=1e-12)
    for blk, k in zip(base.blocks, k_rows, strict=True):
        assert torch.equal(blk.attn.qkv.weight[32:64], k)
    pm.unmerge()
    torch.testing.assert_close(pm(X), out, rtol=1e-10, atol=1e-12)


# SSF on layers without a bias ------------------------------------------------------------------------


def test_ssf_scales_and_shifts_bias_free_qkv():
    base = _vit(qkv_bias=False)
    assert base.blocks[0].attn.qkv.bias is None
    pm = vp.get_peft_model(base, vp.SSFConfig(init_weights=False, modules_to_save=[]))
    assert "blocks.0.attn.qkv" in pm._targets["default"].values()
    sites = {key: name for key, name in pm._targets["default"].items()}
    modules = dict(base.named_modules())
    # reference: the same weights in a model whose qkv has a (zero) bias, reparameterised by the paper's
    # merge equations W' = gamma * W, b' = gamma * b + beta at every SSF site
    twin = _vit(qkv_bias=True)
    twin.load_state_dict(base.state_dict(), strict=False)
    for blk in twin.blocks:
        torch.nn.init.zeros_(blk.attn.qkv.bias)

    def reference(t, x):
        params = {}
        for key, name in sites.items():
            m = modules[name]
            g, beta = t[f"{key}.ssf_scale"], t[f"{key}.ssf_shift"]
            params[f"{name}.weight"] = g.view(-1, *[1] * (m.weight.dim() - 1)) * m.weight
            bias = m.bias if m.bias is not None else torch.zeros_like(beta)
            params[f"{name}.bias"] = g * bias + beta
        return functional_call(twin, params, (x,), strict=False)

    _compare(pm, reference)


def test_ssf_merge_creates_the_bias_and_unmerge_removes_it():
    base = _vit(qkv_bias=False)
    pm = vp.get_peft_model(base, vp.SSFConfig(init_weights=False))
    out = pm(X)
    pm.merge()
    assert base.blocks[0].attn.qkv.bias is not None
    torch.testing.assert_close(pm(X), out, rtol=1e-10, atol=1e-12)
    pm.unmerge()
    assert base.blocks[0].attn.qkv.bias is None
    torch.testing.assert_close(pm(X), out, rtol=1e-10, atol=1e-12)
    plain = pm.merge_and_unload()
    torch.testing.assert_close(plain(X), out, rtol=1e-10, atol=1e-12)


# AdaptFormer and serial adapters under LayerScale and DropPath ----------------------------------------


def _bottleneck(t, prefix, x, act):
    h = act(F.linear(x, t[f"{prefix}_down"], t[f"{prefix}_down_bias"]))
    return F.linear(h, t[f"{prefix}_up"], t[f"{prefix}_up_bias"])


def test_adaptformer_official_placement_with_layerscale():
    """x' = x + LS(MLP(LN(x))) + s * up(ReLU(down(x))): the adapter reads the stream before the MLP's norm
    and is not scaled by LayerScale (Chen et al. 2022, official code; init_values makes LS small)."""
    base = _vit(init_values=1e-3)
    s = 0.7
    pm = vp.get_peft_model(base, vp.AdaptFormerConfig(bottleneck=4, scale=s, init_weights=False, modules_to_save=[]))

    def reference(t, x):
        def block(i, blk, x):
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            return x + blk.ls2(blk.mlp(blk.norm2(x))) + s * _bottleneck(t, f"blocks-{i}.adaptformer", x, F.relu)

        return _vit_forward(base, block, x)

    _compare(pm, reference)


def test_adaptformer_and_houlsby_adapters_survive_a_dropped_branch():
    """With drop-path rate 1 the block's own branches are dropped in training; the adapters' are not."""
    torch.manual_seed(0)
    block = timm.models.vision_transformer.Block(16, 2, init_values=0.1, drop_path=1.0).double()
    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.Sequential(block))
    x = torch.randn(2, 5, 16)
    for method, cfg in (
        ("adaptformer", vp.AdaptFormerConfig(bottleneck=4, scale=0.5, init_weights=False)),
        ("adapter", vp.AdapterConfig(bottleneck=4, placement="houlsby", init_weights=False)),
    ):
        spec = vp.get_backbone("timm_vit")
        layers = vp.get_method(method).build(model, spec, cfg)
        ((_, layer),) = layers
        handles = layer.attach(block)
        layer.active = True
        layer.train()
        block.train()
        t = dict(layer.named_parameters())
        out = block(x)
        for h in handles:
            h.remove()
        if method == "adaptformer":
            expected = x + 0.5 * _bottleneck(t, "adaptformer", x, F.relu)
        else:
            h_attn = block.attn(block.norm1(x))
            x_mid = x + _bottleneck(t, "branches.attn.adapter", h_attn, F.gelu)
            expected = x_mid + _bottleneck(t, "branches.mlp.adapter", block.mlp(block.norm2(x_mid)), F.gelu)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_houlsby_adapters_with_layerscale():
    """h = Attn(LN(x)); x' = x + LS(h) + s*A(h); m = MLP(LN(x')); x'' = x' + LS(m) + s*A'(m)."""
    base = _vit(init_values=1e-3)
    s = 1.5
    cfg = vp.AdapterConfig(bottleneck=4, scale=s, placement="houlsby", init_weights=False, modules_to_save=[])
    pm = vp.get_peft_model(base, cfg)

    def reference(t, x):
        def block(i, blk, x):
            h = blk.attn(blk.norm1(x))
            x = x + blk.ls1(h) + s * _bottleneck(t, f"blocks-{i}.branches.attn.adapter", h, F.gelu)
            m = blk.mlp(blk.norm2(x))
            return x + blk.ls2(m) + s * _bottleneck(t, f"blocks-{i}.branches.mlp.adapter", m, F.gelu)

        return _vit_forward(base, block, x)

    _compare(pm, reference)


# Conv-Adapter as published ------------------------------------------------------------------------------


def _resnet_bottleneck():
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=4, channels=(8, 8, 16, 16), stem_width=8)
    return model.double().eval()


def _conv_adapter(t, key, x, stride, groups, act):
    h = F.conv2d(x, t[f"{key}.conv_adapter_down"], t[f"{key}.conv_adapter_down_bias"], stride, 1, 1, groups)
    h = F.conv2d(act(h), t[f"{key}.conv_adapter_up"], t[f"{key}.conv_adapter_up_bias"])
    return h * t[f"{key}.conv_adapter_scale"].view(1, -1, 1, 1)


def test_conv_adapter_on_resnet_bottleneck_sums_after_bn2_relu():
    base = _resnet_bottleneck()
    pm = vp.get_peft_model(base, vp.ConvAdapterConfig(init_weights=False, modules_to_save=[]))

    def reference(t, x):
        x = base.maxpool(base.act1(base.bn1(base.conv1(x))))
        for stage in (base.layer1, base.layer2, base.layer3, base.layer4):
            for blk in stage:
                name = [n for n, m in base.named_modules() if m is blk][0]
                width = blk.conv2.in_channels
                shortcut = x if blk.downsample is None else blk.downsample(x)
                h = blk.act1(blk.bn1(blk.conv1(x)))
                a = _conv_adapter(t, name.replace(".", "-"), h, blk.conv2.stride[0], width // 4, F.relu)
                h = blk.act2(blk.bn2(blk.conv2(h))) + a
                x = blk.act3(blk.bn3(blk.conv3(h)) + shortcut)
        return base.forward_head(x)

    _compare(pm, reference)


def test_conv_adapter_on_convnext_adds_to_the_depthwise_output():
    torch.manual_seed(0)
    base = timm.create_model("test_convnext", num_classes=4, ls_init_value=0.5).double().eval()
    pm = vp.get_peft_model(base, vp.ConvAdapterConfig(init_weights=False, modules_to_save=[]))
    blocks = {n: m for n, m in base.named_modules() if type(m).__name__ == "ConvNeXtBlock"}

    def reference(t, x):
        x = base.stem(x)
        for stage in base.stages:
            x = stage.downsample(x)
            for blk in stage.blocks:
                name = [n for n, m in blocks.items() if m is blk][0]
                c = blk.conv_dw.in_channels
                h = blk.conv_dw(x) + _conv_adapter(t, name.replace(".", "-"), x, 1, c // 4, F.gelu)
                h = blk.mlp(blk.norm(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
                x = h * blk.gamma.view(1, -1, 1, 1) + x
        return base.forward_head(base.norm_pre(x))

    _compare(pm, reference)


def test_conv_adapter_placements_read_strides_from_the_modules():
    base = _resnet_bottleneck()
    for level in ("conv", "block", "stage"):
        for mode in ("parallel", "sequential"):
            pm = vp.get_peft_model(base, vp.ConvAdapterConfig(level=level, mode=mode, init_weights=False))
            layers = dict(pm.peft_modules["default"].items())
            strides = {k: layer.stride for k, layer in layers.items() if not k.startswith("modules_to_save")}
            if mode == "sequential":
                assert set(strides.values()) == {1}
            elif level == "conv":
                assert strides == {"layer1-0": 1, "layer2-0": 2, "layer3-0": 2, "layer4-0": 2}
            assert pm(X).shape == (2, 4)
            pm.unload()


# parameter counts on the full-size models ---------------------------------------------------------------


def _count(model_name, cfg, **kw):
    with torch.device("meta"):
        base = timm.create_model(model_name, num_classes=0, **kw)
    pm = vp.get_peft_model(base, cfg)
    return pm.get_nb_trainable_parameters()[0]


def test_parameter_counts_on_vit_b16_and_resnet50_equal_the_papers_formulas():
    c, layers = 768, 12
    # LoRA r=8 on q and v: 2 slices x r (C + C) per layer (Hu et al.)
    assert _count("vit_base_patch16_224", vp.LoRAConfig(rank=8, qkv_slices="qv")) == layers * 2 * 8 * 2 * c
    # DoRA adds one magnitude per adapted row
    assert _count("vit_base_patch16_224", vp.DoRAConfig(rank=8, qkv_slices="qv")) == layers * (2 * 8 * 2 * c + 2 * c)
    # AdaptFormer b=64: down (C*b + b) + up (b*C + C) per block
    assert _count("vit_base_patch16_224", vp.AdaptFormerConfig(bottleneck=64)) == layers * (2 * c * 64 + 64 + c)
    # Houlsby adapters b=8: two bottlenecks per block
    assert _count("vit_base_patch16_224", vp.AdapterConfig(bottleneck=8)) == layers * 2 * (2 * c * 8 + 8 + c)
    # VPT-deep 10 tokens: 10 x C per block; SSF: 2 x C per affine op
    assert _count("vit_base_patch16_224", vp.VPTConfig(num_tokens=10, deep=True)) == layers * 10 * c
    # Conv-Adapter gamma=4 on ResNet-50's 3x3 convs: C*k^2 + C/g + (C/g)*C + 2C per bottleneck (width C)
    widths = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    expected = sum(w * 9 + w // 4 + (w // 4) * w + 2 * w for w in widths)
    assert _count("resnet50", vp.ConvAdapterConfig(reduction=4)) == expected == 356_848
