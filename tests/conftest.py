"""Shared fixtures: tiny random-weight backbones of every registered family, and the method table."""

from __future__ import annotations

import dataclasses
import functools
import os

import pytest
import timm
import torch

import visionpeft as vp

torch.set_num_threads(min(2, os.cpu_count() or 1))

IMG = 64


def make_vit(**kw):
    return timm.create_model("test_vit", **{"num_classes": 5, "img_size": IMG, **kw})


def make_samvit(**kw):
    return timm.create_model(
        "samvit_base_patch16",
        embed_dim=32,
        depth=2,
        num_heads=2,
        img_size=IMG,
        global_attn_indexes=(1,),
        window_size=2,
        num_classes=5,
        neck_chans=16,
        **kw,
    )


def make_swin(**kw):
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=16,
        depths=(1, 1),
        num_heads=(2, 2),
        img_size=IMG,
        window_size=4,
        num_classes=5,
        **kw,
    )


def make_convnext(**kw):
    return timm.create_model("test_convnext", num_classes=5, ls_init_value=1.0, **kw)


def make_resnet(**kw):
    return timm.create_model("test_resnet", num_classes=5, zero_init_last=False, **kw)


def make_sam_encoder(**kw):
    """The image encoder of a tiny segment_anything SAM (windowed + global attention, relative positions)."""
    from visionpeft.backbones.sam import TINY_SAM, build_sam

    return build_sam("sam_vit_b", img_size=IMG, **{**TINY_SAM, **kw}).image_encoder


BACKBONES = {
    "timm_vit": make_vit,
    "timm_samvit": make_samvit,
    "timm_swin": make_swin,
    "timm_convnext": make_convnext,
    "timm_resnet": make_resnet,
    "sam": make_sam_encoder,
}


@dataclasses.dataclass
class Row:
    """One method setting of the test table: a :class:`visionpeft.methods.Variant` of a registered method."""

    id: str
    method: str
    options: dict

    @property
    def cls(self):
        return vp.get_method(self.method)

    def config(self, **extra):
        opts = dict(self.options)
        opts.update(extra)
        return self.cls.config_cls.from_dict(opts)


def rows() -> list[Row]:
    """Every variant of every registered method (the registry is the single source of the method table)."""
    return [Row(v.id, m, dict(v.options)) for m in vp.list_methods() for v in vp.get_method(m).variants]


ROWS = rows()


@functools.cache
def _probe(backbone: str) -> torch.nn.Module:
    """One instance per family to ask methods about (never modified: nothing is attached to it)."""
    return BACKBONES[backbone]()


def unsupported_reason(row: Row, backbone: str) -> str | None:
    """What the method declares about this backbone (``None``: supported)."""
    base = _probe(backbone)
    return row.cls.unsupported_reason(base, vp.detect_backbone(base), row.config())


def matrix(supported_only: bool = True) -> list:
    """``pytest.param(row, backbone)`` for the method x backbone pairs the methods declare supported
    (``supported_only=False``: the unsupported ones instead)."""
    out = []
    for r in rows():
        for b in BACKBONES:
            if (unsupported_reason(r, b) is None) == supported_only:
                out.append(pytest.param(r, b, id=f"{r.id}-{b}"))
    return out


def seeded(fn, seed=0, **kw):
    torch.manual_seed(seed)
    return fn(**kw).eval()


def supported(row: Row, backbone: str, **extra):
    """Build the base model and config of a supported pair (``matrix()`` generates only those)."""
    base = seeded(BACKBONES[backbone])
    cfg = row.config(**extra)
    spec = vp.detect_backbone(base)
    assert spec.name == backbone
    reason = row.cls.unsupported_reason(base, spec, cfg)
    assert reason is None, reason
    return base, cfg


def image(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMG, IMG, generator=g)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Embedded data written by tests goes to a per-session folder, not the user's cache."""
    if "VISIONPEFT_CACHE" not in os.environ:
        os.environ["VISIONPEFT_CACHE"] = str(tmp_path_factory.mktemp("vp-cache"))
    yield
