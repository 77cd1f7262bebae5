"""(IA)^3 and VeRA specifics: parity with huggingface peft, the papers' parameter counts on ViT-B/16, q / k / v
slices of a fused qkv, VeRA's shared frozen random matrices."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
from conftest import image, make_vit, seeded

import visionpeft as vp


def _vit_b16_on_meta() -> nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


def _count(method: str, cfg, model: nn.Module) -> int:
    cls = vp.get_method(method)
    return cls.param_count(model, cls.sites(model, vp.detect_backbone(model), cfg), cfg)


# (IA)^3 --------------------------------------------------------------------------------------------------


def test_ia3_parity_with_hf_peft():
    """Same maths as peft's IA3 with keys / values / MLP input: peft scales a whole Linear's output, so its
    vector on qkv carries ones on the q rows (which ours never scales); outputs and gradients agree."""
    peft = pytest.importorskip("peft")
    ours = vp.get_peft_model(seeded(make_vit), vp.IA3Config(modules_to_save=[]))
    theirs = peft.get_peft_model(
        seeded(make_vit), peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"])
    )
    torch.manual_seed(7)
    for i, blk in enumerate(theirs.base_model.model.blocks):
        kv = ours.peft_modules["default"][f"blocks-{i}-attn-qkv"]
        ff = ours.peft_modules["default"][f"blocks-{i}-mlp-fc2"]
        c = blk.attn.qkv.in_features
        with torch.no_grad():
            kv.ia3_scale.copy_(1 + 0.3 * torch.randn_like(kv.ia3_scale))
            ff.ia3_scale.copy_(1 + 0.3 * torch.randn_like(ff.ia3_scale))
            blk.attn.qkv.ia3_l["default"].view(-1)[:c].fill_(1.0)
            blk.attn.qkv.ia3_l["default"].view(-1)[c:].copy_(kv.ia3_scale)
            blk.mlp.fc2.ia3_l["default"].view(-1).copy_(ff.ia3_scale)
    x = image(3)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_ours)
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    for i, blk in enumerate(theirs.base_model.model.blocks):
        kv = ours.peft_modules["default"][f"blocks-{i}-attn-qkv"]
        ff = ours.peft_modules["default"][f"blocks-{i}-mlp-fc2"]
        c = blk.attn.qkv.in_features
        torch.testing.assert_close(
            kv.ia3_scale.grad, blk.attn.qkv.ia3_l["default"].grad.view(-1)[c:], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(ff.ia3_scale.grad, blk.mlp.fc2.ia3_l["default"].grad.view(-1), rtol=1e-4, atol=1e-6)
    # peft trains the q rows too: exactly C per block more than the paper's l_k and l_v
    theirs_n = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours.get_nb_trainable_parameters()[0] == theirs_n - sum(b.attn.qkv.in_features for b in make_vit().blocks)


def test_ia3_parameter_count_on_vit_b16_is_the_papers():
    """l_k, l_v (d = 768 each) and l_ff (d_ff = 3072) in each of the 12 blocks: 12 * (768 + 768 + 3072)."""
    assert _count("ia3", vp.IA3Config(), _vit_b16_on_meta()) == 12 * (768 + 768 + 3072) == 55_296
    assert _count("ia3", vp.IA3Config(qkv_slices=None), _vit_b16_on_meta()) == 12 * (3 * 768 + 3072)


def test_ia3_scales_keys_values_and_the_mlp_input():
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, vp.IA3Config(init_weights=False, modules_to_save=[]))
    group = pm.peft_modules["default"]
    assert sorted(group) == sorted(f"blocks-{i}-{s}" for i in range(len(base.blocks)) for s in ("attn-qkv", "mlp-fc2"))
    blk = base.blocks[0]
    c = blk.attn.qkv.in_features
    kv, ff = group["blocks-0-attn-qkv"], group["blocks-0-mlp-fc2"]
    assert kv.ia3_scale.shape == (2 * c,) and ff.ia3_scale.shape == (blk.mlp.fc2.in_features,)
    x = torch.randn(2, 5, c)
    with pm.disable_adapters():
        plain = blk.attn.qkv(x)
    scaled = blk.attn.qkv(x)
    torch.testing.assert_close(scaled[..., :c], plain[..., :c])  # q untouched
    torch.testing.assert_close(scaled[..., c:], plain[..., c:] * kv.ia3_scale)
    h = torch.randn(2, 5, blk.mlp.fc2.in_features)
    torch.testing.assert_close(
        blk.mlp.fc2(h), nn.functional.linear(h * ff.ia3_scale, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ia3_conv_input_and_output_scaling_merge(groups):
    """On Conv2d (grouped and depthwise too): the input scaling folds into the weight's input columns of each
    group, the output scaling into rows and bias; unmerge restores the weights."""
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=groups), nn.Conv2d(8, 8, 1, groups=groups)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pm = vp.get_peft_model(net, vp.IA3Config(targets=["0", "1"], feedforward=["1"], init_weights=False))
    x = torch.randn(2, 4, 6, 6)
    out = pm(x)
    with pm.disable_adapters():
        h = net[0](x)
    s0 = pm.peft_modules["default"]["0"].ia3_scale.view(1, -1, 1, 1)
    s1 = pm.peft_modules["default"]["1"].ia3_scale.view(1, -1, 1, 1)
    with pm.disable_adapters():
        torch.testing.assert_close(out, net[1](h * s0 * s1))
    pm.merge()
    torch.testing.assert_close(pm(x), out, rtol=1e-5, atol=1e-5)
    pm.unmerge()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_ia3_unmerge_restores_channels_scaled_by_zero():
    base = seeded(make_vit)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    pm = vp.get_peft_model(base, vp.IA3Config(init_weights=False))
    x = image()
    with torch.no_grad():
        pm.peft_modules["default"]["blocks-0-attn-qkv"].ia3_scale[:3] = 0.0
        pm.peft_modules["default"]["blocks-1-mlp-fc2"].ia3_scale[5] = 0.0
    out = pm(x)
    pm.merge()
    assert torch.all(base.blocks[1].mlp.fc2.weight[:, 5] == 0)
    torch.testing.assert_close(pm(x), out, rtol=1e-5, atol=1e-5)
    pm.unmerge()
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_bad_slices_and_unreachable_qkv_are_refused():
    with pytest.raises(ValueError, match="qkv_slices"):
        vp.IA3Config(qkv_slices="kx")
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=32, depth=1, num_classes=3)
    with pytest.raises(ValueError, match="F.linear.*targets"):
        vp.get_peft_model(eva, vp.IA3Config())
    pm = vp.get_peft_model(eva, vp.IA3Config(targets=["mlp_out"], modules_to_save=[]))
    assert list(pm.peft_modules["default"]) == ["blocks-0-mlp-fc2"]
    pm.unload()
    with pytest.raises(ValueError, match="F.linear.*targets"):
        vp.get_peft_model(eva, vp.VeRAConfig(rank=4))
    # torchvision's ViT: qkv is a nn.MultiheadAttention, whose k / v a hook cannot scale: refused, not skipped
    tv = pytest.importorskip("torchvision").models.VisionTransformer(32, 16, 1, 2, 16, 32, num_classes=3)
    for cfg in (vp.IA3Config(), vp.VeRAConfig(rank=4)):
        with pytest.raises(ValueError, match="MultiheadAttention.*targets"):
            vp.get_peft_model(tv, cfg)


# VeRA ------------------------------------------------------------------------------------------------------


def test_vera_parity_with_hf_peft():
    """Same seed, same shared A and B as peft's (regenerated, not copied); with copied vectors the outputs and
    the gradients of b and d agree."""
    peft = pytest.importorskip("peft")
    targets = ["qkv", "fc1", "fc2"]
    ours = vp.get_peft_model(seeded(make_vit), vp.VeRAConfig(rank=6, targets=targets, modules_to_save=[]))
    theirs = peft.get_peft_model(
        seeded(make_vit), peft.VeraConfig(r=6, target_modules=targets, projection_prng_key=0, d_initial=0.1)
    )
    group = ours.peft_modules["default"]
    pairs = [
        (group[f"blocks-{i}-{key}"], mod)
        for i, blk in enumerate(theirs.base_model.model.blocks)
        for key, mod in (("attn-qkv", blk.attn.qkv), ("mlp-fc1", blk.mlp.fc1), ("mlp-fc2", blk.mlp.fc2))
    ]
    torch.manual_seed(7)
    for layer, mod in pairs:
        assert torch.equal(layer.shared.vera_A, mod.vera_A["default"])
        assert torch.equal(layer.shared.vera_B, mod.vera_B["default"])
        torch.testing.assert_close(layer.vera_lambda_d, mod.vera_lambda_d["default"])  # d_initial
        assert torch.equal(layer.vera_lambda_b, mod.vera_lambda_b["default"])  # zeros
        with torch.no_grad():
            for ours_p, theirs_p in (
                (layer.vera_lambda_b, mod.vera_lambda_b),
                (layer.vera_lambda_d, mod.vera_lambda_d),
            ):
                v = 0.5 * torch.randn_like(ours_p)
                ours_p.copy_(v)
                theirs_p["default"].copy_(v)
    x = image(3)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_ours)
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    for layer, mod in pairs:
        torch.testing.assert_close(layer.vera_lambda_b.grad, mod.vera_lambda_b["default"].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.vera_lambda_d.grad, mod.vera_lambda_d["default"].grad, rtol=1e-4, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_vera_parameter_count_on_vit_b16_is_the_papers():
    """The paper's ViT-Base setting (r = 256 on query and value, head excluded): 24.6K trainable parameters,
    ``r + d_out`` per adapted matrix: 12 blocks * 2 * (256 + 768)."""
    cfg = vp.VeRAConfig(rank=256, qkv_slices="qv")
    assert _count("vera", cfg, _vit_b16_on_meta()) == 12 * 2 * (256 + 768) == 24_576
    with torch.device("meta"):
        large = timm.create_model("vit_large_patch16_224", pretrained=False)
    assert _count("vera", cfg, large) == 24 * 2 * (256 + 1024) == 61_440  # the paper's ViT-Large: 61.4K
    built = vp.get_peft_model(
        timm.create_model("vit_base_patch16_224", pretrained=False),
        vp.VeRAConfig(rank=256, qkv_slices="qv", modules_to_save=[]),
    )
    assert built.get_nb_trainable_parameters()[0] == 24_576  # the built model trains exactly that


def test_vera_shares_one_frozen_pair_and_regenerates_it_from_the_seed(tmp_path):
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, vp.VeRAConfig(rank=8, qkv_slices="qv", projection_seed=3, init_weights=False))
    layers = list(pm.peft_modules["default"].values())
    vera = [m for m in layers if hasattr(m, "shared")]
    assert len({id(m.shared.vera_A) for m in vera}) == 1 and len({id(m.shared.vera_B) for m in vera}) == 1
    assert not vera[0].shared.vera_A.requires_grad
    assert all(not n.endswith(("vera_A", "vera_B")) for n, _ in pm.named_parameters())
    pm.to(torch.float64)  # moved and cast once: still one tensor
    assert len({id(m.shared.vera_A) for m in vera}) == 1 and vera[0].shared.vera_A.dtype == torch.float64
    pm.to(torch.float32)
    x = image()
    expected = pm(x)
    pm.save_adapter(tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in saved)  # not saved ...
    meta = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert meta["config"]["projection_seed"] == 3  # ... but regenerated from the seed in the file
    loaded = vp.load_adapter(seeded(make_vit), tmp_path / "run")
    torch.testing.assert_close(loaded(x), expected)
    assert torch.equal(next(iter(loaded.peft_modules["default"].values())).shared.vera_A, vera[0].shared.vera_A)
    other = vp.get_peft_model(seeded(make_vit), vp.VeRAConfig(rank=8, qkv_slices="qv", projection_seed=4))
    assert not torch.equal(next(iter(other.peft_modules["default"].values())).shared.vera_A, vera[0].shared.vera_A)


def test_vera_qv_slices_touch_only_q_and_v():
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, vp.VeRAConfig(rank=4, qkv_slices="vq", init_weights=False))
    layer = pm.peft_modules["default"]["blocks-0-attn-qkv"]
    c = base.blocks[0].attn.qkv.in_features
    assert layer.vera_lambda_b.shape == (2 * c,) and layer.vera_lambda_d.shape == (2 * 4,)
    x = torch.randn(2, 5, c)
    qkv = base.blocks[0].attn.qkv
    with pm.disable_adapters():
        plain = qkv(x)
    out = qkv(x)
    torch.testing.assert_close(out[..., c : 2 * c], plain[..., c : 2 * c])  # k untouched
    a, b = layer.shared.vera_A[:, :c], layer.shared.vera_B[:c]
    for i, (s, e) in enumerate([(0, c), (2 * c, 3 * c)]):
        d, lb = layer.vera_lambda_d[i * 4 : (i + 1) * 4], layer.vera_lambda_b[i * c : (i + 1) * c]
        torch.testing.assert_close(
            out[..., s:e], plain[..., s:e] + lb * ((d * (x @ a.t())) @ b.t()), rtol=1e-5, atol=1e-6
        )
    dw = layer.delta_weight()
    assert dw.shape == (2 * c, c)
    torch.testing.assert_close(dw[:c], (layer.vera_lambda_b[:c, None] * b) @ (layer.vera_lambda_d[:4, None] * a))
    with pytest.raises(ValueError, match="qkv_slices"):
        vp.get_peft_model(seeded(make_vit), vp.VeRAConfig(rank=4, qkv_slices="qv", targets=["mlp_in"]))
