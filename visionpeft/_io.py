"""Atomic file writes and checked reads of adapter files.

Every file the project writes goes through :func:`atomic_write`: the data goes to a temporary file
``.<name>.<pid>.<random>.tmp`` in the target's folder, which is then renamed over the target, so a
reader sees the old file or the new one, never a half-written one. The temporary file is created with
mode ``0o666`` filtered by the process umask, as a plain ``open()`` would, so the result gets the usual
permissions. Temporary files left by a killed writer are removed by the next successful write of the
same target.

An adapter is two files, the tensors and the JSON config; :func:`save_adapter_files` writes the tensors
first and the JSON last, and the JSON records the SHA-256 of the tensors file, so that
:func:`read_adapter_files` can tell a consistent pair from the halves of two different saves.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import math
import os
import re
import secrets
import time
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# a temporary file of another writer is removed only when it is older than this and its writer is gone
STALE_TMP_SECONDS = 10.0
# re-reads of an adapter whose tensors do not match its config's checksum (a save in progress)
READ_ATTEMPTS = 6
HASH_KEY = "weights_sha256"


class AdapterFileError(ValueError):
    """An adapter file is missing, unreadable, or does not fit the model it is loaded into."""


def _tmp_pattern(name: str) -> re.Pattern[str]:
    # ".<name>.<pid>.<12 hex>.tmp" (this module) or ".<name>.<8 random>.tmp" (tempfile.mkstemp, older versions)
    return re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.[0-9a-f]{{12}}|[a-z0-9_]{{8}})\.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell: keep the file)
    return True


def remove_stale_tmp(path: str | os.PathLike, keep: str | None = None) -> list[Path]:
    """Remove the temporary files of ``path`` that an interrupted write left behind.

    Only files named like this module's temporary files for the same target name are considered, and
    one is removed only when it is older than ``STALE_TMP_SECONDS`` and the process id in its name is
    not a live process (a name without a process id, from an older version, is judged by age alone).

    Args:
        path: the target file.
        keep: a temporary file name never to remove (the caller's own).

    Returns:
        The removed files.
    """
    path = Path(path)
    pattern = _tmp_pattern(path.name)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or entry.name == keep:
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < STALE_TMP_SECONDS:
                continue
            if m.group(1) is not None and _pid_alive(int(m.group(1))):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def _create_tmp(path: Path) -> Path:
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            # mode 0o666 is filtered by the umask, exactly as for open(path, "w")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


def atomic_write(path: str | os.PathLike, write: collections.abc.Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path`` (same directory).

    The file gets the permissions of a plain ``open()`` (``0o666`` minus the umask). After a successful
    rename, temporary files of the same target left by killed writers are removed (see
    :func:`remove_stale_tmp`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_tmp(path)
    try:
        write(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    remove_stale_tmp(path, keep=tmp.name)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    atomic_write(path, write)


def save_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")

    atomic_write(path, write)


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter config not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"cannot read adapter config {path}: {e}") from e


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``tensors`` (moved to the CPU, made contiguous)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(flat, metadata=metadata)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write ``tensors`` as safetensors, atomically; returns the SHA-256 (hex) of the file written."""
    data = tensors_to_bytes(tensors, metadata)
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def tensors_from_bytes(data: bytes, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise AdapterFileError(f"cannot read adapter weights {path} (truncated or corrupted file?): {e}") from e


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    return tensors_from_bytes(_read_bytes(path), path)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise AdapterFileError(f"adapter weights not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise AdapterFileError(f"cannot read adapter weights {path}: {e}") from e


def save_adapter_files(
    directory: Path,
    config_name: str,
    weights_name: str,
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write an adapter's tensors, then its JSON config carrying the tensors file's SHA-256.

    Both writes are atomic; the JSON is written last, so that a reader that finds the checksum of the
    tensors file it read in the JSON it read holds the two halves of one save.
    """
    digest = save_tensors(directory / weights_name, tensors, metadata)
    save_json(directory / config_name, {**meta, HASH_KEY: digest})


def read_adapter_files(
    directory: Path, config_name: str, weights_name: str, attempts: int = READ_ATTEMPTS
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter's JSON config and its tensors as one consistent pair.

    When the tensors file does not match the checksum recorded in the config, another process may be
    saving into the folder: both files are read again (``attempts`` times in all, with growing pauses)
    before giving up. A config without a checksum (written by an older version) is taken as it is.

    Returns:
        ``(meta, tensors)``: the parsed JSON (a dict) and the tensors by name.

    Raises:
        AdapterFileError: a file is missing or unreadable, or the two never matched.
    """
    config_path, weights_path = directory / config_name, directory / weights_name
    for attempt in range(attempts):
        meta = load_json(config_path)
        if not isinstance(meta, dict):
            raise AdapterFileError(
                f"{config_path} is not a visionpeft adapter config: a JSON object was expected, "
                f"got a {type(meta).__name__}"
            )
        data = _read_bytes(weights_path)
        expected = meta.get(HASH_KEY)
        if expected is None:
            return meta, tensors_from_bytes(data, weights_path)
        if not isinstance(expected, str):
            raise AdapterFileError(f"{config_path}: {HASH_KEY!r} must be a string, got {type(expected).__name__}")
        if hashlib.sha256(data).hexdigest() == expected:
            return meta, tensors_from_bytes(data, weights_path)
        if attempt + 1 < attempts:
            time.sleep(0.01 * 2**attempt)
    tensors_from_bytes(data, weights_path)  # a truncated or corrupted file is named as such
    raise AdapterFileError(
        f"the adapter files in {directory} do not belong together: the SHA-256 of {weights_name} differs from "
        f"the one recorded in {config_name} ({attempts} reads). Another process may be saving into this folder "
        f"(load again when it is done), or one of the two files was replaced or edited: save the adapter again."
    )


# --------------------------------------------------------------------------------------------------
# type checks of a dataclass read from JSON


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type hint (lenient on hints it does not know)."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(hint)
        return not args or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True  # another class (a nested config ...): left to the config's own parsing


def check_field_types(cls: type, data: dict[str, Any]) -> list[str]:
    """The fields of ``data`` whose values do not fit the dataclass ``cls``'s annotations.

    Returns:
        One ``"key: expected <type>, got <value>"`` line per wrong field (unknown keys are left to
        ``cls.from_dict``, which suggests the right name).
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that cannot be resolved is not checked
        return []
    wrong = []
    for f in dataclasses.fields(cls):
        if f.name in data and f.name in hints and not _matches(data[f.name], hints[f.name]):
            shown = json.dumps(data[f.name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            wrong.append(f"{f.name}: expected {_hint_name(hints[f.name])}, got {shown}")
    return wrong


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and typing.get_origin(hint) is None else str(hint)
