"""Learning on real data: every method adapts a backbone pretrained on digits 0-4 to the unseen digits 5-9.

The backbones are pretrained once per session on the embedded MNIST digits (``visionpeft.data``) and cached
in pytest's cache directory (``--cache-clear`` retrains them). Each registered method then adapts for a
few dozen steps; its training loss must fall and its test accuracy must be far above chance. Everything
runs on one thread: on a small shared machine oversubscribed threads are many times slower, not faster.
"""

from __future__ import annotations

import pytest
import torch

import visionpeft as vp
from visionpeft.data import RECIPES, adapt, digit_split, load_digits, pretrain_backbone, to_rgb

THREADS = 1
SEED = 0
STEPS = 60  # adaptation steps per method (batch 32): ~1 s each
BATCH = 32
N_TEST = 500  # transfer test images (100 per digit)
CHANCE = 1 / 5
MIN_ACC = 0.5  # 2.5x chance; every recipe reaches >= 0.71 with these settings (seeds 0-2 tried)


@pytest.fixture(scope="module")
def split():
    return digit_split(seed=SEED)


@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    return cache.mkdir("visionpeft-digits") if cache is not None else tmp_path_factory.mktemp("visionpeft-digits")


@pytest.fixture(scope="module")
def backbones(cache_dir):
    """Pretrained ``{"vit": (model, acc), "resnet": (model, acc)}``; the ResNet is built only when needed."""
    built: dict[str, tuple[torch.nn.Module, float]] = {}

    def get(kind: str) -> tuple[torch.nn.Module, float]:
        if kind not in built:
            built[kind] = pretrain_backbone(kind, cache_dir=cache_dir, seed=SEED, threads=THREADS)
        return built[kind]

    return get


def test_digits_are_the_real_mnist_sample():
    x, y = load_digits()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(torch.bincount(y), torch.full((10,), 500))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert 0.08 < float(x.mean()) < 0.2  # MNIST's mean intensity is ~0.13: mostly dark background


def test_split_is_disjoint_relabelled_and_deterministic(split):
    again = digit_split(seed=SEED)
    assert torch.equal(split.transfer_train.x, again.transfer_train.x)
    assert torch.equal(split.transfer_test.y, again.transfer_test.y)
    assert split.pretrain_train.digits == (0, 1, 2, 3, 4) and split.transfer_train.digits == (5, 6, 7, 8, 9)
    for part in (split.pretrain_train, split.pretrain_test, split.transfer_train, split.transfer_test):
        assert set(part.y.tolist()) == set(range(5))
    assert len(split.transfer_train) + len(split.transfer_test) == 2500
    assert len(split.transfer_test) == 750
    # no image of the transfer task occurs in its own training split or in the pretraining task
    train = {bytes(t.numpy()) for t in split.transfer_train.x}
    pre = {bytes(t.numpy()) for t in torch.cat([split.pretrain_train.x, split.pretrain_test.x])}
    test = [bytes(t.numpy()) for t in split.transfer_test.x]
    assert not train & set(test) and not pre & (train | set(test))
    few = digit_split(seed=SEED, train_per_class=20)
    assert torch.equal(torch.bincount(few.transfer_train.y), torch.full((5,), 20))
    assert torch.equal(few.transfer_test.y, split.transfer_test.y)


def test_to_rgb():
    x = torch.zeros(2, 1, 28, 28)
    out = to_rgb(x, 32)
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, (0 - 0.1307) / 0.3081))
    assert to_rgb(torch.ones(4, 28, 28), 28).shape == (4, 3, 28, 28)


def test_pretrained_backbone_is_accurate_and_cached(backbones, cache_dir):
    model, acc = backbones("vit")
    assert not model.training
    assert acc >= 0.9, f"the tiny ViT reaches only {acc:.3f} on the held-out pretraining digits"
    again, acc2 = pretrain_backbone("vit", cache_dir=cache_dir, seed=SEED, threads=THREADS)
    assert acc2 == acc
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), f"cached weights differ at {k}"
    assert any(cache_dir.glob("digits-vit-*.pt"))
    assert not any(cache_dir.glob("*.tmp")), "a temporary file of the atomic write was left behind"


def test_pretrain_cache_is_deterministic_and_survives_a_corrupt_file(tmp_path):
    model, acc = pretrain_backbone("vit", steps=5, cache_dir=tmp_path, seed=3, threads=THREADS)
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".pt" and "steps5" in path.name and "seed3" in path.name
    path.write_bytes(b"not a checkpoint")
    again, acc2 = pretrain_backbone("vit", steps=5, cache_dir=tmp_path, seed=3, threads=THREADS)  # retrains
    loaded, acc3 = pretrain_backbone("vit", steps=5, cache_dir=tmp_path, seed=3, threads=THREADS)
    assert acc == acc2 == acc3
    for other in (again, loaded):
        for (k, v), (_, v2) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
            assert torch.equal(v, v2), f"pretraining is not reproducible at {k}"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_every_registered_method_has_a_recipe():
    covered = {r.method for r in RECIPES.values()}
    missing = sorted(set(vp.list_methods()) - covered)
    assert not missing, f"add a visionpeft.data.RECIPES entry (and so a learning test) for: {missing}"


def _backbone_for(recipe, backbones) -> str:
    """The ViT when the method supports it, else the ResNet (conv-only methods)."""
    cls = vp.get_method(recipe.method)
    cfg = cls.config_cls.from_dict(recipe.options)
    reasons = {}
    for kind in ("vit", "resnet"):
        model = backbones(kind)[0]
        reasons[kind] = cls.unsupported_reason(model, vp.detect_backbone(model), cfg)
        if reasons[kind] is None:
            return kind
    pytest.fail(f"{recipe.method} supports neither tiny backbone: {reasons}")


@pytest.mark.parametrize("recipe_id", list(RECIPES))
def test_method_learns_the_unseen_digits(recipe_id, split, backbones):
    recipe = RECIPES[recipe_id]
    kind = _backbone_for(recipe, backbones)
    assert kind == recipe.backbone, f"recipe {recipe_id!r} names {recipe.backbone!r}, but the method runs on {kind!r}"
    base = backbones(kind)[0]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    test = (split.transfer_test.x[:N_TEST], split.transfer_test.y[:N_TEST])
    out = adapt(
        base,
        recipe.method,
        recipe.options,
        split.transfer_train,
        test,
        steps=STEPS,
        lr=recipe.lr,
        batch=BATCH,
        seed=SEED,
        threads=THREADS,
    )
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    falls = f"{out['loss_first']:.3f} -> {out['loss_last']:.3f}"
    assert out["loss_last"] < out["loss_first"], f"training loss (mean of first / last 10 steps) did not fall: {falls}"
    assert out["acc"] >= MIN_ACC, f"test accuracy {out['acc']:.3f} is not far above chance ({CHANCE:.2f})"
    if vp.get_method(recipe.method).trains_base:
        assert out["trainable"] > 0.9 * out["total"], "full fine-tuning should train (almost) everything"
    else:
        assert 0 < out["trainable"] < 0.25 * out["total"], "a PEFT method should train a small share of the model"
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"adapt() modified the pretrained backbone it was given ({k})"
