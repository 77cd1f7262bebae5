"""Users' own classification data: a torchvision ``ImageFolder`` tree, or CSV files of ``path,label``.

ImageFolder layout (class names are the folder names, sorted; the training split decides the label of each
class)::

    <root>/train/<class>/*.jpg      (any depth below the class folder; .png, .bmp, .tif, .webp ... too)
    <root>/val/<class>/*.jpg        (or <root>/test/ when there is no val/)

CSV layout: one file per split, one ``path,label`` row per image; paths are relative to the CSV's own folder
(or absolute); the label is an integer (0, 1, ...) or a class name; a header row such as ``path,label`` is
skipped; the file is UTF-8 (a byte-order mark is accepted). Class names are sorted and numbered from the
training CSV; the evaluation CSV must use the same names.

Both readers check everything when the dataset is built (layout, every row, every file present) and name the
file (and line) of each problem; images are decoded lazily as 8-bit RGB (:func:`~visionpeft.data.files.load_rgb`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from .files import IMG_EXTENSIONS, ImageReadError, is_image_file, load_rgb, read_text

EVAL_SPLITS = ("val", "test")
"""Folder names tried, in order, for the evaluation split of an ImageFolder tree."""

_FOLDER_LAYOUT = (
    "expected ImageFolder layout:\n"
    "  <root>/train/<class name>/<image>.jpg   (one folder per class; .jpg, .png, .bmp, .tif, .webp ...)\n"
    "  <root>/val/<class name>/<image>.jpg     (or <root>/test/ when there is no val/)"
)
_CSV_LAYOUT = (
    "expected CSV layout: one 'path,label' row per image, e.g. 'images/cat_001.jpg,cat' or 'img/0001.png,3'; "
    "paths relative to the CSV's folder (or absolute); an optional header row 'path,label'"
)
_PATH_HEADERS = {"path", "file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "img"}
_LABEL_HEADERS = {"label", "labels", "class", "class_name", "classname", "target", "category", "y"}


def _visible(name: str) -> bool:
    return not name.startswith(".")  # .ipynb_checkpoints, macOS ._ files, .DS_Store


def _valid_image(path: str) -> bool:
    return is_image_file(path) and _visible(os.path.basename(path))


class ImageFolderDataset(ImageFolder):
    """One split of an ImageFolder tree (torchvision's :class:`~torchvision.datasets.ImageFolder`), with checked
    layout, hidden folders and files skipped and 8-bit RGB decoding (16-bit greyscale scaled, not clipped).

    Args:
        root: the split's folder (``<root>/train``), holding one folder per class.
        transform: callable applied to the RGB PIL image.
        class_to_idx: the training split's mapping, for an evaluation split (its folders must be a subset);
            ``None``: the sorted class folders of ``root``.

    Attributes:
        classes: class names, index order. class_to_idx: name -> label. samples: ``(path, label)`` list.
        targets: the labels. num_classes: ``len(classes)``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        class_to_idx: dict[str, int] | None = None,
    ) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"ImageFolder split {str(root)!r} does not exist or is not a folder.\n{_FOLDER_LAYOUT}"
            )
        self._given = dict(class_to_idx) if class_to_idx is not None else None
        try:
            super().__init__(
                str(root),
                transform=transform,
                loader=load_rgb,
                is_valid_file=_valid_image,
                allow_empty=class_to_idx is not None,  # an evaluation split may lack some classes
            )
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{root}: {e}\n{_FOLDER_LAYOUT}") from None
        if not self.samples:
            raise FileNotFoundError(
                f"ImageFolder split {str(root)!r} holds no image files ({', '.join(IMG_EXTENSIONS)}) in its class "
                f"folders.\n{_FOLDER_LAYOUT}"
            )
        self.num_classes = len(self.classes)
        self.split = root.name

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folders of ``directory`` (hidden folders skipped), or the training split's mapping."""
        try:
            found = [c for c in find_classes(directory)[0] if _visible(c)]
        except FileNotFoundError:
            found = []
        if self._given is not None:
            extra = sorted(set(found) - set(self._given))
            if extra:
                raise ValueError(
                    f"{directory}: class folders {', '.join(map(repr, extra[:10]))} do not exist in the training "
                    f"split (classes: {', '.join(sorted(self._given)[:20])}); every evaluation class must be trained"
                )
            return sorted(self._given, key=self._given.get), dict(self._given)
        if not found:
            files = sorted(p.name for p in Path(directory).iterdir())[:10]
            raise FileNotFoundError(
                f"ImageFolder split {str(directory)!r} holds no class folder (found: {', '.join(files) or 'nothing'})"
                f".\n{_FOLDER_LAYOUT}"
            )
        return found, {c: i for i, c in enumerate(found)}

    def load_image(self, index: int) -> Image.Image:
        """The 8-bit RGB PIL image of item ``index``; :class:`~visionpeft.data.files.ImageReadError` names the
        file."""
        return load_rgb(self.samples[index][0])


