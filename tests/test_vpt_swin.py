"""VPT on Swin / SwinV2: prompt tokens joined to every window's attention (the VPT paper's Swin variant).

The reference below is written from the paper's description, not from the code under test: for one shifted
Swin block, each window's tokens and the block's prompts are attended together by hand (q / k / v of both,
relative position bias on the window x window part and zero in the prompt rows / columns, the shift mask on
the window x window part only), the prompt outputs are dropped, and the block's residual / MLP follow.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import image

import visionpeft as vp

WS, SHIFT, P = 4, 2, 2


def make(arch: str = "swin_tiny_patch4_window7_224") -> torch.nn.Module:
    """8x8 tokens in stage 0, 4x4 windows; the second block of each stage is shifted by 2."""
    torch.manual_seed(0)
    return timm.create_model(
        arch, embed_dim=16, depths=(2, 2), num_heads=(2, 2), img_size=32, window_size=WS, num_classes=5
    ).eval()


def layer_at(pm: vp.PeftVisionModel, name: str) -> torch.nn.Module:
    key = next(k for k, m in pm._targets["default"].items() if m == name)
    return pm.peft_modules["default"][key]


def rel_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws): table row of the offset between tokens i = (r1, c1) and j = (r2, c2)."""
    rc = [(r, c) for r in range(ws) for c in range(ws)]
    return torch.tensor([[(r1 - r2 + ws - 1) * (2 * ws - 1) + (c1 - c2 + ws - 1) for r2, c2 in rc] for r1, c1 in rc])


def region(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(h, w) labels of the shifted image's regions: tokens of different regions may not attend."""

    def band(i: int, n: int) -> int:
        return 0 if i < n - ws else (1 if i < n - shift else 2)

    return torch.tensor([[3 * band(i, h) + band(j, w) for j in range(w)] for i in range(h)])


def reference_block(blk: torch.nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """One shifted Swin (v1) block with ``prompts`` (P, C) in every window: (B, H, W, C) -> (B, H, W, C)."""
    attn = blk.attn
    b, h, w, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    bias = attn.relative_position_bias_table[rel_index(WS).view(-1)].view(WS * WS, WS * WS, heads).permute(2, 0, 1)
    y = torch.roll(blk.norm1(x), shifts=(-SHIFT, -SHIFT), dims=(1, 2))
    labels = region(h, w, WS, SHIFT)
    out = torch.zeros_like(y)
    for r0 in range(0, h, WS):
        for c0 in range(0, w, WS):
            lab = labels[r0 : r0 + WS, c0 : c0 + WS].reshape(-1)
            blocked = (lab[:, None] != lab[None, :]).to(x.dtype) * -100.0
            for i in range(b):
                tokens = torch.cat([y[i, r0 : r0 + WS, c0 : c0 + WS].reshape(-1, c), prompts])  # (N + P, C)
                q, k, v = F.linear(tokens, attn.qkv.weight, attn.qkv.bias).split(c, dim=-1)
                q, k, v = (t.view(-1, heads, hd).transpose(0, 1) for t in (q, k, v))  # (nH, N + P, hd)
                logits = q @ k.transpose(-1, -2) * hd**-0.5
                n = WS * WS
                logits[:, :n, :n] = logits[:, :n, :n] + bias + blocked  # prompt rows / columns: no bias, no mask
                o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, c)
                out[i, r0 : r0 + WS, c0 : c0 + WS] = attn.proj(o)[:n].view(WS, WS, c)
    x = x + torch.roll(out, shifts=(SHIFT, SHIFT), dims=(1, 2))
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("fused", [False, True])
def test_window_prompts_match_the_reference_block(fused):
    base = make().double()
    pm = vp.get_peft_model(base, "vpt", num_tokens=P, deep=True)
    blk = base.layers[0].blocks[1]
    assert any(blk.shift_size)
    blk.attn.fused_attn = fused
    prompts = layer_at(pm, "layers.0.blocks.1.attn").vpt_prompts
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = blk(x)
    ref = reference_block(blk, x, prompts)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    (grad_got,) = torch.autograd.grad((got * g).sum(), prompts)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), prompts)
    assert grad_got.abs().sum() > 0
    torch.testing.assert_close(grad_got, grad_ref, rtol=1e-10, atol=1e-10)
    with pm.disable_adapters():  # and the reference without prompts is the base block
        torch.testing.assert_close(blk(x), reference_block(blk, x, prompts[:0]), rtol=1e-10, atol=1e-10)


