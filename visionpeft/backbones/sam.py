"""Segment Anything (the ``segment-anything`` package): the image encoder's spec, building SAM from the official
checkpoints or from a size config, other input sizes, and activation checkpointing of the encoder.

Paper: "Segment Anything", Kirillov et al., 2023, arXiv:2304.02643. The image encoder is a ViT (MAE-pretrained)
whose blocks run on ``(B, H, W, C)`` maps, most of them with windowed attention (14 x 14 windows), four with global
attention; attention adds decomposed relative-position terms (tables of ``2 * size - 1`` rows per axis) and the
patch grid an absolute position embedding ``(1, H/16, W/16, C)``. Adapters attach to the encoder's blocks by the
package's own module names (``image_encoder.blocks.i.attn.qkv``, ``.attn.proj``, ``.mlp.lin1`` / ``.lin2``,
``.norm1`` / ``.norm2``); the mask decoder is the head (it trains and is saved with the adapter by default, as a
classifier is), the prompt encoder stays frozen unless a config names it.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap

# the official sizes (segment_anything/build_sam.py); all share patch 16, window 14, a 256-wide prompt space
SAM_ARCHS: dict[str, dict[str, Any]] = {
    "sam_vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": (2, 5, 8, 11),
    },
    "sam_vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (5, 11, 17, 23),
    },
    "sam_vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (7, 15, 23, 31),
    },
}
SAM_DEFAULTS: dict[str, Any] = {
    "window_size": 14,
    "patch_size": 16,
    "prompt_embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "iou_head_hidden_dim": 256,
    "mask_in_chans": 16,
    "num_multimask_outputs": 3,
}
# a SAM small enough for tests and the CPU demo (same architecture, random weights): a 64 x 64 input gives an
# 8 x 8 grid (patch 8), windows of 4 in the first block, global attention in the second
TINY_SAM: dict[str, Any] = {
    "encoder_embed_dim": 32,
    "encoder_depth": 2,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": (1,),
    "window_size": 4,
    "patch_size": 8,
    "prompt_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_mlp_dim": 64,
    "decoder_num_heads": 2,
    "iou_head_hidden_dim": 32,
    "mask_in_chans": 8,
}
_OPTIONS = set(SAM_ARCHS["sam_vit_b"]) | set(SAM_DEFAULTS)


def _classes() -> tuple[type, type]:
    from segment_anything.modeling import ImageEncoderViT, Sam

    return Sam, ImageEncoderViT


def _is_sam(model: nn.Module) -> bool:
    try:
        sam_cls, encoder_cls = _classes()
    except ImportError:  # the package is not installed: no model can be one
        return False
    return isinstance(model, (sam_cls, encoder_cls))


def sam_image_encoder(model: nn.Module) -> nn.Module:
    """The ``ImageEncoderViT`` of a ``Sam`` (or the encoder itself)."""
    sam_cls, encoder_cls = _classes()
    if isinstance(model, encoder_cls):
        return model
    if isinstance(model, sam_cls):
        return model.image_encoder
    raise TypeError(f"expected a segment_anything Sam or ImageEncoderViT, got {type(model).__name__}")


_B = r"(?:image_encoder\.)?blocks\.\d+"
SAM_ROLES = {
    "block": _B,
    "attn": _B + r"\.attn",
    "qkv": _B + r"\.attn\.qkv",
    "attn_out": _B + r"\.attn\.proj",
    "mlp": _B + r"\.mlp",
    "mlp_in": _B + r"\.mlp\.lin1",
    "mlp_out": _B + r"\.mlp\.lin2",
    "norm": _B + r"\.norm[12]",
    "patch_embed": r"(?:image_encoder\.)?patch_embed\.proj",
}

SAM = register_backbone(
    BackboneSpec(
        name="sam",
        match=_is_sam,
        roles=SAM_ROLES,
        # blocks and MLPs see (B, H, W, C); attention sees (B * windows, w, w, C) in windowed blocks
        layouts={"block": "NHWC", "attn": "NHWC", "mlp": "NHWC"},
        default_layout="NHWC",
        head=lambda m: ["mask_decoder"] if hasattr(m, "mask_decoder") else [],
        frozen=lambda m: ["prompt_encoder"] if hasattr(m, "prompt_encoder") else [],
        num_prefix_tokens=None,  # no token sequence: (B, H, W, C) maps, windowed attention (VPT refused)
        patch_size=lambda m: int(sam_image_encoder(m).patch_embed.proj.kernel_size[0]),
        # no LayerScale or DropPath modules: the attention's and the MLP's own outputs join the stream
        taps={
            "attn": Tap("attn", "out", "attn", "NHWC"),
            "mlp": Tap("mlp", "out", "mlp", "NHWC"),
            "mlp_residual": Tap("norm2", "in", "mlp", "NHWC"),
        },
    )
)


# building --------------------------------------------------------------------------------------------------------
def sam_options(name: str, **overrides: Any) -> dict[str, Any]:
    """The full set of size options of ``name`` (``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``) with
    ``overrides`` applied; an unknown name or option is refused with the close ones."""
    if name not in SAM_ARCHS:
        close = difflib.get_close_matches(str(name), list(SAM_ARCHS), n=3, cutoff=0.4)
        hint = f" (close: {close})" if close else ""
        raise ValueError(f"unknown SAM size {name!r}: choose one of {sorted(SAM_ARCHS)}{hint}")
    bad = sorted(set(overrides) - _OPTIONS)
    if bad:
        hints = {b: difflib.get_close_matches(b, sorted(_OPTIONS), n=1) for b in bad}
        raise ValueError(f"unknown SAM option(s) {hints} (key: close names); the options are {sorted(_OPTIONS)}")
    opts = {**SAM_DEFAULTS, **SAM_ARCHS[name], **overrides}
    opts["encoder_global_attn_indexes"] = tuple(int(i) for i in opts["encoder_global_attn_indexes"])
    return opts


def build_sam(
    name: str = "sam_vit_b",
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    img_size: int = 1024,
    **overrides: Any,
) -> nn.Module:
    """A ``segment_anything`` ``Sam`` of an official size (or a smaller one through ``overrides``), in eval mode.

    Args:
        name: ``sam_vit_b``, ``sam_vit_l`` or ``sam_vit_h`` (the official checkpoints' sizes).
        checkpoint: the official checkpoint file (``sam_vit_b_01ec64.pth``; read with ``weights_only=True``), a
            state dict in its key format, or ``None`` for random weights. A checkpoint made for another input
            size is resized to ``img_size`` (see :func:`load_sam_checkpoint`).
        img_size: the (square) input size; a multiple of the patch size. 1024 is SAM's own.
        overrides: size options (``encoder_embed_dim``, ``encoder_depth``, ``window_size`` ... :data:`TINY_SAM`).
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    o = sam_options(name, **overrides)
    patch = int(o["patch_size"])
    if int(img_size) <= 0 or int(img_size) % patch:
        raise ValueError(f"img_size={img_size} must be a positive multiple of the patch size {patch}")
    grid = int(img_size) // patch
    dim = int(o["prompt_embed_dim"])
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=o["encoder_depth"],
            embed_dim=o["encoder_embed_dim"],
            img_size=int(img_size),
            mlp_ratio=4,
            norm_layer=lambda c: nn.LayerNorm(c, eps=1e-6),
            num_heads=o["encoder_num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=o["encoder_global_attn_indexes"],
            window_size=o["window_size"],
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(int(img_size), int(img_size)),
            mask_in_chans=o["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=o["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=o["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=o["decoder_mlp_dim"],
                num_heads=o["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=o["iou_head_hidden_dim"],
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.sam_options = {"name": name, **o}  # plain attribute: how to rebuild it (saved with adapters)
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint)
    return sam.eval()


def read_sam_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a SAM checkpoint file (``torch.load`` with ``weights_only=True``); a state dict nested
    under ``model`` / ``state_dict`` (training checkpoints of other tools) is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {path} does not exist (the official ones: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, "
            "sam_vit_h_4b8939.pth from the segment-anything repository)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, another format
        raise ValueError(f"SAM checkpoint {path} cannot be read as a torch state dict: {e}") from e
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"SAM checkpoint {path} does not hold a state dict of tensors")
    return state


def _guess_size(state: Mapping[str, torch.Tensor]) -> str | None:
    w = state.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        return None
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, arch in SAM_ARCHS.items():
        if arch["encoder_embed_dim"] == w.shape[0] and arch["encoder_depth"] == depth:
            return name
    return f"embed_dim={w.shape[0]}, depth={depth}"


def resize_sam_state(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its position tensors resized to the geometry of ``target`` (a model's state dict):
    ``image_encoder.pos_embed`` (1, H, W, C) bicubically, the relative-position tables (2 * size - 1, C) of the
    global-attention blocks linearly (as the encoder's own ``get_rel_pos`` interpolates them); every other tensor
    is returned as it is."""
    out = dict(state)
    for key, want in target.items():
        have = out.get(key)
        if have is None or have.shape == want.shape:
            continue
        if key.endswith("pos_embed") and have.dim() == 4 and have.shape[-1] == want.shape[-1]:
            grid = have.permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=tuple(want.shape[1:3]), mode="bicubic", align_corners=False)
            out[key] = grid.permute(0, 2, 3, 1).to(have.dtype).contiguous()
        elif (key.endswith("rel_pos_h") or key.endswith("rel_pos_w")) and have.shape[1:] == want.shape[1:]:
            table = F.interpolate(have.float().t()[None], size=want.shape[0], mode="linear")
            out[key] = table[0].t().to(have.dtype).contiguous()
    return out


def load_sam_checkpoint(
    sam: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], strict: bool = True
) -> None:
    """Load an official-format SAM state dict into ``sam`` (position tensors resized to its input size).

    Raises:
        ValueError: a checkpoint of another SAM size or architecture, naming the mismatched keys and the size
            the checkpoint is for.
    """
    where = f"SAM checkpoint {checkpoint}" if isinstance(checkpoint, (str, os.PathLike)) else "the SAM state dict"
    state = read_sam_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    own = sam.state_dict()
    state = resize_sam_state(state, own)
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if shapes or (strict and (missing or unexpected)):
        size = _guess_size(state)
        built = getattr(sam, "sam_options", {}).get("name", type(sam).__name__)
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        if missing:
            parts.append(f"{len(missing)} key(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        looks = f"; the file looks like {size}" if size else ""
        raise ValueError(f"{where} does not fit this model ({built}): " + "; ".join(parts) + looks)
    sam.load_state_dict(state, strict=strict)


def save_sam_checkpoint(sam: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``sam``'s state dict in the official key format (``torch.save``), atomically."""
    from .._io import atomic_write

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def resize_sam(sam: nn.Module, img_size: int) -> nn.Module:
    """Make ``sam`` (a ``Sam`` or its image encoder) take ``img_size`` x ``img_size`` inputs, in place: the absolute
    position embedding and the global blocks' relative-position tables are resized (:func:`resize_sam_state`),
    the prompt encoder's sizes follow. The result equals a model built for ``img_size`` loaded with the same
    checkpoint."""
    encoder = sam_image_encoder(sam)
    patch = int(encoder.patch_embed.proj.kernel_size[0])
    if int(img_size) <= 0 or int(img_size) % patch:
        raise ValueError(f"img_size={img_size} must be a positive multiple of the patch size {patch}")
    grid = int(img_size) // patch
    with torch.no_grad():
        if encoder.pos_embed is not None:
            target = {"pos_embed": encoder.pos_embed.new_empty(1, grid, grid, encoder.pos_embed.shape[-1])}
            encoder.pos_embed.data = resize_sam_state({"pos_embed": encoder.pos_embed.data}, target)["pos_embed"]
        for block in encoder.blocks:
            attn = block.attn
            if block.window_size == 0 and getattr(attn, "use_rel_pos", False):
                for key in ("rel_pos_h", "rel_pos_w"):
                    table = getattr(attn, key)
                    target = {key: table.new_empty(2 * grid - 1, table.shape[1])}
                    table.data = resize_sam_state({key: table.data}, target)[key]
    encoder.img_size = int(img_size)
    prompt = getattr(sam, "prompt_encoder", None)
    if prompt is not None:
        prompt.image_embedding_size = (grid, grid)
        prompt.input_image_size = (int(img_size), int(img_size))
        prompt.mask_input_size = (4 * grid, 4 * grid)
    return sam


def sam_img_size(sam: nn.Module) -> int:
    return int(sam_image_encoder(sam).img_size)


# activation checkpointing -----------------------------------------------------------------------------------------
def _checkpointed_forward(block: nn.Module) -> Any:
    from torch.utils.checkpoint import checkpoint

    plain = type(block).forward

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            return checkpoint(plain, self, x, use_reentrant=False)
        return plain(self, x)

    return types.MethodType(forward, block)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Recompute each encoder block's activations in the backward pass instead of keeping them (training mode
    only). The module tree and the state dict do not change; hooks inside the blocks (the adapters) run again
    in the recomputation, hooks on the blocks themselves run once. ``enable=False`` restores the plain forward."""
    encoder = sam_image_encoder(model)
    for block in encoder.blocks:
        if enable:
            block.forward = _checkpointed_forward(block)
        else:
            block.__dict__.pop("forward", None)
    encoder.grad_checkpointing = bool(enable)
