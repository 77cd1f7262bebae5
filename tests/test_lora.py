"""LoRA specifics: parity with huggingface peft, q/k/v slices of a fused qkv, grouped convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import image, make_vit, seeded

import visionpeft as vp


def test_parity_with_hf_peft_on_whole_qkv():
    peft = pytest.importorskip("peft")
    ours_base, theirs_base = seeded(make_vit), seeded(make_vit)
    ours = vp.get_peft_model(ours_base, vp.LoRAConfig(rank=4, alpha=8, modules_to_save=[]))
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    torch.manual_seed(7)
    for i, blk in enumerate(theirs.base_model.model.blocks):
        layer = ours.peft_modules["default"][f"blocks-{i}-attn-qkv"]
        a = torch.randn_like(layer.lora_A) * 0.1
        b = torch.randn_like(layer.lora_B) * 0.1
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            blk.attn.qkv.lora_A["default"].weight.copy_(a)
            blk.attn.qkv.lora_B["default"].weight.copy_(b)
    x = image(3)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out_ours)
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    for i, blk in enumerate(theirs.base_model.model.blocks):
        layer = ours.peft_modules["default"][f"blocks-{i}-attn-qkv"]
        torch.testing.assert_close(layer.lora_A.grad, blk.attn.qkv.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, blk.attn.qkv.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_qkv_slices_touch_only_chosen_slices():
    base = seeded(make_vit)
    w0 = base.blocks[0].attn.qkv.weight.detach().clone()
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=2, qkv_slices="vq", init_weights=False))
    layer = pm.peft_modules["default"]["blocks-0-attn-qkv"]
    assert layer.lora_A.shape == (2 * 2, 64) and layer.lora_B.shape == (2 * 64, 2)
    d = 64
    x = torch.randn(3, 5, d)
    delta = layer.delta_output(x)
    assert delta[..., :d].abs().sum() > 0  # q
    assert torch.equal(delta[..., d : 2 * d], torch.zeros_like(delta[..., d : 2 * d]))  # k untouched
    assert delta[..., 2 * d :].abs().sum() > 0  # v
    torch.testing.assert_close(delta, x @ layer.delta_weight().T)
    pm.merge()
    w1 = base.blocks[0].attn.qkv.weight
    assert torch.equal(w1[d : 2 * d], w0[d : 2 * d])
    assert not torch.equal(w1[:d], w0[:d]) and not torch.equal(w1[2 * d :], w0[2 * d :])


def lora_factors(pm: vp.PeftVisionModel, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of the default adapter at ``site`` (the one place that reaches adapter internals)."""
    layer = pm.peft_modules["default"][site]
    return layer.lora_A.detach(), layer.lora_B.detach()


def grouped_conv_update(a: torch.Tensor, b: torch.Tensor, groups: int, scale: float) -> torch.Tensor:
    """The weight update of LoRA on a grouped conv, written out element by element.

    a: (groups * r, C_in / groups, kh, kw), r rank-one kernels per group; b: (C_out, r, 1, 1). Output channel
    o of group j = o // (C_out / groups) gets ``scale * sum_k b[o, k] * a[j * r + k]``.
    """
    c_out, r = b.shape[:2]
    delta = torch.zeros(c_out, *a.shape[1:], dtype=a.dtype)
    for o in range(c_out):
        j = o // (c_out // groups)
        for k in range(r):
            delta[o] += scale * b[o, k, 0, 0] * a[j * r + k]
    return delta


@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_lora_grouped_and_depthwise_merge(groups, stride, padding):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, stride=stride, padding=padding, groups=groups), nn.ReLU())
    w0 = net[0].weight.detach().clone()
    pm = vp.get_peft_model(net, vp.LoRAConfig(rank=2, alpha=6, targets=["0"], init_weights=False))
    a, b = lora_factors(pm, "0")
    assert a.numel() + b.numel() == 2 * (8 * 9 + 8)
    assert b.abs().sum() > 0  # a non-zero update, so the comparison can fail
    x = torch.randn(2, 8, 9, 9)
    out = pm(x)
    w = w0 + grouped_conv_update(a, b, groups, scale=6 / 2)
    ref = nn.functional.conv2d(x, w, net[0].bias, stride, padding, 1, groups).relu()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    pm.merge()
    torch.testing.assert_close(net[0].weight, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pm(x), ref, rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_rank():
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, "lora", rank=4, alpha=16, init_weights=False)
    layer = pm.peft_modules["default"]["blocks-0-attn-qkv"]
    assert layer.scaling == 4.0
    torch.testing.assert_close(layer.delta_weight(), 4.0 * layer.lora_B @ layer.lora_A)


def test_dora_magnitude_init_and_decomposition():
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, vp.DoRAConfig(rank=2, init_weights=False))
    layer = pm.peft_modules["default"]["blocks-1-attn-qkv"]
    w = base.blocks[1].attn.qkv.weight
    x = torch.randn(2, 3, 64)
    out = pm.base_model.blocks[1].attn.qkv(x)
    merged_w = w + layer.delta_weight()
    expect_w = layer.dora_magnitude[:, None] * merged_w / merged_w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, x @ expect_w.T + base.blocks[1].attn.qkv.bias, rtol=1e-5, atol=1e-5)
