"""The bottleneck ``up(act(down(x)))`` shared by AdaptFormer, the serial and the parallel adapters.

Three ways of attaching it, all built from module hooks:

- :class:`ParallelBranch`: ``out = f(x) + scale * B(x)`` around one module (``x`` its input);
- :class:`SerialBranch`: ``out = h + scale * B(h)`` after one module (``h`` its output);
- :class:`TapBranch`: reads a tensor at one point inside a block (a :class:`~visionpeft.backbones._spec.Tap`)
  and adds ``scale * B(t)`` to the output of another module of the block, after the block's LayerScale
  and DropPath, so the adapter's branch is neither scaled nor dropped with the block's own branch.

Parameters are ``<prefix>_down`` (hidden, C_in), ``<prefix>_down_bias``, ``<prefix>_up`` (C_out, hidden)
and ``<prefix>_up_bias``; ``init_weights=True`` zeroes the up-projection (identity at init).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones._spec import Tap
from ._base import AdapterLayer, TapHooks, first_tensor, lora_init_, random_init_, register


def bottleneck_params(c_in: int, c_out: int, hidden: int) -> int:
    """Parameter count of one bottleneck with biases: ``C_in*h + h + h*C_out + C_out``."""
    return c_in * hidden + hidden + hidden * c_out + c_out


class Bottleneck(AdapterLayer):
    """Down-projection, activation, dropout, up-projection on the channel axis.

    Args:
        prefix: parameter-name prefix (the method's name). c_in, c_out: channels. hidden: bottleneck width.
        act: activation module. dropout: on the hidden features. scale: output scale.
        init_weights: ``True``: down Kaiming-uniform, up and biases zero; ``False``: everything random.
    """

    def __init__(
        self,
        prefix: str,
        c_in: int,
        c_out: int,
        hidden: int,
        act: nn.Module,
        dropout: float,
        scale: float,
        init_weights: bool,
    ) -> None:
        super().__init__()
        self.prefix, self.scale = prefix, scale
        self.act = act
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        down = register(self, f"{prefix}_down", torch.empty(hidden, c_in))
        down_bias = register(self, f"{prefix}_down_bias", torch.zeros(hidden))
        up = register(self, f"{prefix}_up", torch.zeros(c_out, hidden))
        up_bias = register(self, f"{prefix}_up_bias", torch.zeros(c_out))
        with torch.no_grad():
            lora_init_(down)
            if not init_weights:
                for p in (up, up_bias, down_bias):
                    random_init_(p, 0.1)

    def _p(self, part: str) -> nn.Parameter:
        return self._parameters[f"{self.prefix}_{part}"]

    def branch(self, x: torch.Tensor, layout: str) -> torch.Tensor:
        """``scale * up(dropout(act(down(x))))``: (..., C_in) -> (..., C_out); (B, C_in, H, W) -> (B, C_out, H, W)."""
        down, up = self._p("down"), self._p("up")
        x = x.to(down.dtype)
        if layout == "NCHW":
            h = self.dropout(self.act(F.conv2d(x, down[:, :, None, None], self._p("down_bias"))))
            return self.scale * F.conv2d(h, up[:, :, None, None], self._p("up_bias"))
        h = self.dropout(self.act(F.linear(x, down, self._p("down_bias"))))
        return self.scale * F.linear(h, up, self._p("up_bias"))


def match_layout(delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bring an adapter output to the shape of the tensor it is added to: equal shapes pass; channels-last
    (B, H, W, C) becomes (B, C, H, W); token maps (B, L, C) and (B, H, W, C) are reshaped into each other."""
    if delta.shape == like.shape:
        return delta
    if delta.dim() == 4 and like.dim() == 4 and delta.permute(0, 3, 1, 2).shape == like.shape:
        return delta.permute(0, 3, 1, 2)
    if delta.numel() == like.numel() and delta.shape[-1] == like.shape[-1] and delta.shape[0] == like.shape[0]:
        return delta.reshape(like.shape)
    raise RuntimeError(
        f"adapter output {tuple(delta.shape)} cannot be added to the site output {tuple(like.shape)}; "
        f"choose a shape-preserving site"
    )


class ParallelBranch(Bottleneck):
    """``out = f(x) + scale * B(x)`` around one module; ``x`` is the module's input."""

    def __init__(self, layout: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.layout = layout

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """x: (B, N, C) / (B, H, W, C) / (B, C, H, W); output of the same spatial shape."""
        delta = self.branch(first_tensor(args, kwargs), self.layout)
        return output + match_layout(delta, output).to(output.dtype)


class SerialBranch(Bottleneck):
    """``out = h + scale * B(h)``; ``h`` is the module's output."""

    def __init__(self, layout: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.layout = layout

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """output: (B, N, C), (B, H, W, C) or (B, C, H, W)."""
        return output + self.branch(output, self.layout).to(output.dtype)


class TapBranch(TapHooks, Bottleneck):
    """Reads the tensor at ``tap.source`` inside a block and adds ``scale * B(t)`` to ``tap.sink``'s output
    (the site is the block; see :class:`~visionpeft.methods._base.TapHooks`)."""

    def __init__(self, tap: Tap, **kw: Any) -> None:
        super().__init__(**kw)
        self.tap = tap
        self._stash = None

    def contribution(self, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        delta = self.branch(t, self.tap.layout)
        if self.tap.sink_layout == "NCHW" and self.tap.layout != "NCHW" and delta.dim() == 4:
            delta = delta.permute(0, 3, 1, 2)  # channels-last branch onto an NCHW map: never guessed from shapes
        return match_layout(delta, output)
