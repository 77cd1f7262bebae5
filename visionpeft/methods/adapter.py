"""Serial bottleneck adapters (Houlsby and Pfeiffer placements).

Papers: "Parameter-Efficient Transfer Learning for NLP", Houlsby et al., 2019, arXiv:1902.00751
(adapters after the attention projection and after the MLP); "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning", Pfeiffer et al., 2021, arXiv:2005.00247 (after the MLP only).

Where it attaches: the adapter reads a branch's output ``h`` (the attention output after its projection,
or the MLP output) and turns the branch into ``h + s * up(GELU(down(h)))`` before the residual addition.
Its own term joins the residual stream after the block's LayerScale and DropPath (hooks on the modules
around them: ``ls1`` / ``drop_path1`` on timm ViTs, ``mlp`` / ``drop_path`` on ConvNeXt), so it is
neither scaled nor dropped with the block's branch, as in the authors' models (which have no
LayerScale). With explicit ``targets`` the adapter wraps each matched module's output instead.
Initialisation: down Kaiming-uniform, up zero, so each adapter starts as the identity (Houlsby et al.
use a near-identity initialisation for the same reason).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import BackboneSpec, infer_features
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant
from ._bottleneck import SerialBranch, TapBranch, bottleneck_params

_PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclasses.dataclass
class AdapterConfig(MethodConfig):
    """Args: bottleneck: hidden width. placement: ``"houlsby"`` (after attention and MLP) or
    ``"pfeiffer"`` (after the MLP); ignored when ``targets`` is given. scale: output scale. dropout: on
    the hidden features."""

    bottleneck: int = 64
    placement: str = "houlsby"
    scale: float = 1.0
    dropout: float = 0.0

    def validate(self) -> None:
        self._one_of("placement", self.placement, tuple(_PLACEMENTS))


@register_method("adapter")
class Adapter(Method):
    config_cls = AdapterConfig
    paper = "Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751); AdapterFusion (arXiv:2005.00247)"
    default_roles = (("block",),)
    variants = (
        Variant(
            "adapter_houlsby",
            {"bottleneck": 16, "placement": "houlsby"},
            paper={"bottleneck": 8, "placement": "houlsby"},
            stem="adapter-houlsby-b8",
            gain=(0.015, 0.07),
        ),
        Variant(
            "adapter_pfeiffer",
            {"bottleneck": 16, "placement": "pfeiffer"},
            paper={"bottleneck": 8, "placement": "pfeiffer"},
            stem="adapter-pfeiffer-b8",
            gain=(0.005, 0.02),
        ),
    )
    renamed_keys = {
        ".adapter.down.weight": ".adapter_down",
        ".adapter.down.bias": ".adapter_down_bias",
        ".adapter.up.weight": ".adapter_up",
        ".adapter.up.bias": ".adapter_up_bias",
    }

    @classmethod
    def upgrade_v1(cls, config: dict, tensors: dict) -> tuple[dict, dict]:
        # format-1 adapters wrapped the attention / MLP modules' outputs: the explicit-targets form today
        if config.get("targets") is None:
            config = {**config, "targets": list(_PLACEMENTS[config.get("placement", "houlsby")])}
        return super().upgrade_v1(config, tensors)

    @classmethod
    def _branches(cls, spec: BackboneSpec, cfg: AdapterConfig) -> list[str]:
        return [b for b in _PLACEMENTS[cfg.placement] if b in spec.taps]

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: AdapterConfig) -> str | None:
        if cfg.targets is None and (not spec.has_role("block") or not cls._branches(spec, cfg)):
            return (
                f"adapter placement={cfg.placement!r} needs blocks with attention / MLP branches, which the "
                f"{spec.name} spec does not define; pass targets=[module names] to wrap their outputs"
            )
        return None

    @classmethod
    def build(cls, model: nn.Module, spec: BackboneSpec, cfg: AdapterConfig) -> list[tuple[str, AdapterLayer]]:
        if cfg.targets is not None:
            return super().build(model, spec, cfg)
        out: list[tuple[str, AdapterLayer]] = []
        for site in cls.sites(model, spec, cfg):
            branches = {}
            for b in cls._branches(spec, cfg):
                c = _tap_width(site, b)
                branches[b] = TapBranch(spec.taps[b], c_in=c, c_out=c, **cls._kw(cfg))
            out.append((site.name, BlockBranches(branches)))
        return out

    @classmethod
    def _kw(cls, cfg: AdapterConfig) -> dict:
        return dict(
            prefix="adapter",
            hidden=cfg.bottleneck,
            act=nn.GELU(),
            dropout=cfg.dropout,
            scale=cfg.scale,
            init_weights=cfg.init_weights,
        )

    @classmethod
    def make_layer(cls, site: Site, cfg: AdapterConfig) -> AdapterLayer:
        c = infer_features(site.module)[1]
        return SerialBranch(site.layout, c_in=c, c_out=c, **cls._kw(cfg))

    @classmethod
    def site_params(cls, site: Site, cfg: AdapterConfig) -> int:
        if cfg.targets is not None:
            c = infer_features(site.module)[1]
            return bottleneck_params(c, c, cfg.bottleneck)
        return sum(
            bottleneck_params(_tap_width(site, b), _tap_width(site, b), cfg.bottleneck)
            for b in cls._branches(site.spec, cfg)
        )


def _tap_width(site: Site, branch: str) -> int:
    """Channels of a block's attention or MLP branch output (its module's output features)."""
    name = branch if hasattr(site.module, branch) else site.spec.taps[branch].source  # MetaFormer: token_mixer
    try:
        return infer_features(site.module.get_submodule(name))[1]
    except ValueError:  # a tap at a parameter-free module (torchvision ViT's dropout): the block's own width
        return infer_features(site.module)[1]


class BlockBranches(AdapterLayer):
    """The adapters of one block, one per branch (``attn`` and / or ``mlp``), switched together."""

    def __init__(self, branches: dict[str, TapBranch]) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(branches)

    def attach(self, target: nn.Module) -> list:
        return [h for b in self.branches.values() for h in b.attach(target)]

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "active" and "branches" in self._modules:
            for b in self.branches.values():
                b.active = value
