"""Site selection pinned by hand: ``layers``, ``exclude`` and VPT's ``deep`` choose exactly the module names
written out below for the tiny test models (not a list computed by the code under test)."""

from __future__ import annotations

import pytest
import torch
from conftest import image, make_convnext, make_resnet, make_swin, make_vit, seeded

import visionpeft as vp

VIT_BLOCK_OPS = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
SWIN_BLOCK_OPS = VIT_BLOCK_OPS


def chosen(pm: vp.PeftVisionModel, adapter: str = "default") -> list[str]:
    """Module names the adapter attached to, in model order (the trained head copy left out)."""
    return [m for key, m in pm._targets[adapter].items() if not key.startswith("modules_to_save")]


def prompts_of(pm: vp.PeftVisionModel, module_name: str, adapter: str = "default") -> torch.Tensor | None:
    """The VPT prompt tensor (num_tokens, C) attached before ``module_name``, or ``None`` for a strip-only site."""
    key = next(k for k, m in pm._targets[adapter].items() if m == module_name)
    return getattr(pm.peft_modules[adapter][key], "vpt_prompts", None)


def vit_block(i: int, ops: list[str] = VIT_BLOCK_OPS) -> list[str]:
    return [f"blocks.{i}.{op}" for op in ops]


CASES = [
    # (id, backbone, method, options, the module names written out by hand)
    ("lora_vit_default", make_vit, "lora", {}, [f"blocks.{i}.attn.qkv" for i in range(6)]),
    ("lora_vit_layer1", make_vit, "lora", {"layers": [1]}, ["blocks.1.attn.qkv"]),
    ("lora_vit_layers_0_5", make_vit, "lora", {"layers": [5, 0]}, ["blocks.0.attn.qkv", "blocks.5.attn.qkv"]),
    (
        "lora_vit_exclude_full_name",
        make_vit,
        "lora",
        {"exclude": ["blocks.0.attn.qkv"]},
        [f"blocks.{i}.attn.qkv" for i in range(1, 6)],
    ),
    (
        "lora_vit_exclude_suffix",
        make_vit,
        "lora",
        {"targets": ["qkv", "mlp_in", "mlp_out"], "exclude": ["fc1"], "layers": [2, 3]},
        ["blocks.2.attn.qkv", "blocks.2.mlp.fc2", "blocks.3.attn.qkv", "blocks.3.mlp.fc2"],
    ),
    (
        "lora_vit_exclude_regex",
        make_vit,
        "lora",
        {"targets": ["attn.proj"], "exclude": [r"blocks\.[0-3]\..*"]},
        ["blocks.4.attn.proj", "blocks.5.attn.proj"],
    ),
    ("lora_swin_layer1", make_swin, "lora", {"layers": [1]}, ["layers.1.blocks.0.attn.qkv"]),
    (
        "lora_swin_exclude",
        make_swin,
        "lora",
        {"exclude": ["layers.0.blocks.0.attn.qkv"]},
        ["layers.1.blocks.0.attn.qkv"],
    ),
    # ConvNeXt has no qkv: LoRA's defaults are the MLP's fc1 / fc2; block 2 of the global order is stages.1.blocks.1
    (
        "lora_convnext_layer2",
        make_convnext,
        "lora",
        {"layers": [2]},
        ["stages.1.blocks.1.mlp.fc1", "stages.1.blocks.1.mlp.fc2"],
    ),
    (
        "lora_convnext_layers_0_8",
        make_convnext,
        "lora",
        {"layers": [0, 8], "exclude": ["stages.3.blocks.1.mlp.fc2"]},
        ["stages.0.blocks.0.mlp.fc1", "stages.0.blocks.0.mlp.fc2", "stages.3.blocks.1.mlp.fc1"],
    ),
    # ResNet: the block convolutions (not the stem, not the downsample shortcut)
    ("lora_resnet_layer1", make_resnet, "lora", {"layers": [1]}, ["layer2.0.conv1", "layer2.0.conv2"]),
    (
        "lora_resnet_layer2_exclude",
        make_resnet,
        "lora",
        {"layers": [2], "exclude": ["layer3.0.conv2"]},
        ["layer3.0.conv1", "layer3.0.conv3"],
    ),
    ("bitfit_vit_layer1", make_vit, "bitfit", {"layers": [1]}, vit_block(1)),
    (
        "bitfit_vit_exclude_norms",
        make_vit,
        "bitfit",
        {"layers": [0], "exclude": ["norm1", "norm2"]},
        ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"],
    ),
    # BitFit on ResNet: only modules that have a bias (the BatchNorms; the convs have none), head left out
    (
        "bitfit_resnet_default",
        make_resnet,
        "bitfit",
        {},
        ["conv1.1", "conv1.4", "bn1"]
        + ["layer1.0.bn1", "layer1.0.bn2"]
        + ["layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.2"]
        + ["layer3.0.bn1", "layer3.0.bn2", "layer3.0.bn3", "layer3.0.downsample.2"]
        + ["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.2"],
    ),
    (
        "bitfit_resnet_layer1",
        make_resnet,
        "bitfit",
        {"layers": [1]},
        ["layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.2"],
    ),
    (
        "ssf_vit_default",
        make_vit,
        "ssf",
        {},
        ["patch_embed.proj"] + [n for i in range(6) for n in vit_block(i)] + ["norm"],
    ),
    (
        "ssf_vit_exclude",
        make_vit,
        "ssf",
        {"exclude": ["patch_embed.proj", "norm", r"blocks\.[1-5]\..*"]},
        vit_block(0),
    ),
    ("ssf_vit_layers", make_vit, "ssf", {"layers": [3, 4]}, vit_block(3) + vit_block(4)),
    ("ssf_swin_layer0", make_swin, "ssf", {"layers": [0]}, [f"layers.0.blocks.0.{op}" for op in SWIN_BLOCK_OPS]),
    (
        "conv_adapter_convnext_conv",
        make_convnext,
        "conv_adapter",
        {"level": "conv", "layers": [0, 8]},
        ["stages.0.blocks.0", "stages.3.blocks.1"],
    ),
    (
        "conv_adapter_convnext_conv_exclude",
        make_convnext,
        "conv_adapter",
        {"level": "conv", "exclude": [r"stages\.2\..*"]},
        ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1", "stages.3.blocks.0", "stages.3.blocks.1"],
    ),
    # the conv level's sites are the blocks; inside each, the adapter sits beside the spatial conv (see below)
    (
        "conv_adapter_resnet_conv",
        make_resnet,
        "conv_adapter",
        {"level": "conv", "layers": [0, 3], "exclude": ["layer4.0"]},
        ["layer1.0"],
    ),
    (
        "conv_adapter_resnet_conv_all",
        make_resnet,
        "conv_adapter",
        {"level": "conv"},
        ["layer1.0", "layer2.0", "layer3.0", "layer4.0"],
    ),
    ("vpt_shallow", make_vit, "vpt", {"num_tokens": 2}, ["blocks.0", "blocks.5"]),
    ("vpt_shallow_layer2", make_vit, "vpt", {"num_tokens": 2, "layers": [2]}, ["blocks.2", "blocks.5"]),
    ("vpt_deep_all", make_vit, "vpt", {"num_tokens": 2, "deep": True}, [f"blocks.{i}" for i in range(6)]),
    (
        "vpt_deep_0_2",
        make_vit,
        "vpt",
        {"num_tokens": 2, "deep": True, "layers": [2, 0]},
        ["blocks.0", "blocks.2", "blocks.5"],
    ),
    (
        "vpt_shallow_ignores_more_layers",
        make_vit,
        "vpt",
        {"num_tokens": 2, "layers": [1, 3]},
        ["blocks.1", "blocks.5"],
    ),
]


