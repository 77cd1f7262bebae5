"""Features no other test could see break: full fine-tuning's adapter file, unload(), grad checkpointing,
two methods on one model, .npz weights, position-embedding resampling and the shipped VTAB protocol."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import image, make_convnext, make_swin, make_vit, seeded
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.engine.build import build_backbone
from visionpeft.engine.experiment import DENSE_DATA_KEYS, ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder (the one place that knows the file name)."""
    return load_file(str(directory / "adapter.safetensors"))


def hook_count(model: torch.nn.Module) -> int:
    """Forward (pre-)hooks registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# full fine-tuning: the adapter file holds the base weights ------------------------------------------------------


def test_full_finetuning_saves_every_trained_base_weight(tmp_path):
    base = seeded(make_vit)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    pm = vp.get_peft_model(base, "full")
    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(pm(image(4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    pm.eval()
    pm.save_adapter(tmp_path / "full")
    saved = adapter_tensors(tmp_path / "full")
    body = {n: p for n, p in base.named_parameters() if not n.startswith("head.")}
    assert {k for k in saved if k.startswith("base_model.")} == {f"base_model.{n}" for n in body}
    for n, p in body.items():
        assert torch.equal(saved[f"base_model.{n}"], p.detach()), n
    changed = [n for n, p in body.items() if not torch.equal(p.detach(), original[n])]
    assert len(changed) > len(body) // 2, "training did not change the base weights: the check could not fail"
    # a fresh base with the file reproduces the trained model
    x = image(2)
    with torch.no_grad():
        expect = pm(x)
        loaded = vp.load_adapter(seeded(make_vit), tmp_path / "full")
        torch.testing.assert_close(loaded(x), expect, rtol=0, atol=0)


# unload() -------------------------------------------------------------------------------------------------------

UNLOAD = [
    ("lora", {"rank": 2, "qkv_slices": "qv"}, False),
    ("lora", {"rank": 2, "qkv_slices": "qv"}, True),
    ("vpt", {"num_tokens": 2, "deep": True}, False),
    ("ssf", {}, False),
    ("ssf", {}, True),
    ("bitfit", {}, True),
    ("adaptformer", {"bottleneck": 4}, False),
]


@pytest.mark.parametrize(
    "method,opts,merged", UNLOAD, ids=[m + ("_merged" if merged else "") for m, _, merged in UNLOAD]
)
def test_unload_returns_the_pristine_base_model(method, opts, merged):
    base = seeded(make_vit)
    base.patch_embed.proj.weight.requires_grad_(False)  # a user's own freezing survives the round trip
    requires = {n: p.requires_grad for n, p in base.named_parameters()}
    state = {k: v.clone() for k, v in base.state_dict().items()}
    x = image(2)
    with torch.no_grad():
        ref = base(x)
    hooks = hook_count(base)
    pm = vp.get_peft_model(base, method, init_weights=False, **opts)
    with torch.no_grad():
        assert not torch.allclose(pm(x), ref), "the adapter has no effect: the check could not fail"
    if merged:
        pm.merge()
    plain = pm.unload()
    assert plain is base
    assert hook_count(plain) == hooks == 0
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == requires
    after = plain.state_dict()
    assert after.keys() == state.keys()
    tol = {"rtol": 1e-6, "atol": 1e-6} if merged else {"rtol": 0, "atol": 0}
    for k, v in state.items():
        torch.testing.assert_close(after[k], v, **tol, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, **tol)
    with pytest.raises(RuntimeError, match="unloaded"):
        pm(x)


# gradient checkpointing is really on ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,block",
    [(make_vit, "blocks.1"), (make_swin, "layers.1.blocks.0"), (make_convnext, "stages.1.blocks.1")],
    ids=["vit", "swin", "convnext"],
)
def test_grad_checkpointing_recomputes_the_blocks(make, block):
    """With checkpointing a block's forward starts again during backward (twice per step), without it once."""
    calls = []
    for ckpt in (False, True):
        base = seeded(make)
        pm = vp.get_peft_model(base, "ssf")
        pm.set_grad_checkpointing(ckpt)  # timm's API, reached through the wrapper
        assert {m.grad_checkpointing for m in base.modules() if hasattr(m, "grad_checkpointing")} == {ckpt}
        fired: list[int] = []
        # a pre-hook: torch stops a recomputation early, once it has what backward needs
        dict(base.named_modules())[block].register_forward_pre_hook(lambda m, a, fired=fired: fired.append(1))
        pm.train()
        out = pm(image(2))
        n_forward = len(fired)
        out.sum().backward()
        calls.append((n_forward, len(fired)))
    assert calls[0] == (1, 1), "without checkpointing: one forward, no recomputation"
    assert calls[1] == (1, 2), "with checkpointing: the block is recomputed in backward"


