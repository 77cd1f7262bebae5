"""Reading users' files: text lists (UTF-8 with or without a byte-order mark) and images of any common PIL mode
as 8-bit RGB.

Two traps this module closes: a list file saved with a byte-order mark (Windows editors, Excel's "CSV UTF-8")
would glue ``\\ufeff`` to its first path, and a 16-bit PNG (PIL modes ``I;16`` / ``I``) converted with a plain
``Image.convert("RGB")`` is clipped at 255, so a scan spread over 0..65535 collapses to a few grey levels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File name endings read as images (lower case; compared case-insensitively)."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageReadError(OSError):
    """An image file is missing, unreadable, corrupt or truncated, or has a pixel format that cannot be turned into
    8-bit RGB without losing its values; the message names the file."""


def read_text(path: str | os.PathLike, what: str = "list file") -> str:
    """The text of a UTF-8 file; a leading byte-order mark is dropped.

    Args:
        path: the file.
        what: how the file is called in error messages (``"VTAB list file"``, ``"CSV file"``).

    Raises:
        ValueError: the file is not valid UTF-8 (another encoding such as Latin-1 or UTF-16); the message names
            the file, the line and the offending bytes, and says how to convert it.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ValueError(
            f"{what} {str(path)!r} is UTF-16 encoded; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8 "
            f"{path.name} > {path.stem}-utf8{path.suffix}`)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        bad = raw[e.start : e.end + 3]
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 (line {line}: bytes {bad!r}); save it as UTF-8 "
            f"(e.g. `iconv -f LATIN1 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`)"
        ) from None


def pil_to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """An 8-bit RGB copy of ``image``, keeping the full range of high-bit-depth greyscale images.

    16-bit greyscale (modes ``I;16*``, and ``I`` as PIL opens 16-bit PNGs) is scaled by 1/257 (65535 -> 255) and
    rounded; other modes go through ``Image.convert("RGB")`` (alpha is dropped).

    Args:
        image: a PIL image of any mode.
        name: the file name used in error messages.

    Raises:
        ImageReadError: a 32-bit integer image with values outside [0, 65535] or a float image (mode ``F``):
            there is no single right way to map them to 8 bits.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        arr = np.asarray(image)
        if mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise ImageReadError(
                f"image {name!r} is a 32-bit integer image with values in [{int(arr.min())}, {int(arr.max())}]; "
                "only 8- and 16-bit images are read: convert it to 8- or 16-bit PNG"
            )
        grey = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1)), mode="RGB")
    if mode == "F":
        raise ImageReadError(
            f"image {name!r} has floating-point pixels (PIL mode 'F'); convert it to an 8- or 16-bit PNG"
        )
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB (see :func:`pil_to_rgb`), fully decoded.

    Raises:
        ImageReadError: the file is missing, unreadable, corrupt or truncated, or of an unsupported pixel format;
            the message names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode inside the try: a truncated file fails here, not later in a worker
            return pil_to_rgb(im, str(path))
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {str(path)!r}: {e}") from e


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the file name ends in one of :data:`IMG_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMG_EXTENSIONS)
