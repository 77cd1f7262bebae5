"""VTAB-1k in the folder layout most PEFT repositories (NOAH, VPT, SSF, ...) use.

One folder per task under a common root::

    <root>/<task>/train800.txt            "images/train800/000000.jpg 3" per line
    <root>/<task>/val200.txt
    <root>/<task>/train800val200.txt
    <root>/<task>/test.txt
    <root>/<task>/images/<split>/000000.jpg   (or .png)

``<task>`` is the canonical name (:data:`VTAB_TASKS`) or any alias in :data:`VTAB_INFO` (``cifar``,
``oxford_pet``, dashed spellings such as ``clevr-count`` ...), or any other folder name: a custom task in the
same layout, whose class count is given or read from its list files (:func:`infer_num_classes`). Two
protocols are used in the papers (:func:`splits_for`): ``tune`` trains on train800 and evaluates on val200
(hyper-parameter search); ``final`` trains on train800val200 and reports top-1 on test.

The 19 tasks and their class counts follow Zhai et al. 2019 (arXiv:1910.04867) as implemented in
google-research/task_adaptation; :func:`make_vtab_task_from_arrays` writes a task folder in the same layout
from numpy arrays (tests, the embedded MNIST demo task).
"""

from __future__ import annotations

import dataclasses
import difflib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .files import ImageReadError, load_rgb, pil_to_rgb, read_text

SPLITS = ("train800", "val200", "train800val200", "test")
MODES: dict[str, tuple[str, str]] = {"tune": ("train800", "val200"), "final": ("train800val200", "test")}
GROUPS = ("natural", "specialized", "structured")


@dataclasses.dataclass(frozen=True)
class VTABTask:
    """One VTAB-1k task.

    Args:
        name: canonical name (also the preferred folder name).
        num_classes: number of classes of the official task.
        group: ``natural``, ``specialized`` or ``structured``.
        title: short display name used in result tables.
        aliases: other names (folder names of common repositories, longer spellings); compared after
            lower-casing and mapping ``-`` / spaces to ``_``.
    """

    name: str
    num_classes: int
    group: str
    title: str
    aliases: tuple[str, ...] = ()


_TABLE = (
    VTABTask("cifar100", 100, "natural", "CIFAR-100", ("cifar", "cifar_100")),
    VTABTask("caltech101", 102, "natural", "Caltech101", ("caltech", "caltech_101")),
    VTABTask("dtd", 47, "natural", "DTD", ("textures",)),
    VTABTask("oxford_flowers102", 102, "natural", "Flowers102", ("flowers102", "flowers", "flowers_102")),
    VTABTask("oxford_iiit_pet", 37, "natural", "Pets", ("oxford_pet", "oxford_pets", "pets", "pet")),
    VTABTask("svhn", 10, "natural", "SVHN", ("svhn_cropped",)),
    VTABTask("sun397", 397, "natural", "Sun397", ("sun",)),
    VTABTask("patch_camelyon", 2, "specialized", "Camelyon", ("camelyon", "pcam")),
    VTABTask("eurosat", 10, "specialized", "EuroSAT", ()),
    VTABTask("resisc45", 45, "specialized", "Resisc45", ("resisc",)),
    VTABTask(
        "diabetic_retinopathy", 5, "specialized", "Retinopathy", ("retinopathy", "diabetic_retinopathy_detection")
    ),
    VTABTask("clevr_count", 8, "structured", "Clevr-Count", ("clevr_count_all",)),
    VTABTask("clevr_dist", 6, "structured", "Clevr-Dist", ("clevr_distance", "clevr_closest_object_distance")),
    VTABTask("dmlab", 6, "structured", "DMLab", ()),
    VTABTask("kitti", 4, "structured", "KITTI-Dist", ("kitti_dist", "kitti_distance")),
    VTABTask("dsprites_loc", 16, "structured", "dSpr-Loc", ("dsprites_location", "dsprites_position")),
    VTABTask("dsprites_ori", 16, "structured", "dSpr-Ori", ("dsprites_orientation",)),
    VTABTask("smallnorb_azi", 18, "structured", "sNORB-Azim", ("smallnorb_azimuth",)),
    VTABTask("smallnorb_ele", 9, "structured", "sNORB-Elev", ("smallnorb_elevation",)),
)

VTAB_TASKS: tuple[str, ...] = tuple(t.name for t in _TABLE)
"""The 19 canonical task names in the order of the papers' tables (natural, specialized, structured)."""
VTAB_INFO: dict[str, VTABTask] = {t.name: t for t in _TABLE}
VTAB_GROUPS: dict[str, tuple[str, ...]] = {g: tuple(t.name for t in _TABLE if t.group == g) for g in GROUPS}