@pytest.mark.parametrize("make,method,options,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_chosen_module_names(make, method, options, expected):
    pm = vp.get_peft_model(seeded(make), method, **options)
    assert sorted(chosen(pm)) == sorted(expected)
    pm(image(1))  # the chosen sites also run


def test_only_the_chosen_module_changes_its_output():
    """LoRA (non-zero init) with layers=[1]: the first output that differs is blocks.1.attn.qkv's."""
    base = seeded(make_vit)
    pm = vp.get_peft_model(base, "lora", rank=2, layers=[1], init_weights=False, modules_to_save=[])
    outs: dict[str, torch.Tensor] = {}
    for name, m in base.named_modules():  # registered after the adapter's hooks: they see the adapted output
        if isinstance(m, torch.nn.Linear) and name.startswith(("blocks.0.", "blocks.1.")):
            m.register_forward_hook(lambda mod, a, out, name=name: outs.__setitem__(name, out.detach().clone()))
    x = image(1)
    with torch.no_grad():
        with pm.disable_adapters():
            pm(x)
        ref = dict(outs)
        pm(x)
    for n in vit_block(0, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]):
        assert torch.equal(outs[n], ref[n]), n
    assert not torch.allclose(outs["blocks.1.attn.qkv"], ref["blocks.1.attn.qkv"])


