"""ViT-Adapter as a neck: a spatial prior, injectors and extractors around a plain ViT's blocks.

Paper: "Vision Transformer Adapter for Dense Predictions", Chen et al., ICLR 2023, arXiv:2205.08534.

The neck drives the (frozen or trained, hooked) timm ViT itself: patch embedding and position embedding, then
for each of the interaction groups (default: the blocks split into 4 equal groups): the injector adds
multi-scale deformable attention from the spatial features (c2, c3, c4) into the ViT's patch tokens (the
LAST ``h * w`` tokens: prefix tokens and VPT prompts are left alone), the group's block modules run (so every
adapter hook runs), and the extractor updates the spatial features with deformable attention into the ViT's
patch tokens plus a ConvFFN. Outputs: c1 (the spatial prior's 1/4 map plus a transposed convolution of c2),
c2, c3, c4, each plus the matching interaction's ViT features resized to its size (``add_vit_feature``), then
a norm per level; all ``D`` channels (the ViT's width).

Initialisation: the injector's ``gamma`` is 0 (the ViT's tokens are unchanged at init); deformable attention as
Deformable DETR (:class:`MSDeformAttn`); level embeddings normal (std 0.02). Deviation from the paper: the
output norms and the spatial prior's norms are BatchNorm2d (the paper's SyncBN; convert with
``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP). Paper mode: method "full" + this neck; PEFT mode: any
other method + this neck (the ViT stays frozen, its adapters train with the neck).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._plain_vit import PlainViT, tokens_to_map
from .deform_attn import MSDeformAttn, level_start_index, reference_points
from .features import REDUCTIONS, Neck, crop, unwrap


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """Conv stem: (B, 3, H, W) -> c1..c4 at 1/4, 1/8, 1/16, 1/32, each projected to ``dim`` channels.

    Args:
        channels: stem width (the paper's ``inplanes``, 64); stages use 1x, 2x, 4x, 4x of it.
        dim: output channels (the ViT's width D).
    """

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, c, 2), *_conv_bn_relu(c, c, 1), *_conv_bn_relu(c, c, 1), nn.MaxPool2d(3, 2, 1)
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(c, 2 * c, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * c, 4 * c, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * c, 4 * c, 2))
        self.fc = nn.ModuleList(nn.Conv2d(cin, dim, 1) for cin in (c, 2 * c, 4 * c, 4 * c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> [(B, D, ceil(H / r), ceil(W / r))] for r = 4, 8, 16, 32."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [fc(c) for fc, c in zip(self.fc, (c1, c2, c3, c4), strict=True)]


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise conv on each level's map -> GELU -> Linear, on (B, N, D) spatial tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """x: (B, sum H_l W_l, D), levels concatenated; shapes: (H_l, W_l) -> (B, sum H_l W_l, D)."""
        x = self.fc1(x)
        b, _, c = x.shape
        parts = []
        for part, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes, strict=True):
            m = self.dwconv(part.transpose(1, 2).reshape(b, c, h, w))
            parts.append(m.flatten(2).transpose(1, 2))
        return self.fc2(self.act(torch.cat(parts, dim=1)))


class Injector(nn.Module):
    """ViT patch tokens += gamma * MSDeformAttn(LN(tokens), spatial features c2..c4); gamma starts at 0."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, levels: int = 3) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, levels, heads, points, ratio)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(
        self, query: torch.Tensor, ref: torch.Tensor, feat: torch.Tensor, shapes: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """query: (B, h*w, D); ref: (B, h*w, 1, 2); feat: (B, S, D) -> (B, h*w, D)."""
        attn = self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes, start)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """Spatial tokens c += MSDeformAttn(LN(c), ViT patch tokens); c += ConvFFN(LN(c))."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, cffn_ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, 1, heads, points, ratio)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = ConvFFN(dim, max(1, int(dim * cffn_ratio)))

    def forward(
        self,
        query: torch.Tensor,
        ref: torch.Tensor,
        feat: torch.Tensor,
        shapes: torch.Tensor,
        start: torch.Tensor,
        query_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query: (B, S, D) spatial tokens; ref: (B, S, 1, 2); feat: (B, h*w, D) -> (B, S, D)."""
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes, start)
        return query + self.ffn(self.ffn_norm(query), query_shapes)


