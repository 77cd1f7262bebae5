"""AdaptFormer: a parallel bottleneck beside each block's MLP.

Paper: "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition", Chen et al., 2022,
arXiv:2205.13535.

Where it attaches (``placement="residual"``, the default, as in the official code): the adapter reads the
residual stream ``x`` entering the MLP sub-block (before the MLP's LayerNorm) and its output joins the
stream beside the MLP branch, ``x' = x + DropPath(LS(MLP(LN(x)))) + s * up(ReLU(down(x)))``, so it is
neither scaled by the block's LayerScale nor dropped with its DropPath (hooks on the block's ``norm2`` and
``drop_path2``; backbones whose spec defines the ``mlp_residual`` tap: ViT, DeiT, EVA-style timm ViTs,
Swin, SAM's ViT). ``placement="mlp"`` is the earlier variant: a hook on the MLP module adds
``s * up(ReLU(down(y)))`` to its output, where ``y`` is the MLP's own (normalised) input; it also works on
ConvNeXt and with explicit ``targets``.
Initialisation (paper, "LoRA-style"): down Kaiming-uniform, up and biases zero, so the model is
unchanged at init. Defaults: bottleneck 64, scale 0.1 (the paper's setting).
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .._registry import register_method
from ..backbones._spec import BackboneSpec, infer_features
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant
from ._bottleneck import ParallelBranch, TapBranch, bottleneck_params

_PLACEMENTS = ("residual", "mlp")


@dataclasses.dataclass
class AdaptFormerConfig(MethodConfig):
    """Args: bottleneck: hidden width. scale: fixed output scale s. dropout: on the hidden features.
    placement: ``"residual"`` (official: reads the stream before the MLP's norm, joins after DropPath) or
    ``"mlp"`` (reads the MLP's input, adds to its output)."""

    bottleneck: int = 64
    scale: float = 0.1
    dropout: float = 0.0
    placement: str = "residual"

    def validate(self) -> None:
        self._one_of("placement", self.placement, _PLACEMENTS)
        if self.placement == "residual" and self.targets is not None:
            raise ValueError(
                "AdaptFormerConfig: targets need placement='mlp' (the residual placement targets whole blocks; "
                "select them with layers=[...])"
            )


@register_method("adaptformer")
class AdaptFormer(Method):
    config_cls = AdaptFormerConfig
    paper = "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition (arXiv:2205.13535)"
    default_roles = (("mlp",),)
    variants = (
        Variant(
            "adaptformer",
            {"bottleneck": 16, "scale": 0.5},
            lr=1e-2,
            paper={"bottleneck": 64, "scale": 0.1},
            stem="adaptformer-b64",
            gain=(0.025, 0.09),
        ),
        Variant(
            "adaptformer_mlp",
            {"bottleneck": 16, "scale": 0.5, "placement": "mlp"},
            lr=1e-2,
            paper={"bottleneck": 64, "scale": 0.1, "placement": "mlp"},
            stem="adaptformer-mlp-b64",
            gain=(0.015, 0.09),
        ),
    )
    renamed_keys = {
        ".adapter.down.weight": ".adaptformer_down",
        ".adapter.down.bias": ".adaptformer_down_bias",
        ".adapter.up.weight": ".adaptformer_up",
        ".adapter.up.bias": ".adaptformer_up_bias",
    }

    @classmethod
    def upgrade_v1(cls, config: dict, tensors: dict) -> tuple[dict, dict]:
        # format-1 files were written by the only placement of the time, the MLP-input one
        return super().upgrade_v1({"placement": "mlp", **config}, tensors)

    @classmethod
    def default_targets(cls, spec: BackboneSpec, cfg: AdaptFormerConfig) -> list[str] | None:
        if cfg.placement == "residual":
            return ["block"] if spec.has_role("block") and "mlp_residual" in spec.taps else None
        return super().default_targets(spec, cfg)

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: AdaptFormerConfig) -> str | None:
        if cfg.placement == "residual" and cls.default_targets(spec, cfg) is None:
            return (
                f"adaptformer placement='residual' needs blocks with a pre-norm MLP sub-block (the spec's "
                f"'mlp_residual' tap), which {spec.name} does not define; use placement='mlp'"
            )
        return super().unsupported_reason(model, spec, cfg)

    @classmethod
    def make_layer(cls, site: Site, cfg: AdaptFormerConfig) -> AdapterLayer:
        kw = dict(prefix="adaptformer", act=nn.ReLU(), dropout=cfg.dropout, scale=cfg.scale)
        kw.update(hidden=cfg.bottleneck, init_weights=cfg.init_weights)
        if cfg.placement == "residual":
            c = _width(site)
            return TapBranch(site.spec.taps["mlp_residual"], c_in=c, c_out=c, **kw)
        c_in, c_out = infer_features(site.module)
        return ParallelBranch(site.layout, c_in=c_in, c_out=c_out, **kw)

    @classmethod
    def site_params(cls, site: Site, cfg: AdaptFormerConfig) -> int:
        if cfg.placement == "residual":
            return bottleneck_params(_width(site), _width(site), cfg.bottleneck)
        c_in, c_out = infer_features(site.module)
        return bottleneck_params(c_in, c_out, cfg.bottleneck)


def _width(site: Site) -> int:
    """Channels of the residual stream of a block: those of its MLP sub-block's norm."""
    return infer_features(site.module.get_submodule(site.spec.taps["mlp_residual"].source))[0]
