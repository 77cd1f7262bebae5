"""``VisionPeftBackbone``: a timm backbone or SAM's image encoder with a visionpeft adapter and a feature pyramid,
as an mmseg backbone (a tuple of NCHW maps at strides 4, 8, 16, 32).

The backbone's weights are loaded when it is built (``pretrained``), so that a checkpoint that holds only the
adapter and the heads (see :class:`~visionpeft.integrations.mmseg.hooks.PeftAdapterHook`) can be evaluated;
``init_weights`` (called by mmengine's Runner before training) leaves every weight as it is: the adapter and the
pyramid initialise themselves as their papers say when they are built.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from timm.layers import LayerNorm2d

from ...backbones.sam import SAM_ARCHS, build_sam
from ...dense import load_adapter as vp_load_adapter
from ...model import PeftVisionModel, get_peft_model
from ...necks import NECKS, build_neck
from ...necks.features import REDUCTIONS, crop

PYRAMIDS = NECKS  # "native", "simple_pyramid", "vit_adapter"
PYRAMID_PREFIX = "pyramid."


def _unknown_backbone(name: str) -> ValueError:
    import timm

    candidates = sorted(set(timm.list_models()) | set(SAM_ARCHS))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"VisionPeftBackbone: unknown backbone {name!r}: not a timm model name (timm.list_models()) nor a SAM "
        f"image encoder ({', '.join(sorted(SAM_ARCHS))}).{hint}"
    )


def _check_method(method: str) -> None:
    from ..._registry import list_methods

    if method not in list_methods():
        close = difflib.get_close_matches(str(method), list_methods(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"VisionPeftBackbone: unknown method {method!r}.{hint} Registered methods: {', '.join(list_methods())}"
        )


def build_timm_backbone(name: str, pretrained: bool | str | None, kwargs: dict) -> nn.Module:
    """A timm backbone without classifier that takes any input size (ViTs with ``dynamic_img_size``, Swin with
    ``strict_img_size=False`` unless ``kwargs`` say otherwise), with weights from timm's hub (``pretrained=True``),
    a hub repository (``"hf-hub:owner/repo"``), a local file or ``"embedded:<kind>"`` (visionpeft's reader)."""
    import timm

    from ...engine.build import build_backbone
    from ...engine.experiment import ModelConfig

    if not timm.is_model(name.split(".")[0]) and not name.startswith("hf-hub:"):
        raise _unknown_backbone(name)
    kwargs = dict(kwargs)
    hub, file = bool(pretrained is True), None
    if isinstance(pretrained, str):
        if pretrained.startswith("hf-hub:"):
            hub = True
            kwargs["pretrained_cfg_overlay"] = {
                **kwargs.get("pretrained_cfg_overlay", {}),
                "hf_hub_id": pretrained[7:],
            }
        elif pretrained.startswith("embedded:") or Path(pretrained).expanduser().is_file():
            file = pretrained
        else:
            raise FileNotFoundError(
                f"VisionPeftBackbone: pretrained={pretrained!r} is neither a local file nor 'embedded:<kind>' nor "
                "'hf-hub:<owner>/<repo>'; use pretrained=True for timm's weights of the backbone (choose them with a "
                "tag: backbone='vit_base_patch16_224.augreg2_in21k_ft_in1k'), or None for random weights"
            )
    elif pretrained not in (None, False, True):
        raise TypeError(f"VisionPeftBackbone: pretrained must be None, True or a string, got {pretrained!r}")
    for option in ("dynamic_img_size", "strict_img_size"):
        if option in kwargs:
            continue
        trial = {**kwargs, option: option == "dynamic_img_size"}
        try:
            return build_backbone(ModelConfig(name=name, pretrained=hub, pretrained_file=file, kwargs=trial), 0)
        except TypeError as e:  # a family without the option (ConvNeXt, ResNet, ...)
            if option not in str(e):
                raise
    return build_backbone(ModelConfig(name=name, pretrained=hub, pretrained_file=file, kwargs=kwargs), 0)


class SamPyramid(nn.Module):
    """ViTDet's simple feature pyramid on SAM's image encoder output (its own neck: ``C`` channels at stride
    ``p``, the patch size): transposed convolutions up to stride 4, identity, max pools down to stride 32, each
    then 1x1 conv + LayerNorm2d + 3x3 conv + LayerNorm2d to ``out_channels``. The input is zero-padded to the
    encoder's (square, fixed) ``img_size``; each map is cropped to ``ceil(H / r) x ceil(W / r)`` after.

    Args:
        encoder: segment_anything's ``ImageEncoderViT`` (adapter hooks run: the encoder's own modules are called).
        out_channels: channels of every output map.
    """

    def __init__(self, encoder: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.patch = int(encoder.patch_embed.proj.kernel_size[0])
        if self.patch not in (4, 8, 16, 32):
            raise ValueError(f"SAM pyramid: the patch size must be 4, 8, 16 or 32, got {self.patch}")
        dim = int(encoder.neck[0].out_channels)
        self.scales = nn.ModuleList()
        for r in REDUCTIONS:
            layers: list[nn.Module] = []
            c = dim
            for j in range(int(math.log2(self.patch // r)) if r < self.patch else 0):
                if j > 0:
                    layers += [LayerNorm2d(c), nn.GELU()]
                layers.append(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2))
                c //= 2
            if r > self.patch:
                layers.append(nn.MaxPool2d(kernel_size=r // self.patch, stride=r // self.patch, ceil_mode=True))
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels)]
            layers += [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.scales.append(nn.Sequential(*layers))
        self.feature_info = [{"num_chs": int(out_channels), "reduction": r} for r in REDUCTIONS]

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W), H, W <= img_size -> 4 maps (B, out_channels, ceil(H / r), ceil(W / r))."""
        size = int(encoder.img_size)
        h, w = x.shape[-2:]
        if h > size or w > size:
            raise ValueError(
                f"SAM pyramid: the input is {h}x{w}, larger than the encoder's img_size {size}; build it with a "
                f"larger backbone_cfg=dict(img_size=...) or crop / resize the input (test_cfg mode='slide')"
            )
        feat = encoder(nn.functional.pad(x, (0, size - w, 0, size - h)))  # (B, C, size / p, size / p)
        return crop([scale(feat) for scale in self.scales], (h, w), list(REDUCTIONS))


def _pyramid_kwargs(pyramid: str, out_indices: Sequence[int] | None, depth: int | None) -> dict[str, Any]:
    """Map mmseg's ``out_indices`` onto the pyramid's options (see :class:`VisionPeftBackbone`)."""
    if out_indices is None or pyramid == "native":
        return {}
    idx = [int(i) for i in out_indices]
    if pyramid == "simple_pyramid":
        if len(idx) != 1:
            raise ValueError(
                f"VisionPeftBackbone: pyramid 'simple_pyramid' reads ONE block (ViTDet); out_indices={tuple(idx)} "
                "names several: give out_indices=(i,) or use pyramid='vit_adapter' for 4 interaction groups"
            )
        return {"block_index": idx[0]}
    if pyramid == "vit_adapter":
        idx = [i % depth if depth else i for i in idx]
        if len(idx) != 4 or idx != sorted(set(idx)) or idx[-1] != (depth or 0) - 1:
            raise ValueError(
                f"VisionPeftBackbone: pyramid 'vit_adapter' takes out_indices = the LAST block of each of its 4 "
                f"interaction groups, ascending and ending with the last block ({(depth or 0) - 1}); "
                f"got {tuple(out_indices)}"
            )
        starts = [0] + [i + 1 for i in idx[:-1]]
        return {"interaction_indexes": [[s, e] for s, e in zip(starts, idx, strict=True)]}
    return {}


@MODELS.register_module()
class VisionPeftBackbone(BaseModule):
    """A frozen timm backbone (or SAM image encoder) with a visionpeft adapter and a feature pyramid.

    Args:
        backbone: a timm model name (``"vit_base_patch16_224"``; a pretrained tag may follow a dot) or a SAM image
            encoder (``"sam_vit_b"`` / ``"sam_vit_l"`` / ``"sam_vit_h"``, built by ``visionpeft.sam.build_sam``).
        method: a registered visionpeft method (``vp.list_methods()``: ``lora``, ``adaptformer``, ``vpt``, ...).
        method_cfg: the method's options (``dict(rank=8)``).
        pretrained: ``None``: random weights; ``True``: timm's hub weights of ``backbone``; ``"hf-hub:owner/repo"``;
            a local checkpoint file (timm's reader and conversions; for SAM, the official ``sam_vit_b_01ec64.pth``);
            ``"embedded:<kind>"``: the backbone visionpeft pretrains on digits.
        pyramid: ``"simple_pyramid"`` (ViTDet), ``"vit_adapter"`` (plain ViTs) or ``"native"`` (hierarchical models'
            own stages); ``None``: simple_pyramid for plain ViTs and SAM, native otherwise. SAM takes only
            simple_pyramid.
        pyramid_cfg: the pyramid's options (``out_channels`` of simple_pyramid, ``n_points`` of vit_adapter, ...).
        out_indices: plain ViTs: the blocks the pyramid reads (simple_pyramid: one block, ``(11,)``; vit_adapter:
            the last block of each of the 4 interaction groups, ``(2, 5, 8, 11)``); native: which of the 4 stages
            to return (``(0, 1, 2, 3)``). ``None``: the pyramid's default, all 4 maps.
        backbone_cfg: keyword arguments of ``timm.create_model`` or of ``build_sam`` (``img_size``, size options).
        adapter: a folder written by :class:`PeftAdapterHook` (or ``save_adapter``): its adapter is loaded (with
            ``vp.load_adapter``, trainable) instead of a new one, and its pyramid tensors too; ``method`` and
            ``method_cfg`` are then taken from the folder.
        norm_eval: keep the frozen backbone's BatchNorm layers in eval mode while training (running statistics
            unchanged).
        init_cfg: mmengine's init config; applies to the pyramid only.

    ``forward``: ``(B, 3, H, W)`` -> a tuple of NCHW maps at strides 4, 8, 16, 32 (``out_channels`` lists their
    channels, for the heads' ``in_channels``).
    """

    def __init__(
        self,
        backbone: str,
        method: str | None = "lora",
        method_cfg: dict | None = None,
        pretrained: bool | str | None = None,
        pyramid: str | None = None,
        pyramid_cfg: dict | None = None,
        out_indices: Sequence[int] | None = None,
        backbone_cfg: dict | None = None,
        adapter: str | None = None,
        norm_eval: bool = False,
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(backbone, str):
            raise TypeError(f"VisionPeftBackbone: backbone must be a model name (str), got {backbone!r}")
        if adapter is None:
            if not isinstance(method, str):
                raise TypeError(f"VisionPeftBackbone: method must be a method name, got {method!r}")
            _check_method(method)
        if pyramid is not None and pyramid not in PYRAMIDS:
            close = difflib.get_close_matches(str(pyramid), PYRAMIDS, n=1)
            raise ValueError(
                f"VisionPeftBackbone: unknown pyramid {pyramid!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; choose one of {', '.join(PYRAMIDS)}, or None for the backbone's default"
            )
        backbone_cfg, pyramid_cfg = dict(backbone_cfg or {}), dict(pyramid_cfg or {})
        self.is_sam = backbone in SAM_ARCHS
        if self.is_sam:
            if pretrained not in (None, False) and not isinstance(pretrained, str):
                raise ValueError("VisionPeftBackbone: SAM's pretrained is the official checkpoint file (a path)")
            base = build_sam(backbone, checkpoint=pretrained or None, **backbone_cfg).image_encoder
        else:
            base = build_timm_backbone(backbone, pretrained, backbone_cfg)
        base.train()
        if adapter is not None:
            self.peft = vp_load_adapter(base, adapter, is_trainable=True)
            if not isinstance(self.peft, PeftVisionModel):
                raise ValueError(f"VisionPeftBackbone: {adapter} holds a visionpeft dense model, not an mmseg adapter")
        else:
            self.peft = get_peft_model(base, method, **dict(method_cfg or {}))
        if self.is_sam:
            if pyramid not in (None, "simple_pyramid"):
                raise ValueError(
                    f"VisionPeftBackbone: SAM's image encoder takes pyramid 'simple_pyramid' (or None), "
                    f"not {pyramid!r}"
                )
            if out_indices is not None:
                raise ValueError("VisionPeftBackbone: SAM's pyramid reads the encoder's output; remove out_indices")
            self.pyramid_name = "simple_pyramid"
            self.pyramid = SamPyramid(base, **pyramid_cfg)
        else:
            from ...necks import auto_neck

            self.pyramid_name = pyramid or auto_neck(base)
            depth = len(base.blocks) if hasattr(base, "blocks") and self.pyramid_name != "native" else None
            kwargs = {**_pyramid_kwargs(self.pyramid_name, out_indices, depth), **pyramid_cfg}
            self.pyramid = build_neck(self.pyramid_name, base, **kwargs)
        levels = len(self.pyramid.feature_info)
        self.out_indices = (
            tuple(range(levels)) if out_indices is None or self.pyramid_name != "native" else tuple(out_indices)
        )
        bad = [i for i in self.out_indices if not -levels <= int(i) < levels]
        if bad:
            raise ValueError(f"VisionPeftBackbone: out_indices {bad} out of range for the {levels} native stages")
        self.norm_eval = bool(norm_eval)
        self.build_args = {
            "backbone": backbone,
            "pretrained": pretrained,
            "pyramid": pyramid,
            "pyramid_cfg": pyramid_cfg,
            "out_indices": None if out_indices is None else list(out_indices),
            "backbone_cfg": backbone_cfg,
            "norm_eval": self.norm_eval,
        }
        if adapter is not None:
            self._load_pyramid(Path(adapter))

    @property
    def out_channels(self) -> list[int]:
        """Channels of the returned maps, in order (a head's ``in_channels``)."""
        return [int(self.pyramid.feature_info[i]["num_chs"]) for i in self.out_indices]

    def _load_pyramid(self, folder: Path) -> None:
        from .hooks import read_head_state

        _, tensors = read_head_state(folder)
        prefix = "backbone." + PYRAMID_PREFIX
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = self.pyramid.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(
                f"VisionPeftBackbone: the pyramid tensors in {folder} do not fit pyramid {self.pyramid_name!r} "
                f"({len(state)} tensors in the folder, {len(expected)} in the model); use the folder's pyramid "
                "and pyramid_cfg"
            )
        self.pyramid.load_state_dict(state)

    def init_weights(self) -> None:
        """Keep every weight: the backbone's come from ``pretrained`` (at build), the adapter and the pyramid
        initialise themselves. An ``init_cfg`` applies to the pyramid only. (mmengine's default would call the
        timm model's own ``init_weights`` and erase the pretrained weights.)"""
        if self.init_cfg:
            from mmengine.model.weight_init import initialize

            initialize(self.pyramid, self.init_cfg)
        self._is_init = True

    def train(self, mode: bool = True) -> VisionPeftBackbone:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.peft.base_model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)
                ):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (B, 3, H, W) -> maps (B, C_i, ceil(H / r_i), ceil(W / r_i)) for the chosen levels, r = 4 ... 32."""
        maps = self.pyramid(self.peft.base_model, x)
        return tuple(maps[i] for i in self.out_indices)


__all__ = ["PYRAMIDS", "SamPyramid", "VisionPeftBackbone", "build_timm_backbone"]