def imagefolder_datasets(
    root: str | Path,
    transform: Callable[[Image.Image], Any] | None = None,
    eval_transform: Callable[[Image.Image], Any] | None = None,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """``(train, eval)`` of an ImageFolder tree: ``<root>/train`` and ``<root>/val`` (or ``<root>/test`` when
    there is no ``val``); the evaluation split's ``split`` attribute says which one was used.

    Raises:
        FileNotFoundError: a missing root or split folder, no class folder, a class folder without images; the
            message shows the expected layout and what was found.
        ValueError: the evaluation split has a class folder that the training split lacks.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {str(root)!r} does not exist or is not a folder.\n{_FOLDER_LAYOUT}")
    sub = sorted(p.name for p in root.iterdir() if p.is_dir())
    found = ", ".join(sub[:20]) or "none"
    if not (root / "train").is_dir():
        hint = ""
        if (root.parent / "train").is_dir() or (root.name in ("train", *EVAL_SPLITS)):
            hint = " The root looks like a split folder: pass its parent as the root."
        raise FileNotFoundError(
            f"ImageFolder root {str(root)!r} has no 'train' folder (folders found: {found}).{hint}\n{_FOLDER_LAYOUT}"
        )
    eval_name = next((s for s in EVAL_SPLITS if (root / s).is_dir()), None)
    if eval_name is None:
        raise FileNotFoundError(
            f"ImageFolder root {str(root)!r} has no 'val' (nor 'test') folder for evaluation (folders found: "
            f"{found}).\n{_FOLDER_LAYOUT}"
        )
    train = ImageFolderDataset(root / "train", transform)
    evaluation = ImageFolderDataset(root / eval_name, eval_transform or transform, class_to_idx=train.class_to_idx)
    return train, evaluation


# CSV ----------------------------------------------------------------------------------------------------------


def read_label_csv(path: str | Path) -> list[tuple[int, str, str]]:
    """``(line number, image path, label text)`` of every data row of a ``path,label`` CSV.

    A first row whose path cell is a known column name (``path``, ``file``, ``filename``, ``image`` ...) or whose
    label cell is one (``label``, ``class``, ``target``, ``category`` ...) is a header and skipped. Blank lines
    are skipped.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not UTF-8, a row without exactly two cells, an empty cell, or no data row; the message names
            the file and line.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {str(path)!r} not found; {_CSV_LAYOUT}")
    text = read_text(path, "CSV file")
    rows: list[tuple[int, str, str]] = []
    seen_first = False
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for cells in reader:
            lineno = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != 2:
                raise ValueError(
                    f"{path}:{lineno}: expected 2 cells 'path,label', got {len(cells)}: {cells!r}; {_CSV_LAYOUT}"
                    + (" (quote paths that hold a comma)" if len(cells) > 2 else "")
                )
            file, label = cells[0].strip(), cells[1].strip()
            first, seen_first = not seen_first, True
            if first and (file.lower() in _PATH_HEADERS or label.lower() in _LABEL_HEADERS):
                continue  # a header row
            if not file or not label:
                raise ValueError(
                    f"{path}:{lineno}: empty {'path' if not file else 'label'} in {cells!r}; {_CSV_LAYOUT}"
                )
            rows.append((lineno, file, label))
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not a valid CSV row ({e}); {_CSV_LAYOUT}") from None
    if not rows:
        raise ValueError(f"CSV file {str(path)!r} lists no images; {_CSV_LAYOUT}")
    return rows


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class CSVDataset(Dataset):
    """One split described by a ``path,label`` CSV (:func:`read_label_csv`); items are ``(transform(image),
    label)``.

    Args:
        csv_file: the CSV; relative image paths are taken from its folder.
        transform: callable applied to the RGB PIL image; ``None`` returns the PIL image.
        class_to_idx: class name -> label, for labels given as names (``None``: integer labels).
        num_classes: class count that integer labels are checked against.

    Attributes:
        csv_file: the CSV. samples: ``(image path, label)`` list. targets: the labels. num_classes.
        classes: class names in label order, or ``None`` for integer labels.
    """

    def __init__(
        self,
        csv_file: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        class_to_idx: dict[str, int] | None = None,
        num_classes: int | None = None,
        rows: list[tuple[int, str, str]] | None = None,
    ) -> None:
        self.csv_file = Path(csv_file).expanduser()
        self.transform = transform
        rows = rows if rows is not None else read_label_csv(self.csv_file)
        base = self.csv_file.parent
        self.class_to_idx = dict(class_to_idx) if class_to_idx is not None else None
        if self.class_to_idx is not None:
            self.classes: list[str] | None = sorted(self.class_to_idx, key=self.class_to_idx.get)
            self.num_classes = len(self.classes)
        else:
            if num_classes is None:
                raise ValueError("CSVDataset with integer labels needs num_classes")
            self.classes, self.num_classes = None, int(num_classes)
        self.samples: list[tuple[Path, int]] = []
        missing: list[tuple[int, str]] = []
        for lineno, file, text in rows:
            label = self._label(lineno, text)
            path = Path(file).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                missing.append((lineno, file))
            self.samples.append((path, label))
        if missing:
            lineno, rel = missing[0]
            raise FileNotFoundError(
                f"{self.csv_file}:{lineno}: image {rel!r} not found (looked for {str(base / rel)!r}); "
                f"{len(missing)} of {len(self.samples)} listed images are missing"
            )
        self.targets = [label for _, label in self.samples]

    def _label(self, lineno: int, text: str) -> int:
        where = f"{self.csv_file}:{lineno}"
        if self.class_to_idx is not None:
            if text not in self.class_to_idx:
                names = ", ".join(list(self.class_to_idx)[:20])
                raise ValueError(f"{where}: class {text!r} is not a class of the training data ({names})")
            return self.class_to_idx[text]
        if not _is_int(text):
            raise ValueError(
                f"{where}: label {text!r} is not an integer, but the training CSV's labels are integers; use one "
                "kind of label (integers 0, 1, ... or class names) in both files"
            )
        label = int(text)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{where}: label {label} outside [0, {self.num_classes}); labels are 0 .. num_classes - 1 "
                "(set data.num_classes if the class count is larger)"
            )
        return label

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The 8-bit RGB PIL image of item ``index``; :class:`~visionpeft.data.files.ImageReadError` names the
        file and the CSV."""
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except ImageReadError as e:
            raise ImageReadError(f"{e} (listed in {self.csv_file})") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        return (self.transform(image) if self.transform is not None else image), self.samples[index][1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(csv={str(self.csv_file)!r}, n={len(self)}, num_classes={self.num_classes})"


def csv_datasets(
    train_csv: str | Path,
    eval_csv: str | Path,
    transform: Callable[[Image.Image], Any] | None = None,
    eval_transform: Callable[[Image.Image], Any] | None = None,
    num_classes: int | None = None,
) -> tuple[CSVDataset, CSVDataset]:
    """``(train, eval)`` datasets from two ``path,label`` CSVs.

    The training CSV decides the kind of label: all integers -> integer labels (``num_classes`` defaults to the
    largest label of both files plus one); otherwise class names, sorted and numbered (``classes`` holds them).

    Raises:
        FileNotFoundError: a missing CSV or image (named with the CSV's line).
        ValueError: a malformed row, a label of the other kind, a class name the training CSV lacks, a label out
            of range, or ``num_classes`` that contradicts the class names.
    """
    train_rows, eval_rows = read_label_csv(train_csv), read_label_csv(eval_csv)
    if all(_is_int(label) for _, _, label in train_rows):
        if num_classes is None:
            ints = [int(label) for _, _, label in train_rows + eval_rows if _is_int(label)]
            num_classes = max(ints) + 1 if ints else 1
        train = CSVDataset(train_csv, transform, num_classes=num_classes, rows=train_rows)
        evaluation = CSVDataset(eval_csv, eval_transform or transform, num_classes=num_classes, rows=eval_rows)
        return train, evaluation
    names = sorted({label for _, _, label in train_rows})
    if num_classes is not None and num_classes != len(names):
        raise ValueError(
            f"num_classes={num_classes}, but the training CSV {str(train_csv)!r} names {len(names)} classes "
            f"({', '.join(names[:20])}); leave num_classes unset for class-name labels"
        )
    mapping = {name: i for i, name in enumerate(names)}
    train = CSVDataset(train_csv, transform, class_to_idx=mapping, rows=train_rows)
    evaluation = CSVDataset(eval_csv, eval_transform or transform, class_to_idx=mapping, rows=eval_rows)
    return train, evaluation
