"""Semantic segmentation heads, the segmentation loss and whole / sliding-window inference.

Every head takes the feature pyramid of a neck (a list of NCHW maps with channels ``in_channels`` at strides
``in_strides``, finest first, typically 4 / 8 / 16 / 32; map ``i`` of an ``H x W`` image is
``ceil(H / r_i) x ceil(W / r_i)``) and returns class logits at the finest stride. The heads follow
mmsegmentation's decode heads (conv + BatchNorm + ReLU blocks, ``Dropout2d(0.1)`` before a 1x1 classifier):

- ``upernet``: UperNet, Xiao et al. 2018, "Unified Perceptual Parsing for Scene Understanding", arXiv:1807.10221
  (pyramid pooling on the coarsest map, FPN fusion of all levels).
- ``fpn``: the semantic branch of Panoptic FPN, Kirillov et al. 2019, "Panoptic Feature Pyramid Networks",
  arXiv:1901.02446 (an FPN, per-level scale heads up to the finest stride, summed).
- ``segformer``: the all-MLP decoder of SegFormer, Xie et al. 2021, "SegFormer: Simple and Efficient Design for
  Semantic Segmentation with Transformers", arXiv:2105.15203.
- ``linear``: BatchNorm + one 1x1 conv on the concatenated, upsampled levels: the linear probe of dense features.

:class:`FCNHead` is the auxiliary head (mmseg's default on map 2, stride 16). Heads are plain modules: they are
trained in full and saved with the adapter. Norm layers are passed as factories (``norm_layer=nn.BatchNorm2d``,
or ``functools.partial(nn.GroupNorm, 32)``), never as strings.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from visionpeft._registry import _suggest

NormLayer = Callable[[int], nn.Module]

__all__ = [
    "SEG_HEADS",
    "FCNHead",
    "FPNHead",
    "LinearHead",
    "SegFormerHead",
    "UPerHead",
    "build_seg_head",
    "seg_loss",
    "slide_inference",
    "whole_inference",
]


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of ``x`` (B, C, h, w) to ``size``; a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvModule(nn.Sequential):
    """``k x k`` conv (no bias) + norm + ReLU, mmcv's ``ConvModule`` with the usual config.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: conv kernel size; padding keeps the spatial size.
        norm_layer: norm factory called with ``out_channels``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, norm_layer: NormLayer = nn.BatchNorm2d
    ):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )


class _DecodeHead(nn.Module):
    """Shared parts: input checks and the ``Dropout2d`` + 1x1 classifier (mmseg's ``cls_seg``)."""

    def __init__(
        self, in_channels: Sequence[int], in_strides: Sequence[int], channels: int, num_classes: int, dropout: float
    ):
        super().__init__()
        in_channels, in_strides = [int(c) for c in in_channels], [int(s) for s in in_strides]
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(
                f"{type(self).__name__}: in_channels {in_channels} and in_strides {in_strides} must be non-empty "
                "lists of the same length (one entry per feature map)"
            )
        if any(b <= a for a, b in zip(in_strides, in_strides[1:], strict=False)):
            raise ValueError(f"{type(self).__name__}: in_strides {in_strides} must be increasing (finest map first)")
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
        self.in_channels, self.in_strides = in_channels, in_strides
        self.channels, self.num_classes = channels, num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _check(self, feats: Sequence[Tensor]) -> list[Tensor]:
        feats = list(feats)
        got = [f.shape[1] if f.dim() == 4 else f"a {f.dim()}-d tensor" for f in feats]
        if got != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {len(self.in_channels)} NCHW maps with channels {self.in_channels}, "
                f"got channels {got}; build the head with the neck's feature_info channels"
            )
        return feats

    def cls_seg(self, x: Tensor) -> Tensor:
        """(B, channels, h, w) -> logits (B, num_classes, h, w)."""
        return self.conv_seg(self.dropout(x))


