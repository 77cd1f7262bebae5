"""LoHa and LoKr: parity with huggingface peft, ViT-B/16 parameter counts by the papers' formulas, q / k / v
slices of a fused qkv, weights read by their parent (EVA) and nn.MultiheadAttention (torchvision ViT)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from conftest import image, make_resnet, make_vit, seeded

import visionpeft as vp
from visionpeft.methods.loha import LoHaLayer
from visionpeft.methods.lokr import LoKrLayer, factorize


def grouped_net() -> nn.Module:
    """A grouped and a depthwise convolution (peft handles ``groups`` too), with a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 12, 3, padding=1, groups=4),
        nn.Conv2d(12, 12, 3, padding=1, groups=12),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 5),
    )


PEFT_NAME = {"loha": lambda n: "hada_" + n[len("loha_") :], "lokr": lambda n: n}
CASES = [
    ("loha", make_vit, {}),
    ("loha", make_resnet, {}),
    ("loha", grouped_net, {"targets": ["1", "2"]}),
    ("lokr", make_vit, {}),  # W1 full, W2 low-rank
    ("lokr", make_vit, {"rank": 2, "decompose_both": True}),  # W1 low-rank too
    ("lokr", make_vit, {"decompose_factor": 4}),
    ("lokr", make_resnet, {}),  # W2 full (rank >= max(b, d) / 2), conv kernels
    ("lokr", grouped_net, {"targets": ["1", "2"], "rank": 1}),
]


@pytest.mark.parametrize("method,make,options", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_outputs_and_gradients_equal_hf_peft(method, make, options):
    peft = pytest.importorskip("peft")
    opts = {"rank": 4, "alpha": 8, **options}
    ours = vp.get_peft_model(seeded(make), method, modules_to_save=[], **opts)
    names = dict(ours._targets["default"])  # layer key -> module name
    theirs_cfg = {"r": opts["rank"], "alpha": opts["alpha"], "target_modules": sorted(set(names.values()))}
    if method == "loha":
        theirs = peft.get_peft_model(seeded(make), peft.LoHaConfig(**theirs_cfg))
    else:
        extra = {k: options[k] for k in ("decompose_both", "decompose_factor") if k in options}
        theirs = peft.get_peft_model(seeded(make), peft.LoKrConfig(**theirs_cfg, **extra))
    modules = dict(theirs.base_model.model.named_modules())
    torch.manual_seed(7)
    pairs = []
    for key, layer in ours.peft_modules["default"].items():
        for pname, p in layer.named_parameters():
            q = getattr(modules[names[key]], PEFT_NAME[method](pname))["default"]
            value = torch.randn_like(q) * 0.2
            with torch.no_grad():
                q.copy_(value)
                p.copy_(value.reshape(p.shape))  # ours: one matrix per q / k / v slice (here one slice)
            pairs.append((p, q))
    assert pairs and ours.get_nb_trainable_parameters()[0] == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    x = image(3)
    out_ours, out_theirs = ours(x), theirs(x)
    assert (out_ours - seeded(make)(x)).abs().max() > 1e-3, "the copied factors must change the output"
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out_ours)
    (out_ours * g).sum().backward()
    (out_theirs * g).sum().backward()
    for p, q in pairs:
        torch.testing.assert_close(p.grad.reshape(q.shape), q.grad, rtol=1e-4, atol=1e-6)


def test_factorize_matches_peft():
    lokr_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 400):
        for f in (-1, 1, 3, 4, 8, 12, 30):
            assert factorize(dim, f) == lokr_layer.factorization(dim, f), (dim, f)


def _vit_b16():
    """ViT-B/16 with random weights, on the meta device: the counts need shapes only (and take no time)."""
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


