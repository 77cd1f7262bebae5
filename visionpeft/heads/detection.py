"""Object detection and instance segmentation: torchvision's detectors on our feature pyramid.

The detectors are torchvision's own (``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``, ``FCOS``), built as in
torchvision's ``*_resnet50_fpn`` constructors, with :class:`PyramidBackbone` in place of the ResNet: it calls a
``features`` callable (the frozen, adapted backbone + neck, returning NCHW maps at strides 4 / 8 / 16 / 32) and
adds a ``torchvision.ops.FeaturePyramidNetwork`` on top. As in torchvision, the two-stage detectors use all four
maps plus a max-pooled P6 (``LastLevelMaxPool``; P2-P6, anchors 32-512), and the one-stage detectors use the
stride-8..32 maps plus P6 / P7 computed from P5 (``LastLevelP6P7``; P3-P7; RetinaNet anchors 32-512 with three
scales per octave, FCOS one point per location). Anchor sizes follow the strides (two-stage 8x, RetinaNet 4x,
FCOS 1x the level's stride), so other stride sets get matching anchors.

``features`` is stored as a plain attribute, not a submodule: ``detector.state_dict()`` and
``detector.parameters()`` hold only the FPN and the detection heads, and ``detector.train()`` / ``.to()`` do not
reach it (the caller owns the backbone, its adapters and their mode).

Labels are ``1..num_classes`` for every detector (0 is torchvision's background). The R-CNNs get
``num_classes + 1`` classes (background included); RetinaNet and FCOS index their sigmoid classifiers by label
directly, so they too get ``num_classes + 1`` outputs, the unused class 0 is only ever a negative, and its
detections are dropped.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from visionpeft._registry import _suggest

__all__ = ["DETECTORS", "PyramidBackbone", "build_detector"]

DETECTORS: tuple[str, ...] = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PyramidBackbone(nn.Module):
    """A torchvision detection backbone over a ``features`` callable: selected maps -> FPN (+ extra levels).

    Args:
        features: maps the normalised, padded batch (B, 3, H, W) to a list of NCHW maps (finest first). Kept as a
            plain attribute (not a submodule), so its tensors are not part of this module's state.
        in_channels: channels of each map ``features`` returns.
        levels: indices of the maps that enter the FPN.
        out_channels: FPN width.
        extra_blocks: torchvision's extra FPN block (``LastLevelMaxPool`` / ``LastLevelP6P7``) or None.

    Attributes:
        out_channels: FPN width (torchvision's detectors read it).
        feature_names: the keys of the returned ``OrderedDict``, finest first (extra levels last).
    """

    def __init__(
        self,
        features: Callable[[Tensor], Sequence[Tensor]],
        in_channels: Sequence[int],
        levels: Sequence[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
    ):
        super().__init__()
        if not callable(features):
            raise TypeError(f"PyramidBackbone: features must be callable (x -> list of maps), got {type(features)}")
        self.__dict__["features"] = features  # plain attribute: nn.Module.__setattr__ would register a module
        self.in_channels = [int(c) for c in in_channels]
        self.levels = [int(i) for i in levels]
        bad = [i for i in self.levels if not 0 <= i < len(self.in_channels)]
        if bad or not self.levels:
            raise ValueError(
                f"feature levels {self.levels} must be non-empty indices into the {len(self.in_channels)} maps "
                f"(in_channels {self.in_channels})"
            )
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork([self.in_channels[i] for i in self.levels], out_channels, extra_blocks)
        extra = {LastLevelMaxPool: ["pool"], LastLevelP6P7: ["p6", "p7"]}.get(type(extra_blocks), [])
        self.feature_names = [str(k) for k in range(len(self.levels))] + extra

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """(B, 3, H, W) -> ``OrderedDict`` of (B, out_channels, h_l, w_l), keys :attr:`feature_names`."""
        maps = list(self.features(x))
        got = [m.shape[1] for m in maps]
        if got != self.in_channels:
            raise ValueError(
                f"the detector's features returned maps with channels {got}, but it was built with in_channels "
                f"{self.in_channels}; pass the neck's feature_info channels"
            )
        return self.fpn(OrderedDict((str(k), maps[i]) for k, i in enumerate(self.levels)))


class _ForegroundOnly:
    """Drops detections of label 0 (the unused background slot of the one-stage classifiers)."""

    def postprocess_detections(self, *args, **kwargs) -> list[dict[str, Tensor]]:
        dets = super().postprocess_detections(*args, **kwargs)
        return [{k: v[d["labels"] > 0] for k, v in d.items()} for d in dets]


class _RetinaNet(_ForegroundOnly, RetinaNet):
    """torchvision's RetinaNet whose predictions never carry the background label 0."""


class _FCOS(_ForegroundOnly, FCOS):
    """torchvision's FCOS whose predictions never carry the background label 0."""


# name -> (class, default levels, extra block factory, anchor size per stride, aspect ratios)
_SPECS = {
    "faster_rcnn": (FasterRCNN, (0, 1, 2, 3), lambda c: LastLevelMaxPool(), lambda s: (8 * s,), (0.5, 1.0, 2.0)),
    "mask_rcnn": (MaskRCNN, (0, 1, 2, 3), lambda c: LastLevelMaxPool(), lambda s: (8 * s,), (0.5, 1.0, 2.0)),
    "retinanet": (
        _RetinaNet,
        (1, 2, 3),
        lambda c: LastLevelP6P7(c, c),
        lambda s: tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)),
        (0.5, 1.0, 2.0),
    ),
    "fcos": (_FCOS, (1, 2, 3), lambda c: LastLevelP6P7(c, c), lambda s: (s,), (1.0,)),
}


