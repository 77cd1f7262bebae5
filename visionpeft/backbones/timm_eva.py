"""timm EVA / EVA-02 / rotary ViTs (``vit_*_rope_*``, timm's ``Eva`` class) and BEiT (v1, v2).

Blocks ``blocks.i`` see (B, N, C) token sequences with class / register tokens in front. Their LayerScale
is a block parameter (``gamma_1`` / ``gamma_2``) applied to the branch output, so the taps read the
attention / MLP modules' outputs and write after ``drop_path1`` / ``drop_path2``. The fused ``qkv``
Linear of EVA, EVA-02 tiny / small and BEiT is read with ``F.linear(x, self.qkv.weight, qkv_bias)``
(separate q / v biases): a hook on it never runs, so it is a hosted weight (LoRA / DoRA supply the
adapted weight during the attention's forward). EVA-02 base / large have separate ``q_proj`` /
``k_proj`` / ``v_proj`` Linears (the ``qkv`` role then names those three). Prompt tokens (VPT) cannot
join blocks whose rotary embedding or relative position bias is sized for the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from .._registry import register_backbone
from ._spec import BackboneSpec, Tap, classifier_at

_B = r"blocks\.\d+"


def _roles() -> dict[str, str]:
    return {
        "block": _B,
        "attn": _B + r"\.attn",
        "qkv": _B + r"\.attn\.(qkv|q_proj|k_proj|v_proj)",
        "attn_out": _B + r"\.attn\.proj",
        "mlp": _B + r"\.mlp",
        "mlp_in": _B + r"\.mlp\.fc1(_g|_x)?",  # Mlp / GluMlp: fc1; SwiGLU: fc1_g and fc1_x
        "mlp_out": _B + r"\.mlp\.fc2",
        "norm": _B + r"\.norm[12]",
        "patch_embed": r"patch_embed\.proj",
        "final_norm": r"norm|fc_norm",
    }


def _is_eva(model: nn.Module, post_norm: bool = False) -> bool:
    from timm.models.eva import Eva, EvaBlockPostNorm

    if not isinstance(model, Eva):
        return False
    return any(isinstance(b, EvaBlockPostNorm) for b in model.blocks) == post_norm


def _is_beit(model: nn.Module) -> bool:
    from timm.models.beit import Beit

    return isinstance(model, Beit)


def _patch(model: nn.Module) -> int:
    p = model.patch_embed.patch_size
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def _eva_prompt_refusal(model: nn.Module) -> str | None:
    if getattr(model, "rope", None) is not None:
        return (
            "the rotary position embedding of this EVA model is computed for the patch grid and applied to every "
            "token after the class / register tokens, so prompt tokens have no position"
        )
    return None


def _beit_prompt_refusal(model: nn.Module) -> str | None:
    if getattr(model, "rel_pos_bias", None) is not None or any(
        getattr(b.attn, "relative_position_bias_table", None) is not None for b in model.blocks
    ):
        return (
            "BEiT's relative position bias is sized for the patch grid plus the class token, so prompt tokens "
            "have no place"
        )
    return None


# pre-norm blocks: the branch modules' outputs are unscaled (gamma_1 / gamma_2 multiply them afterwards)
_PRE_NORM_TAPS = {
    "attn": Tap("attn", "out", "drop_path1"),
    "mlp": Tap("mlp", "out", "drop_path2"),
    "mlp_residual": Tap("norm2", "in", "drop_path2"),
}

_HOSTED = _B + r"\.attn\.qkv"


def _token_spec(
    name: str, match: Callable[[nn.Module], bool], taps: dict[str, Tap], refusal: Callable
) -> BackboneSpec:
    """A spec of one of these flat-token families: the same roles, layouts, head and hosted ``qkv``."""
    return register_backbone(
        BackboneSpec(
            name=name,
            match=match,
            roles=_roles(),
            layouts={r: "NLC" for r in ("block", "attn", "mlp")},
            default_layout="NLC",
            head=classifier_at("head"),
            num_prefix_tokens=lambda m: int(m.num_prefix_tokens),
            patch_size=_patch,
            taps=taps,
            hosted_weights=_HOSTED,
            prompt_refusal=refusal,
        )
    )


TIMM_EVA = _token_spec("timm_eva", _is_eva, _PRE_NORM_TAPS, _eva_prompt_refusal)
# EvaBlockPostNorm: x + drop_path1(norm1(attn(x))), x + drop_path2(norm2(mlp(x))); no LayerScale
TIMM_EVA_POST_NORM = _token_spec(
    "timm_eva_post_norm",
    lambda m: _is_eva(m, post_norm=True),
    {
        "attn": Tap("drop_path1", "in", "drop_path1"),
        "mlp": Tap("drop_path2", "in", "drop_path2"),
        "mlp_residual": Tap("mlp", "in", "drop_path2"),
    },
    _eva_prompt_refusal,
)
TIMM_BEIT = _token_spec("timm_beit", _is_beit, _PRE_NORM_TAPS, _beit_prompt_refusal)
