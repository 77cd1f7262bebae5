"""Build the backbone (timm name, hub or local weights) and the adapted model from a config."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn

from ..model import PeftVisionModel, get_peft_model
from .experiment import ExperimentConfig, ModelConfig

EMBEDDED_PREFIX = "embedded:"


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


def build_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """``timm.create_model`` with the config's kwargs; weights from the hub or from a local file.

    Local files are read the way timm reads them (head dropped when the class count differs, ViT position
    embeddings resampled to the new image size); ``.npz`` files go through the model's own
    ``load_pretrained`` (the big_vision / AugReg format).
    """
    kwargs = dict(cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    nc = cfg.num_classes if cfg.num_classes is not None else num_classes
    if cfg.pretrained_file:
        path = resolve_weights_file(cfg.pretrained_file)
        if path.endswith(".npz"):
            model = timm.create_model(cfg.name, pretrained=False, num_classes=nc, **kwargs)
            if not hasattr(model, "load_pretrained"):
                raise ValueError(f"{cfg.name} cannot read .npz checkpoints; convert {path} to .safetensors")
            model.load_pretrained(path)
            return model
        return timm.create_model(
            cfg.name, pretrained=True, pretrained_cfg_overlay={"file": path}, num_classes=nc, **kwargs
        )
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, num_classes=nc, **kwargs)


def build_model(cfg: ExperimentConfig, num_classes: int) -> PeftVisionModel:
    return get_peft_model(build_backbone(cfg.model, num_classes), cfg.method)