# two different methods on one model (the README's example) -------------------------------------------------------


def test_lora_and_adaptformer_on_one_model():
    x = image(2)
    base = seeded(make_vit)
    with torch.no_grad():
        out_base = base(x)
    pm = vp.get_peft_model(base, vp.LoRAConfig(rank=4, init_weights=False), adapter_name="cifar")
    with torch.no_grad():
        out_cifar = pm(x)
    pm.add_adapter("pets", vp.AdaptFormerConfig(bottleneck=8, init_weights=False))  # added inactive
    with torch.no_grad():
        torch.testing.assert_close(pm(x), out_cifar, rtol=0, atol=0)
    pm.set_adapter("pets")
    with torch.no_grad():
        out_pets = pm(x)

    # each adapter alone, on its own copy of the base model, with the same tensors
    def alone(name: str, cfg: vp.MethodConfig) -> torch.Tensor:
        ref = vp.get_peft_model(seeded(make_vit), cfg)
        ref.peft_modules["default"].load_state_dict(pm.peft_modules[name].state_dict())
        with torch.no_grad():
            return ref(x)

    torch.testing.assert_close(out_cifar, alone("cifar", vp.LoRAConfig(rank=4)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_pets, alone("pets", vp.AdaptFormerConfig(bottleneck=8)), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out_pets, out_cifar) and not torch.allclose(out_pets, out_base)

    # pets acts and trains, cifar is frozen and silent
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".pets." in n for n in trainable)
    F.cross_entropy(pm(x), torch.tensor([0, 1])).backward()
    for n, p in pm.named_parameters():
        assert (p.grad is not None) == (".pets." in n), n
    with torch.no_grad(), pm.disable_adapters():
        torch.testing.assert_close(pm(x), out_base, rtol=0, atol=0)

    # back to cifar: merge / unmerge it
    pm.set_adapter("cifar")
    pm.merge()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), out_cifar, rtol=1e-5, atol=1e-5)
    pm.unmerge()
    pm.set_adapter("pets")
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge()

    # delete cifar: its hooks and parameters go, pets is unchanged
    hooks_both = hook_count(base)
    pm.delete_adapter("cifar")
    assert pm.adapters == ["pets"] and pm.active_adapter == "pets"
    assert not any(".cifar." in n for n, _ in pm.named_parameters())
    pets_only = vp.get_peft_model(seeded(make_vit), vp.AdaptFormerConfig(bottleneck=8))
    assert hook_count(base) == hook_count(pets_only.base_model) < hooks_both
    with torch.no_grad():  # (cifar's merge and unmerge moved the qkv weights by a rounding error)
        torch.testing.assert_close(pm(x), out_pets, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="cifar"):
        pm.set_adapter("cifar")


# .npz weights (big_vision / AugReg format) ------------------------------------------------------------------------


