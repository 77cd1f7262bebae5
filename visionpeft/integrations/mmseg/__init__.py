"""visionpeft in mmsegmentation 1.x pipelines: ``VisionPeftBackbone`` and ``PeftAdapterHook`` in mmseg's
registries, on a torch that mmcv's compiled ops do not support.

This package is the only part of visionpeft that imports OpenMMLab packages. Importing it (an mmseg config's
``custom_imports = dict(imports=["visionpeft.integrations.mmseg"])``):

1. installs the ``mmcv.ops`` stand-in when mmcv's compiled ops are missing (``mmcv-lite``; see
   :mod:`._compat`), before anything imports ``mmseg.models``;
2. makes mmengine's checkpoint loader allowlist the globals its own checkpoints need under torch's
   ``weights_only=True`` loading (resume works; nothing is allowed globally);
3. registers :class:`VisionPeftBackbone` (``MODELS``) and :class:`PeftAdapterHook` (``HOOKS``).

Requires ``pip install "visionpeft[mmseg]"`` (mmengine 0.10.7, mmsegmentation 1.2.2, mmcv-lite 2.1.0 or mmcv 2.1.0
with ops, ftfy, regex).
"""

from __future__ import annotations

try:
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"visionpeft.integrations.mmseg needs mmsegmentation 1.x and mmengine ({e}); install them with "
        "pip install 'visionpeft[mmseg]' (README: section mmsegmentation)"
    ) from e

from ._compat import (
    install_checkpoint_loader,
    install_mmcv_ops,
    install_package_utils,
    mmengine_safe_globals,
    point_sample,
    sigmoid_focal_loss,
)

install_mmcv_ops()
install_checkpoint_loader()
install_package_utils()

from .backbone import PYRAMIDS, SamPyramid, VisionPeftBackbone, build_timm_backbone  # noqa: E402
from .hooks import (  # noqa: E402
    PeftAdapterHook,
    frozen_backbone_keys,
    load_adapter_folder,
    read_head_state,
    save_adapter_folder,
)

__all__ = [
    "PYRAMIDS",
    "PeftAdapterHook",
    "SamPyramid",
    "VisionPeftBackbone",
    "build_timm_backbone",
    "frozen_backbone_keys",
    "install_checkpoint_loader",
    "install_mmcv_ops",
    "install_package_utils",
    "load_adapter_folder",
    "mmengine_safe_globals",
    "point_sample",
    "read_head_state",
    "save_adapter_folder",
    "sigmoid_focal_loss",
]
