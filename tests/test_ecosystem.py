"""The adapted model is an ordinary nn.Module: dtype moves, autocast, torch.compile, DDP, checkpointing."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import image, make_convnext, make_swin, make_vit, seeded

import visionpeft as vp

COMMON = [
    ("lora", {"rank": 4, "qkv_slices": "qv"}),
    ("dora", {"rank": 2}),
    ("adaptformer", {"bottleneck": 8}),
    ("vpt", {"num_tokens": 2, "deep": True}),
    ("ssf", {}),
    ("adapter", {"bottleneck": 4}),
]


@pytest.mark.parametrize("method,opts", COMMON, ids=[m for m, _ in COMMON])
def test_to_bfloat16_and_back(method, opts):
    pm = vp.get_peft_model(seeded(make_vit), method, init_weights=False, **opts)
    x = image()
    ref = pm(x)
    pm.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in pm.parameters())
    out = pm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    pm.to(torch.float32)
    torch.testing.assert_close(pm(x), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method,opts", COMMON, ids=[m for m, _ in COMMON])
def test_autocast_cpu_bf16_trains(method, opts):
    pm = vp.get_peft_model(seeded(make_vit), method, init_weights=False, **opts)
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(image(4))
        loss = torch.nn.functional.cross_entropy(out.float(), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("method,opts", COMMON, ids=[m for m, _ in COMMON])
def test_torch_compile_has_no_graph_breaks(method, opts):
    import torch._dynamo

    torch._dynamo.reset()
    pm = vp.get_peft_model(seeded(make_vit), method, init_weights=False, **opts)
    x = image()
    explanation = torch._dynamo.explain(pm)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), pm(x), rtol=1e-5, atol=1e-5)
    out = compiled(x)
    out.sum().backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)


def test_compile_follows_adapter_switching():
    import torch._dynamo

    torch._dynamo.reset()
    pm = vp.get_peft_model(seeded(make_vit), "lora", rank=2, init_weights=False, adapter_name="a")
    pm.add_adapter("b", vp.LoRAConfig(rank=2, init_weights=False))
    x = image()
    compiled = torch.compile(pm, backend="aot_eager")
    out_a = compiled(x)
    pm.set_adapter("b")
    torch.testing.assert_close(compiled(x), pm(x))
    assert not torch.allclose(compiled(x), out_a)


@pytest.mark.parametrize("make", [make_vit, make_swin, make_convnext], ids=["vit", "swin", "convnext"])
def test_grad_checkpointing_gives_same_gradients(make):
    method = "lora" if make is not make_convnext else "ssf"
    grads = []
    for ckpt in (False, True):
        pm = vp.get_peft_model(seeded(make), method, init_weights=False)
        pm.set_grad_checkpointing(ckpt)  # timm's API, reached through the wrapper
        pm.train()
        out = pm(image(2))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_gloo():
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        pm = vp.get_peft_model(seeded(make_vit), "adaptformer", bottleneck=4, init_weights=False)
        ref = vp.get_peft_model(seeded(make_vit), "adaptformer", bottleneck=4, init_weights=False)
        ref.load_state_dict(pm.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(pm)
        x, y = image(4), torch.tensor([0, 1, 2, 3])
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        for p, q in zip(pm.parameters(), ref.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
            else:
                assert p.grad is None
        assert len(ddp.module.adapter_state_dict()) > 0
    finally:
        dist.destroy_process_group()
