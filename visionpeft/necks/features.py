"""Feature pyramids at strides 4, 8, 16, 32 from any backbone: a hierarchical model's own stages, or ViTDet's
simple feature pyramid for a plain ViT.

Papers: "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet), Li et al., 2022,
arXiv:2203.16527 (the simple feature pyramid).

A neck is called with the (hooked) timm model at each forward, ``neck(backbone, x)``, and never registers it as
a submodule, so ``neck.state_dict()`` holds only the neck's own tensors. It returns NCHW maps whose channels and
reductions are those of ``neck.feature_info`` (timm style: ``[{"num_chs": C, "reduction": 4}, ...]``); map
``i`` is ``ceil(H / r_i) x ceil(W / r_i)`` for any input size: the input is zero-padded (bottom / right) to what
the backbone needs and each map cropped after.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from ._plain_vit import PlainViT, resolve_index, tokens_to_map, vit_kind

REDUCTIONS = (4, 8, 16, 32)


def unwrap(backbone: nn.Module) -> nn.Module:
    """The timm model inside a ``PeftVisionModel`` (its ``base_model``), or ``backbone`` itself."""
    from ..model import PeftVisionModel

    return backbone.base_model if isinstance(backbone, PeftVisionModel) else backbone


def crop(maps: list[torch.Tensor], size: tuple[int, int], reductions: list[int]) -> list[torch.Tensor]:
    """Each (B, C, h, w) map cut to ``ceil(H / r) x ceil(W / r)`` of the unpadded input size (H, W)."""
    out = []
    for m, r in zip(maps, reductions, strict=True):
        h, w = math.ceil(size[0] / r), math.ceil(size[1] / r)
        if m.shape[-2] < h or m.shape[-1] < w:
            raise RuntimeError(f"a stride-{r} map is {tuple(m.shape[-2:])}, smaller than the {h}x{w} of the input")
        out.append(m[..., :h, :w])
    return out


class Neck(nn.Module):
    """Base of the necks: ``forward(backbone, x)`` -> NCHW maps at strides 4, 8, 16, 32.

    Attributes:
        feature_info: ``[{"num_chs": C_i, "reduction": r_i}]`` for the four maps, in order.
    """

    feature_info: list[dict]

    @property
    def channels(self) -> list[int]:
        return [int(f["num_chs"]) for f in self.feature_info]

    @property
    def reductions(self) -> list[int]:
        return [int(f["reduction"]) for f in self.feature_info]

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        """x: (B, 3, H, W) -> [(B, C_i, ceil(H / r_i), ceil(W / r_i))]."""
        raise NotImplementedError


def stage_reductions(model: nn.Module) -> list[dict]:
    """The model's timm ``feature_info`` as a list of dicts (``[]`` when it has none)."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return []
    if hasattr(info, "info"):  # timm FeatureInfo
        info = info.info
    return [dict(d) for d in info if isinstance(d, dict) and "reduction" in d and "num_chs" in d]