def test_vit_b16_parameter_counts_follow_the_papers_formulas():
    """ViT-B/16, 12 blocks, C = 768, fused qkv 768 -> 2304, rank 8 (the generated configs' setting), head excluded."""
    base = _vit_b16()
    # LoHa (FedPara 2R(m + n) per m x n matrix): 2 * 8 * (2304 + 768) = 49,152 per block
    pm = vp.get_peft_model(base, vp.LoHaConfig(rank=8, alpha=8, modules_to_save=[]))
    assert pm.get_nb_trainable_parameters()[0] == 12 * 2 * 8 * (2304 + 768) == 589_824
    # LoKr: 2304 = 48 x 48, 768 = 24 x 32; W1 48 x 24 full, W2 (48 x 32) low-rank since 8 < max(48, 32) / 2
    base = _vit_b16()
    pm = vp.get_peft_model(base, vp.LoKrConfig(rank=8, alpha=8, modules_to_save=[]))
    assert pm.get_nb_trainable_parameters()[0] == 12 * (48 * 24 + 8 * (48 + 32)) == 21_504
    # LoKr on q and v only: each 768 x 768 slice has a = c = 24, b = d = 32: W1 24 x 24, W2 rank 8 (8 < 32 / 2)
    base = _vit_b16()
    pm = vp.get_peft_model(base, vp.LoKrConfig(rank=8, qkv_slices="qv", modules_to_save=[]))
    assert pm.get_nb_trainable_parameters()[0] == 12 * 2 * (24 * 24 + 8 * (32 + 32)) == 26_112
    for name, cfg in (("loha", vp.LoHaConfig(rank=8)), ("lokr", vp.LoKrConfig(rank=8, qkv_slices="qv"))):
        method = vp.get_method(name)
        sites = method.sites(base, vp.detect_backbone(base), cfg)
        assert method.param_count(base, sites, cfg) == {"loha": 589_824, "lokr": 26_112}[name]


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_qkv_slices_leave_the_k_rows_alone_and_start_as_the_identity(method):
    base = seeded(make_vit)
    x = image()
    ref = base(x)
    pm = vp.get_peft_model(base, method, rank=2, qkv_slices="vq", modules_to_save=[])
    assert pm.peft_config["default"].qkv_slices == "qv"
    torch.testing.assert_close(pm(x), ref, rtol=0, atol=0)  # the zero factor makes dW exactly zero
    pm = vp.get_peft_model(seeded(make_vit), method, rank=2, qkv_slices="qv", init_weights=False)
    qkv = pm.base_model.blocks[0].attn.qkv
    before = qkv.weight.detach().clone()
    out = pm(x)
    pm.merge()
    d = qkv.weight.shape[0] // 3
    changed = (qkv.weight - before).abs().sum(dim=1)
    assert (changed[:d] > 0).all() and (changed[2 * d :] > 0).all()
    assert torch.equal(changed[d : 2 * d], torch.zeros(d))
    torch.testing.assert_close(pm(x), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_weights_read_by_the_parent_and_multihead_attention(method, tmp_path):
    """EVA reads qkv.weight with F.linear inside its attention; torchvision's ViT uses nn.MultiheadAttention's
    packed in_proj_weight. The supplied W + dW reaches both, trains, saves and merges; the Parameter stays."""
    from test_backbones2 import hosted_model, tv_vit

    for make, size, opts in (
        (lambda: hosted_model("eva02_tiny_patch14_224"), 32, {"targets": ["qkv"]}),
        (tv_vit, 32, {"qkv_slices": "qv"}),
    ):
        model = make()
        keys = list(model.state_dict())
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        ref = model(x)
        torch.manual_seed(1)
        pm = vp.get_peft_model(model, method, rank=2, init_weights=False, modules_to_save=[], **opts)
        out = pm(x)
        assert (out - ref).abs().max() > 1e-3, "the adapted weight must reach the attention"
        assert all("weight" not in m.__dict__ and "in_proj_weight" not in m.__dict__ for m in model.modules())
        with pm.disable_adapters():
            torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)
        out.sum().backward()
        trained = [p for p in pm.peft_modules.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        pm.save_adapter(tmp_path / method)
        torch.testing.assert_close(vp.load_adapter(make(), tmp_path / method)(x), out, rtol=1e-5, atol=1e-5)
        plain = pm.merge_and_unload()
        assert list(plain.state_dict()) == keys
        torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="decompose_factor"):
        vp.LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="qkv_slices"):
        vp.LoHaConfig(qkv_slices="qx")
    with pytest.raises(ValueError, match="rank"):
        vp.LoHaConfig(rank=0)


def test_two_active_weight_delta_layers_on_one_module_add_their_deltas():
    """What several adapters active at once on one Linear compute: W + dW_loha + dW_lokr (neither is lost)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    loha = LoHaLayer(lin, rank=2, scaling=1.0, slices=None, init_weights=False)
    lokr = LoKrLayer(lin, vp.LoKrConfig(rank=1, init_weights=False), slices=None)
    handles = loha.attach(lin) + lokr.attach(lin)
    loha.active = lokr.active = True
    expected = torch.nn.functional.linear(x, lin.weight + loha.delta_weight() + lokr.delta_weight(), lin.bias)
    torch.testing.assert_close(lin(x), expected)
    assert isinstance(lin.weight, nn.Parameter) and "weight" not in lin.__dict__
    for h in handles:
        h.remove()
