"""Backbone specs: where the roles (``qkv``, ``mlp``, ``block`` ...) of a model family live.

A spec maps role names to regular expressions over module names (matched in full), records the
token layout of each role's input and output (timm's ``NLC`` / ``NHWC`` / ``NCHW`` vocabulary) and
how to find the classification head and the prefix tokens. Methods ask for roles; specs answer with
module names. Any model without a spec still works with explicit module-name patterns.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable

import torch.nn as nn

LAYOUTS = ("NLC", "NHWC", "NCHW")


@dataclasses.dataclass(frozen=True)
class Tap:
    """Two points inside a block, named relative to the block.

    Args:
        source: child module whose input (``read="in"``) or output (``read="out"``) is the adapter's input.
        read: ``"in"`` or ``"out"``.
        sink: child module whose output receives the adapter's contribution.
        layout: layout of the source tensor (``NLC`` / ``NHWC``: channels last; ``NCHW``); ``None``: inferred
            from the source module of each block (see :func:`module_layout`), for families whose blocks
            run the same branch on channels-last or NCHW tensors (ConvNeXt with and without ``conv_mlp``).
        sink_layout: layout of the sink's output when it differs from the source's (``None``: told by the
            shapes). A channels-last branch added to an NCHW map is permuted by it, never guessed from shapes
            (an (B, H, W, C) map with H == W == C looks the same in both layouts).
    """

    source: str
    read: str
    sink: str
    layout: str | None = "NLC"
    sink_layout: str | None = None

    def resolve(self, block: nn.Module) -> Tap:
        """This tap with a concrete layout for one block (``layout=None`` looks at the source module)."""
        if self.layout is not None:
            return self
        source = block.get_submodule(self.source)
        return dataclasses.replace(self, layout=module_layout(source, "NHWC"))


@dataclasses.dataclass
class BackboneSpec:
    """Description of one backbone family.

    Args:
        name: registry key (``timm_vit``, ``timm_swin`` ...).
        match: predicate telling whether a model belongs to the family.
        roles: role name -> regular expression over module names.
        layouts: role name -> layout of the tensors entering and leaving modules of that role.
        default_layout: layout assumed for modules matched by pattern rather than role.
        head: function returning the module names of the classification head(s) of a model.
        num_prefix_tokens: function returning the number of class / register tokens, or ``None``
            when the blocks do not see a flat token sequence (VPT is then unsupported).
        patch_size: function returning the patch size (VPT's prompt initialisation uses it).
        taps: branch name (``attn``, ``mlp``, ``mlp_residual``) -> :class:`Tap`: where, inside one block, a
            residual branch's unscaled output (or the residual stream entering it) can be read, and the
            module after LayerScale and DropPath whose output receives an adapter's contribution.
        conv_tap: function ``block -> Tap`` locating a conv block's spatial (k x k) convolution: the
            tensor entering it and the module whose output follows it (Conv-Adapter's ``conv`` level).
        act_layer: the backbone's own activation (adapters on it default to the same kind).
        hosted_weights: regular expression over module names whose ``weight`` their parent module reads
            itself (``F.linear(x, self.qkv.weight, qkv_bias)`` in EVA, BEiT and SwinV2 attention), so a
            hook on the module never runs. Only methods that supply the adapted weight during the parent's
            forward (``Method.reaches_hosted_weights``: LoRA, DoRA) adapt them; other methods skip them.
        prompt_refusal: function returning why prompt tokens cannot join this model's blocks (rotary
            embeddings or relative position biases sized for the patch grid), or ``None`` when they can.
        frozen: function returning the module names of parts that are neither backbone nor head (SAM's prompt
            encoder): methods leave them alone unless a target names them, full fine-tuning does not train them.
    """

    name: str
    match: Callable[[nn.Module], bool]
    roles: dict[str, str]
    layouts: dict[str, str]
    default_layout: str
    head: Callable[[nn.Module], list[str]]
    num_prefix_tokens: Callable[[nn.Module], int] | None = None
    patch_size: Callable[[nn.Module], int] | None = None
    taps: dict[str, Tap] = dataclasses.field(default_factory=dict)
    conv_tap: Callable[[nn.Module], Tap] | None = None
    act_layer: type[nn.Module] = nn.GELU
    hosted_weights: str | None = None
    prompt_refusal: Callable[[nn.Module], str | None] | None = None
    frozen: Callable[[nn.Module], list[str]] | None = None

    def untouched(self, model: nn.Module) -> list[str]:
        """The head(s) and the frozen parts of ``model``: what a method's default targets never reach."""
        return list(self.head(model)) + (list(self.frozen(model)) if self.frozen is not None else [])

    def host_of(self, name: str, modules: dict[str, nn.Module] | None = None) -> str | None:
        """Name of the module that reads the weight of module ``name`` itself, or ``None``: the parent of a
        ``hosted_weights`` match, and the ``nn.MultiheadAttention`` around an ``out_proj`` (in any model)."""
        parent, _, leaf = name.rpartition(".")
        if self.hosted_weights is not None and re.fullmatch(self.hosted_weights, name) is not None:
            return parent
        if modules is not None and leaf == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
            return parent
        return None

    def has_role(self, role: str) -> bool:
        return role in self.roles

    def layout_of(self, role: str | None, module: nn.Module) -> str:
        """Layout of a site's input/output, from the module that is actually there.

        Leaf modules tell it by their type (Linear / LayerNorm: channels last; Conv2d / BatchNorm /
        channels-first norms: NCHW). A container takes the role's declared layout (or the spec's
        default), unless its first Linear / Conv2d is a Conv2d: then it reads NCHW maps (ConvNeXt's
        ``conv_mlp=True`` MLP of 1x1 convolutions, ConvFormer stages of CAFormer).
        """
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and not channels_first_norm(module):
            return "NLC" if self.default_layout == "NLC" else "NHWC"
        declared = self.layouts.get(role, self.default_layout) if role is not None else self.default_layout
        return module_layout(module, declared)

    def blocks(self, model: nn.Module) -> list[str]:
        """Module names of the blocks in forward order (empty when the spec has no ``block`` role)."""
        if "block" not in self.roles:
            return []
        pattern = re.compile(self.roles["block"])
        return [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]


def classifier_at(path: str) -> Callable[[nn.Module], list[str]]:
    """Head finder: ``[path]`` when the module at dotted ``path`` exists and is not an Identity."""

    def find(model: nn.Module) -> list[str]:
        m: nn.Module | None = model
        for part in path.split("."):
            m = getattr(m, part, None)
        return [] if m is None or isinstance(m, nn.Identity) else [path]

    return find


def module_layout(module: nn.Module, declared: str) -> str:
    """Layout of the tensors a module reads: NCHW for convolutions, batch / group norms, channels-first
    layer norms and containers whose first Linear / Conv2d is a Conv2d (ConvNeXt's ``conv_mlp`` MLP);
    ``declared`` otherwise (a container's input cannot be told from a Linear inside it: a stage may turn
    NCHW maps into tokens before its first Linear).
    """
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)) or channels_first_norm(module):
        return "NCHW"
    first = next((m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    return "NCHW" if isinstance(first, nn.Conv2d) else declared


def channels_first_norm(module: nn.Module) -> bool:
    """timm's norms over the channel axis of NCHW maps (``LayerNorm2d``, ``LayerNorm2dNoBias``, ``LayerNormAct2d``)."""
    name = type(module).__name__
    return (name.startswith("LayerNorm") and "2d" in name) or name in ("LayerNormNd", "GroupNorm1")


def affine_output(module: nn.Module) -> nn.Module:
    """The module whose output is a norm's affine output: timm's norm + activation layers (``BatchNormAct2d``,
    ``GroupNormAct`` ...) apply ``drop`` then ``act`` after the affine step, so it is their ``drop`` child;
    any other module is itself."""
    drop = getattr(module, "drop", None)
    norm = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    if (
        isinstance(module, norm)
        and isinstance(drop, nn.Module)
        and isinstance(getattr(module, "act", None), nn.Module)
    ):
        return drop
    return module


ALL_LINEAR, ALL_CONV = "all-linear", "all-conv"
"""Special targets: every ``nn.Linear`` (and ``nn.MultiheadAttention``) / every ``nn.Conv2d`` of the model,
the classification head excluded (as huggingface peft's ``all-linear``)."""


def block_index(name: str, blocks: list[str]) -> int | None:
    """Index of the block that contains module ``name`` (itself included), or ``None``."""
    best = None
    for i, b in enumerate(blocks):
        if name == b or name.startswith(b + "."):
            best = i
    return best


def pattern_matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_targets(
    model: nn.Module,
    spec: BackboneSpec,
    targets: list[str],
    exclude: list[str] | None = None,
    layers: list[int] | None = None,
    accept: Callable[[str, nn.Module], bool] | None = None,
    what: str = "targets",
    hosted: bool = False,
) -> list[tuple[str, str | None]]:
    """Turn roles / patterns into module names.

    ``"all-linear"`` and ``"all-conv"`` (as in huggingface peft) select every ``nn.Linear`` / ``nn.Conv2d``
    outside the spec's classification head(s). Modules whose weight their parent reads itself (the spec's
    ``hosted_weights``) are kept only with ``hosted=True``.

    Returns:
        ``(module_name, role)`` pairs in model order; ``role`` is ``None`` for pattern matches.

    Raises:
        ValueError: when nothing matches; the message lists the spec's roles and close module names.
    """
    names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    blocks = spec.blocks(model)
    found: dict[str, str | None] = {}
    heads = tuple(spec.untouched(model)) if any(t in (ALL_LINEAR, ALL_CONV) for t in targets) else ()
    for target in targets:
        if target in (ALL_LINEAR, ALL_CONV):
            # an attention's packed input projection is a linear layer too (LoRA / DoRA accept it)
            kind = (nn.Linear, nn.MultiheadAttention) if target == ALL_LINEAR else nn.Conv2d
            hits = [
                n
                for n in names
                if isinstance(modules[n], kind) and not any(n == h or n.startswith(h + ".") for h in heads)
            ]
            role = None
        elif target in spec.roles:
            pattern = re.compile(spec.roles[target])
            hits = [n for n in names if pattern.fullmatch(n)]
            role: str | None = target
        else:
            hits = [n for n in names if pattern_matches(target, n)]
            role = None
        for n in hits:
            found.setdefault(n, role)
    selected = []
    skipped_hosted: list[str] = []
    for n in names:  # model order
        if n not in found:
            continue
        if exclude and any(pattern_matches(e, n) for e in exclude):
            continue
        if not hosted and spec.host_of(n, modules) is not None:
            skipped_hosted.append(n)
            continue
        if layers is not None:
            idx = block_index(n, blocks)
            if idx is None or idx not in layers:
                continue
        if accept is not None and not accept(n, modules[n]):
            continue
        selected.append((n, found[n]))
    if not selected and skipped_hosted:
        raise ValueError(
            f"{what} {targets} match only modules whose weight their parent reads itself (F.linear in the "
            f"attention of {spec.name}: {', '.join(skipped_hosted[:3])}), so a hook on them never runs; "
            f"LoRA and DoRA adapt them, other methods need other targets"
        )
    if not selected:
        raise ValueError(_no_match_message(spec, targets, names, layers, len(blocks), what))
    return selected


def _no_match_message(
    spec: BackboneSpec, targets: list[str], names: list[str], layers: list[int] | None, n_blocks: int, what: str
) -> str:
    close: list[str] = []
    for t in targets:
        last = t.split(".")[-1]
        leaves = sorted({n.split(".")[-1] for n in names})
        close += difflib.get_close_matches(last, leaves, n=3, cutoff=0.5)
        close += difflib.get_close_matches(t, names, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))
    msg = f"{what} {targets} match no suitable module of this {spec.name} backbone."
    if spec.roles:
        msg += f" Roles of {spec.name}: {', '.join(sorted(spec.roles))}."
    if close:
        msg += f" Close module names: {', '.join(close[:6])}."
    if layers is not None:
        msg += f" (layers={layers}; the backbone has {n_blocks} blocks.)"
    return msg


def infer_features(module: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a module, from its first and last Linear / Conv / norm."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        n = module.num_features if isinstance(module, nn.BatchNorm2d) else module.num_channels
        return n, n
    inner = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not inner:
        raise ValueError(f"cannot infer the channels of {type(module).__name__}: it holds no Linear or Conv2d")
    c_in = infer_features(inner[0])[0]
    # output channels: the last Linear/Conv that is not part of a shortcut or downsample branch
    main = [m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and "downsample" not in n]
    last = main[-1] if main else inner[-1]
    return c_in, infer_features(last)[1]


def _pair(v: int | tuple[int, ...]) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def spatial_stride(module: nn.Module) -> int:
    """Spatial down-sampling factor of a conv / pool module, or of a block or stage holding one.

    A residual block or stage of the supported families down-samples at one point at most (ResNet's
    strided conv and its shortcut run in parallel, ConvNeXt's stage stem runs before its blocks), so the
    largest stride of any convolution or pooling inside it is the module's stride.
    """
    strides = [
        _pair(m.stride)
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and m.stride is not None
    ]
    return max(strides, default=1)
