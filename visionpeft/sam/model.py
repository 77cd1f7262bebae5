"""SAM with adapters: promptable or semantic (multi-class) segmentation, the adapter folder, and prediction.

A :class:`SamModel` wraps a :class:`~visionpeft.model.PeftVisionModel` over a whole ``segment_anything`` ``Sam``:
the adapter's hooks sit in the image encoder, the mask decoder trains as the head (a saved copy; ``modules_to_save=[]``
freezes it) and the prompt encoder stays frozen. Two modes:

* ``"prompt"``: SAM's own task, masks for box / point / mask prompts (:meth:`SamModel.decode`);
* ``"semantic"``: one mask per class from the decoder without prompts, as in SAMed (Zhang & Liu, 2023,
  arXiv:2304.13785): the decoder gets ``num_classes`` extra mask tokens (initialised from SAM's own tokens and
  output MLPs), and :meth:`SamModel.forward` returns ``(B, K, H, W)`` logits.

The adapter folder holds the method's files (``adapter.safetensors``: encoder adapter + decoder) and
``sam_config.json`` (mode, classes, input size and the SAM size it was trained on)::

    sam = build_sam("sam_vit_b", checkpoint="sam_vit_b_01ec64.pth", img_size=512)
    model = SamModel.from_sam(sam, vp.LoRAConfig(rank=8, qkv_slices="qv"), mode="semantic", num_classes=9)
    ... train ...
    model.save_adapter("out/sam-lora")
    predictor = sam_predictor(build_sam("sam_vit_b", checkpoint="sam_vit_b_01ec64.pth"), "out/sam-lora")
    predictor.set_image(image); masks, scores, logits = predictor.predict(box=np.array([x0, y0, x1, y1]))
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import AdapterFileError, load_json, save_json
from .._version import __version__
from ..backbones.sam import resize_sam, sam_image_encoder, sam_img_size
from ..config import MethodConfig
from ..model import PeftVisionModel, get_peft_model, print_trainable
from ..model import load_adapter as _load_method_adapter

SAM_CONFIG = "sam_config.json"
SAM_FORMAT = 1
MODES = ("prompt", "semantic")


def semantic_decoder(sam: nn.Module, num_classes: int) -> nn.Module:
    """Give ``sam`` a mask decoder with one mask token per class (in place; returns ``sam``).

    The new decoder has ``num_classes + 1`` mask tokens (token 0 is SAM's single-mask token, unused; tokens 1..K
    are the classes, read through ``multimask_output=True``). Everything shared (the two-way transformer, the
    upscaling, the IoU token) is copied; each class token and its output MLP start as a copy of SAM's token
    ``k mod 4``, the IoU head's last layer likewise, so training starts from SAM's mask prediction.
    """
    from segment_anything.modeling import MaskDecoder

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    old = sam.mask_decoder
    if old.num_mask_tokens == num_classes + 1 and getattr(old, "semantic_classes", None) == num_classes:
        return sam
    iou_head = old.iou_prediction_head
    new = MaskDecoder(
        transformer_dim=old.transformer_dim,
        transformer=copy.deepcopy(old.transformer),
        num_multimask_outputs=num_classes,
        iou_head_depth=iou_head.num_layers,
        iou_head_hidden_dim=iou_head.layers[0].out_features,
    )
    new.output_upscaling = copy.deepcopy(old.output_upscaling)
    n_old = old.num_mask_tokens
    with torch.no_grad():
        new.iou_token.weight.copy_(old.iou_token.weight)
        for k in range(new.num_mask_tokens):
            src = k % n_old
            new.mask_tokens.weight[k].copy_(old.mask_tokens.weight[src])
            new.output_hypernetworks_mlps[k].load_state_dict(old.output_hypernetworks_mlps[src].state_dict())
        for i, layer in enumerate(new.iou_prediction_head.layers):
            ref = iou_head.layers[i]
            if i < len(new.iou_prediction_head.layers) - 1:
                layer.load_state_dict(ref.state_dict())
            else:
                rows = torch.arange(new.num_mask_tokens) % n_old
                layer.weight.copy_(ref.weight[rows])
                layer.bias.copy_(ref.bias[rows])
    new.semantic_classes = num_classes
    sam.mask_decoder = new.to(next(old.parameters()).device)
    return sam


@dataclasses.dataclass
class SamSpec:
    """What ``sam_config.json`` records: the mode, the classes (semantic), the input size and SAM's size."""

    mode: str = "prompt"
    num_classes: int | None = None
    classes: list[str] | None = None
    img_size: int = 1024
    sam: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SAM mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "semantic":
            if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
                raise ValueError(f"semantic SAM needs num_classes >= 1, got {self.num_classes!r}")
            if self.classes is not None and len(self.classes) != self.num_classes:
                raise ValueError(f"{len(self.classes)} class names for num_classes={self.num_classes}")


