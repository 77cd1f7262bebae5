"""Tests written to kill mutants that survived ``make mutate`` (docs/testing.md): each states what it guards."""

from __future__ import annotations

import copy

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
