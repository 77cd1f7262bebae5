"""The mmsegmentation integration (visionpeft.integrations.mmseg): configs build, a step trains only the adapter,
a Runner trains, validates and resumes on the digit scenes, and the adapter folder reads back.

Marked ``mmseg``; skipped when mmseg is not installed (``pip install -e ".[mmseg]"``; CI installs it).
"""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmseg", reason="the mmseg extra is not installed")
pytestmark = pytest.mark.mmseg

import timm  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import visionpeft as vp  # noqa: E402
import visionpeft.integrations.mmseg as vpm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mmseg"
TINY = CONFIGS / "upernet_lora-r8_test-vit_1xb8-400_digit-scenes-64x64.py"
REAL = sorted(p for p in CONFIGS.glob("*_ade20k-512x512.py"))


def tiny_cfg(scenes: Path | None = None) -> Config:
    if scenes is not None:
        os.environ["VISIONPEFT_SCENES"] = str(scenes)
    return Config.fromfile(str(TINY))


def test_six_ade20k_configs():
    names = {p.name.split("_")[1] + "/" + p.name.split("_")[2] for p in REAL}
    assert names == {
        "adaptformer-b64/vit-b16",
        "lora-r8/vit-b16",
        "vpt-deep-t50/vit-b16",
        "vit-adapter/vit-b16-frozen",
        "lora-r8/swin-t",
        "conv-adapter/convnext-t",
    }


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name.split("_8xb2")[0])
def test_every_config_builds(path):
    """MODELS.build of each real-size ADE20K config (on the meta device: shapes without weights, fast), wired right:
    the pyramid's channels are the heads' in_channels, the maps have the right shapes, and only the adapter, the
    pyramid and the heads train."""
    cfg = Config.fromfile(str(path))
    assert cfg.model.backbone.pretrained is True and "visionpeft.integrations.mmseg" in cfg.custom_imports.imports
    cfg.model.backbone.pretrained = None  # no download in tests
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    bb = model.backbone
    assert list(bb.out_channels) == list(cfg.model.decode_head.in_channels)
    assert bb.out_channels[cfg.model.auxiliary_head.in_index] == cfg.model.auxiliary_head.in_channels
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    base = {f"backbone.peft.base_model.{n}" for n, _ in bb.peft.base_model.named_parameters()}
    assert not trainable & base  # the whole timm model is frozen
    pyramid = {f"backbone.pyramid.{n}" for n, _ in bb.pyramid.named_parameters()}
    assert pyramid <= trainable and any(n.startswith("decode_head.") for n in trainable)
    assert (cfg.model.backbone.pyramid == "native") == (not pyramid)
    adapter = [n for n in trainable if n.startswith("backbone.peft.peft_modules.")]
    assert bool(adapter) == (cfg.model.backbone.method != "linear_probe")
    model.eval()
    sizes = [(-(-64 // r), -(-48 // r)) for r in (4, 8, 16, 32)]
    if bb.pyramid_name != "vit_adapter":  # its deformable attention reads index tensors: no meta forward
        maps = bb(torch.empty(1, 3, 64, 48, device="meta"))
        assert [tuple(m.shape[1:]) for m in maps] == [(c, *hw) for c, hw in zip(bb.out_channels, sizes, strict=True)]
    maps = tuple(torch.empty(1, c, *hw, device="meta") for c, hw in zip(bb.out_channels, sizes, strict=True))
    assert model.decode_head(maps).shape == (1, 150, 16, 12)
    assert model.auxiliary_head(maps).shape[1] == 150


def test_unknown_method_or_backbone_fails_at_build_with_our_message():
    tiny = tiny_cfg().model.backbone
    for key, value, expected in (
        ("method", "lorra", "unknown method 'lorra'. Did you mean 'lora'"),
        ("backbone", "vit_bse_patch16_224", "unknown backbone 'vit_bse_patch16_224'"),
        ("pyramid", "simple", "unknown pyramid 'simple'"),
    ):
        cfg = ConfigDict(copy.deepcopy(dict(tiny)))
        cfg.pop("_delete_", None)
        cfg[key] = value
        with pytest.raises(ValueError, match=expected) as info:
            MODELS.build(cfg)
        if key == "method":
            assert "adaptformer" in str(info.value)  # the registered methods are listed
        if key == "backbone":
            assert "vit_base_patch16_224" in str(info.value) and "sam_vit_b" in str(info.value)


def test_out_indices_and_sam_encoder():
    vit = MODELS.build(
        ConfigDict(
            type="VisionPeftBackbone",
            backbone="test_vit",
            backbone_cfg=dict(img_size=64),
            method="adaptformer",
            pyramid="vit_adapter",
            out_indices=(0, 1, 3, 5),
        )
    )
    assert vit.pyramid.groups == [[0, 0], [1, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="LAST block of each"):
        MODELS.build(
            ConfigDict(type="VisionPeftBackbone", backbone="test_vit", pyramid="vit_adapter", out_indices=(0, 1))
        )
    cnx = MODELS.build(
        ConfigDict(type="VisionPeftBackbone", backbone="test_convnext", method="conv_adapter", out_indices=(1, 3))
    )
    maps = cnx(torch.randn(2, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [8, 2] and len(cnx.out_channels) == 2
    from visionpeft.backbones.sam import TINY_SAM

    sam = MODELS.build(
        ConfigDict(
            type="VisionPeftBackbone",
            backbone="sam_vit_b",
            backbone_cfg=dict(img_size=64, **TINY_SAM),
            method="lora",
            pyramid_cfg=dict(out_channels=32),
        )
    )
    assert vp.PeftVisionModel is type(sam.peft) and sam.peft.spec.name == "sam"
    maps = sam(torch.randn(1, 3, 60, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 15, 16), (32, 8, 8), (32, 4, 4), (32, 2, 2)]
    maps[0].sum().backward()
    assert all(p.grad is not None for n, p in sam.peft.named_parameters() if "lora_" in n)


def test_train_step_trains_only_the_adapter_and_predicts():
    """One step through mmengine's optimizer wrapper (built from the config) changes the adapter, pyramid and heads
    and leaves every frozen backbone weight bit-identical; init_weights keeps the backbone's weights; predict works."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = MODELS.build(cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights()  # mmengine's default would call timm's init_weights and re-draw the frozen ViT
    after_init = model.state_dict()
    assert all(torch.equal(before[k], after_init[k]) for k in before if k.startswith("backbone."))
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    samples = []
    for _ in range(2):
        s = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 11, (1, 64, 64)))
        samples.append(s)
    data = dict(inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)], data_samples=samples)
    model.train()
    losses = model.train_step(data, optim)
    assert torch.isfinite(losses["loss"]) and "decode.loss_ce" in losses
    state = model.state_dict()
    frozen = [k for k in state if k.startswith("backbone.peft.base_model.")]
    assert frozen and all(torch.equal(before[k], state[k]) for k in frozen)
    changed = [k for k in state if not torch.equal(before[k], state[k])]
    assert any("lora_" in k for k in changed) and any(k.startswith("backbone.pyramid.") for k in changed)
    model.eval()
    out = model.test_step(dict(inputs=data["inputs"][:1], data_samples=[samples[0]]))
    assert out[0].pred_sem_seg.data.shape == (1, 64, 64) and int(out[0].pred_sem_seg.data.max()) < 11


def test_runner_trains_validates_resumes_and_exports(tmp_path, monkeypatch):
    """Runner: 2 iterations + validation on an ADE20K-layout digit-scenes folder, adapter-only checkpoints, resume
    from the checkpoint under torch's weights_only loading, and the adapter folder read back by vp.load_adapter."""
    from mmengine.runner import Runner

    # the Runner formats its config with yapf 5 times (log, dump, each checkpoint): ~20 s on 2 cores, text only
    monkeypatch.setattr(Config, "pretty_text", property(lambda self: repr(self.to_dict())))

    from visionpeft.data.scenes import ensure_digit_scenes

    scenes = ensure_digit_scenes(tmp_path / "scenes", num_train=4, num_val=2)
    weights = tmp_path / "test_vit.safetensors"  # the "pretrained" backbone: the same random weights in every run
    save_file(timm.create_model("test_vit", num_classes=0, img_size=64).state_dict(), str(weights))

    def runner(work: Path, iters: int, resume: str | None = None) -> Runner:
        cfg = tiny_cfg(scenes)
        cfg.work_dir = str(work)
        cfg.model.backbone.pretrained = str(weights)
        cfg.train_cfg.update(max_iters=iters, val_interval=2)
        cfg.param_scheduler[0].end = 3
        cfg.default_hooks.checkpoint.interval = 2
        cfg.default_hooks.logger.interval = 1
        cfg.train_dataloader.batch_size = 2
        cfg.custom_hooks = [dict(type="PeftAdapterHook", adapter_only_checkpoint=True)]
        cfg.log_level = "WARNING"
        if resume:
            cfg.resume, cfg.load_from = True, resume
        return Runner.from_cfg(cfg)

    first = runner(tmp_path / "work", 2)
    first.train()
    ckpt = tmp_path / "work" / "iter_2.pth"
    folder = tmp_path / "work" / "iter_2_adapter"
    assert ckpt.is_file() and (folder / "adapter.safetensors").is_file() and (folder / "mmseg_head.json").is_file()
    scalars = first.message_hub.log_scalars
    assert "val/mIoU" in first.message_hub.runtime_info or any("mIoU" in k for k in scalars)
    with pytest.raises(pickle.UnpicklingError):  # torch's default loading refuses mmengine's checkpoint ...
        torch.load(ckpt)
    raw = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("backbone.peft.base_model.") for k in raw["state_dict"])  # adapter-only
    assert any("lora_" in k for k in raw["state_dict"])

    second = runner(tmp_path / "work2", 3, resume=str(ckpt))  # ... ours loads it, allowlisting only what it needs
    second.train()
    assert second.iter == 3 and (tmp_path / "work2" / "iter_3_adapter" / "adapter.safetensors").is_file()
    resumed = second.model.state_dict()
    file_weights = timm.models.load_state_dict(str(weights))
    assert all(torch.equal(resumed[f"backbone.peft.base_model.{k}"], v) for k, v in file_weights.items())
    lora = [k for k in raw["state_dict"] if "lora_B" in k]
    assert lora and not all(torch.equal(resumed[k], raw["state_dict"][k]) for k in lora)  # one more step from it

    # the adapter folder: vp.load_adapter gives the same backbone features; the whole segmentor reads back too
    model = first.model.eval()
    x = torch.randn(1, 3, 64, 64)
    base = timm.create_model("test_vit", num_classes=0, img_size=64, dynamic_img_size=True)
    base.load_state_dict(timm.models.load_state_dict(str(weights)))
    peft = vp.load_adapter(base, folder)
    with torch.no_grad():
        assert torch.allclose(peft.forward_features(x), model.backbone.peft.forward_features(x), atol=1e-6)
    args = vpm.read_head_state(folder)[0]["backbone_args"]
    rebuilt = vpm.VisionPeftBackbone(**args, adapter=str(folder)).eval()
    fresh = MODELS.build(first.cfg.model).eval()
    with torch.no_grad():
        ref = model.backbone(x)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rebuilt(x), ref, strict=True))
        assert not torch.allclose(fresh.backbone(x)[0], ref[0], atol=1e-5)  # the check can fail
        vpm.load_adapter_folder(fresh, folder)
        assert torch.allclose(fresh._forward(x), model._forward(x), atol=1e-5)


def test_mmcv_ops_stand_in():
    import mmcv.ops
    import torch.nn.functional as F
    from mmseg.models.losses.focal_loss import py_sigmoid_focal_loss

    feats = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    pts = torch.tensor([[[0.1, 0.125], [0.5, 0.5], [0.9, 0.875]]] * 2)  # pixel centres (x = 0.5 / 5 ...)
    out = vpm.point_sample(feats, pts)
    assert out.shape == (2, 3, 3)
    assert torch.allclose(out[..., 0], feats[..., 0, 0]) and torch.allclose(out[..., 2], feats[..., 3, 4])
    assert torch.allclose(out[..., 1], feats[..., 1:3, 2].mean(-1))  # between rows 1 and 2, column 2
    assert vpm.point_sample(feats, pts[:, None]).shape == (2, 3, 1, 3)
    logits, target = torch.randn(6, 4), torch.tensor([0, 3, 4, 1, 2, 4])  # 4 = no positive class
    mine = vpm.sigmoid_focal_loss(logits, target, 2.0, 0.25, None, "none")
    onehot = F.one_hot(target, 5)[:, :4]
    ref = py_sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.allclose(mine, ref, atol=1e-6)
    assert torch.allclose(vpm.sigmoid_focal_loss(logits, target), ref.sum() / 6, atol=1e-6)
    if getattr(mmcv.ops, "VISIONPEFT_STANDIN", False):
        assert mmcv.ops.point_sample is vpm.point_sample
        with pytest.raises(ModuleNotFoundError, match="CrissCrossAttention"):
            from mmcv.ops import CrissCrossAttention  # noqa: F401


def test_checkpoint_allowlist_is_narrow():
    """The getattr that mmengine's checkpoints need reaches HistoryBuffer's statistics methods, nothing else."""
    from mmengine.logging import HistoryBuffer

    assert vpm._compat.history_buffer_method(HistoryBuffer, "mean") is HistoryBuffer.mean
    for obj, name in ((os, "system"), (HistoryBuffer, "__init__"), (HistoryBuffer, "update")):
        with pytest.raises(pickle.UnpicklingError, match="allows only"):
            vpm._compat.history_buffer_method(obj, name)
    names = {getattr(g, "__name__", str(g)) for g in vpm.mmengine_safe_globals()}
    assert "getattr" not in names and "eval" not in names
