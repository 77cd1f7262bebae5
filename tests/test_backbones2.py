"""Backbones II: site layouts read off the modules, weights read by their parent (EVA / BEiT / SwinV2 qkv),
``all-linear`` / ``all-conv`` targets and the specs of the newer families."""

from __future__ import annotations

import pytest
import timm
import torch

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