def _norm(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


_ALIASES: dict[str, str] = {}
for _t in _TABLE:
    for _a in (_t.name, *_t.aliases):
        _ALIASES[_norm(_a)] = _t.name

_LAYOUT = (
    "expected VTAB-1k layout:\n"
    "  <root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt\n"
    "      one '<image path> <label>' per line, e.g. 'images/train800/000000.jpg 3'\n"
    "  <root>/<task>/images/<split>/000000.jpg (or .png)\n"
    "  <task>: a canonical name (cifar100, caltech101, ..., smallnorb_ele) or a common alias (cifar, oxford_pet, "
    "clevr-count, ...)"
)


def resolve_task(name: str) -> str:
    """Canonical VTAB task name of ``name`` (a canonical name or alias; case, ``-`` and ``_`` are ignored).

    Raises:
        ValueError: unknown name; the message suggests the closest known names and lists the tasks.
    """
    key = _norm(name)
    if key.startswith("vtab_") and key[5:] in _ALIASES:
        key = key[5:]
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, list(_ALIASES), n=3, cutoff=0.6)
    names = dict.fromkeys(_ALIASES[c] for c in close)  # canonical names, closest first, no repeats
    hint = f"; did you mean {' or '.join(map(repr, names))}?" if names else "."
    raise ValueError(f"unknown VTAB task {name!r}{hint} Tasks: {', '.join(VTAB_TASKS)}")


def task_info(name: str) -> VTABTask:
    """The :class:`VTABTask` of a canonical name or alias."""
    return VTAB_INFO[resolve_task(name)]


def splits_for(mode: str) -> tuple[str, str]:
    """``(train split, eval split)`` of a protocol: ``tune`` -> (train800, val200); ``final`` ->
    (train800val200, test)."""
    if mode not in MODES:
        raise ValueError(
            f"unknown VTAB mode {mode!r}; use 'tune' (train800 -> val200) or 'final' (train800val200 -> test)"
        )
    return MODES[mode]


def _folder_candidates(task: str) -> list[str]:
    names = [str(task).strip()]  # the name as given first, then the canonical name and every alias
    try:
        info = task_info(task)
        names += [info.name, *info.aliases]
    except ValueError:  # a custom task (e.g. the MNIST demo): only its literal name
        pass
    out: list[str] = []
    for n in names:
        for v in (n, n.replace("_", "-"), n.replace("-", "_")):
            if v not in out:
                out.append(v)
    return out


