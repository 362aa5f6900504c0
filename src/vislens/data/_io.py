"""File-system helpers shared by the writers and loaders of the data layer."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class OutputExistsError(FileExistsError, ValueError):
    """The output directory is taken: a FileExistsError that `except ValueError`
    (the CLI's one-line user errors) also catches."""


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` that becomes `out_dir` only on success.

    Readers therefore see either no dataset or a whole one, never a half-written
    one; the temporary directory is removed when the body raises.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; "
                              "remove it or pick a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def open_image(source, name: str | Path) -> Iterator[Image.Image]:
    """Image.open that turns a file that is not an image (or is cut short) into one line
    naming the file, instead of PIL's error from deep inside a loader."""
    try:
        with Image.open(source) as img:
            img.load()
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{name} is not a readable image ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); "
                         "replace or remove that file") from None


def read_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Open an image fully into memory (no open file handle stays behind)."""
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found; check the images directory")
    with open_image(path, path) as img:
        return img.convert(mode) if mode and img.mode != mode else img.copy()


def mask_box(mask) -> tuple[int, int, int, int]:
    """Exclusive pixel bounds of a mask; (0, 0, 0, 0) when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def read_index_png(path: Path) -> np.ndarray:
    """Palette indices of a label PNG (mode P or L), as VOC and DAVIS store them."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation {path} not found")
    with open_image(path, path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path} is a {img.mode} image; expected a palette (P) or "
                             "grey (L) label PNG")
        return np.array(img)


def sorted_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of `folder` with one of `suffixes` (case-insensitive), in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
