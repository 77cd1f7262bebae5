"""The method x backbone matrix (design section 7): one invariant per test."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BACKBONES, image, matrix, seeded, supported

import visionpeft as vp

CASES = matrix()
UNSUPPORTED = matrix(supported_only=False)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's logits; for a feature map (SAM's encoder), the loss of a fixed linear
    read-out of its mean feature, so that the gradient reaches every layer."""
    if out.dim() == 2:
        return torch.nn.functional.cross_entropy(out, y)
    feats = out.mean(dim=tuple(range(2, out.dim())))
    w = torch.linspace(-1, 1, feats.shape[1] * 5).view(5, -1)
    return torch.nn.functional.cross_entropy(feats @ w.t(), y)


@pytest.mark.parametrize("row,backbone", CASES)
def test_shapes_unchanged(row, backbone):
    base, cfg = supported(row, backbone, init_weights=False)
    x = image()
    ref = base(x)
    pm = vp.get_peft_model(base, cfg)
    out = pm(x)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    if row.cls.trains_base and not vp.detect_backbone(base).head(base):
        return  # full fine-tuning of a model without a head starts as the model itself
    assert not torch.allclose(out, ref), "a non-trivially initialised adapter must change the output"


@pytest.mark.parametrize("row,backbone", UNSUPPORTED)
def test_unsupported_pair_raises_the_declared_reason(row, backbone):
    base = seeded(BACKBONES[backbone])
    reason = row.cls.unsupported_reason(base, vp.detect_backbone(base), row.config())
    hooks = _hooks(base)
    with pytest.raises(ValueError) as err:
        vp.get_peft_model(base, row.config())
    assert str(err.value) == reason
    assert _hooks(base) == hooks and all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("row,backbone", [c for c in CASES if c.values[0].cls.identity_at_init])
def test_identity_at_init(row, backbone):
    base, cfg = supported(row, backbone)
    x = image()
    ref = base(x)
    pm = vp.get_peft_model(base, cfg)
    torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row,backbone", CASES)
def test_only_adapter_parameters_train(row, backbone):
    base, cfg = supported(row, backbone)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    pm = vp.get_peft_model(base, cfg)
    pm.train()
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x, y = image(4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        _loss(pm(x), y).backward()
        opt.step()
    after = base.state_dict()
    if row.cls.trains_base:
        changed = [k for k in frozen if not torch.equal(frozen[k], after[k])]
        assert changed, "full fine-tuning must update base weights"
    else:
        for k, v in frozen.items():
            if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # BatchNorm statistics follow the data in train mode, as in any fine-tuning
            assert torch.equal(v, after[k]), f"base tensor {k} changed"
    moved = [n for n, p in pm.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved, "no trainable parameter moved"
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {n} received a gradient"


@pytest.mark.parametrize("row,backbone", CASES)
def test_every_adapter_parameter_gets_gradient(row, backbone):
    base, cfg = supported(row, backbone, init_weights=False)
    pm = vp.get_peft_model(base, cfg)
    pm.train()
    out = pm(image(4))
    (out * torch.randn_like(out)).sum().backward()
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"


@pytest.mark.parametrize("row,backbone", CASES)
def test_merge_equivalence(row, backbone):
    base, cfg = supported(row, backbone, init_weights=False)
    pm = vp.get_peft_model(base, cfg)
    x = image()
    if not row.cls.mergeable:
        with pytest.raises(ValueError, match=row.method):
            pm.merge()
        return
    before_base = {k: v.clone() for k, v in base.state_dict().items()}
    unmerged = pm(x)
    pm.merge()
    torch.testing.assert_close(pm(x), unmerged, rtol=1e-4, atol=1e-4)
    pm.unmerge()
    torch.testing.assert_close(pm(x), unmerged, rtol=1e-4, atol=1e-4)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before_base[k], rtol=1e-5, atol=1e-5)
    plain = pm.merge_and_unload()
    assert plain is base and _hooks(plain) == 0
    assert type(plain).__module__.startswith(("timm", "segment_anything"))
    torch.testing.assert_close(plain(x), unmerged, rtol=1e-4, atol=1e-4)


# full fine-tuning holds one adapter, the base weights themselves (tests/test_errors.py checks the refusal)
@pytest.mark.parametrize("row,backbone", [c for c in CASES if not c.values[0].cls.trains_base])
def test_multi_adapter_switching(row, backbone):
    base, cfg = supported(row, backbone, init_weights=False)
    x = image()
    ref = base(x)
    pm = vp.get_peft_model(base, cfg, adapter_name="a")
    out_a = pm(x)
    torch.manual_seed(123)
    pm.add_adapter("b", row.config(init_weights=False))
    torch.testing.assert_close(pm(x), out_a)  # adding does not activate
    pm.set_adapter("b")
    out_b = pm(x)
    assert not torch.allclose(out_a, out_b)
    assert all(not p.requires_grad for p in pm.peft_modules["a"].parameters())
    assert all(p.requires_grad for p in pm.peft_modules["b"].parameters())
    with pm.disable_adapters():
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(x), out_b)
    pm.set_adapter("a")
    torch.testing.assert_close(pm(x), out_a)
    pm.delete_adapter("b")
    assert pm.adapters == ["a"] and "b" not in pm.peft_modules
    torch.testing.assert_close(pm(x), out_a)
    pm.delete_adapter("a")
    assert _hooks(base) == 0
    torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row,backbone", CASES)
def test_save_load_round_trip(row, backbone, tmp_path):
    base, cfg = supported(row, backbone, init_weights=False)
    pristine = copy.deepcopy(base.state_dict())
    pm = vp.get_peft_model(base, cfg)
    x = image()
    expected = pm(x)
    pm.save_adapter(tmp_path / "run")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    base_keys = [k for k in saved if k.startswith("base_model.")]
    if not row.cls.trains_base:
        assert not base_keys, "adapter file must hold no frozen base weights"
    n_saved = sum(v.numel() for v in saved.values())
    assert n_saved == sum(p.numel() for p in pm.peft_modules["default"].parameters()) + sum(
        v.numel() for k, v in saved.items() if k.startswith("base_model.")
    )
    fresh = BACKBONES[backbone]().eval()
    fresh.load_state_dict(pristine)
    loaded = vp.load_adapter(fresh, tmp_path / "run")
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in loaded.parameters())


def expected_count(pm, row, cfg) -> int:
    """The method's declared formula at its sites, plus the saved head copies."""
    base = pm.base_model
    sites = row.cls.sites(base, pm.spec, cfg)
    heads = [n for k, n in pm._targets["default"].items() if k.startswith("modules_to_save-")]
    modules = dict(base.named_modules())
    return row.cls.param_count(base, sites, cfg) + sum(p.numel() for h in heads for p in modules[h].parameters())


@pytest.mark.parametrize("row,backbone", CASES)
def test_parameter_count_matches_formula(row, backbone):
    base, cfg = supported(row, backbone)
    pm = vp.get_peft_model(base, cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected_count(pm, row, cfg)
    assert total == sum(p.numel() for p in base.parameters()) + sum(p.numel() for p in pm.peft_modules.parameters())
    line = pm.print_trainable_parameters()
    assert line.startswith("trainable: ") and "%" in line
