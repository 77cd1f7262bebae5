"""Tests written to kill mutants that survived ``make mutate`` (docs/testing.md): each states what it guards."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import BACKBONES, image, seeded

import visionpeft as vp


def test_unload_gives_back_the_pristine_model_bit_for_bit():
    """Guards ``unload()``: every hook removed, the base weights and ``requires_grad`` flags restored, and the
    returned model can be wrapped again (the wrapped-model mark is cleared)."""
    base = seeded(BACKBONES["timm_vit"])
    before = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=2))
    with torch.no_grad():
        for p in pm.peft_modules.parameters():
            p.normal_()  # a non-zero update, so a hook left in place would change the output
    plain = pm.unload()
    assert plain is base
    x = image()
    with torch.no_grad():
        assert torch.equal(plain(x), before(x))
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    for (n, p), (_, q) in zip(plain.state_dict().items(), before.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    vp.get_peft_model(plain, vp.LoRAConfig(rank=2))  # no "already wrapped" error


def test_vit_roles_name_these_modules_of_the_tiny_vit():
    """Guards the ViT spec's role patterns (``_vit_like``): each role resolves to the modules written out here by
    hand for timm's ``test_vit`` (6 blocks). The registered spec is built at import time, so a test that calls
    ``_vit_like()`` itself is what pins the patterns."""
    from visionpeft.backbones.timm_vit import _vit_like

    names = [n for n, _ in BACKBONES["timm_vit"]().named_modules() if n]
    blocks = [f"blocks.{i}" for i in range(6)]
    expected = {
        "block": blocks,
        "attn": [f"{b}.attn" for b in blocks],
        "qkv": [f"{b}.attn.qkv" for b in blocks],
        "attn_out": [f"{b}.attn.proj" for b in blocks],
        "mlp": [f"{b}.mlp" for b in blocks],
        "mlp_in": [f"{b}.mlp.fc1" for b in blocks],
        "mlp_out": [f"{b}.mlp.fc2" for b in blocks],
        "norm": [f"{b}.norm{i}" for b in blocks for i in (1, 2)],
        "patch_embed": ["patch_embed.proj"],
        "final_norm": ["norm", "fc_norm"],
    }
    roles = _vit_like()
    assert sorted(roles) == sorted(expected)
    for role, pattern in roles.items():
        assert [n for n in names if re.fullmatch(pattern, n)] == expected[role], role
    # the SAM ViT's blocks sit under the same prefix; another prefix moves every block-level role with it
    other = _vit_like(r"trunk\.blocks\.\d+")
    assert re.fullmatch(other["qkv"], "trunk.blocks.3.attn.qkv") and not re.fullmatch(
        other["qkv"], "blocks.3.attn.qkv"
    )
    assert other["patch_embed"] == roles["patch_embed"]


def test_classifier_at_finds_the_head_by_its_dotted_path():
    """Guards ``classifier_at``, the head finder of the Swin, ConvNeXt, ResNet and SAM specs: the path when the module
    exists, nothing when it is missing or replaced by an Identity (``reset_classifier(0)``)."""
    from visionpeft.backbones._spec import classifier_at

    convnext = BACKBONES["timm_convnext"]()
    assert classifier_at("head.fc")(convnext) == ["head.fc"]
    assert classifier_at("head.nothing")(convnext) == []
    assert classifier_at("fc")(convnext) == []
    convnext.reset_classifier(0)
    assert classifier_at("head.fc")(convnext) == []
    assert classifier_at("fc")(BACKBONES["timm_resnet"]()) == ["fc"]


def test_no_match_message_lists_roles_close_names_of_every_target_and_the_layers():
    """Guards the text of the "nothing matched" error (the README promises errors that say how to fix the input):
    the backbone's roles, close names for every target (by leaf name and by full name, at most six) and, when
    ``layers`` is set, the backbone's block count."""
    from visionpeft.backbones._spec import resolve_targets

    vit = BACKBONES["timm_vit"]()
    with pytest.raises(ValueError) as err:
        resolve_targets(vit, vp.detect_backbone(vit), ["qkvv", "blocks.1.attn.projj"], layers=[7], what="exclude")
    assert str(err.value) == (
        "exclude ['qkvv', 'blocks.1.attn.projj'] match no suitable module of this timm_vit backbone. "
        "Roles of timm_vit: attn, attn_out, block, final_norm, mlp, mlp_in, mlp_out, norm, patch_embed, qkv. "
        "Close module names: qkv, proj, proj_drop, blocks.1.attn.proj, blocks.5.attn.proj, blocks.4.attn.proj. "
        "(layers=[7]; the backbone has 6 blocks.)"
    )
    with pytest.raises(ValueError) as err:
        resolve_targets(vit, vp.detect_backbone(vit), ["blocks.0.attn.qkvv"])
    assert str(err.value).endswith(
        "Close module names: qkv, blocks.0.attn.qkv, blocks.5.attn.qkv, blocks.4.attn.qkv."
    )  # no layers: no block count


