"""Multi-scale deformable attention in pure PyTorch (``F.grid_sample``): nothing to compile.

Paper: "Deformable DETR: Deformable Transformers for End-to-End Object Detection", Zhu et al., 2021,
arXiv:2010.04159; used by ViT-Adapter's injectors and extractors (arXiv:2205.08534).

Each query attends to ``n_points`` sampled locations per head and per level of a multi-scale value map. A
location ``(x, y)`` in ``[0, 1]`` is the point ``(x * W, y * H)`` of a level in pixel units whose pixel centres
sit at ``i + 0.5``; it is read by bilinear interpolation with zeros outside the map (``grid_sample`` with
``align_corners=False``, ``padding_mode="zeros"`` at grid ``2 * loc - 1``). :func:`ms_deform_attn` is the
reference every faster kernel (the kernels issue's Triton one) must equal, behind the same signature.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _shapes(spatial_shapes: torch.Tensor | list | tuple) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of a multi-scale value map.

    Args:
        value: (B, S, heads, Dh), the levels' maps flattened row-major and concatenated, S = sum(H_l * W_l).
        spatial_shapes: (L, 2) long, (H_l, W_l) of each level.
        level_start_index: (L,) long, offset of each level in S (``cumsum`` of ``H * W``, starting at 0).
        sampling_locations: (B, Q, heads, L, P, 2) in [0, 1], ``(x, y)``; outside [0, 1] reads zeros.
        attention_weights: (B, Q, heads, L, P), usually a softmax over L * P.

    Returns:
        (B, Q, heads * Dh): per head, ``sum_{l, p} w[l, p] * bilinear(value_l, loc[l, p])``.
    """
    b, s, heads, dh = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    shapes = _shapes(spatial_shapes)
    if len(shapes) != levels:
        raise ValueError(f"ms_deform_attn: {len(shapes)} spatial shapes for {levels} levels of sampling locations")
    if sum(h * w for h, w in shapes) != s:
        raise ValueError(
            f"ms_deform_attn: value has {s} positions, the spatial shapes {shapes} hold "
            f"{sum(h * w for h, w in shapes)}"
        )
    starts = [
        int(i)
        for i in (level_start_index.tolist() if isinstance(level_start_index, torch.Tensor) else level_start_index)
    ]
    grids = 2 * sampling_locations - 1  # (B, Q, heads, L, P, 2)
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl] : starts[lvl] + h * w]  # (B, HW, heads, Dh)
        v = v.permute(0, 2, 3, 1).reshape(b * heads, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, q, points, 2)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*h, Dh, Q, P)
    sampled = torch.stack(samples, dim=-2).flatten(-2)  # (B*heads, Dh, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (sampled * weights).sum(-1).view(b, heads * dh, q)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR's, without the padding mask).

    Initialisation (Deformable DETR): the sampling-offset Linear has zero weight and a bias that places head
    ``m``'s point ``k`` at ``(k + 1)`` pixels along direction ``2 pi m / heads`` (scaled so the larger of
    ``|cos|, |sin|`` is 1), on every level; the attention-weight Linear is zero (uniform weights); the value
    and output projections are Xavier-uniform with zero bias.

    Args:
        d_model: query / input width C.
        n_levels: number of value levels L.
        n_heads: attention heads; ``int(d_model * ratio)`` must be divisible by it.
        n_points: sampled points per head and level P.
        ratio: width of the value projection relative to ``d_model`` (ViT-Adapter's ``deform_ratio``).
    """

    def __init__(
        self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0
    ) -> None:
        super().__init__()
        inner = int(d_model * ratio)
        if n_heads < 1 or inner % n_heads:
            raise ValueError(
                f"MSDeformAttn: the value width int(d_model * ratio) = {inner} must be divisible by n_heads={n_heads}"
            )
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, inner)
        self.output_proj = nn.Linear(inner, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # (heads, 2)
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        bias = direction.view(self.n_heads, 1, 1, 2) * steps  # (heads, 1, P, 2)
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1).to(self.sampling_offsets.bias.dtype))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """Attend from each query to points around its reference point on every level.

        Args:
            query: (B, Q, C).
            reference_points: (B, Q, L, 2) (or (B, Q, 1, 2), broadcast over levels) in [0, 1], ``(x, y)``.
            value_input: (B, S, C), the L levels flattened and concatenated.
            spatial_shapes: (L, 2) long (H, W).
            level_start_index: (L,) long.

        Returns:
            (B, Q, C).
        """
        b, q, _ = query.shape
        s = value_input.shape[1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_input).view(b, s, heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, heads, levels, points, 2)
        weights = self.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
        weights = weights.view(b, q, heads, levels, points)
        shapes = torch.as_tensor(_shapes(spatial_shapes), dtype=query.dtype, device=query.device)  # (L, 2) (H, W)
        normalizer = shapes.flip(-1)  # (W, H): an offset of one pixel of that level
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)


def reference_points(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Pixel centres of each level's grid in [0, 1], ``(x, y)``, levels concatenated row-major: (sum HW, 2)."""
    out = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    return torch.cat(out, 0)


def level_start_index(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L,) long: where each level starts in the flattened sequence."""
    sizes = torch.as_tensor([h * w for h, w in shapes], dtype=torch.long, device=device)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
