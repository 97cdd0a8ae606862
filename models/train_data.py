"""Training data for ``equislide pretrain``: labelled image folders and unlabelled tissue tiles.

Two datasets, one interface (``len(ds)``, ``ds.load(indices) -> (uint8 (n, S, S, 3), labels | None)``
and ``ds.summary()``):

- :class:`ImageDataset`: image files decoded on demand (an ImageFolder of class folders, like
  NCT-CRC-HE-100K's ``ADI BACK DEB ...``; :func:`image_folder`). Every file is decoded once when the
  folder is scanned, so an unreadable image is skipped and counted there, before any training step,
  and the epochs see a fixed list.
- :class:`TileDataset`: tiles already in memory (cut from slides or tile stores by
  :mod:`equislide.stages.pretrain`).

The summary names what was trained on: counts per class and the SHA-256 of the sorted list of
relative file names, so two runs on the same folder can be told apart from runs on another.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equislide.models._errors import TrainingDataError
from equislide.text import one_line, path_text

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "TileDataset",
    "decode_image",
    "file_list_sha256",
    "image_folder",
]

#: File suffixes read as images (case-insensitive); anything else in a class folder is ignored.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_SKIPPED_SHOWN = 5
#: Folders whose decoded images fit in this many bytes are kept decoded in memory after the scan.
CACHE_BYTES = 2 * 1024**3


def decode_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """An image file as ``(size, size, 3)`` uint8 RGB: transparency composited on white (slide
    background), the central square kept, then resized (bilinear, antialiased) when its side differs.

    Raises:
        OSError, ValueError: the file cannot be decoded (PIL's own reasons).
    """
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        if (w, h) != (side, side):
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if side != size:
            img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8)


def file_list_sha256(names: list[str]) -> str:
    """SHA-256 of the sorted names joined by newlines (POSIX relative paths)."""
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class ImageDataset:
    """Image files with optional integer labels, decoded on demand at ``size`` x ``size`` px.

    Attributes:
        root: The folder the files were found in.
        files: The readable images, in a fixed (sorted) order.
        labels: Class index of each file (None: unlabelled).
        classes: Class names (the folder names), index = label.
        size: Side every image is decoded to.
        skipped: ``(relative path, reason)`` of files that could not be decoded.
    """

    root: Path
    files: list[Path]
    labels: list[int] | None
    classes: list[str]
    size: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Decoded images kept from the scan when they all fit :data:`CACHE_BYTES` (else decoded per batch).
    cache: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, indices) -> tuple[np.ndarray, np.ndarray | None]:
        """The images at ``indices`` as ``(n, size, size, 3)`` uint8, and their labels (or None)."""
        idx = [int(i) for i in indices]
        if self.cache is not None:
            labels = None if self.labels is None else np.asarray([self.labels[i] for i in idx], np.int64)
            return self.cache[np.asarray(idx, np.int64)], labels
        tiles = (
            np.stack([decode_image(self.files[i], self.size) for i in idx])
            if idx
            else np.zeros((0, self.size, self.size, 3), np.uint8)
        )
        labels = None if self.labels is None else np.asarray([self.labels[i] for i in idx], np.int64)
        return tiles, labels

    def summary(self) -> dict[str, Any]:
        """What was trained on: counts, classes, the file list's SHA-256 and what was skipped."""
        names = [f.relative_to(self.root).as_posix() for f in self.files]
        out: dict[str, Any] = {
            "kind": "image_folder",
            "root": path_text(self.root),
            "n_images": len(self.files),
            "size": self.size,
            "files_sha256": file_list_sha256(names),
            "skipped": len(self.skipped),
            "skipped_examples": [f"{path_text(n)}: {r}" for n, r in self.skipped[:_SKIPPED_SHOWN]],
        }
        if self.labels is not None:
            counts = np.bincount(np.asarray(self.labels, np.int64), minlength=len(self.classes))
            out["classes"] = list(self.classes)
            out["class_counts"] = {c: int(n) for c, n in zip(self.classes, counts, strict=True)}
        return out


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def image_folder(
    root: str | os.PathLike[str], *, size: int, labelled: bool = True, min_classes: int = 2
) -> ImageDataset:
    """Scan an ImageFolder (one sub-folder per class, images inside) and decode every image once.

    Args:
        root: The folder.
        size: Side the images are decoded to (``--input-size``).
        labelled: Class folders give labels; False: every image below ``root`` (recursively) is an
            unlabelled sample.
        min_classes: Fewest classes a labelled folder must have (2 for supervised training; 1 is
            enough for data that is only scored).

    Raises:
        TrainingDataError: ``root`` is not a folder, holds no readable image, or (labelled) has fewer
            than ``min_classes`` class folders with images; the message names the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise TrainingDataError(f"{path_text(root)}: not a folder")
    if labelled:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        found = [(d.name, sorted(p for p in d.rglob("*") if _is_image(p))) for d in class_dirs]
        found = [(name, files) for name, files in found if files]
        if not found:
            loose = sum(1 for p in root.iterdir() if _is_image(p))
            hint = (
                f"; it holds {loose} images directly: put them in one sub-folder per class" if loose else ""
            )
            raise TrainingDataError(f"{path_text(root)}: no class folder with images in it{hint}")
        if len(found) < min_classes:
            raise TrainingDataError(
                f"{path_text(root)}: only one class ({path_text(found[0][0])}); supervised training needs "
                "at least two class folders (use --self-supervised for unlabelled data)"
            )
        candidates = [(p, label) for label, (_, files) in enumerate(found) for p in files]
        classes = [name for name, _ in found]
    else:
        candidates = [(p, 0) for p in sorted(p for p in root.rglob("*") if _is_image(p))]
        classes = []
    files, labels, skipped, decoded = [], [], [], []
    keep = len(candidates) * size * size * 3 <= CACHE_BYTES
    for path, label in candidates:
        try:
            img = decode_image(path, size)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file; skip and count
            skipped.append((path.relative_to(root).as_posix(), one_line(err)[:160]))
            continue
        files.append(path)
        labels.append(label)
        if keep:
            decoded.append(img)
    if not files:
        raise TrainingDataError(
            f"{path_text(root)}: none of its {len(candidates)} image files could be read"
            + (f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    if labelled:
        present = sorted(set(labels))
        if len(present) < min_classes:
            raise TrainingDataError(
                f"{path_text(root)}: only class {classes[present[0]]!r} has readable images; supervised "
                "training needs at least two"
            )
    cache = np.stack(decoded) if keep else None
    return ImageDataset(root, files, labels if labelled else None, classes, size, skipped, cache)


@dataclass
class TileDataset:
    """Unlabelled uint8 tiles ``(n, S, S, 3)`` in memory, with the summary of where they came from."""

    tiles: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.tiles
        if t.dtype != np.uint8 or t.ndim != 4 or t.shape[-1] != 3 or t.shape[1] != t.shape[2]:
            raise ValueError(f"tiles must be uint8 (n, S, S, 3), got {t.dtype} {t.shape}")

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def load(self, indices) -> tuple[np.ndarray, None]:
        return self.tiles[np.asarray(list(indices), dtype=np.int64)], None

    def summary(self) -> dict[str, Any]:
        return {"kind": "tiles", "n_tiles": len(self), "size": int(self.tiles.shape[1]), **self.info}