def test_full_finetuning_exclude_by_module_or_parameter_name():
    """Guards ``full``'s ``exclude``: a module pattern (``qkv``) freezes that module's weight and bias in every
    block, a parameter-name pattern freezes that one tensor, and every other base parameter still trains (the head
    trains as its saved copy, so the base head stays frozen)."""
    from visionpeft.methods.full import FullFinetuneConfig

    pm = vp.get_peft_model(BACKBONES["timm_vit"](), FullFinetuneConfig(exclude=["qkv", r"blocks\.0\.norm1\.weight"]))
    frozen = {n for n, p in pm.base_model.named_parameters() if not p.requires_grad}
    assert frozen == {f"blocks.{i}.attn.qkv.{t}" for i in range(6) for t in ("weight", "bias")} | {
        "blocks.0.norm1.weight",
        "head.weight",
        "head.bias",
    }


def test_full_finetuning_count_leaves_out_every_saved_module():
    """Guards ``full``'s parameter count with ``modules_to_save``: modules saved as copies (here the head and the
    final norm) are counted once, as copies, not also as base parameters."""
    from visionpeft.methods.full import FullFinetune, FullFinetuneConfig

    vit = BACKBONES["timm_vit"]()
    total = sum(p.numel() for p in vit.parameters())
    head = sum(p.numel() for p in vit.head.parameters())
    norm = sum(p.numel() for p in vit.norm.parameters())
    assert FullFinetune.param_count(vit, [], FullFinetuneConfig()) == total - head
    assert (
        FullFinetune.param_count(vit, [], FullFinetuneConfig(modules_to_save=["head", "norm"])) == total - head - norm
    )


def _vpt_reference(model, prompts: dict[int, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """VPT from the paper, on timm's ViT pieces: before the first prompted block the prompts are inserted after the
    prefix tokens, before each later prompted block they replace the previous block's outputs at those positions;
    after the last block they are dropped."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    k, first = model.num_prefix_tokens, min(prompts)
    n = next(iter(prompts.values())).shape[0]
    for i, blk in enumerate(model.blocks):
        if i in prompts:
            rest = t[:, k:] if i == first else t[:, k + n :]
            t = torch.cat([t[:, :k], prompts[i].expand(t.shape[0], -1, -1), rest], dim=1)
        t = blk(t)
    t = torch.cat([t[:, :k], t[:, k + n :]], dim=1)
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize(
    "kw,deep,layers,prompted",
    [
        ({}, True, [3, 1], [1, 3]),
        ({}, False, [2, 4], [2]),
        ({}, True, None, [0, 1, 2, 3, 4, 5]),
        # average pooling reads every token (a prompt left in place changes it); register tokens: 3 prefix tokens
        ({"global_pool": "avg", "reg_tokens": 2}, True, [1, 3], [1, 3]),
    ],
)
def test_vpt_prompts_the_chosen_blocks_as_the_paper_says(kw, deep, layers, prompted):
    """Guards VPT's placement: which blocks get prompts (``layers``, sorted; shallow keeps the first), insert before
    the first and replace before the others (deep), and strip after the last block; checked against the reference
    above on the tiny ViT."""
    pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"], **kw), vp.VPTConfig(num_tokens=3, deep=deep, layers=layers))
    group = pm.peft_modules["default"]
    prompts = {
        int(key.split("-")[1]): layer.vpt_prompts for key, layer in group.items() if hasattr(layer, "vpt_prompts")
    }
    assert sorted(prompts) == prompted
    x = image()
    with torch.no_grad():
        out = pm(x)
        with pm.disable_adapters():
            ref = _vpt_reference(pm.base_model, prompts, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_vpt_prompt_init_range_and_dropout():
    """Guards VPT's initialisation (uniform in [-v, v], v = sqrt(6 / (3 * patch^2 + C)), the paper's Xavier bound)
    and its prompt dropout (active in training, off in evaluation)."""
    import math

    pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"], patch_size=8), vp.VPTConfig(num_tokens=50, deep=True))
    v = math.sqrt(6.0 / (3 * 8 * 8 + 64))  # 8 x 8 patches, 64 channels
    layers = [m for m in pm.peft_modules["default"].values() if hasattr(m, "vpt_prompts")]
    assert len(layers) == 6
    p = torch.cat([m.vpt_prompts.detach().flatten() for m in layers])
    assert p.abs().max() <= v and p.max() > 0.9 * v and p.min() < -0.9 * v
    pm = vp.get_peft_model(seeded(BACKBONES["timm_vit"]), vp.VPTConfig(num_tokens=4, dropout=0.5))
    x = image()
    with torch.no_grad():
        pm.eval()
        assert torch.equal(pm(x), pm(x))
        pm.train()
        torch.manual_seed(0)
        a = pm(x)
        assert not torch.equal(a, pm(x))


@pytest.mark.parametrize("layers", [[6], [-1], []])
def test_vpt_layers_out_of_range_are_refused(layers):
    """Guards VPT's ``layers`` check: an index past the last block (the tiny ViT has 6), a negative one or an empty
    list is a clear error naming the block count, not a silently smaller prompt set."""
    with pytest.raises(ValueError, match=re.escape(f"vpt layers {layers} out of range: the backbone has 6 blocks")):
        vp.get_peft_model(BACKBONES["timm_vit"](), vp.VPTConfig(deep=True, layers=layers))
