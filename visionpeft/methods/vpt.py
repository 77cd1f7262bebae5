"""VPT: visual prompt tuning, shallow and deep.

Paper: "Visual Prompt Tuning", Jia et al., 2022, arXiv:2203.12119.

Where it attaches: forward pre-hooks on the transformer blocks. Shallow: before the first block,
``num_tokens`` learnable prompt tokens are inserted after the class / register tokens. Deep: before
every selected block the prompt positions are filled with that block's own prompts (the previous
block's outputs at those positions are discarded). A forward hook on the last block strips the
prompts, so the final norm, pooling and head see the original token layout. Initialisation (paper):
uniform in ``[-v, v]`` with ``v = sqrt(6 / (3 * patch_h * patch_w + C))`` (Xavier over the patch
embedding's fan-in); the model output changes at init, as in the paper.

Swin and SwinV2 (timm): the paper's Swin variant. The blocks see (B, H, W, C) maps partitioned into
windows, so the prompts join every window's attention instead: a :class:`WindowPromptLayer` on each
prompted block's window attention (``layers.i.blocks.j.attn``) appends that block's ``num_tokens``
prompts (P, C) to every window, (nW*B, N, C) -> (nW*B, N + P, C), for the duration of the attention
only. Prompts see and are seen by every token of the window: the shift mask is padded with zeros, and
the relative position bias is zero in the prompt rows and columns (SwinV2: its continuous bias's
middle value, 16 * sigmoid(0) = 8; see :meth:`WindowPromptLayer._bias_shadows`). The module's bias is
shadowed for the call by an instance attribute (as LoRA's hosted weights are) and withdrawn after it,
also when the forward raises. The prompt outputs are dropped after the attention, so the block's token layout is
unchanged. Deep: every selected block's attention gets its own prompts; shallow: the first selected
block's only. SAM's windowed blocks and other maps stay unsupported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import BackboneSpec, infer_features
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant


@dataclasses.dataclass
class VPTConfig(MethodConfig):
    """Args: num_tokens: prompts per block. deep: prompts before every selected block (else only the
    first). dropout: dropout on the prompts. ``layers`` selects the blocks that get prompts."""

    num_tokens: int = 10
    deep: bool = False
    dropout: float = 0.0

    def validate(self) -> None:
        if self.targets is not None:
            raise ValueError(
                "VPTConfig: vpt places prompts before blocks; select blocks with layers=[...], not targets"
            )


class VPTLayer(AdapterLayer):
    """Prompt insertion / replacement before one block and / or stripping after it."""

    uses_before = True

    def __init__(
        self, prefix: int, num_tokens: int, dim: int, mode: str | None, strip: bool, init_val: float, dropout: float
    ) -> None:
        super().__init__()
        self.prefix, self.num_tokens, self.mode, self.strip = prefix, num_tokens, mode, strip
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if mode is not None:
            self.vpt_prompts = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-init_val, init_val))

    def no_weight_decay(self) -> set[str]:
        return {"vpt_prompts"}

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """x: (B, N, C) -> (B, N + num_tokens, C) (insert) or same shape (replace)."""
        if self.mode is None:
            return None
        x = args[0]
        p = self.dropout(self.vpt_prompts).to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        head, k = x[:, : self.prefix], self.prefix
        tail = x[:, k:] if self.mode == "insert" else x[:, k + self.num_tokens :]
        return (torch.cat([head, p, tail], dim=1), *args[1:]), kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """(B, N + num_tokens, C) -> (B, N, C) after the last block."""
        if not self.strip:
            return None
        k = self.prefix
        return torch.cat([output[:, :k], output[:, k + self.num_tokens :]], dim=1)


def window_attention_kind(module: nn.Module) -> str | None:
    """``"v1"`` for timm Swin's ``WindowAttention``, ``"v2"`` for SwinV2's, else ``None``."""
    from timm.models import swin_transformer, swin_transformer_v2

    if isinstance(module, swin_transformer.WindowAttention):
        return "v1"
    if isinstance(module, swin_transformer_v2.WindowAttention):
        return "v2"
    return None


_ABSENT = object()


class WindowPromptLayer(AdapterLayer):
    """``num_tokens`` prompts joined to every window of one Swin / SwinV2 window attention, for that call.

    Pre-hook: x (nW*B, N, C) -> (nW*B, N + P, C) (prompts appended after the window's tokens), the shift
    mask (nW, N, N) -> (nW, N + P, N + P) padded with zeros, and the relative position bias shadowed by one
    zero-padded to (nH, N + P, N + P). Post-hook (always called): the shadow withdrawn, the output cut back
    to (nW*B, N, C).
    """

    uses_before = True

    def __init__(self, num_tokens: int, dim: int, kind: str, init_val: float, dropout: float) -> None:
        super().__init__()
        self.num_tokens, self.kind = num_tokens, kind
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vpt_prompts = nn.Parameter(torch.empty(num_tokens, dim).uniform_(-init_val, init_val))
        self._call: tuple[int, dict[str, Any]] | None = None  # the forward in flight: (N, shadowed attributes)

    def no_weight_decay(self) -> set[str]:
        return {"vpt_prompts"}

    def attach(self, target: nn.Module) -> list[Any]:
        return [
            target.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            target.register_forward_hook(self._finish, with_kwargs=True, always_call=True),
        ]

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """x: (nW*B, N, C) -> (nW*B, N + P, C); mask: (nW, N, N) -> (nW, N + P, N + P)."""
        args, kwargs = list(args), dict(kwargs)
        x = args[0] if args else kwargs["x"]
        b, n, _ = x.shape
        k = self.num_tokens
        p = self.dropout(self.vpt_prompts).to(x.dtype).unsqueeze(0).expand(b, -1, -1)
        x = torch.cat([x, p], dim=1)
        if args:
            args[0] = x
        else:
            kwargs["x"] = x
        if len(args) > 1 and args[1] is not None:
            args[1] = F.pad(args[1], (0, k, 0, k))
        elif kwargs.get("mask") is not None:
            kwargs["mask"] = F.pad(kwargs["mask"], (0, k, 0, k))
        shadows = self._bias_shadows(module, n)
        self._call = (n, {name: module.__dict__.get(name, _ABSENT) for name in shadows})
        module.__dict__.update(shadows)  # instance attributes come before parameters, buffers and methods
        return tuple(args), kwargs

    def _bias_shadows(self, module: nn.Module, n: int) -> dict[str, Any]:
        """The attributes that make the module's forward read a relative position bias zero-padded to N + P."""
        k = self.num_tokens
        if self.kind == "v1":  # the forward adds self._get_rel_pos_bias(): (1, nH, N, N)
            orig = module._get_rel_pos_bias
            return {"_get_rel_pos_bias": lambda: F.pad(orig(), (0, k, 0, k))}
        # v2: 16 * sigmoid(cpb_mlp(relative_coords_table).view(-1, nH)[relative_position_index]) viewed as
        # (window_size[0] * window_size[1])^2. The prompt pairs read one extra table row of zeros: a bias of
        # 16 * sigmoid(0) = 8, the middle of the bias's range (0, 16), as v1's zero is the middle of its; a
        # bias of 0 would put the prompts ~8 logits below the window's tokens, where they barely act
        heads, mlp = module.num_heads, module.cpb_mlp
        rows = module.relative_coords_table.shape[1] * module.relative_coords_table.shape[2]
        index = F.pad(module.relative_position_index, (0, k, 0, k), value=rows)

        def cpb(table: torch.Tensor) -> torch.Tensor:
            out = mlp(table).view(-1, heads)
            return torch.cat([out, out.new_zeros((1, heads))])

        return {"cpb_mlp": cpb, "relative_position_index": index, "window_size": (n + k, 1)}

    def _finish(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Withdraw the shadows (also when the forward raised: ``output`` is then ``None``); (nW*B, N + P, C)
        -> (nW*B, N, C)."""
        call, self._call = self._call, None
        if call is None:
            return None
        n, saved = call
        for name, value in saved.items():
            if value is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        return None if output is None else output[:, :n]


@register_method("vpt")
class VPT(Method):
    config_cls = VPTConfig
    paper = "Visual Prompt Tuning (arXiv:2203.12119)"
    identity_at_init = False
    default_roles = (("block",),)
    variants = (
        Variant(
            "vpt_shallow",
            {"num_tokens": 4},
            lr=1e-1,
            paper={"num_tokens": 10, "dropout": 0.1},
            stem="vpt-shallow-t10",
            gain=(None, 0.005),
            why="four prompts barely move the class token's prediction under a frozen probe head (-0.1 to +1.5%)",
        ),
        Variant(
            "vpt_deep",
            {"num_tokens": 4, "deep": True},
            lr=5e-2,
            paper={"num_tokens": 10, "deep": True, "dropout": 0.1},
            stem="vpt-deep-t10",
            gain=(None, 0.01),
            why="the prompts barely move the prediction under a frozen probe head (+0.5 to +2.5%)",
        ),
    )

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: VPTConfig) -> str | None:
        if spec.num_prefix_tokens is None and model is not None and cls._window_attentions(model, spec):
            return None  # Swin / SwinV2: prompts join each window's attention
        if spec.num_prefix_tokens is None or not spec.has_role("block"):
            return (
                f"vpt needs a backbone whose blocks see a token sequence (B, N, C), or timm Swin / SwinV2 "
                f"window attention (prompts joined to every window); {spec.name} blocks see "
                f"{spec.layouts.get('block', spec.default_layout)} maps without either, so VPT (shallow or "
                f"deep) is not supported on it"
            )
        refusal = spec.prompt_refusal(model) if spec.prompt_refusal is not None and model is not None else None
        if refusal:
            return f"vpt is not supported on this {spec.name} model: {refusal}"
        return None

    @staticmethod
    def _window_attentions(model: nn.Module, spec: BackboneSpec) -> list[tuple[str, nn.Module, str]]:
        """``(name, module, kind)`` of every block's window attention (``<block>.attn``), or ``[]`` unless
        every block has a timm Swin / SwinV2 one."""
        if not spec.has_role("block"):
            return []
        modules = dict(model.named_modules())
        out = []
        for block in spec.blocks(model):
            attn = modules.get(f"{block}.attn")
            kind = window_attention_kind(attn) if attn is not None else None
            if kind is None:
                return []
            out.append((f"{block}.attn", attn, kind))
        return out

    @staticmethod
    def _dim(model: nn.Module) -> int:
        return int(getattr(model, "embed_dim", 0) or getattr(model, "num_features", 0) or model.hidden_dim)

    @classmethod
    def build(cls, model: nn.Module, spec: BackboneSpec, cfg: VPTConfig) -> list[tuple[str, AdapterLayer]]:
        blocks = spec.blocks(model)
        chosen = sorted(set(cfg.layers)) if cfg.layers is not None else list(range(len(blocks)))
        bad = [i for i in chosen if not 0 <= i < len(blocks)]
        if bad or not chosen:
            raise ValueError(f"vpt layers {cfg.layers} out of range: the backbone has {len(blocks)} blocks")
        if not cfg.deep:
            chosen = chosen[:1]
        p = spec.patch_size(model) if spec.patch_size else 16
        if spec.num_prefix_tokens is None:  # Swin / SwinV2: each chosen block's window attention, at its width
            windows = cls._window_attentions(model, spec)
            out = []
            for i in chosen:
                name, attn, kind = windows[i]
                init_val = math.sqrt(6.0 / float(3 * p * p + attn.dim))
                out.append((name, WindowPromptLayer(cfg.num_tokens, attn.dim, kind, init_val, cfg.dropout)))
            return out
        dim = cls._dim(model)
        init_val = math.sqrt(6.0 / float(3 * p * p + dim))
        prefix = spec.num_prefix_tokens(model)
        last = len(blocks) - 1
        out = []
        for i, name in enumerate(blocks):
            if i < chosen[0]:
                continue
            mode = "insert" if i == chosen[0] else ("replace" if i in chosen else None)
            if mode is None and i != last:
                continue
            out.append((name, VPTLayer(prefix, cfg.num_tokens, dim, mode, i == last, init_val, cfg.dropout)))
        return out

    @classmethod
    def param_count(cls, model: nn.Module, sites: list[Site], cfg: VPTConfig) -> int:
        """``num_tokens * C`` prompts before each prompted block: the selected blocks (sites) when deep,
        the first of them when shallow; C is the block's width (per stage on Swin / SwinV2)."""
        if not sites:
            return 0
        if sites[0].spec.num_prefix_tokens is None:  # windowed: the width of each block's window attention
            prompted = sites if cfg.deep else sites[:1]
            return sum(cfg.num_tokens * s.module.attn.dim for s in prompted)
        dim = infer_features(sites[0].module)[0]
        return cfg.num_tokens * dim * (len(sites) if cfg.deep else 1)