class SamModel(nn.Module):
    """SAM with an adapter (see the module docstring).

    Args:
        peft: a PeftVisionModel over a whole ``Sam`` (for ``"semantic"``, one whose decoder went through
            :func:`semantic_decoder` before the adapter was attached: use :meth:`from_sam`).
        mode: ``"prompt"`` or ``"semantic"``.
        num_classes, classes: the classes of the semantic mode.
        cache_size: image embeddings kept when the encoder does not train (keyed by the images' bytes), so that
            decoder-only training runs the encoder once per distinct image; 0 turns the cache off.
    """

    def __init__(
        self,
        peft: PeftVisionModel,
        mode: str = "prompt",
        num_classes: int | None = None,
        classes: list[str] | None = None,
        cache_size: int = 0,
    ) -> None:
        super().__init__()
        from segment_anything.modeling import Sam

        if not isinstance(peft, PeftVisionModel) or not isinstance(peft.base_model, Sam):
            raise TypeError(
                "SamModel wraps a PeftVisionModel over a whole segment_anything Sam "
                f"(vp.get_peft_model(sam, config)), got {type(peft).__name__}"
            )
        self.peft = peft
        sam = peft.base_model
        self.spec = SamSpec(mode, num_classes, list(classes) if classes else None, sam_img_size(sam), _options(sam))
        if mode == "semantic" and getattr(sam.mask_decoder, "semantic_classes", None) != num_classes:
            raise ValueError(
                f"the decoder of this SAM has no {num_classes} class tokens: build the model with "
                "SamModel.from_sam(sam, config, mode='semantic', num_classes=K)"
            )
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @classmethod
    def from_sam(
        cls,
        sam: nn.Module,
        config: MethodConfig | str,
        mode: str = "prompt",
        num_classes: int | None = None,
        classes: list[str] | None = None,
        cache_size: int = 0,
        **method_options: Any,
    ) -> SamModel:
        """Attach ``config`` (a method config or a method name with ``method_options``) to ``sam`` in ``mode``."""
        SamSpec(mode, num_classes, list(classes) if classes else None)  # checks before anything changes
        if mode == "semantic":
            semantic_decoder(sam, num_classes)
        return cls(get_peft_model(sam, config, **method_options), mode, num_classes, classes, cache_size)

    # parts ---------------------------------------------------------------------------------------------------
    @property
    def sam(self) -> nn.Module:
        return self.peft.base_model

    @property
    def img_size(self) -> int:
        return sam_img_size(self.sam)

    @property
    def encoder_trains(self) -> bool:
        """Whether anything in (or hooked on) the image encoder trains."""
        return any(p.requires_grad and ("image_encoder" in n) for n, p in self.peft.named_parameters()) or any(
            p.requires_grad for p in sam_image_encoder(self.sam).parameters()
        )

    def print_trainable_parameters(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.sam.parameters())
        return print_trainable(trainable, total)

    # forward -------------------------------------------------------------------------------------------------
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images (S = the model's input size) -> ``(B, C, S/16, S/16)`` embeddings.
        Without a trainable encoder they are computed without autograd (and cached when ``cache_size > 0``)."""
        _check_images(images, self.img_size)
        encoder = self.sam.image_encoder
        trains = self.encoder_trains
        if trains and torch.is_grad_enabled():
            return encoder(images)
        with torch.no_grad():
            if self.cache_size <= 0 or trains:  # a training encoder changes: its embeddings are never reused
                return encoder(images)
            return torch.cat([self._cached(encoder, x[None]) for x in images])

    def _cached(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit.to(x.device)
        out = encoder(x)
        self._cache[key] = out.detach().cpu()
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    def decode(
        self,
        embedding: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on one image.

        Args:
            embedding: ``(1, C, h, w)``, one image's embedding.
            points: ``(coords (N, n, 2), labels (N, n))``, x / y in input pixels; label 1 foreground, 0
                background, -1 padding.
            boxes: ``(N, 4)`` x0, y0, x1, y1 in input pixels.
            mask_input: ``(N, 1, 4h, 4w)`` low-resolution logits of a previous prediction.
            multimask: three candidate masks per prompt instead of one.

        Returns:
            ``(low-resolution logits (N, M, 4h, 4w), predicted IoU (N, M))``.
        """
        sam = self.sam
        if points is None and boxes is None and mask_input is None:
            raise ValueError("decode needs at least one prompt: points, boxes or mask_input")
        if points is not None:
            coords, labels = points
            _check_points(coords, self.img_size)
        if boxes is not None:
            _check_points(boxes.reshape(-1, 2, 2), self.img_size, what="boxes")
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def semantic_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` embeddings -> ``(B, K, 4h, 4w)`` class logits (semantic mode)."""
        if self.spec.mode != "semantic":
            raise RuntimeError("semantic_logits needs a SamModel in 'semantic' mode")
        sam = self.sam
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()
        out = []
        for emb in embeddings:
            logits, _ = sam.mask_decoder(
                image_embeddings=emb[None],
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            out.append(logits)
        return torch.cat(out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Semantic mode: ``(B, 3, S, S)`` -> ``(B, K, S, S)`` class logits."""
        logits = self.semantic_logits(self.image_embeddings(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # files ---------------------------------------------------------------------------------------------------
    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the adapter (encoder adapter + decoder: ``adapter.safetensors``) and ``sam_config.json``."""
        directory = Path(directory)
        self.peft.save_adapter(directory)
        meta = {
            "format_version": SAM_FORMAT,
            "visionpeft_version": __version__,
            "spec": dataclasses.asdict(self.spec),
        }
        save_json(directory / SAM_CONFIG, meta)
        return directory

    def predictor(self, merge: bool = False) -> Any:
        """A ``segment_anything.SamPredictor`` answering with this adapted SAM (``set_image``, ``predict`` with
        points, boxes and masks; :class:`SamAutomaticMaskGenerator` takes ``predictor.model``). ``merge=True``
        merges a mergeable adapter into the weights first (zero overhead; this SamModel is then spent)."""
        from segment_anything import SamPredictor

        self.peft.eval()
        sam = self.peft.merge_and_unload() if merge else self.sam
        return SamPredictor(sam)


def _options(sam: nn.Module) -> dict:
    opts = dict(getattr(sam, "sam_options", {}) or {})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}


def _check_images(images: Any, img_size: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"SAM takes (B, 3, H, W) image tensors, got {getattr(images, 'shape', type(images))}")
    if images.shape[1] != 3:
        raise ValueError(f"SAM takes RGB images (3 channels), got {images.shape[1]} channels: convert them first")
    if tuple(images.shape[-2:]) != (img_size, img_size):
        raise ValueError(
            f"this SAM takes {img_size} x {img_size} inputs, got {tuple(images.shape[-2:])}: resize the longest side "
            "and pad (segment_anything's ResizeLongestSide), or build / resize the model for another size"
        )


def _check_points(coords: torch.Tensor, img_size: int, what: str = "points") -> None:
    if coords.numel() and (coords.min() < 0 or coords.max() > img_size):
        raise ValueError(
            f"{what} outside the {img_size} x {img_size} input: coordinates span "
            f"[{coords.min().item():.1f}, {coords.max().item():.1f}] (x / y in input pixels)"
        )


# loading -----------------------------------------------------------------------------------------------------------
def is_sam_adapter(directory: str | os.PathLike) -> bool:
    return (Path(directory) / SAM_CONFIG).is_file()


def read_sam_spec(directory: str | os.PathLike) -> SamSpec:
    """The :class:`SamSpec` saved in ``directory`` (checked)."""
    path = Path(directory) / SAM_CONFIG
    if not path.is_file():
        raise AdapterFileError(f"{path} does not exist: {directory} is not a SAM adapter folder")
    try:
        meta = load_json(path)
    except Exception as e:
        raise AdapterFileError(f"{path} cannot be read: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != SAM_FORMAT:
        raise AdapterFileError(
            f"{path}: format_version {meta.get('format_version') if isinstance(meta, dict) else None!r} is not "
            f"{SAM_FORMAT}; it was not written by this visionpeft version ({__version__})"
        )
    spec = meta.get("spec")
    names = {f.name for f in dataclasses.fields(SamSpec)}
    if not isinstance(spec, dict) or set(spec) - names:
        raise AdapterFileError(f"{path}: the 'spec' object must have the keys {sorted(names)}")
    try:
        return SamSpec(**spec)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


_SIZE_KEYS = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads", "prompt_embed_dim", "patch_size")


def load_sam_adapter(
    sam: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> SamModel:
    """Attach a saved SAM adapter to a base ``Sam`` (built from the same SAM size, e.g. the official checkpoint):
    the model is resized to the adapter's input size and, in semantic mode, given its class tokens; then the
    method's files are loaded and checked (:func:`visionpeft.model.load_adapter`)."""
    spec = read_sam_spec(directory)
    have = _options(sam)
    wrong = {k: (spec.sam.get(k), have.get(k)) for k in _SIZE_KEYS if k in spec.sam and k in have}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    if wrong:
        raise AdapterFileError(
            f"the SAM adapter in {directory} was trained on {spec.sam.get('name', 'another SAM')}; this model "
            f"differs: {', '.join(f'{k} (adapter {a}, model {b})' for k, (a, b) in wrong.items())}"
        )
    if sam_img_size(sam) != spec.img_size:
        resize_sam(sam, spec.img_size)
    if spec.mode == "semantic":
        semantic_decoder(sam, spec.num_classes)
    peft = _load_method_adapter(sam, directory, adapter_name, is_trainable)
    return SamModel(peft, spec.mode, spec.num_classes, spec.classes)


def sam_predictor(sam: nn.Module, directory: str | os.PathLike, merge: bool = True) -> Any:
    """A ``segment_anything.SamPredictor`` of ``sam`` (the base model) with the adapter in ``directory``;
    ``merge=True`` merges a mergeable adapter (LoRA, DoRA, BitFit, SSF ...) into the weights."""
    model = load_sam_adapter(sam, directory)
    return model.predictor(merge=merge and model.peft.method.mergeable)
