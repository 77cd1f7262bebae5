"""VeRA: vector-based random matrix adaptation.

Paper: "VeRA: Vector-based Random Matrix Adaptation", Kopiczko et al., ICLR 2024, arXiv:2310.11454.

Where it attaches: the same Linear sites as LoRA (``qkv`` by default, else the MLP's Linears; any subset of
q, k, v of a fused ``qkv`` with ``qkv_slices``, each slice adapted as its own matrix). A forward hook adds
``Lambda_b B Lambda_d A x`` to the output: ``A`` (r, C_in) and ``B`` (C_out, r) are frozen random matrices
shared by every layer of the adapter (one pair, sized for the largest input and output width among the sites;
each layer uses its top-left ``C_out x r`` / ``r x C_in`` block), and only the vectors ``d`` (r,) and ``b``
(C_out,) train, so a layer costs ``r + C_out`` parameters (24,576 for r=256 on q and v of ViT-B/16: the
paper's 24.6K). ``A`` and ``B`` are not saved: they are regenerated from ``projection_seed`` (kept in the
adapter file's config) with a CPU generator, Kaiming-uniform (He, ``a = 0``), ``A`` drawn first, as
huggingface peft does, so the same seed gives the same matrices there. They live in one module held by every
layer (non-persistent buffers): one tensor each, moved and cast once.
Initialisation (paper): ``b = 0``, ``d = d_initial`` (0.1), so the model is unchanged at init. Merge adds
``(b * B) @ (d * A)`` to the weight; it is exact in eval mode (the input dropout has no weight form).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._registry import register_method
from ..backbones._spec import BackboneSpec
from ..config import MethodConfig
from ._base import AdapterLayer, Method, Site, Variant, first_tensor, register
from .ia3 import hosted_qkv_reason, is_fused_qkv
from .lora import _QKV, qkv_slices_of


@dataclasses.dataclass
class VeRAConfig(MethodConfig):
    """VeRA hyper-parameters.

    Args:
        rank: rows of the shared random A (columns of B); VeRA's parameters grow with it only by ``r`` per layer.
        d_initial: initial value of every entry of the trained vector ``d``.
        dropout: dropout on the input of the VeRA path.
        qkv_slices: on fused ``qkv`` Linears, the slices to adapt, e.g. ``"qv"`` (the paper's setting);
            ``None`` = the whole layer.
        projection_seed: seed of the generator of the shared frozen A and B (saved in the adapter's config).
    """

    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    qkv_slices: str | None = None
    projection_seed: int = 0

    def validate(self) -> None:
        if self.qkv_slices is not None:
            s = self.qkv_slices.lower()
            if not s or any(c not in _QKV for c in s) or len(set(s)) != len(s):
                raise ValueError(
                    f"VeRAConfig.qkv_slices must be a non-empty subset of 'qkv' such as 'qv', got {self.qkv_slices!r}"
                )
            self.qkv_slices = "".join(sorted(set(s), key=_QKV.get))
        if not isinstance(self.projection_seed, int) or isinstance(self.projection_seed, bool):
            raise ValueError(f"VeRAConfig.projection_seed must be an integer, got {self.projection_seed!r}")


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming (He) uniform, ``a = 0``: bound ``sqrt(6 / fan_in)`` (torch's default), drawn from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random matrices shared by all layers of one VeRA adapter (non-persistent buffers).

    Args:
        rank: r. in_features / out_features: the largest input / output width among the sites. seed: the
        generator's seed.
    """

    def __init__(self, rank: int, in_features: int, out_features: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", _kaiming_uniform((rank, in_features), g), persistent=False)
        self.register_buffer("vera_B", _kaiming_uniform((out_features, rank), g), persistent=False)


class VeRALinear(AdapterLayer):
    """VeRA on one Linear, optionally on output slices (q / k / v of a fused qkv), each with its own d and b.

    Args:
        target: the Linear. shared: the adapter's :class:`VeRAProjections`. rank, d_initial, dropout: VeRA's.
        slices: ``[(start, end)]`` output rows, all of one size (``None``: all rows). init_weights: ``False``
        draws b and d at random.
    """

    def __init__(
        self,
        target: nn.Linear,
        shared: VeRAProjections,
        rank: int,
        d_initial: float,
        dropout: float,
        slices: list[tuple[int, int]] | None,
        init_weights: bool,
    ) -> None:
        super().__init__()
        self.shared = shared  # the same module in every layer of the adapter: one A and one B
        self.rank = rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        out_f, self.in_features = target.weight.shape
        self.slices = slices if slices is not None else [(0, out_f)]
        self.rows_per_slice = self.slices[0][1] - self.slices[0][0]
        rows = [r for s, e in self.slices for r in range(s, e)]
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long), persistent=False)
        n = len(self.slices)
        dtype = target.weight.dtype
        register(self, "vera_lambda_d", torch.full((n * rank,), float(d_initial), dtype=dtype))
        register(self, "vera_lambda_b", torch.zeros(n * self.rows_per_slice, dtype=dtype))
        if not init_weights:
            with torch.no_grad():
                self.vera_lambda_d.normal_(d_initial, 0.5)
                self.vera_lambda_b.normal_(0.0, 0.5)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The used blocks of the shared matrices: A (r, C_in) and B (rows per slice, r)."""
        return self.shared.vera_A[:, : self.in_features], self.shared.vera_B[: self.rows_per_slice]

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        """The update of the adapted rows: (..., C_in) -> (..., adapted rows), slice after slice."""
        a, b = self._factors()
        n, r = len(self.slices), self.rank
        x = self.dropout(x).to(self.vera_lambda_d.dtype)
        h = F.linear(x, a.to(x.dtype))  # (..., r), the same for every slice
        h = h.unsqueeze(-2) * self.vera_lambda_d.view(n, r)  # (..., n, r)
        y = F.linear(h, b.to(x.dtype)) * self.vera_lambda_b.view(n, -1)  # (..., n, rows per slice)
        return y.flatten(-2)

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        delta = self.delta_output(first_tensor(args, kwargs)).to(output.dtype)
        return output.index_add(-1, self.rows, delta)

    def delta_weight(self) -> torch.Tensor:
        """``(b * B) @ (d * A)`` per slice, stacked: (adapted rows, C_in)."""
        a, b = self._factors()
        n, r = len(self.slices), self.rank
        d = self.vera_lambda_d.view(n, r, 1)
        lb = self.vera_lambda_b.view(n, -1, 1)
        dt = self.vera_lambda_d.dtype
        return ((lb * b.to(dt)) @ (d * a.to(dt))).reshape(-1, self.in_features)

    @torch.no_grad()
    def merge(self, target: nn.Module) -> None:
        w = target.weight
        w.index_add_(0, self.rows, self.delta_weight().to(w.dtype))

    @torch.no_grad()
    def unmerge(self, target: nn.Module) -> None:
        w = target.weight
        w.index_add_(0, self.rows, self.delta_weight().to(w.dtype), alpha=-1)


def site_slices(site: Site, cfg: VeRAConfig) -> list[tuple[int, int]] | None:
    """The q / k / v slices adapted at a site (``None``: the whole Linear)."""
    if cfg.qkv_slices is None or not is_fused_qkv(site):
        return None
    return qkv_slices_of(site.module, cfg.qkv_slices)


def adapted_out(site: Site, cfg: VeRAConfig) -> int:
    """Output rows of one adapted matrix at the site (a slice's, or the Linear's)."""
    slices = site_slices(site, cfg)
    return slices[0][1] - slices[0][0] if slices else site.module.out_features


@register_method("vera")
class VeRA(Method):
    config_cls = VeRAConfig
    paper = "VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)"
    mergeable = True
    default_roles = (("qkv",), ("mlp_in", "mlp_out"))
    accepts = (nn.Linear,)
    variants = (
        Variant(
            "vera", {"rank": 32}, lr=1e-1, paper={"rank": 256}, stem="vera-r256", gain=(0.018, 0.13)
        ),  # seeds 0-2: >= 0.036, 0.26
        Variant(
            "vera_qv",
            {"rank": 32, "qkv_slices": "qv"},
            lr=1e-1,
            paper={"rank": 256, "qkv_slices": "qv"},
            stem="vera-r256-qv",
            gain=(0.02, 0.12),  # seeds 0-2: >= 0.044, 0.25
        ),
    )

    @classmethod
    def unsupported_reason(cls, model: nn.Module | None, spec: BackboneSpec, cfg: VeRAConfig) -> str | None:
        if cfg.qkv_slices is not None and cfg.targets is None and not spec.has_role("qkv"):
            return f"qkv_slices needs a fused qkv Linear; the {spec.name} spec has no qkv role"
        reason = hosted_qkv_reason(cls.name, model, spec, cfg) or super().unsupported_reason(model, spec, cfg)
        return reason or cls.build_refusal(model, spec, cfg)

    @classmethod
    def sites(cls, model: nn.Module, spec: BackboneSpec, cfg: VeRAConfig) -> list[Site]:
        sites = super().sites(model, spec, cfg)
        if cfg.qkv_slices is not None and not any(site_slices(s, cfg) for s in sites):
            raise ValueError(
                f"qkv_slices={cfg.qkv_slices!r} given but no VeRA target is a fused qkv Linear "
                f"(targets {cls.targets_for(spec, cfg)})"
            )
        return sites

    @classmethod
    def build(cls, model: nn.Module, spec: BackboneSpec, cfg: VeRAConfig) -> list[tuple[str, AdapterLayer]]:
        sites = cls.sites(model, spec, cfg)
        shared = VeRAProjections(
            cfg.rank,
            max(s.module.in_features for s in sites),
            max(adapted_out(s, cfg) for s in sites),
            cfg.projection_seed,
        )
        return [
            (
                s.name,
                VeRALinear(
                    s.module, shared, cfg.rank, cfg.d_initial, cfg.dropout, site_slices(s, cfg), cfg.init_weights
                ),
            )
            for s in sites
        ]

    @classmethod
    def make_layer(cls, site: Site, cfg: VeRAConfig) -> AdapterLayer:
        raise NotImplementedError("VeRA layers share one pair of random matrices: build them with VeRA.build")

    @classmethod
    def site_params(cls, site: Site, cfg: VeRAConfig) -> int:
        """``r + C_out`` per adapted matrix (per q / k / v slice of a fused qkv): the vectors d and b."""
        n = len(site_slices(site, cfg) or [None])
        return n * (cfg.rank + adapted_out(site, cfg))