def build_detector(
    name: str,
    features: Callable[[Tensor], Sequence[Tensor]],
    in_channels: Sequence[int],
    num_classes: int,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    in_strides: Sequence[int] = (4, 8, 16, 32),
    levels: Sequence[int] | None = None,
    anchor_sizes: Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] | None = None,
    **kwargs,
) -> nn.Module:
    """Build a torchvision detector on a feature pyramid.

    The detector takes a list of images (3, H, W) in [0, 1] (and, in training, targets with ``boxes`` (N, 4) xyxy
    pixels and ``labels`` (N,) in 1..num_classes, plus ``masks`` (N, H, W) for Mask R-CNN); its transform resizes
    them (shorter side ``min_size``, longer at most ``max_size``), normalises with ``image_mean`` / ``image_std``,
    pads the batch to a multiple of 32 and calls ``features`` on it. Training returns a dict of losses, evaluation
    a list of dicts (``boxes``, ``labels``, ``scores``, and ``masks`` (N, 1, H, W) for Mask R-CNN) in the input
    images' coordinates.

    Args:
        name: one of :data:`DETECTORS`.
        features: maps the normalised batch (B, 3, H, W) to NCHW maps at ``in_strides`` (not registered as a
            submodule; see the module docstring).
        in_channels: channels of each map.
        num_classes: number of foreground classes K.
        fpn_channels: FPN width (a multiple of 32 for RetinaNet / FCOS, whose heads use GroupNorm(32)).
        min_size: the transform's shorter-side size (torchvision's 800 suits COCO; pass the data's size for small
            images, e.g. 128, to avoid upsampling them).
        max_size: the transform's longer-side limit.
        image_mean: per-channel mean of the backbone's normalisation.
        image_std: per-channel std of the backbone's normalisation.
        in_strides: stride of each map (sets the anchor sizes).
        levels: indices of the maps that enter the FPN (default: all four for the R-CNNs, strides 8-32 for
            RetinaNet / FCOS, as torchvision).
        anchor_sizes: one tuple of sizes per pyramid level (default from the strides, see the module docstring).
        aspect_ratios: anchor aspect ratios shared by all levels (default torchvision's).
        **kwargs: further arguments of the torchvision class (``box_score_thresh``, ``score_thresh``,
            ``rpn_batch_size_per_image``, ...).

    Returns:
        The torchvision detector; ``detector.backbone`` is the :class:`PyramidBackbone`.
    """
    if name not in _SPECS:
        raise KeyError(f"unknown detector {name!r}.{_suggest(str(name), list(DETECTORS))}")
    cls, default_levels, extra, anchor_of_stride, default_ratios = _SPECS[name]
    if num_classes < 1:
        raise ValueError(
            f"build_detector: num_classes counts the foreground classes and must be >= 1, got {num_classes}"
        )
    in_channels, in_strides = [int(c) for c in in_channels], [int(s) for s in in_strides]
    if len(in_strides) != len(in_channels):
        raise ValueError(f"build_detector: in_channels {in_channels} and in_strides {in_strides} differ in length")
    if name in ("retinanet", "fcos") and fpn_channels % 32:
        raise ValueError(
            f"build_detector: {name} needs fpn_channels divisible by 32 (GroupNorm(32)), got {fpn_channels}"
        )
    # the torchvision class's own arguments, less those set here, plus its transform's (passed through **kwargs)
    own = {"self", "backbone", "num_classes", "min_size", "max_size", "image_mean", "image_std", "anchor_generator"}
    own |= {"rpn_anchor_generator", "box_roi_pool", "mask_roi_pool"}
    params = inspect.signature(cls.__init__).parameters.items()
    accepted = [n for n, p in params if n not in own and p.kind is not inspect.Parameter.VAR_KEYWORD]
    accepted += ["size_divisible", "fixed_size"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"detector {name!r} got unknown argument(s) {unknown}. Accepted: fpn_channels, min_size, max_size, "
            f"image_mean, image_std, in_strides, levels, anchor_sizes, aspect_ratios, {', '.join(accepted)}."
        )
    levels = list(default_levels if levels is None else levels)
    backbone = PyramidBackbone(features, in_channels, levels, fpn_channels, extra(fpn_channels))
    strides = [in_strides[i] for i in levels]
    strides += [strides[-1] * 2 ** (k + 1) for k in range(len(backbone.feature_names) - len(levels))]
    if anchor_sizes is None:
        anchor_sizes = [anchor_of_stride(s) for s in strides]
    anchor_sizes = tuple(tuple(int(a) for a in sizes) for sizes in anchor_sizes)
    if len(anchor_sizes) != len(backbone.feature_names):
        raise ValueError(
            f"build_detector: {len(anchor_sizes)} anchor size tuples for {len(backbone.feature_names)} pyramid levels "
            f"{backbone.feature_names}; give one tuple per level"
        )
    ratios = tuple(float(r) for r in (default_ratios if aspect_ratios is None else aspect_ratios))
    anchors = AnchorGenerator(anchor_sizes, (ratios,) * len(anchor_sizes))
    common = dict(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std))
    if name in ("faster_rcnn", "mask_rcnn"):
        names = backbone.feature_names[: len(levels)]  # RoIs are pooled from the FPN maps, not the extra P6
        kwargs["box_roi_pool"] = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
        if name == "mask_rcnn":
            kwargs["mask_roi_pool"] = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
        return cls(backbone, num_classes + 1, rpn_anchor_generator=anchors, **common, **kwargs)
    return cls(backbone, num_classes + 1, anchor_generator=anchors, **common, **kwargs)
