"""Backbones II: site layouts read off the modules, weights read by their parent (EVA / BEiT / SwinV2 qkv),
``all-linear`` / ``all-conv`` targets and the specs of the newer families."""

from __future__ import annotations

import pytest
import timm
import torch
from test_zoo import _one_thread, liven  # noqa: F401  (_one_thread: an autouse fixture)

import visionpeft as vp

IMG = 64


def image(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def convnext(arch: str, conv_mlp: bool | None = None) -> torch.nn.Module:
    kw = {} if conv_mlp is None else {"conv_mlp": conv_mlp}
    torch.manual_seed(0)
    return timm.create_model(arch, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_classes=5, **kw).eval()


def _linear_to_conv_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A conv_mlp=False ConvNeXt state_dict in the conv_mlp=True form: MLP weights become 1x1 kernels."""
    return {k: v[:, :, None, None] if ".mlp.fc" in k and k.endswith("weight") else v for k, v in state.items()}


# 1. ConvNeXt conv_mlp=True: the MLP runs as 1x1 convs on NCHW maps ---------------------------------------------
TAPPED = [
    ("adaptformer", {"placement": "mlp", "bottleneck": 8}),
    ("parallel_adapter", {"bottleneck": 8}),
    ("adapter", {"bottleneck": 8, "placement": "houlsby"}),
    ("adapter", {"bottleneck": 8, "placement": "pfeiffer"}),
    ("ssf", {}),
]


@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
@pytest.mark.parametrize("method,options", TAPPED, ids=[f"{m}-{o.get('placement', '')}" for m, o in TAPPED])
def test_conv_mlp_convnext_computes_what_the_linear_mlp_computes(arch, method, options, tmp_path):
    """The same weights as Linear (NHWC) or 1x1-conv (NCHW) MLP, the same adapter: the same output."""
    linear, conv = convnext(arch, conv_mlp=False), convnext(arch)
    assert isinstance(conv.stages[0].blocks[0].mlp.fc1, torch.nn.Conv2d)
    conv.load_state_dict(_linear_to_conv_state(linear.state_dict()))
    x = image()
    ref = linear(x)
    torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-4)
    torch.manual_seed(3)
    pm = vp.get_peft_model(linear, method, init_weights=False, **options)
    expected = pm(x)
    assert not torch.allclose(expected, ref, atol=1e-4)
    pm.save_adapter(tmp_path / "a")
    loaded = vp.load_adapter(conv, tmp_path / "a")
    torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
def test_conv_mlp_sites_and_taps_read_nchw(arch):
    base = convnext(arch)
    spec = vp.detect_backbone(base)
    cfg = vp.ParallelAdapterConfig(bottleneck=4)
    sites = vp.get_method("parallel_adapter").sites(base, spec, cfg)
    assert sites and {s.layout for s in sites} == {"NCHW"}
    block = base.stages[0].blocks[0]
    assert spec.taps["mlp"].resolve(block).layout == "NCHW"
    linear = convnext(arch, conv_mlp=False)
    assert {s.layout for s in vp.get_method("parallel_adapter").sites(linear, spec, cfg)} == {"NHWC"}
    assert spec.taps["mlp"].resolve(linear.stages[0].blocks[0]).layout == "NHWC"


@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
@pytest.mark.parametrize("method", ["adaptformer", "parallel_adapter", "adapter", "ssf", "conv_adapter", "bitfit"])
def test_conv_mlp_convnext_runs_every_supported_method(arch, method):
    base = convnext(arch)
    options = {"placement": "mlp"} if method == "adaptformer" else {}
    x = image()
    ref = base(x)
    pm = vp.get_peft_model(base, method, **options)
    out = pm(x)
    if vp.get_method(method).identity_at_init:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    pm2 = vp.get_peft_model(convnext(arch), method, init_weights=False, **options)
    assert not torch.allclose(pm2(x), ref, atol=1e-5)


# 2. weights read by their parent: EVA / BEiT / SwinV2 compute qkv with F.linear(x, self.qkv.weight, qkv_bias) ---
V = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5)


def hosted_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch.startswith("swinv2"):
        kw = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 2), img_size=32, window_size=4, num_classes=5)
    else:
        kw = dict(V, init_values=1.0) if arch.startswith("beit") else dict(V)
    model = timm.create_model(arch, **kw).eval()
    # random q / v biases (timm zeroes them: the F.linear bias path must matter), LayerScale and head
    return liven(model, vp.detect_backbone(model))


HOSTED = ["eva02_tiny_patch14_224", "beit_base_patch16_224", "swinv2_tiny_window8_256"]


@pytest.mark.parametrize("arch", HOSTED)
def test_a_hook_on_the_hosted_qkv_linear_never_fires(arch):
    """Why these sites need another mechanism (a failing version of this test means timm changed)."""
    model = hosted_model(arch)
    spec = vp.detect_backbone(model)
    qkv = [n for n, _ in model.named_modules() if n.endswith("attn.qkv")]
    assert qkv and all(spec.host_of(n) == n.rpartition(".")[0] for n in qkv)
    calls = []
    modules = dict(model.named_modules())
    for n in qkv:
        modules[n].register_forward_hook(lambda *a: calls.append(1))
    model(image(1, 32))
    assert calls == []


@pytest.mark.parametrize("arch", HOSTED)
@pytest.mark.parametrize(
    "method,options", [("lora", {"rank": 2}), ("lora", {"rank": 2, "qkv_slices": "qv"}), ("dora", {"rank": 2})]
)
def test_lora_on_a_hosted_qkv_changes_the_output_and_merges_exactly(arch, method, options, tmp_path):
    model = hosted_model(arch)
    keys = list(model.state_dict())
    x = image(2, 32)
    ref = model(x)
    torch.manual_seed(1)
    pm = vp.get_peft_model(model, method, init_weights=False, modules_to_save=[], targets=["qkv"], **options)
    qkv = next(m for n, m in model.named_modules() if n.endswith("attn.qkv"))
    out = pm(x)
    assert (out - ref).abs().max() > 1e-3, "the adapted qkv weight must reach the attention"
    assert "weight" not in qkv.__dict__ and list(model.state_dict()) == keys
    assert isinstance(qkv.weight, torch.nn.Parameter)
    with pm.disable_adapters():
        torch.testing.assert_close(pm(x), ref, rtol=0, atol=1e-6)
    out.sum().backward()  # the low-rank factors learn through the supplied weight; the base stays frozen
    trained = [p for p in pm.peft_modules.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert qkv.weight.grad is None
    pm.save_adapter(tmp_path / "a")
    loaded = vp.load_adapter(hosted_model(arch), tmp_path / "a")
    torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-5)
    plain = pm.merge_and_unload()
    assert list(plain.state_dict()) == keys and "weight" not in qkv.__dict__
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)


def test_lora_qkv_slices_leave_the_k_rows_of_a_hosted_weight_alone():
    model = hosted_model("eva02_tiny_patch14_224")
    pm = vp.get_peft_model(model, "lora", rank=2, qkv_slices="qv", init_weights=False, modules_to_save=[])
    qkv = model.blocks[0].attn.qkv
    before = qkv.weight.detach().clone()
    pm.merge()
    d = qkv.weight.shape[0] // 3
    delta = (qkv.weight - before).abs().sum(dim=1)
    assert delta[:d].min() > 0 and delta[2 * d :].min() > 0 and delta[d : 2 * d].max() == 0


def test_a_failed_forward_leaves_no_adapted_weight_behind():
    model = hosted_model("beit_base_patch16_224")
    pm = vp.get_peft_model(model, "lora", init_weights=False, modules_to_save=[])
    qkv = model.blocks[0].attn.qkv

    def boom(*args):
        raise RuntimeError("boom")

    handle = model.blocks[0].attn.proj.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pm(image(1, 32))
    handle.remove()
    assert "weight" not in qkv.__dict__ and isinstance(qkv.weight, torch.nn.Parameter)


def test_methods_that_cannot_reach_a_hosted_weight_say_so():
    model = hosted_model("eva02_tiny_patch14_224")
    with pytest.raises(ValueError, match=r"parent reads itself .*LoRA and DoRA adapt them"):
        vp.get_peft_model(model, "parallel_adapter", targets=["qkv"])
    with pytest.raises(ValueError, match="LoRA dropout=0.1 .* reads its weight itself"):
        vp.get_peft_model(model, "lora", dropout=0.1)
    pm = vp.get_peft_model(model, "ssf")  # every affine op except the hosted qkv, whose output SSF cannot scale
    sites = list(pm._targets["default"].values())
    assert "blocks.0.attn.proj" in sites and not any(s.endswith("attn.qkv") for s in sites)


def test_separate_q_k_v_projections_take_qkv_slices():
    torch.manual_seed(0)
    model = timm.create_model("eva02_base_patch14_224", **V).eval()  # q_proj / k_proj / v_proj
    pm = vp.get_peft_model(model, "lora", rank=2, qkv_slices="qv", modules_to_save=[])
    sites = sorted(s.rpartition(".")[2] for s in pm._targets["default"].values())
    assert sites == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert pm.get_nb_trainable_parameters()[0] == 4 * 2 * (32 + 32)


# prompts, prefix tokens, LayerScale ----------------------------------------------------------------------------
def test_vpt_refuses_rotary_and_relative_position_models_with_the_reason():
    for arch, why in (("eva02_tiny_patch14_224", "rotary"), ("beit_base_patch16_224", "relative position bias")):
        torch.manual_seed(0)
        model = timm.create_model(arch, **V)
        with pytest.raises(ValueError, match=f"vpt is not supported on this timm_.* model: .*{why}"):
            vp.get_peft_model(model, "vpt")
    eva01 = timm.create_model("eva02_tiny_patch14_224", use_rot_pos_emb=False, **V)  # absolute positions only
    assert vp.get_peft_model(eva01, "vpt", num_tokens=2)(image(1, 32)).shape == (1, 5)


@pytest.mark.parametrize(
    "arch,prefix", [("vit_small_patch14_reg4_dinov2", 5), ("vit_medium_patch16_rope_reg1_gap_256", 1)]
)
def test_register_tokens_are_prefix_tokens(arch, prefix):
    torch.manual_seed(0)
    model = timm.create_model(arch, **{**V, "num_heads": 2}).eval()
    spec = vp.detect_backbone(model)
    assert spec.num_prefix_tokens(model) == prefix
    if spec.prompt_refusal is not None and spec.prompt_refusal(model):
        return
    seen = {}
    pm = vp.get_peft_model(model, "vpt", num_tokens=3)
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))  # runs after VPT's
    pm(image(1, 32))
    x = seen["in"]
    assert x.shape[1] == prefix + 3 + (32 // 8) ** 2
    prompts = pm.peft_modules["default"]["blocks-0"].vpt_prompts
    torch.testing.assert_close(x[0, prefix : prefix + 3], prompts)  # after the class and register tokens


def test_deit3_layer_scale_does_not_scale_the_adapters():
    """DeiT-III's LayerScale (init 1e-5 at full scale) multiplies the block branches, never the adapters' own."""
    torch.manual_seed(0)
    small = timm.create_model("deit3_small_patch16_224", init_values=1e-6, **V).eval()
    assert vp.detect_backbone(small).name == "timm_vit" and small.blocks[0].ls1.gamma.abs().max() < 1e-5
    x = image(1, 32)
    feats = {}
    small.blocks[-1].register_forward_hook(lambda m, a, o: feats.__setitem__("o", o))
    for method in ("adapter", "adaptformer"):
        torch.manual_seed(2)
        pm = vp.get_peft_model(small, method, init_weights=False, modules_to_save=[])
        pm(x)
        adapted = feats["o"]
        with pm.disable_adapters():
            pm(x)
        assert (adapted - feats["o"]).abs().max() > 1e-2, method
        pm.unload()


# 3. torchvision: nn.MultiheadAttention's packed input projection --------------------------------------------
def tv_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    model.heads.head = torch.nn.Linear(32, 5)  # torchvision zero-initialises its head
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("slices", [None, "qv"])
def test_lora_on_multihead_attention_in_proj(method, slices, tmp_path):
    model = tv_vit()
    assert vp.detect_backbone(model).name == "tv_vit"
    keys = list(model.state_dict())
    x = image(2, 32)
    ref = model(x)
    mha = model.encoder.layers.encoder_layer_0.self_attention
    before = mha.in_proj_weight.detach().clone()
    torch.manual_seed(1)
    pm = vp.get_peft_model(model, method, rank=2, qkv_slices=slices, init_weights=False, modules_to_save=[])
    assert sorted(pm._targets["default"].values())[0] == "encoder.layers.encoder_layer_0.self_attention"
    assert pm.get_nb_trainable_parameters()[0] == 2 * vp.get_method(method).site_params(
        vp.get_method(method).sites(model, pm.spec, pm.peft_config["default"])[0], pm.peft_config["default"]
    )
    out = pm(x)
    assert (out - ref).abs().max() > 1e-3
    assert "in_proj_weight" not in mha.__dict__ and list(model.state_dict()) == keys
    pm.save_adapter(tmp_path / "a")
    torch.testing.assert_close(vp.load_adapter(tv_vit(), tmp_path / "a")(x), out, rtol=1e-5, atol=1e-5)
    pm.merge()
    torch.testing.assert_close(pm(x), out, rtol=1e-4, atol=1e-4)
    changed = (mha.in_proj_weight - before).abs().sum(dim=1)
    d = 32
    assert changed[:d].min() > 0 and changed[2 * d :].min() > 0
    assert (changed[d : 2 * d].max() == 0) == (slices == "qv")
    plain = pm.merge_and_unload()
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)


def test_all_linear_reaches_the_attention_out_proj_that_multihead_attention_reads_itself():
    model = tv_vit()
    calls = []
    model.encoder.layers.encoder_layer_0.self_attention.out_proj.register_forward_hook(lambda *a: calls.append(1))
    x = image(1, 32)
    ref = model(x)
    assert calls == []  # F.multi_head_attention_forward reads out_proj.weight: a hook on it never runs
    pm = vp.get_peft_model(model, "lora", targets="all-linear", init_weights=False, modules_to_save=[])
    sites = set(pm._targets["default"].values())
    layer = "encoder.layers.encoder_layer_0."
    assert {layer + "self_attention", layer + "self_attention.out_proj", layer + "mlp.0", layer + "mlp.3"} <= sites
    assert "heads.head" not in sites
    out = pm(x)
    plain = pm.merge_and_unload()
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)
    assert (out - ref).abs().max() > 1e-3


# 4. targets="all-linear" / "all-conv" on any model ----------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "ssf", "bitfit"])
@pytest.mark.parametrize("target,kind", [("all-linear", torch.nn.Linear), ("all-conv", torch.nn.Conv2d)])
def test_all_linear_and_all_conv_attach_without_module_names(method, target, kind, tmp_path):
    torch.manual_seed(0)
    base = timm.create_model("test_byobnet", num_classes=4).eval()  # no spec: the generic one
    if target == "all-linear":
        base.head.fc = torch.nn.Sequential(torch.nn.Linear(256, 16), torch.nn.Linear(16, 4))  # a two-layer head
        base.get_classifier = lambda: base.head.fc
    spec = vp.detect_backbone(base)
    assert spec.name == "generic" and spec.head(base) == ["head.fc"]
    modules = dict(base.named_modules())
    x = image(2, 64)
    if target == "all-linear":  # every Linear of this net sits in its head
        with pytest.raises(ValueError, match=r"\['all-linear'\] match no suitable module"):
            vp.get_peft_model(base, method, targets=target)
        return
    pm = vp.get_peft_model(base, method, targets=target, init_weights=False, modules_to_save=[])
    sites = list(pm._targets["default"].values())
    expected = [n for n, m in modules.items() if isinstance(m, kind) and not n.startswith("head.fc")]
    if method == "bitfit":
        expected = [n for n in expected if modules[n].bias is not None]
    assert sites == expected and sites
    out = pm(x)
    pm.save_adapter(tmp_path / "a")
    plain = pm.merge_and_unload()
    torch.testing.assert_close(plain(x), out, rtol=1e-4, atol=1e-4)


def test_all_linear_on_a_vit_skips_the_head_only():
    torch.manual_seed(0)
    base = timm.create_model("test_vit", num_classes=5, img_size=64).eval()
    pm = vp.get_peft_model(base, "dora", targets="all-linear", rank=2)
    sites = {n for k, n in pm._targets["default"].items() if not k.startswith("modules_to_save-")}
    linears = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sites == linears - {"head"} and "modules_to_save-head" in pm._targets["default"]
