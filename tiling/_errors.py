"""Errors raised by :mod:`equislide.tiling`.

Every error about an input file is a :class:`SlideError` with the file's ``path`` and a short
``reason``; ``str(err)`` is a single line ``"<file name>: <reason> (<detail>)"`` so a run report can
show it as is. Catch :class:`SlideError` to skip a bad sample and keep the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from equislide.text import one_line

__all__ = [
    "CorruptSlideError",
    "NoTissueError",
    "NoUsableMppError",
    "NotASlideError",
    "PermissionDeniedError",
    "SlideError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "UnsupportedImageError",
]


class SlideError(Exception):
    """A slide or image that cannot be used.

    Attributes:
        path: The file as given by the caller.
        reason: What is wrong, a few words ("truncated file", "not a slide or image").
        detail: The underlying library's message (OpenSlide, tifffile, PIL), or ``None``.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, *, detail: str | None = None) -> None:
        self.path = Path(path)
        self.reason = one_line(reason)
        self.detail = one_line(detail) if detail else None
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path.name or self.path}: {self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        return text

    def __reduce__(self):  # keep errors picklable across Dask workers
        return (_rebuild, (type(self), str(self.path), self.reason, self.detail))


def _rebuild(cls: type[SlideError], path: str, reason: str, detail: str | None) -> SlideError:
    return cls(path, reason, detail=detail)


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The path does not exist."""


class NotASlideError(SlideError):
    """Not a slide or image: unknown format, a text file, zero bytes, a directory, a special file."""


class CorruptSlideError(SlideError):
    """A known format that fails to decode: truncated file, broken tiles or headers."""


class SlideTooLargeError(SlideError):
    """Declared dimensions above the limit (a decompression bomb), refused before decoding."""


class UnsupportedImageError(SlideError):
    """A decodable image that cannot be turned into RGB (e.g. 5 channels, complex values)."""


class NoUsableMppError(SlideError):
    """No usable resolution: the metadata has none (or a garbage one) and no ``input_mpp`` was given;
    refused unless the caller opts in to native pixels."""


class NoTissueError(SlideError):
    """The tissue mask of a slide is empty (raised by callers of :func:`tissue_mask`)."""


class PermissionDeniedError(SlideError, PermissionError):
    """The file exists but cannot be read by this process."""
