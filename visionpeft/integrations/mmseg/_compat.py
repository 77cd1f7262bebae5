"""OpenMMLab 2.x on the torch we support: a stand-in for the two ``mmcv.ops`` names mmseg needs at import time,
and loading mmengine's own checkpoints with ``weights_only=True``.

``mmcv-lite`` (mmcv without compiled ops) installs in seconds on any torch, but four mmseg modules import
``mmcv.ops`` when ``mmseg.models`` is imported, and ``mmcv.ops`` needs the compiled ``mmcv._ext``. When (and only
when) ``mmcv._ext`` is missing, :func:`install_mmcv_ops` puts a small module under ``sys.modules["mmcv.ops"]``
that provides ``point_sample`` (bilinear sampling at normalised points, written here with
``torch.nn.functional.grid_sample``) and ``sigmoid_focal_loss`` (mmcv's signature over
``torchvision.ops.sigmoid_focal_loss``). Every other ``mmcv.ops`` name raises ``ModuleNotFoundError`` naming the
op and the fix (mmseg's optional heads, e.g. CCHead and PSAHead, catch exactly that error and stay unavailable).

torch >= 2.6 loads with ``weights_only=True`` by default; mmengine's checkpoints pickle numpy arrays, dtypes and
scalars and ``mmengine.logging.HistoryBuffer`` (the message hub's logs), so resuming fails.
:func:`mmengine_safe_globals` allowlists exactly those globals, and :func:`install_checkpoint_loader` makes
mmengine's loaders (local files, URLs) use them inside a ``torch.serialization.safe_globals`` block: everything
else stays under torch's default protection.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

OPS_HINT = (
    "mmcv's compiled ops are not installed (mmcv-lite, or mmcv built without ops); visionpeft provides only "
    "point_sample and sigmoid_focal_loss. Build mmcv 2.1.0 with its ops (README, section mmsegmentation: route (a)) "
    "to use {name!r}"
)


def point_sample(
    input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs: Any
) -> torch.Tensor:
    """Bilinear samples of feature maps at points given in [0, 1] coordinates (``mmcv.ops.point_sample``).

    Args:
        input: (N, C, H, W) maps.
        points: (N, P, 2) or (N, Hp, Wp, 2) ``(x, y)`` in [0, 1] (0: the left / top edge, 1: the right / bottom).
        align_corners: ``grid_sample``'s convention for where the edges lie.
        **kwargs: more ``grid_sample`` options (``mode``, ``padding_mode``).

    Returns:
        (N, C, P) for (N, P, 2) points, else (N, C, Hp, Wp).
    """
    flat = points.dim() == 3
    grid = points.unsqueeze(2) if flat else points  # grid_sample wants (N, Hp, Wp, 2)
    out = F.grid_sample(input, grid.to(input.dtype) * 2.0 - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if flat else out


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss with class-index targets (``mmcv.ops.sigmoid_focal_loss``).

    Args:
        input: (N, C) logits.
        target: (N,) class indices in [0, C]; C (one past the last class) marks a sample with no positive class.
        gamma: focusing exponent. alpha: weight of the positive term (the negative term gets 1 - alpha).
        weight: optional (C,) weights, each sample's loss scaled by the weight of its target class.
        reduction: ``"none"`` ((N, C) losses), ``"mean"`` (sum divided by N, as mmcv) or ``"sum"``.

    Returns:
        The loss, reduced as asked.
    """
    from torchvision.ops import sigmoid_focal_loss as tv_focal

    if input.dim() != 2 or target.shape != input.shape[:1]:
        raise ValueError(
            f"sigmoid_focal_loss: input (N, C) and target (N,), got {tuple(input.shape)} and {tuple(target.shape)}"
        )
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"sigmoid_focal_loss: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    n, c = input.shape
    target = target.long()
    onehot = F.one_hot(target.clamp(0, c), c + 1)[:, :c].to(input.dtype)
    loss = tv_focal(input, onehot, alpha=alpha, gamma=gamma, reduction="none")
    if weight is not None and weight.numel() > 0:
        w = torch.cat([weight.to(loss.dtype).reshape(-1), loss.new_ones(1)])  # index C (no positive): 1
        loss = loss * w[target.clamp(0, c)].unsqueeze(1)
    if reduction == "mean":
        return loss.sum() / max(n, 1)
    if reduction == "sum":
        return loss.sum()
    return loss


def _compiled_ops_available() -> bool:
    try:
        return importlib.util.find_spec("mmcv._ext") is not None
    except (ImportError, ValueError):
        return False