def find_task_dir(root: str | Path, task: str) -> Path:
    """The folder of ``task`` under ``root``: tries the name as given, the canonical name, every alias and their
    dashed forms.

    Raises:
        FileNotFoundError: ``root`` is missing, or holds no folder for the task; the message shows the
            expected layout, the names tried and the folders found under ``root``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"VTAB root {str(root)!r} does not exist or is not a folder.\n{_LAYOUT}")
    tried = _folder_candidates(task)
    for name in tried:
        if (root / name).is_dir():
            return root / name
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    shown = ", ".join(found[:40]) or "none"
    if len(found) > 40:
        shown += f", ... ({len(found)} in all)"
    hint = ""
    if (root / "train800val200.txt").exists() or (root / "test.txt").exists():
        hint = "\nThe root itself looks like a task folder: pass its parent as the root."
    try:
        resolve_task(task)
    except ValueError as e:  # not a VTAB name: maybe a misspelt one
        if "did you mean" in str(e):
            hint += "\n" + str(e).split(" Tasks:")[0].replace("unknown VTAB task", "note: task", 1)
    raise FileNotFoundError(
        f"no folder for VTAB task {task!r} under {str(root)!r} (tried: {', '.join(tried)}).\n"
        f"Folders found under the root: {shown}.{hint}\n{_LAYOUT}"
    )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Default transform (no torchvision): an RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    arr = np.array(pil_to_rgb(image), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _parse_list(f: Path) -> list[tuple[int, str, int]]:
    """``(line number, image path, label)`` of every non-blank line of a VTAB list file (UTF-8, with or without a
    byte-order mark); malformed lines raise ``ValueError`` naming the file and line."""
    out: list[tuple[int, str, int]] = []
    for lineno, line in enumerate(read_text(f, "VTAB list file").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        parts = text.rsplit(maxsplit=1)
        try:
            if len(parts) != 2:
                raise ValueError
            label = int(parts[1])
        except ValueError:
            raise ValueError(
                f"{f}:{lineno}: malformed line {text!r}; expected '<image path> <integer label>', "
                "e.g. 'images/train800/000000.jpg 3'"
            ) from None
        if label < 0:
            raise ValueError(f"{f}:{lineno}: negative label {label} (line {text!r}); labels are 0, 1, 2, ...")
        out.append((lineno, parts[0], label))
    return out


def infer_num_classes(task_dir: str | Path) -> int:
    """Class count of a custom task: the largest label in any of its list files (:data:`SPLITS`) plus one.

    Raises:
        FileNotFoundError: the folder holds none of the list files.
        ValueError: a list file is malformed or lists no image.
    """
    task_dir = Path(task_dir)
    lists = [task_dir / f"{s}.txt" for s in SPLITS if (task_dir / f"{s}.txt").is_file()]
    if not lists:
        raise FileNotFoundError(f"no VTAB list file in {str(task_dir)!r}.\n{_LAYOUT}")
    labels = [label for f in lists for _, _, label in _parse_list(f)]
    if not labels:
        raise ValueError(f"the VTAB list files in {str(task_dir)!r} list no images")
    return max(labels) + 1


class VTABDataset(Dataset):
    """One split of one VTAB-1k task; items are ``(transform(image), label)``.

    The list file is parsed and checked when the dataset is built (every line well formed, every label in
    ``[0, num_classes)``, every image file present); images are decoded lazily with PIL and converted to 8-bit RGB
    (16-bit greyscale scaled, see :func:`~visionpeft.data.files.pil_to_rgb`).

    Args:
        root: folder holding one sub-folder per task.
        task: canonical name or alias, or any other folder name (a custom task in the same layout).
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: callable applied to the RGB PIL image; default :func:`pil_to_tensor` (float (3, H, W)
            in [0, 1]).
        num_classes: overrides the official class count (labels are checked against it); for a custom task
            ``None`` reads it from the task's list files (:func:`infer_num_classes`).

    Attributes:
        task: canonical (or custom) task name. task_dir, list_file: resolved paths. samples: list of
        ``(image path, label)``. targets: the labels. num_classes: class count.
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown VTAB split {split!r}; use one of {', '.join(SPLITS)}")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.task_dir = find_task_dir(root, task)
        try:
            self.task = resolve_task(task)
            official: int | None = VTAB_INFO[self.task].num_classes
        except ValueError:  # a custom task: its literal name, classes given or read from the lists
            self.task, official = str(task).strip(), None
        if num_classes is not None:
            self.num_classes = int(num_classes)
        else:
            self.num_classes = official if official is not None else infer_num_classes(self.task_dir)
        self.split = split
        self.transform = transform if transform is not None else pil_to_tensor
        self.list_file = self.task_dir / f"{split}.txt"
        self.samples = self._read_list()
        self.targets = [label for _, label in self.samples]

    def _read_list(self) -> list[tuple[Path, int]]:
        f = self.list_file
        if not f.is_file():
            present = sorted(p.name for p in self.task_dir.glob("*.txt")) or ["none"]
            raise FileNotFoundError(
                f"VTAB list file {str(f)!r} not found (list files in {str(self.task_dir)!r}: {', '.join(present)}).\n"
                f"{_LAYOUT}"
            )
        samples: list[tuple[Path, int]] = []
        missing: list[tuple[int, str]] = []
        for lineno, rel, label in _parse_list(f):
            if label >= self.num_classes:
                raise ValueError(
                    f"{f}:{lineno}: label {label} outside [0, {self.num_classes}) for task {self.task!r} "
                    f"(line '{rel} {label}'); pass num_classes= (data.num_classes) if this is a custom task"
                )
            path = self.task_dir / rel
            if not path.is_file():
                missing.append((lineno, rel))
            samples.append((path, label))
        if missing:
            lineno, rel = missing[0]
            raise FileNotFoundError(
                f"{f}:{lineno}: image {rel!r} not found (looked for {str(self.task_dir / rel)!r}); "
                f"{len(missing)} of {len(samples)} listed images are missing"
            )
        if not samples:
            raise ValueError(f"VTAB list file {str(f)!r} lists no images")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The 8-bit RGB PIL image of item ``index``; unreadable or corrupt files raise
        :class:`~visionpeft.data.files.ImageReadError` (an ``OSError``) naming the path."""
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except ImageReadError as e:
            cause = str(e).split(": ", 1)[1] if str(e).startswith("cannot read image") else str(e)
            raise ImageReadError(f"cannot read VTAB image {str(path)!r} (from {self.list_file.name}): {cause}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.transform(self.load_image(index)), self.samples[index][1]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(task={self.task!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, dir={str(self.task_dir)!r})"
        )


def vtab_datasets(
    root: str | Path,
    task: str,
    mode: str = "final",
    transform: Callable[[Image.Image], Any] | None = None,
    eval_transform: Callable[[Image.Image], Any] | None = None,
    num_classes: int | None = None,
) -> tuple[VTABDataset, VTABDataset]:
    """``(train, eval)`` datasets of a protocol (:func:`splits_for`); ``eval_transform`` defaults to
    ``transform``."""
    train_split, eval_split = splits_for(mode)
    train = VTABDataset(root, task, train_split, transform, num_classes)
    evaluation = VTABDataset(root, task, eval_split, eval_transform or transform, num_classes)
    return train, evaluation


def make_vtab_task_from_arrays(
    root: str | Path,
    task: str,
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[int | None] | Mapping[str, Sequence[int]] = (800, 200, None),
    image_format: str = "png",
    overwrite: bool = False,
) -> Path:
    """Write ``<root>/<task>`` in the VTAB-1k layout from uint8 arrays; deterministic (same input, same bytes).

    Each split gets its own image folder, as in the released VTAB-1k: ``images/<split>/NNNNNN.<ext>``;
    train800val200 is train800 followed by val200.

    Args:
        root: folder to create the task folder in.
        task: folder name (written literally; a canonical name, an alias or a custom name).
        images: uint8 array (N, H, W) grayscale, (N, H, W, 1) or (N, H, W, 3) RGB.
        labels: (N,) non-negative integer labels.
        splits: ``(n_train800, n_val200, n_test)`` taken in order from the arrays (``n_test=None``: the
            rest), or a mapping ``{"train800": indices, "val200": indices, "test": indices}``.
        image_format: ``png`` (lossless) or ``jpg`` (quality 95, as most released copies).
        overwrite: replace the list files and ``images/`` of an existing task folder.

    Returns:
        The task folder.
    """
    images = np.asarray(images)
    labels_arr = np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(f"images must be uint8 (N, H, W[, 1|3]), got {images.dtype} {tuple(images.shape)}")
    if labels_arr.shape != (len(images),) or not np.issubdtype(labels_arr.dtype, np.integer) or (labels_arr < 0).any():
        raise ValueError(
            f"labels must be {len(images)} non-negative integers, got {labels_arr.dtype} {labels_arr.shape}"
        )
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg"}.get(image_format.lower())
    if ext is None:
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    index = _split_indices(len(images), splits)
    index["train800val200"] = np.concatenate([index["train800"], index["val200"]])

    task_dir = Path(root) / task
    existing = [task_dir / f"{s}.txt" for s in SPLITS if (task_dir / f"{s}.txt").exists()]
    if (existing or (task_dir / "images").exists()) and not overwrite:
        raise FileExistsError(f"{str(task_dir)!r} already holds a VTAB task; pass overwrite=True to replace it")
    for p in existing:
        p.unlink()
    if (task_dir / "images").exists():
        shutil.rmtree(task_dir / "images")
    for split in SPLITS:
        (task_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for k, i in enumerate(index[split]):
            rel = f"images/{split}/{k:06d}.{ext}"
            img = images[i][..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images[i]
            pil = Image.fromarray(np.ascontiguousarray(img))
            if ext == "jpg":
                pil.convert("RGB").save(task_dir / rel, format="JPEG", quality=95)
            else:
                pil.save(task_dir / rel, format="PNG")
            lines.append(f"{rel} {int(labels_arr[i])}\n")
        (task_dir / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    return task_dir


def _split_indices(n: int, splits: Sequence[int | None] | Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    if isinstance(splits, Mapping):
        unknown = set(splits) - {"train800", "val200", "test"}
        if unknown or not {"train800", "val200", "test"} <= set(splits):
            raise ValueError(f"splits mapping needs exactly the keys train800, val200, test; got {sorted(splits)}")
        out = {k: np.asarray(v, dtype=np.int64).reshape(-1) for k, v in splits.items()}
        for k, v in out.items():
            if v.size == 0 or (v < 0).any() or (v >= n).any():
                raise ValueError(f"splits[{k!r}] must hold 1 or more indices in [0, {n})")
        return out
    if len(splits) != 3:
        raise ValueError(f"splits must be (n_train800, n_val200, n_test), got {splits!r}")
    n_train, n_val, n_test = splits
    n_test = n - n_train - n_val if n_test is None else n_test
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > n:
        raise ValueError(f"splits {tuple(splits)!r} need 1+ image each and at most {n} in all")
    bounds = np.cumsum([0, n_train, n_val, n_test])
    return {s: np.arange(bounds[j], bounds[j + 1]) for j, s in enumerate(("train800", "val200", "test"))}