def test_fused_and_plain_attention_agree():
    base = make()
    pm = vp.get_peft_model(base, "vpt", num_tokens=P, deep=True)
    x = image(2, seed=4)[..., :32, :32]
    outs = []
    for fused in (False, True):
        for m in base.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
        outs.append(pm(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_prompts_change_the_output_and_only_prompts_train(arch):
    base = make(arch)
    with torch.no_grad():  # SwinV2 zero-initialises its post-norms: every block would be the identity
        for name, p in base.named_parameters():
            if ".norm" in name and name.endswith("weight"):
                p.fill_(1.0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = base(x)
    pm = vp.get_peft_model(base, "vpt", num_tokens=P, deep=True, modules_to_save=[])
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all(n.endswith("vpt_prompts") for n in names)
    assert pm.get_nb_trainable_parameters()[0] == P * (16 + 16 + 32 + 32)  # P x C per prompted block
    out = pm(x)
    assert out.shape == ref.shape and (out - ref).abs().max() > 1e-3
    out.square().sum().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    with pm.disable_adapters():
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=0)


def test_shallow_prompts_only_the_first_selected_block():
    pm = vp.get_peft_model(make(), "vpt", num_tokens=P, layers=[1, 2])
    assert list(pm._targets["default"].values()) == ["layers.0.blocks.1.attn", "head.fc"]
    deep = vp.get_peft_model(make(), "vpt", num_tokens=P, deep=True, layers=[1, 2])
    assert [m for m in deep._targets["default"].values() if m != "head.fc"] == [
        "layers.0.blocks.1.attn",
        "layers.1.blocks.0.attn",
    ]
    assert layer_at(deep, "layers.1.blocks.0.attn").vpt_prompts.shape == (P, 32)


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_bias_shadow_is_withdrawn_after_a_forward_and_after_a_failing_one(arch):
    base = make(arch)
    pm = vp.get_peft_model(base, "vpt", num_tokens=P, deep=True)
    attn = base.layers[0].blocks[1].attn
    before = dict(attn.__dict__)
    seen: list[set[str]] = []
    attn.proj.register_forward_pre_hook(lambda m, a: seen.append(set(attn.__dict__) - set(before)))
    pm(torch.randn(1, 3, 32, 32))
    assert seen and seen[0]  # the shadow is there during the attention
    assert attn.__dict__.keys() == before.keys() and attn.__dict__.get("window_size") == before.get("window_size")

    def boom(m, a):
        raise RuntimeError("boom")

    handle = attn.proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pm(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert attn.__dict__.keys() == before.keys() and attn.__dict__.get("window_size") == before.get("window_size")
    assert pm(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # and the next forward works


def test_merge_refuses():
    pm = vp.get_peft_model(make(), "vpt", num_tokens=P, deep=True)
    assert not vp.get_method("vpt").mergeable
    with pytest.raises((ValueError, NotImplementedError)):
        pm.merge_and_unload()


def test_save_load_round_trip(tmp_path):
    base = make()
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    keys = list(base.state_dict())
    pm = vp.get_peft_model(base, "vpt", num_tokens=P, deep=True)
    assert list(base.state_dict()) == keys  # the base model's keys are unchanged
    with torch.no_grad():
        for p in pm.peft_modules.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out = pm(x)
    pm.save_adapter(tmp_path / "vpt")
    fresh = make()
    fresh.load_state_dict(pristine)
    torch.testing.assert_close(vp.load_adapter(fresh, tmp_path / "vpt")(x), out, rtol=1e-6, atol=1e-6)


def test_other_windowed_backbones_still_refuse():
    sam = timm.create_model(
        "samvit_base_patch16",
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=32,
        global_attn_indexes=(1,),
        window_size=2,
        num_classes=5,
        neck_chans=16,
    )
    with pytest.raises(ValueError, match="timm Swin / SwinV2 window attention"):
        vp.get_peft_model(sam, "vpt", num_tokens=P)