def install_mmcv_ops() -> bool:
    """Put the ``mmcv.ops`` stand-in into ``sys.modules`` when mmcv's compiled ops are missing.

    Returns:
        ``True`` when the stand-in was installed now; ``False`` when the real ops are there or ``mmcv.ops`` is
        already imported (the stand-in or the real one).
    """
    if "mmcv.ops" in sys.modules or _compiled_ops_available():
        return False
    import mmcv

    mod = types.ModuleType("mmcv.ops", "visionpeft's stand-in for mmcv.ops (mmcv without compiled ops)")
    mod.point_sample = point_sample
    mod.sigmoid_focal_loss = sigmoid_focal_loss
    mod.__all__ = ["point_sample", "sigmoid_focal_loss"]
    mod.VISIONPEFT_STANDIN = True

    def missing(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(OPS_HINT.format(name=name), name="mmcv._ext")

    mod.__getattr__ = missing
    sys.modules["mmcv.ops"] = mod
    mmcv.ops = mod
    return True


def history_buffer_method(obj: Any, name: str) -> Any:
    """The only ``getattr`` a checkpoint may call: a statistics method of ``HistoryBuffer`` (mmengine pickles the
    message hub's buffers with ``getattr(HistoryBuffer, "mean")`` and the like). Anything else is refused."""
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer

    allowed = {"min", "max", "current", "mean"} | set(HistoryBuffer._statistics_methods)
    if obj is not HistoryBuffer or not isinstance(name, str) or name not in allowed:
        raise pickle.UnpicklingError(
            f"checkpoint calls getattr({obj!r}, {name!r}); visionpeft allows only HistoryBuffer's statistics "
            f"methods ({', '.join(sorted(allowed))}) in mmengine checkpoints"
        )
    return getattr(HistoryBuffer, name)


@functools.cache
def mmengine_safe_globals() -> tuple[Any, ...]:
    """The globals (besides torch's own) that mmengine's checkpoints pickle: ``HistoryBuffer`` and its statistics
    methods (through a ``getattr`` limited to them: ``(history_buffer_method, "builtins.getattr")``), and numpy's
    arrays, dtypes and scalars (``meta`` and the message hub's logs)."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
    # numeric dtypes only (numpy >= 1.25 pickles each dtype's own class): no object, string or void arrays
    numeric = tuple(dict.fromkeys(type(np.dtype(c)) for c in "?bBhHiIlLqQefd"))
    return (
        HistoryBuffer,
        *numeric,
        (history_buffer_method, "builtins.getattr"),
        np.ndarray,
        np.dtype,
        core.multiarray._reconstruct,
        core.multiarray.scalar,
    )


def safe_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a checkpoint reader so that it runs with :func:`mmengine_safe_globals` allowlisted."""

    @functools.wraps(load)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(list(mmengine_safe_globals())):
            return load(*args, **kwargs)

    wrapped.visionpeft_safe = True
    return wrapped


def install_checkpoint_loader() -> None:
    """Make mmengine's loaders of local files and URLs read with the allowlist (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if prefix in ("", "http://", "https://") and not getattr(loader, "visionpeft_safe", False):
            CheckpointLoader.register_scheme(prefixes=prefix, loader=safe_load(loader), force=True)


def _is_installed(package: str) -> bool:
    """mmengine's ``is_installed`` without ``pkg_resources``: a distribution or an importable module."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package)
        return spec is not None and spec.origin is not None


def _installed_path(package: str) -> str:
    """mmengine's ``get_installed_path`` without ``pkg_resources``: the folder of the package's module."""
    import importlib.metadata
    import os

    names = [package] + [m for m, dists in importlib.metadata.packages_distributions().items() if package in dists]
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            return os.path.dirname(spec.origin)
    raise importlib.metadata.PackageNotFoundError(package)


def install_package_utils() -> bool:
    """Let mmengine resolve ``mmseg::`` config bases when ``pkg_resources`` is missing (setuptools >= 81).

    mmengine 0.10.7 finds installed packages with ``pkg_resources``, which setuptools 81 removed. mmseg's own
    ``tools/train.py`` reads the config before anything of ours is imported, so the ``mmseg`` extra pins
    ``setuptools<81``; this fallback serves code that imports ``visionpeft.integrations.mmseg`` first (the Python
    API, the tests). Returns whether it was installed.
    """
    if importlib.util.find_spec("pkg_resources") is not None:
        return False
    import mmengine.config.config as config_module
    import mmengine.utils as utils
    import mmengine.utils.package_utils as package_utils

    for module in (config_module, utils, package_utils):
        module.is_installed = _is_installed
        module.get_installed_path = _installed_path
    return True