class NativeNeck(Neck):
    """A hierarchical timm model's own stages (Swin / SwinV2, ConvNeXt, ResNet, EfficientNet, RegNet,
    MobileNetV3, ...), read with timm's ``forward_intermediates`` on the unmodified model; no parameters.

    The stages are the last ``feature_info`` entries of reduction 4, 8, 16 and 32. Inputs are zero-padded to
    a multiple of 32. Swin / SwinV2 in timm 1.0 take a fixed ``img_size`` unless created with
    ``timm.create_model(..., strict_img_size=False)`` (or ``dynamic_img_size=True``, the same); with a fixed size,
    inputs no larger than ``img_size`` are zero-padded to it and larger ones raise an error saying so.

    Args:
        backbone: the timm model (or a ``PeftVisionModel`` around it).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        model = unwrap(backbone)
        info = stage_reductions(model)
        last: dict[int, int] = {}
        for i, d in enumerate(info):
            last[int(d["reduction"])] = i
        missing = [r for r in REDUCTIONS if r not in last]
        name = type(model).__name__
        if vit_kind(model) is not None:
            raise ValueError(
                f"neck 'native' needs stages at strides 4, 8, 16, 32; {name} is a plain ViT (one stride, "
                f"{sorted(last) or 'no feature_info'}): use neck 'simple_pyramid' (ViTDet) or 'vit_adapter'"
            )
        if not hasattr(model, "forward_intermediates") or missing:
            have = sorted(last) if last else "no timm feature_info"
            raise ValueError(
                f"neck 'native' needs a timm model with forward_intermediates and feature_info stages at reductions "
                f"4, 8, 16, 32; {name} has {have} (missing {missing or 'forward_intermediates'}). Plain ViTs: use "
                f"neck 'simple_pyramid' or 'vit_adapter'"
            )
        self.indices = [last[r] for r in REDUCTIONS]
        self.feature_info = [
            {"num_chs": int(info[i]["num_chs"]), "reduction": r} for i, r in zip(self.indices, REDUCTIONS, strict=True)
        ]
        params = inspect.signature(model.forward_intermediates).parameters
        self._kwargs = {"intermediates_only": True}
        if "output_fmt" in params:
            self._kwargs["output_fmt"] = "NCHW"
        if "stop_early" in params:
            self._kwargs["stop_early"] = True

    @staticmethod
    def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
        """The input size a model insists on (timm's ``strict_img_size`` patch embedding), or ``None``."""
        pe = getattr(model, "patch_embed", None)
        if pe is None or not getattr(pe, "strict_img_size", False) or getattr(pe, "img_size", None) is None:
            return None
        return int(pe.img_size[0]), int(pe.img_size[1])

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> [(B, C_i, ceil(H / r_i), ceil(W / r_i))], r = 4, 8, 16, 32."""
        model = unwrap(backbone)
        h, w = x.shape[-2:]
        fixed = self._fixed_size(model)
        if fixed is not None:
            if h > fixed[0] or w > fixed[1]:
                raise ValueError(
                    f"neck 'native': this {type(model).__name__} takes a fixed img_size {fixed[0]}x{fixed[1]}, the "
                    f"input is {h}x{w}. Create it with timm.create_model(..., strict_img_size=False) (Swin / SwinV2; "
                    f"or dynamic_img_size=True) to accept any size, or resize / crop the input to at most "
                    f"{fixed[0]}x{fixed[1]} (smaller inputs are zero-padded)"
                )
            th, tw = fixed
        else:
            th, tw = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
        xp = F.pad(x, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else x
        maps = model.forward_intermediates(xp, indices=self.indices, **self._kwargs)
        for m, f in zip(maps, self.feature_info, strict=True):
            if m.ndim != 4 or m.shape[1] != f["num_chs"]:
                raise RuntimeError(
                    f"neck 'native': {type(model).__name__}.forward_intermediates gave {tuple(m.shape)} for the "
                    f"stride-{f['reduction']} stage, expected NCHW with {f['num_chs']} channels"
                )
        return crop(list(maps), (h, w), self.reductions)


def _conv_norm(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout)]


class SimplePyramidNeck(Neck):
    """ViTDet's simple feature pyramid on a plain ViT's last (or chosen) block.

    The chosen block's patch tokens (the last ``h * w`` tokens, after the final norm when ``final_norm``)
    form a map at the patch stride ``p``; each output stride ``r`` in 4, 8, 16, 32 is reached from it by
    ``log2(p / r)`` transposed convolutions (kernel 2, stride 2; channels halved each time, LayerNorm2d +
    GELU between two), identity, or a max pool of ``r / p`` (ceil mode); then 1x1 conv + LayerNorm2d + 3x3
    conv + LayerNorm2d to ``out_channels``. Patch 16 gives factors 4, 2, 1, 1/2; patch 8 gives 2, 1, 1/2, 1/4.
    Inputs are zero-padded to a multiple of ``p`` (or to a fixed-size model's ``img_size``).

    Args:
        backbone: timm VisionTransformer / DeiT, EVA or BEiT (or a ``PeftVisionModel`` around one).
        out_channels: channels of every output map.
        block_index: the block whose output is used (negative: from the end).
        final_norm: apply the model's final ``norm`` to the tokens.
    """

    def __init__(
        self, backbone: nn.Module, out_channels: int = 256, block_index: int = -1, final_norm: bool = True
    ) -> None:
        super().__init__()
        vit = PlainViT(unwrap(backbone), "simple_pyramid")
        if vit.patch[0] != vit.patch[1] or vit.patch[0] not in (4, 8, 16, 32):
            raise ValueError(
                f"neck 'simple_pyramid' needs a square patch of 4, 8, 16 or 32 pixels (strides 4-32 are powers of two "
                f"of it); this ViT's patch is {vit.patch}"
            )
        if int(out_channels) < 1:
            raise ValueError(f"simple_pyramid: out_channels must be positive, got {out_channels}")
        self.block_index = resolve_index(int(block_index), vit.depth, "block_index")
        self.final_norm = bool(final_norm)
        self.patch = vit.patch[0]
        dim = vit.dim
        self.scales = nn.ModuleList()
        for r in REDUCTIONS:
            layers: list[nn.Module] = []
            c = dim
            if r < self.patch:  # upsample by p / r = 2^k
                k = int(math.log2(self.patch // r))
                for j in range(k):
                    if j > 0:
                        layers += [LayerNorm2d(c), nn.GELU()]
                    layers.append(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2))
                    c //= 2
            elif r > self.patch:
                f = r // self.patch
                layers.append(nn.MaxPool2d(kernel_size=f, stride=f, ceil_mode=True))
            layers += _conv_norm(c, out_channels, 1) + _conv_norm(out_channels, out_channels, 3)
            self.scales.append(nn.Sequential(*layers))
        self.feature_info = [{"num_chs": int(out_channels), "reduction": r} for r in REDUCTIONS]

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> 4 maps (B, out_channels, ceil(H / r), ceil(W / r)), r = 4, 8, 16, 32."""
        vit = PlainViT(unwrap(backbone), "simple_pyramid")
        h, w = x.shape[-2:]
        emb = vit.embed(vit.pad(x))
        tokens = vit.run(emb, emb.tokens, 0, self.block_index + 1)
        if self.final_norm:
            tokens = vit.final_norm(tokens)
        feat = tokens_to_map(tokens, emb.grid)
        return crop([scale(feat) for scale in self.scales], (h, w), self.reductions)