def vit_to_npz(model: timm.models.VisionTransformer, path: Path) -> None:
    """Write a timm ViT in the AugReg ``.npz`` layout (JAX kernels: (in, out), convs HWIO, heads split)."""
    heads = model.blocks[0].attn.num_heads
    c = model.embed_dim
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * c, (j + 1) * c)
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[rows].T.reshape(c, heads, c // heads)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[rows].reshape(heads, c // heads)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, c // heads, c)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in w.items()})


def test_npz_weights_load_through_build_backbone(tmp_path):
    torch.manual_seed(5)
    src = timm.create_model("test_vit", num_classes=7, img_size=64)
    vit_to_npz(src, tmp_path / "augreg.npz")
    model = build_backbone(ModelConfig(name="test_vit", pretrained_file=str(tmp_path / "augreg.npz"), img_size=64), 3)
    assert model.head.out_features == 3
    got = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    # with the same class count the head is read too
    same = build_backbone(ModelConfig(name="test_vit", pretrained_file=str(tmp_path / "augreg.npz"), img_size=64), 7)
    torch.testing.assert_close(same.head.weight, src.head.weight, rtol=0, atol=0)


def test_position_embeddings_resampled_to_another_input_size(tmp_path):
    torch.manual_seed(6)
    src = timm.create_model("test_vit", num_classes=5, img_size=32)  # 2 x 2 patches
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w32.safetensors"))
    model = build_backbone(
        ModelConfig(name="test_vit", pretrained_file=str(tmp_path / "w32.safetensors"), img_size=64), 5
    )
    c = src.embed_dim
    assert src.pos_embed.shape == (1, 1 + 4, c) and model.pos_embed.shape == (1, 1 + 16, c)
    torch.testing.assert_close(model.pos_embed[:, :1], src.pos_embed[:, :1], rtol=0, atol=0)  # class token's
    grid = src.pos_embed[:, 1:].reshape(1, 2, 2, c).permute(0, 3, 1, 2)
    # timm's convention: bicubic (antialiased), corners not aligned
    expect = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(model.pos_embed[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 16, c))
    got = model.state_dict()
    for k, v in src.state_dict().items():
        if k != "pos_embed" and not k.startswith("head."):  # timm drops a local file's head
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


# the shipped VTAB configs follow the papers' protocol -------------------------------------------------------------

VTAB_CONFIGS = sorted((ROOT / "configs" / "vtab").glob("*.yaml"))

AUGMENTATION_WORDS = ("aug", "mixup", "cutmix", "flip", "crop", "jitter", "reprob", "erase", "smoothing")


def test_vtab_configs_follow_the_protocol(tmp_path):
    """Batch 64, 100 epochs with 10 warm-up, final protocol (train800val200 -> test), ImageNet normalisation,
    and the images the trainer sees: a 224 x 224 bicubic resize without crop or augmentation (the same
    tensor every time, equal to PIL's bicubic resize written out here)."""
    from PIL import Image

    from visionpeft.data import make_vtab_task_from_arrays
    from visionpeft.data.build import build_datasets

    assert len(VTAB_CONFIGS) > 250
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 12, 20, 3), dtype=np.uint8)  # not square: a crop would show
    checked: set[str] = set()
    for path in VTAB_CONFIGS:
        cfg = load_config(path)
        d, s = cfg.data, cfg.schedule
        assert (d.dataset, d.mode, d.img_size, d.batch_size) == ("vtab", "final", 224, 64), path.name
        assert (s.epochs, s.warmup_epochs) == (100, 10), path.name
        assert cfg.optimizer.grad_accum == 1, path.name
        assert d.mean == [0.485, 0.456, 0.406] and d.std == [0.229, 0.224, 0.225], path.name
        for f in dataclasses.fields(d):  # any augmentation setting the data config grows stays off
            if f.name.endswith("_prob"):  # how often mixup / cutmix apply: moot while both are 0
                continue
            if f.name in DENSE_DATA_KEYS:  # read by segmentation / detection only
                continue
            if any(word in f.name for word in AUGMENTATION_WORDS):
                assert getattr(d, f.name) in (None, False, 0, 0.0, "", "none"), f"{path.name}: data.{f.name}"
        key = repr(dataclasses.replace(d, num_workers=0))
        if key in checked:  # the images of this data section were checked already
            continue
        if not (tmp_path / d.task).is_dir():
            make_vtab_task_from_arrays(tmp_path, d.task, images, [0, 1, 0, 1], splits=(2, 1, 1))
        checked.add(key)
        train, evaluation, _, _ = build_datasets(dataclasses.replace(d, root=str(tmp_path)))
        mean, std = torch.tensor(d.mean)[:, None, None], torch.tensor(d.std)[:, None, None]
        for ds in (train, evaluation):
            img = np.array(ds.load_image(0).convert("RGB").resize((224, 224), Image.BICUBIC))
            expect = (torch.from_numpy(img).permute(2, 0, 1) / 255.0 - mean) / std
            for _ in range(3):
                assert (ds[0][0] - expect).abs().max() < 1e-5, path.name
    assert len(checked) >= 19