class UPerHead(_DecodeHead):
    """UperNet head (arXiv:1807.10221), as mmseg's ``UPerHead``.

    Pyramid pooling (adaptive average pools at ``pool_scales``, 1x1 ConvModules, upsampled and concatenated with the
    map, a 3x3 bottleneck) on the coarsest map; 1x1 lateral ConvModules on the others; a top-down path (bilinear
    upsampling and addition); 3x3 FPN ConvModules; all levels upsampled to the finest and concatenated; a 3x3 fusion
    ConvModule; ``Dropout2d`` and a 1x1 classifier.

    Note: the scale-1 pooling branch normalises a 1x1 map, so BatchNorm needs a batch of at least 2 in training
    (as in mmseg); use ``norm_layer=functools.partial(nn.GroupNorm, 32)`` for batch 1.

    Args:
        in_channels: channels of each input map, finest first.
        in_strides: stride of each input map.
        num_classes: number of classes K.
        channels: width of the head (512 in UperNet).
        pool_scales: output sizes of the pyramid pooling module.
        dropout: ``Dropout2d`` probability before the classifier.
        norm_layer: norm factory.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__(in_channels, in_strides, channels, num_classes, dropout)
        last = self.in_channels[-1]
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(last, channels, 1, norm_layer)) for s in pool_scales
        )
        self.bottleneck = ConvModule(last + len(pool_scales) * channels, channels, 3, norm_layer)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1, norm_layer) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, norm_layer) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3, norm_layer)

    def psp_forward(self, x: Tensor) -> Tensor:
        """Pyramid pooling: (B, C_last, h, w) -> (B, channels, h, w)."""
        outs = [x] + [_resize(m(x), x.shape[-2:]) for m in self.psp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Maps ``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        feats = self._check(feats)
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)] + [
            self.psp_forward(feats[-1])
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([_resize(o, size) for o in outs], dim=1))
        return self.cls_seg(fused)


class FPNHead(_DecodeHead):
    """Semantic FPN (the semantic branch of Panoptic FPN, arXiv:1901.02446), as mmseg's FPN neck + ``FPNHead``.

    An FPN (torchvision's ``FeaturePyramidNetwork``: 1x1 laterals, nearest top-down, 3x3 outputs, ``fpn_channels``
    wide), then one scale head per level: ``log2(stride_i / stride_0)`` repeats of 3x3 ConvModule + 2x bilinear
    upsampling (one ConvModule without upsampling for the finest level), the levels summed at the finest stride,
    ``Dropout2d`` and a 1x1 classifier. Each upsampling step lands exactly on the next finer map's size, so odd
    sizes (``ceil(H / r)``) line up.

    Args:
        in_channels: channels of each input map, finest first.
        in_strides: stride of each input map.
        num_classes: number of classes K.
        channels: width of the scale heads (128 in the paper / mmseg).
        fpn_channels: width of the FPN (256).
        dropout: ``Dropout2d`` probability before the classifier.
        norm_layer: norm factory of the scale heads (the paper uses GroupNorm, mmseg BatchNorm).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        channels: int = 128,
        fpn_channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__(in_channels, in_strides, channels, num_classes, dropout)
        self.fpn = FeaturePyramidNetwork(self.in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList()
        for stride in self.in_strides:
            steps = max(1, round(math.log2(stride / self.in_strides[0])))
            convs = [ConvModule(fpn_channels if k == 0 else channels, channels, 3, norm_layer) for k in range(steps)]
            self.scale_heads.append(nn.ModuleList(convs))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Maps ``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        feats = self._check(feats)
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
        sizes = [f.shape[-2:] for f in feats]
        out = None
        for i, (convs, x) in enumerate(zip(self.scale_heads, pyramid, strict=True)):
            for k, conv in enumerate(convs):
                x = conv(x)
                if i > 0:  # upsample one level per conv, onto the exact size of the next finer map
                    x = _resize(x, sizes[max(i - k - 1, 0)])
            x = _resize(x, sizes[0])
            out = x if out is None else out + x
        return self.cls_seg(out)


class SegFormerHead(_DecodeHead):
    """The SegFormer all-MLP decoder (arXiv:2105.15203).

    A per-level linear layer (a 1x1 conv with bias, i.e. a Linear on the tokens) to ``channels``, every level
    upsampled to the finest and concatenated (coarsest first, as the paper's code), a 1x1 fusion ConvModule (conv +
    BN + ReLU), ``Dropout2d`` and a 1x1 classifier.

    Args:
        in_channels: channels of each input map, finest first.
        in_strides: stride of each input map.
        num_classes: number of classes K.
        channels: the decoder's embedding width (256 for MiT-B0/B1, 768 for the larger ones).
        dropout: ``Dropout2d`` probability before the classifier.
        norm_layer: norm factory of the fusion layer.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__(in_channels, in_strides, channels, num_classes, dropout)
        self.linears = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in self.in_channels)
        self.fuse = ConvModule(len(self.in_channels) * channels, channels, 1, norm_layer)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Maps ``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        feats = self._check(feats)
        size = feats[0].shape[-2:]
        outs = [_resize(lin(f), size) for lin, f in zip(self.linears, feats, strict=True)]
        return self.cls_seg(self.fuse(torch.cat(outs[::-1], dim=1)))


class LinearHead(_DecodeHead):
    """The linear probe of dense features: every level upsampled (bilinear) to the finest and concatenated, then
    BatchNorm and one 1x1 conv (as the linear segmentation evaluations of DINOv2 / iBOT). No hidden layer.

    Args:
        in_channels: channels of each input map, finest first.
        in_strides: stride of each input map.
        num_classes: number of classes K.
        dropout: ``Dropout2d`` probability before the classifier (0: none).
        norm_layer: norm factory applied to the concatenation.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__(in_channels, in_strides, sum(int(c) for c in in_channels), num_classes, dropout)
        self.norm = norm_layer(self.channels)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Maps ``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_0, W_0)."""
        feats = self._check(feats)
        size = feats[0].shape[-2:]
        return self.cls_seg(self.norm(torch.cat([_resize(f, size) for f in feats], dim=1)))


class FCNHead(nn.Module):
    """The auxiliary FCN head (mmseg's ``FCNHead`` as used beside UperNet): on map ``in_index`` of the pyramid,
    ``num_convs`` 3x3 ConvModules, ``Dropout2d`` and a 1x1 classifier. Its logits are at that map's stride;
    :func:`seg_loss` resizes them to the target.

    Args:
        in_channels: channels of map ``in_index``.
        num_classes: number of classes K.
        channels: width of the convs (256 in mmseg's UperNet configs).
        in_index: which map of the pyramid to read (2: stride 16).
        num_convs: number of 3x3 ConvModules.
        dropout: ``Dropout2d`` probability before the classifier.
        norm_layer: norm factory.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        in_index: int = 2,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead: num_convs must be >= 1, got {num_convs}")
        self.in_channels, self.num_classes, self.in_index = int(in_channels), num_classes, in_index
        self.convs = nn.Sequential(
            *[ConvModule(in_channels if k == 0 else channels, channels, 3, norm_layer) for k in range(num_convs)]
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Maps ``[(B, C_i, H_i, W_i)]`` -> logits (B, K, H_j, W_j) of map ``j = in_index``."""
        feats = list(feats)
        if not -len(feats) <= self.in_index < len(feats):
            raise ValueError(f"FCNHead: in_index {self.in_index} is out of range for {len(feats)} feature maps")
        x = feats[self.in_index]
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"FCNHead expects map {self.in_index} with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        return self.conv_seg(self.dropout(self.convs(x)))


_SEG_HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "upernet": UPerHead,
    "fpn": FPNHead,
    "segformer": SegFormerHead,
    "linear": LinearHead,
}
SEG_HEADS: tuple[str, ...] = tuple(_SEG_HEAD_CLASSES)


def _check_kwargs(what: str, fn: Callable, kwargs: dict, exclude: Sequence[str] = ()) -> None:
    """Raise a ``TypeError`` naming the accepted keyword arguments of ``fn`` when ``kwargs`` has others."""
    params = inspect.signature(fn).parameters
    allowed = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD and n not in exclude and n != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{what} got unknown argument(s) {unknown}. Accepted: {', '.join(allowed)}.")


def build_seg_head(
    name: str, in_channels: Sequence[int], in_strides: Sequence[int], num_classes: int, **kwargs
) -> nn.Module:
    """Build a segmentation head by name.

    Args:
        name: one of :data:`SEG_HEADS` (``"upernet"``, ``"fpn"``, ``"segformer"``, ``"linear"``).
        in_channels: channels of each input map, finest first (the neck's ``feature_info`` ``num_chs``).
        in_strides: stride of each input map (``feature_info`` ``reduction``), e.g. ``[4, 8, 16, 32]``.
        num_classes: number of classes K.
        **kwargs: the head's own arguments (``channels``, ``dropout``, ``norm_layer``, ...).

    Returns:
        A module mapping the list of maps to logits (B, K, H / s0, W / s0) at the finest stride ``s0``.
    """
    if name not in _SEG_HEAD_CLASSES:
        raise KeyError(f"unknown segmentation head {name!r}.{_suggest(str(name), list(SEG_HEADS))}")
    cls = _SEG_HEAD_CLASSES[name]
    _check_kwargs(
        f"segmentation head {name!r}", cls.__init__, kwargs, exclude=("in_channels", "in_strides", "num_classes")
    )
    return cls(in_channels, in_strides, num_classes, **kwargs)


def seg_loss(logits: Tensor, target: Tensor, ignore_index: int = 255, dice_weight: float = 0.0) -> Tensor:
    """Pixel-wise cross-entropy with an ignore index, plus an optional soft dice term.

    The logits are resized (bilinear, ``align_corners=False``) to the target's size first. The cross-entropy is the
    mean over the pixels that are not ignored; the dice term is ``1 - 2|P.T| / (|P| + |T|)`` per class, from the
    softmax ``P`` and the one-hot target ``T`` summed over the batch's non-ignored pixels, averaged over the classes
    present in the target. A batch whose pixels are all ignored gives 0 (with a gradient graph), not NaN.

    Args:
        logits: (B, K, h, w) class logits.
        target: (B, H, W) integer labels in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of pixels that do not count.
        dice_weight: weight of the dice term (0: cross-entropy only).

    Returns:
        The scalar loss.
    """
    if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"seg_loss expects logits (B, K, h, w) and target (B, H, W), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    target = target.long()
    logits = _resize(logits, target.shape[-2:])
    num_classes = logits.shape[1]
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        labels = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(
            f"seg_loss: target holds labels {labels} outside [0, {num_classes}) that are not ignore_index "
            f"{ignore_index}; check the dataset's class count (num_classes) and reduce_zero_label"
        )
    n_valid = valid.sum()
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / n_valid.clamp(min=1)
    if dice_weight:
        probs = logits.float().softmax(dim=1) * valid.unsqueeze(1)
        onehot = F.one_hot(target.masked_fill(~valid, 0), num_classes).permute(0, 3, 1, 2) * valid.unsqueeze(1)
        inter = (probs * onehot).sum(dim=(0, 2, 3))
        denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
        present = onehot.sum(dim=(0, 2, 3)) > 0
        dice = 1 - (2 * inter + 1e-6) / (denom + 1e-6)
        dice = (dice * present).sum() / present.sum().clamp(min=1)
        loss = loss + dice_weight * dice.to(loss.dtype)
    return loss


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if h < 1 or w < 1:
        raise ValueError(f"slide_inference: {what} must be positive, got {v}")
    return int(h), int(w)


def whole_inference(fn: Callable[[Tensor], Tensor], img: Tensor) -> Tensor:
    """Run ``fn`` on the whole image and resize its logits (bilinear) to the image size (the counterpart of
    :func:`slide_inference`).

    Args:
        fn: maps images (B, 3, H, W) to logits (B, K, h, w).
        img: (B, 3, H, W) images.

    Returns:
        Logits (B, K, H, W).
    """
    return _resize(fn(img), img.shape[-2:])


def slide_inference(
    fn: Callable[[Tensor], Tensor],
    img: Tensor,
    num_classes: int,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
) -> Tensor:
    """Sliding-window inference, as mmseg's ``slide_inference``.

    Windows of size ``crop`` start every ``stride`` pixels and are clamped to the image (the last window of a row
    ends at the border); where windows overlap, their logits are averaged (a count map divides the sum). A window
    smaller than the crop (an image smaller than the crop) is padded with zeros (the mean of a normalised image) at
    its bottom / right, and the padding is cut from its logits. Logits that ``fn`` returns at a lower resolution are
    resized (bilinear) to the window first. Call it under ``torch.no_grad()``.

    Args:
        fn: maps crops (B, 3, h, w) to logits (B, K, h', w').
        img: (B, 3, H, W) images.
        num_classes: number of classes K.
        crop: window size, an int or (h, w).
        stride: step between windows, an int or (h, w).

    Returns:
        Logits (B, K, H, W) (float32).
    """
    (h_crop, w_crop), (h_stride, w_stride) = _pair(crop, "crop"), _pair(stride, "stride")
    b, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((b, num_classes, h_img, w_img), dtype=torch.float32)
    count = img.new_zeros((1, 1, h_img, w_img), dtype=torch.float32)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * h_stride + h_crop, h_img), min(wi * w_stride + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            window = img[:, :, y1:y2, x1:x2]
            h, w = y2 - y1, x2 - x1
            if h < h_crop or w < w_crop:
                window = F.pad(window, (0, w_crop - w, 0, h_crop - h))
            out = fn(window)
            if out.shape[:2] != (b, num_classes):
                raise ValueError(
                    f"slide_inference: fn returned logits of shape {tuple(out.shape)}, expected ({b}, {num_classes}, "
                    "h, w); pass the head's num_classes"
                )
            out = _resize(out, window.shape[-2:])[:, :, :h, :w]
            preds[:, :, y1:y2, x1:x2] += out.float()
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count