def default_groups(depth: int, n: int = 4) -> list[list[int]]:
    """``[start, end]`` (inclusive) of ``n`` near-equal contiguous block groups (the larger groups first)."""
    if depth < n:
        raise ValueError(f"vit_adapter: a ViT of {depth} blocks cannot be split into {n} interaction groups")
    sizes = [depth // n + (1 if i < depth % n else 0) for i in range(n)]
    out, s = [], 0
    for size in sizes:
        out.append([s, s + size - 1])
        s += size
    return out


class ViTAdapterNeck(Neck):
    """ViT-Adapter around a plain timm ViT (VisionTransformer / DeiT, EVA, BEiT).

    Args:
        backbone: the timm ViT (or a ``PeftVisionModel`` around one).
        interaction_indexes: ``[[start, end], ...]`` inclusive block ranges, contiguous from block 0 to the last
            (``None``: 4 equal groups).
        n_heads: deformable-attention heads (``None``: the ViT's heads).
        n_points: sampled points per head and level.
        deform_ratio: value-projection width relative to D.
        cffn_ratio: ConvFFN hidden width relative to D.
        conv_inplane: the spatial prior module's stem width.
        add_vit_feature: add each interaction's ViT features (resized) to c1..c4.
        extra_extractor: two more extractors after the last interaction (as the paper).
    """

    def __init__(
        self,
        backbone: nn.Module,
        interaction_indexes: list[list[int]] | None = None,
        n_heads: int | None = None,
        n_points: int = 4,
        deform_ratio: float = 1.0,
        cffn_ratio: float = 0.25,
        conv_inplane: int = 64,
        add_vit_feature: bool = True,
        extra_extractor: bool = True,
    ) -> None:
        super().__init__()
        vit = PlainViT(unwrap(backbone), "vit_adapter")
        dim = vit.dim
        groups = default_groups(vit.depth) if interaction_indexes is None else [list(g) for g in interaction_indexes]
        self._check_groups(groups, vit.depth)
        if add_vit_feature and len(groups) != 4:
            raise ValueError(
                f"vit_adapter: add_vit_feature=True adds one interaction's ViT features to each of c1..c4, so "
                f"interaction_indexes needs 4 groups; got {len(groups)}"
            )
        for key, val in (("n_points", n_points), ("conv_inplane", conv_inplane)):
            if int(val) < 1:
                raise ValueError(f"vit_adapter: {key} must be a positive integer, got {val}")
        for key, val in (("deform_ratio", deform_ratio), ("cffn_ratio", cffn_ratio)):
            if not float(val) > 0:
                raise ValueError(f"vit_adapter: {key} must be positive, got {val}")
        heads = int(n_heads) if n_heads is not None else (vit.num_heads or 6)
        if int(dim * deform_ratio) % heads:
            raise ValueError(
                f"vit_adapter: n_heads={heads} must divide the value width int(D * deform_ratio) = "
                f"{int(dim * deform_ratio)} (D = {dim})"
            )
        self.groups = groups
        self.add_vit_feature = bool(add_vit_feature)
        self.spm = SpatialPriorModule(int(conv_inplane), dim)
        self.level_embed = nn.Parameter(torch.empty(3, dim).normal_(std=0.02))
        self.injectors = nn.ModuleList(Injector(dim, heads, n_points, deform_ratio) for _ in groups)
        self.extractors = nn.ModuleList(Extractor(dim, heads, n_points, deform_ratio, cffn_ratio) for _ in groups)
        n_extra = 2 if extra_extractor else 0
        self.extra_extractors = nn.ModuleList(
            Extractor(dim, heads, n_points, deform_ratio, cffn_ratio) for _ in range(n_extra)
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in REDUCTIONS)
        self.feature_info = [{"num_chs": dim, "reduction": r} for r in REDUCTIONS]

    @staticmethod
    def _check_groups(groups: list[list[int]], depth: int) -> None:
        ok = bool(groups) and all(len(g) == 2 and g[0] <= g[1] for g in groups)
        ok = ok and groups[0][0] == 0 and groups[-1][1] == depth - 1
        ok = ok and all(b[0] == a[1] + 1 for a, b in zip(groups, groups[1:], strict=False))
        if not ok:
            raise ValueError(
                f"vit_adapter: interaction_indexes={groups} must be [start, end] block ranges, contiguous from block "
                f"0 to block {depth - 1}, e.g. {default_groups(depth) if depth >= 4 else [[0, depth - 1]]}"
            )

    def interact(
        self, backbone: nn.Module, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, tuple[int, int]]:
        """Run the ViT with the interactions on a padded input.

        Args:
            backbone: the timm ViT (or a ``PeftVisionModel``).
            x: (B, 3, H, W).

        Returns:
            ``(c, vit_maps, tokens, grid)``: c1..c4 before the ViT features and norms, (B, D, h_r, w_r) of the
            padded input; each interaction's ViT patch map (B, D, h, w); the last block's tokens (B, N, D)
            (before the model's final norm); the patch grid (h, w).
        """
        vit = PlainViT(unwrap(backbone), "vit_adapter")
        xp = vit.pad(x)
        c1, c2, c3, c4 = self.spm(xp)
        shapes_c = [tuple(c.shape[-2:]) for c in (c2, c3, c4)]
        c = torch.cat(
            [(m.flatten(2).transpose(1, 2) + self.level_embed[i]) for i, m in enumerate((c2, c3, c4))], dim=1
        )  # (B, S, D)
        emb = vit.embed(xp)
        grid = emb.grid
        b, dev, dt = x.shape[0], x.device, c.dtype
        hw = grid[0] * grid[1]
        # injector: queries the ViT grid, values c2..c4; extractor: queries c2..c4, values the ViT grid
        inj_shapes = torch.as_tensor(shapes_c, dtype=torch.long, device=dev)
        inj_start = level_start_index(shapes_c, dev)
        inj_ref = reference_points([grid], dev, dt)[None, :, None].expand(b, -1, -1, -1)
        ext_shapes = torch.as_tensor([grid], dtype=torch.long, device=dev)
        ext_start = level_start_index([grid], dev)
        ext_ref = reference_points(shapes_c, dev, dt)[None, :, None].expand(b, -1, -1, -1)

        tokens = emb.tokens
        vit_maps = []
        for (start, end), inj, ext in zip(self.groups, self.injectors, self.extractors, strict=True):
            patches = inj(tokens[:, -hw:], inj_ref, c, inj_shapes, inj_start)
            tokens = torch.cat([tokens[:, :-hw], patches], dim=1)
            tokens = vit.run(emb, tokens, start, end + 1)
            patches = tokens[:, -hw:]
            c = ext(c, ext_ref, patches, ext_shapes, ext_start, shapes_c)
            vit_maps.append(tokens_to_map(tokens, grid))
        for ext in self.extra_extractors:
            c = ext(c, ext_ref, tokens[:, -hw:], ext_shapes, ext_start, shapes_c)
        parts = c.split([h * w for h, w in shapes_c], dim=1)
        c2, c3, c4 = (p.transpose(1, 2).reshape(b, -1, h, w) for p, (h, w) in zip(parts, shapes_c, strict=True))
        up = self.up(c2)
        c1 = c1 + up[..., : c1.shape[-2], : c1.shape[-1]]
        return [c1, c2, c3, c4], vit_maps, tokens, grid

    def forward(self, backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> 4 maps (B, D, ceil(H / r), ceil(W / r)), r = 4, 8, 16, 32."""
        h, w = x.shape[-2:]
        cs, vit_maps, _, _ = self.interact(backbone, x)
        if self.add_vit_feature:
            cs = [
                c + F.interpolate(v, size=c.shape[-2:], mode="bilinear", align_corners=False)
                for c, v in zip(cs, vit_maps, strict=True)
            ]
        return crop([norm(c) for norm, c in zip(self.norms, cs, strict=True)], (h, w), self.reductions)
