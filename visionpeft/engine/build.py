"""Build the backbone (timm name, hub or local weights) and the adapted model from a config."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ..model import PeftVisionModel, get_peft_model
from .experiment import ConfigError, ExperimentConfig, ModelConfig

EMBEDDED_PREFIX = "embedded:"
# wrappers that training frameworks put in front of a backbone's keys (DDP, Lightning, detection /
# segmentation models, our own PeftVisionModel, torch.compile); stripped when that makes more keys match
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "base_model.", "encoder.")


class PretrainedFileError(ValueError):
    """``model.pretrained_file`` is unreadable or does not hold the weights of the configured backbone."""


def resolve_weights_file(path: str) -> str:
    """A local checkpoint path, or ``embedded:<kind>`` for the backbone the project pretrains on digits."""
    if path.startswith(EMBEDDED_PREFIX):
        from .pretrain import embedded_backbone_file

        return str(embedded_backbone_file(path[len(EMBEDDED_PREFIX) :]))
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained_file not found: {p}")
    if p.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt"):
        raise ValueError(f"model.pretrained_file {p}: expected .safetensors, .pth / .pt / .bin or .npz")
    return str(p)


def head_classes(cfg: ModelConfig, num_classes: int) -> int:
    """The class count of the new head: ``model.num_classes``, or the data's when it is not set.

    Raises:
        ConfigError: ``model.num_classes`` is smaller than the number of classes in the data.
    """
    if cfg.num_classes is None:
        return num_classes
    if cfg.num_classes < num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.num_classes} is smaller than the {num_classes} classes of the data "
            f"(labels 0..{num_classes - 1}); remove model.num_classes or set it to >= {num_classes}"
        )
    return cfg.num_classes


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (:data:`KEY_PREFIXES`) from the keys while that makes more of them match
    ``wanted``; keys without the prefix (a wrapper's own head, a loss module) are dropped with it."""
    while True:
        matched = len(wanted.intersection(state))
        best, best_matched = None, matched
        for prefix in KEY_PREFIXES:
            if any(k.startswith(prefix) for k in wanted):
                continue  # the model itself has such a submodule
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            n = len(wanted.intersection(stripped))
            if n > best_matched:
                best, best_matched = stripped, n
        if best is None:
            return state
        state = best


def _checkpoint_filter(model: nn.Module) -> Callable | None:
    """timm's conversion function for the model's family (``checkpoint_filter_fn`` of its module: weight
    layout conversions, position-embedding resampling to the model's image size), if it has one."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def load_pretrained_file(model: nn.Module, path: str, in_chans: int = 3) -> None:
    """Load a local checkpoint into a timm ``model`` the way timm loads its own weights, and refuse a file
    that does not cover the backbone.

    The file is read with timm's reader (``state_dict`` / ``model`` / EMA entries of a training
    checkpoint, ``module.`` prefixes), wrapper prefixes are stripped (:data:`KEY_PREFIXES`), the family's
    checkpoint filter converts it (position embeddings resampled to the model's image size), and timm's
    ``load_pretrained`` loads it (head dropped when its class count differs, input channels adapted).

    Raises:
        PretrainedFileError: the file is unreadable, or a backbone tensor is missing from it or has another
            shape (the message gives the counts of matched, missing and unexpected keys).
    """
    from timm.models import load_pretrained, load_state_dict

    try:
        state = load_state_dict(path, use_ema=True)
    except Exception as e:  # noqa: BLE001 - any reader error is a bad file
        raise PretrainedFileError(f"cannot read model.pretrained_file {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedFileError(f"model.pretrained_file {path} does not hold a state dict of tensors")
    target = model.state_dict()
    state = _strip_prefixes(dict(state), set(target))
    filter_fn = _checkpoint_filter(model)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # noqa: BLE001 - a foreign layout can break the family's converter
            raise PretrainedFileError(
                f"model.pretrained_file {path} cannot be converted for {type(model).__name__}: {type(e).__name__}: {e}"
            ) from e
    heads = _classifier_names(model)

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in heads)

    backbone = [k for k in target if not is_head(k)]
    # BatchNorm fills a missing counter itself (old torchvision-style checkpoints lack it)
    missing = [k for k in backbone if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and not is_head(k)]
    wrong = [k for k in backbone if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or wrong:
        matched = len(backbone) - len(missing) - len(wrong)
        detail = f"{matched} of {len(backbone)} backbone tensors match, {len(missing)} missing"
        if missing:
            detail += f" (e.g. {', '.join(missing[:3])})"
        if wrong:
            k = wrong[0]
            detail += (
                f", {len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)})"
            )
        detail += f", {len(unexpected)} unexpected"
        if unexpected:
            detail += f" (e.g. {', '.join(unexpected[:3])})"
        raise PretrainedFileError(
            f"model.pretrained_file {path} does not hold the weights of {type(model).__name__} "
            f"(model.name and model.kwargs): {detail}. Check that the file belongs to this architecture "
            "and size; known wrapper prefixes (" + ", ".join(KEY_PREFIXES) + ") are stripped already"
        )
    # the head: timm drops it when the class count differs; also drop it when only its shape differs
    for k in [k for k in state if is_head(k)]:
        if k not in target or tuple(state[k].shape) != tuple(target[k].shape):
            del state[k]
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.pop("file", None)
    cfg["state_dict"] = {k: v for k, v in state.items() if k in target}
    load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=in_chans, strict=False)


def build_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the config's kwargs; weights from the hub or from a local file.

    Local files go through :func:`load_pretrained_file` (timm's reader and conversions, a coverage check);
    ``.npz`` files go through the model's own ``load_pretrained`` (the big_vision / AugReg format).
    ``num_classes`` is the data's class count, used unless ``model.num_classes`` is set (never smaller).
    """
    kwargs = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    nc = head_classes(cfg, num_classes)
    if cfg.pretrained_file:
        path = resolve_weights_file(cfg.pretrained_file)
        model = timm.create_model(cfg.name, pretrained=False, num_classes=nc, **kwargs)
        if path.endswith(".npz"):
            if not hasattr(model, "load_pretrained"):
                raise ValueError(f"{cfg.name} cannot read .npz checkpoints; convert {path} to .safetensors")
            model.load_pretrained(path)
            return model
        load_pretrained_file(model, path, in_chans=kwargs.get("in_chans", 3))
        return model
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=nc, **kwargs)


def build_model(cfg: ExperimentConfig, num_classes: int) -> PeftVisionModel:
    return get_peft_model(build_backbone(cfg.model, num_classes), cfg.method)
