"""VPT: visual prompt tuning, shallow and deep.

Paper: "Visual Prompt Tuning", Jia et al., 2022, arXiv:2203.12119.

Where it attaches: forward pre-hooks on the transformer blocks. Shallow: before the first block,
``num_tokens`` learnable prompt tokens are inserted after the class / register tokens. Deep: before
every selected block the prompt positions are filled with that block's own prompts (the previous
block's outputs at those positions are discarded). A forward hook on the last block strips the
prompts, so the final norm, pooling and head see the original token layout. Initialisation (paper):
uniform in ``[-v, v]`` with ``v = sqrt(6 / (3 * patch_h * patch_w + C))`` (Xavier over the patch
embedding's fan-in); the model output changes at init, as in the paper.

Only backbones whose blocks see a flat token sequence (B, N, C) are supported; Swin and SAM blocks see
(B, H, W, C) maps partitioned into windows, where appended tokens have no window to join.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

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
        if spec.num_prefix_tokens is None or not spec.has_role("block"):
            return (
                f"vpt needs a backbone whose blocks see a token sequence (B, N, C); {spec.name} blocks "
                f"see {spec.layouts.get('block', spec.default_layout)} maps (windowed for Swin / SAM), where "
                f"prompt tokens have no place, so VPT (shallow or deep) is not supported on it"
            )
        refusal = spec.prompt_refusal(model) if spec.prompt_refusal is not None and model is not None else None
        if refusal:
            return f"vpt is not supported on this {spec.name} model: {refusal}"
        return None

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
        dim = cls._dim(model)
        p = spec.patch_size(model) if spec.patch_size else 16
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
        the first of them when shallow."""
        if not sites:
            return 0
        dim = infer_features(sites[0].module)[0]
        return cfg.num_tokens * dim * (len(sites) if cfg.deep else 1)
