"""The adapted model is an ordinary nn.Module: dtype moves, autocast, torch.compile, DDP, checkpointing."""

from __future__ import annotations

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
    """In bf16 the adapter's effect (adapted minus base output) is the fp32 effect up to bf16 rounding: an
    adapter skipped or mis-cast in bf16 fails, however small its effect next to the logits."""
    pm = vp.get_peft_model(seeded(make_vit), method, init_weights=False, **opts)
    x = image()
    with torch.no_grad():
        ref = pm(x)
        with pm.disable_adapters():
            effect32 = ref - pm(x)
        pm.to(torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in pm.parameters())
        out = pm(x.bfloat16())
        assert out.dtype == torch.bfloat16
        with pm.disable_adapters():
            effect16 = out.float() - pm(x.bfloat16()).float()
    assert effect32.norm() > 0.1, "the adapter has no effect: the check could not fail"
    err = (effect16 - effect32).norm() / effect32.norm()
    assert err < 0.05, f"bf16 effect differs from the fp32 effect by {err:.1%}"
    pm.to(torch.float32)
    with torch.no_grad():
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


def _ddp_model() -> vp.PeftVisionModel:
    return vp.get_peft_model(seeded(make_vit), "lora", rank=2, qkv_slices="qv", init_weights=False)


def _ddp_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each process its own data: different images and labels per rank."""
    return image(3, seed=10 + rank), torch.tensor([rank, rank + 1, 4 - rank])


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pm = _ddp_model()
        ddp = torch.nn.parallel.DistributedDataParallel(pm)
        x, y = _ddp_batch(rank)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
        torch.save(
            {"grads": grads, "adapter_keys": sorted(ddp.module.adapter_state_dict())}, f"{out_dir}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_two_processes_average_gradients(tmp_path):
    """Two gloo processes on different data: each one's gradient is the mean of the two one-process gradients."""
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn would import torch and timm again, slowly)
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    single = []
    for rank in range(2):
        pm = _ddp_model()
        x, y = _ddp_batch(rank)
        torch.nn.functional.cross_entropy(pm(x), y).backward()
        single.append({n: p.grad for n, p in pm.named_parameters() if p.requires_grad})
    assert single[0].keys() == single[1].keys() and len(single[0]) > 0
    # the two ranks' own gradients differ, so an all-reduce that does nothing would fail
    assert any(not torch.allclose(single[0][n], single[1][n]) for n in single[0])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["grads"].keys() == single[0].keys(), "only the trainable parameters get gradients"
        assert got["adapter_keys"] == sorted(_ddp_model().adapter_state_dict())
        for n, g in got["grads"].items():
            torch.testing.assert_close(g, (single[0][n] + single[1][n]) / 2, rtol=1e-5, atol=1e-7, msg=n)
