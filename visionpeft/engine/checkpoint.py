"""Training checkpoints: atomic writes, safe loads, config compatibility checks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

# sections and keys that may differ between a run and its resumption
_VOLATILE = {
    ("runtime", "out_dir"),
    ("runtime", "threads"),
    ("runtime", "log_every"),
    ("data", "root"),
    ("data", "num_workers"),
    ("runtime", "device"),
}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with torch.save to a temporary file, then rename it over ``path``."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a visionpeft checkpoint?): {e}") from e


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring paths and worker counts.

    A key that the saved config lacks (written by a version without it) counts as unchanged while the
    current value is its default (``defaults``: the resolved config of an all-default experiment).
    """
    defaults = defaults or {}
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if (section, key) in _VOLATILE:
                continue
            if key not in a and key in b and b[key] == (defaults.get(section) or {}).get(key, object()):
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs config {b.get(key)!r}")
    return diffs