def _block_inputs(base: torch.nn.Module) -> list[torch.Tensor]:
    """Record what each block receives (after any pre-hook registered before this one)."""
    seen: list[torch.Tensor] = []
    for blk in base.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def test_vpt_deep_inserts_then_replaces_at_the_chosen_blocks():
    base = seeded(make_vit)
    k, prefix = 2, base.num_prefix_tokens
    pm = vp.get_peft_model(base, "vpt", num_tokens=k, deep=True, layers=[0, 2])
    seen = _block_inputs(base)
    after_1: list[torch.Tensor] = []
    base.blocks[1].register_forward_hook(lambda m, a, out: after_1.append(out.detach().clone()))
    x = image(2)
    with torch.no_grad():
        out = pm(x)
    n = (64 // 16) ** 2 + prefix
    assert [t.shape[1] for t in seen] == [n + k] * 6  # inserted before block 0, kept through block 5
    p0, p2 = prompts_of(pm, "blocks.0"), prompts_of(pm, "blocks.2")
    assert p0 is not None and p2 is not None and not torch.allclose(p0, p2)
    prompt_rows = slice(prefix, prefix + k)
    torch.testing.assert_close(seen[0][:, prompt_rows], p0.expand(2, -1, -1))  # block 0: its own prompts
    torch.testing.assert_close(seen[2][:, prompt_rows], p2.expand(2, -1, -1))  # block 2: replaced by its own
    # ... while the class and patch tokens pass from block 1 to block 2 unchanged and in place
    assert torch.equal(seen[2][:, :prefix], after_1[0][:, :prefix])
    assert torch.equal(seen[2][:, prefix + k :], after_1[0][:, prefix + k :])
    for i in (1, 3, 4, 5):  # other blocks: the previous block's outputs at the prompt positions
        assert not torch.allclose(seen[i][:, prompt_rows], p0.expand(2, -1, -1))
        assert not torch.allclose(seen[i][:, prompt_rows], p2.expand(2, -1, -1))
    assert prompts_of(pm, "blocks.5") is None  # the last block only strips
    assert out.shape == (2, 5)
    # the patch tokens entering block 0 are the base model's (prompts only added)
    with torch.no_grad(), pm.disable_adapters():
        seen.clear()
        pm(x)
    assert [t.shape[1] for t in seen] == [n] * 6


def test_vpt_shallow_inserts_once_before_the_chosen_block():
    base = seeded(make_vit)
    k, prefix = 3, base.num_prefix_tokens
    pm = vp.get_peft_model(base, "vpt", num_tokens=k, layers=[2])
    seen = _block_inputs(base)
    with torch.no_grad():
        pm(image(1))
    n = (64 // 16) ** 2 + prefix
    assert [t.shape[1] for t in seen] == [n, n, n + k, n + k, n + k, n + k]
    torch.testing.assert_close(seen[2][0, prefix : prefix + k], prompts_of(pm, "blocks.2"))
    assert not torch.allclose(seen[3][0, prefix : prefix + k], seen[2][0, prefix : prefix + k])


def _hooked(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if n and (m._forward_hooks or m._forward_pre_hooks))


def test_conv_adapter_hooks_sit_beside_the_spatial_conv():
    """ConvNeXt: read and add at the depthwise conv; ResNet BasicBlock: beside its first (strided) conv;
    block level: the block itself."""
    pm = vp.get_peft_model(seeded(make_convnext), "conv_adapter", layers=[0], modules_to_save=[])
    assert _hooked(pm.base_model) == ["stages.0.blocks.0.conv_dw"]
    pm = vp.get_peft_model(seeded(make_resnet), "conv_adapter", layers=[1], modules_to_save=[])
    assert _hooked(pm.base_model) == ["layer2.0.conv1"]
    pm = vp.get_peft_model(seeded(make_resnet), "conv_adapter", level="block", layers=[1], modules_to_save=[])
    assert _hooked(pm.base_model) == ["layer2.0"]
