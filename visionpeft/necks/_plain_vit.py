"""Driving a plain timm ViT (VisionTransformer / DeiT, EVA, BEiT) block by block, through its own submodules.

The necks call ``patch_embed``, the position embedding and each block module of the (hooked) timm model, so
every adapter hook runs; timm's ``forward_intermediates`` is not used because it drops the first
``num_prefix_tokens`` tokens, which is wrong once VPT prompts sit between the prefix and the patches. Patch
tokens are always the LAST ``h * w`` tokens of a block's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def vit_kind(model: nn.Module) -> str | None:
    """``"vit"`` (timm VisionTransformer, DeiT), ``"eva"``, ``"beit"``, or ``None`` for anything else."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, Eva):
        return "eva"
    if isinstance(model, Beit):
        return "beit"
    return None


@dataclasses.dataclass
class Embedded:
    """Tokens entering the first block.

    Attributes:
        tokens: (B, N, D), prefix tokens first, then the ``h * w`` patch tokens.
        grid: (h, w), the patch grid of the padded input.
        block_kwargs: block index -> keyword arguments of that block's forward (EVA's rope, BEiT's shared bias).
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    block_kwargs: Callable[[int], dict]


class PlainViT:
    """A view of a plain timm ViT: its width, depth, patch size, and how to embed an image and run blocks.

    Args:
        model: the timm model (with adapter hooks; not modified).
        neck: the neck's name, for error messages.
    """

    def __init__(self, model: nn.Module, neck: str) -> None:
        kind = vit_kind(model)
        if kind is None:
            raise ValueError(
                f"neck {neck!r} needs a plain ViT (timm VisionTransformer / DeiT, EVA or BEiT); got "
                f"{type(model).__name__}. Hierarchical backbones (Swin, ConvNeXt, ResNet, ...) already have "
                f"stages at strides 4-32: use neck 'native'"
            )
        self.model, self.kind, self.neck = model, kind, neck
        p = model.patch_embed.patch_size
        self.patch = (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))
        self.dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.num_heads = int(getattr(model.blocks[0].attn, "num_heads", 0) or 0)
        self.dynamic = bool(getattr(model, "dynamic_img_size", False))
        size = getattr(model.patch_embed, "img_size", None)
        self.img_size = tuple(int(s) for s in size) if size is not None else None

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad (B, 3, H, W) at the bottom / right to what the model accepts: a multiple of the patch size
        (``dynamic_img_size=True``), or the model's fixed ``img_size`` (inputs no larger than it)."""
        h, w = x.shape[-2:]
        if self.dynamic or self.img_size is None:
            th, tw = math.ceil(h / self.patch[0]) * self.patch[0], math.ceil(w / self.patch[1]) * self.patch[1]
        else:
            th, tw = self.img_size
            if h > th or w > tw:
                how = (
                    "timm's BEiT has no dynamic_img_size: create it with a larger img_size (or call its "
                    "set_input_size before attaching adapters)"
                    if self.kind == "beit"
                    else "Create the backbone with timm.create_model(..., dynamic_img_size=True) to accept any size"
                )
                raise ValueError(
                    f"neck {self.neck!r}: this {type(self.model).__name__} takes a fixed img_size {th}x{tw}, the "
                    f"input is {h}x{w}. {how}, or resize / crop the input to at most {th}x{tw} (smaller inputs are "
                    f"zero-padded)"
                )
        return F.pad(x, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else x

    def embed(self, x: torch.Tensor) -> Embedded:
        """(B, 3, H, W), already padded by :meth:`pad` -> tokens before the first block."""
        m = self.model
        grid = (x.shape[-2] // self.patch[0], x.shape[-1] // self.patch[1])
        t = m.patch_embed(x)
        kwargs: Callable[[int], dict] = lambda i: {}  # noqa: E731
        if self.kind == "vit":
            t = m._pos_embed(t)  # patch dropout (timm's patch_drop) is skipped: a dense map needs every patch
            t = m.norm_pre(t)
        elif self.kind == "eva":
            t, rope = m._pos_embed(t)
            t = m.norm_pre(t)
            if rope is not None:
                mixed = getattr(m, "rope_mixed", False)
                kwargs = (lambda i: {"rope": rope[i]}) if mixed else (lambda i: {"rope": rope})  # noqa: E731
        else:  # beit: fixed grid (relative position biases sized for it)
            t = t.flatten(1, 2) if t.ndim == 4 else t
            t = torch.cat([m.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
            if m.pos_embed is not None:
                t = t + m.pos_embed
            t = m.pos_drop(t)
            bias = m.rel_pos_bias() if m.rel_pos_bias is not None else None
            kwargs = lambda i: {"shared_rel_pos_bias": bias}  # noqa: E731
        if t.ndim == 4:
            t = t.flatten(1, 2)
        if t.shape[1] < grid[0] * grid[1]:
            raise ValueError(
                f"neck {self.neck!r}: {t.shape[1]} tokens after the embedding for a {grid[0]}x{grid[1]} patch grid; "
                f"turn patch dropout off (patch_drop_rate=0)"
            )
        return Embedded(t, grid, kwargs)

    def run(self, emb: Embedded, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` on (B, N, D) tokens (the block modules are called: their hooks run)."""
        for i in range(start, stop):
            tokens = self.model.blocks[i](tokens, **emb.block_kwargs(i))
        return tokens

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.model, "norm", None)
        return tokens if norm is None else norm(tokens)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The LAST h*w tokens of (B, N, D) as a map (B, D, h, w)."""
    h, w = grid
    if tokens.shape[1] < h * w:
        raise ValueError(f"{tokens.shape[1]} tokens cannot hold a {h}x{w} patch grid")
    patches = tokens[:, tokens.shape[1] - h * w :]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def resolve_index(index: int, depth: int, key: str) -> int:
    """A block index (negative counts from the end) checked against the depth."""
    if not -depth <= index < depth:
        raise ValueError(f"{key}={index} is out of range: the ViT has {depth} blocks")
    return index % depth
