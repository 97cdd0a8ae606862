"""Text every room prints: one-line reasons, and file names made safe to show, log and store.

File names on Linux are bytes. Python carries the bytes that are not UTF-8 as lone surrogates
(``os.fsdecode``'s ``surrogateescape``), which is right for opening the file and wrong for JSON, logs
and Prefect parameters (they refuse to encode them). A name may also hold newlines, escape sequences
or rich markup. So: the real path travels inside a process; :func:`printable` is what is shown or
written; :func:`pack_path` / :func:`unpack_path` carry a path through JSON (Prefect's parameters)
without loss.
"""

from __future__ import annotations

import os

__all__ = [
    "OneLineFormatter",
    "one_line",
    "one_line_console",
    "pack_path",
    "path_text",
    "printable",
    "unpack_path",
]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Marks a packed path: the hex of its bytes, used only for names that are not UTF-8.
_PACKED = "equislide-fsbytes:"


def printable(text: object) -> str:
    """``text`` with bytes that are not UTF-8 as ``\\xff`` and control characters escaped (``\\n``,
    ``\\x1b``): always encodable as UTF-8, and always one line."""
    s = str(text)
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file system byte gave: show its code point
        raw = s.encode("utf-8", "backslashreplace")
    s = raw.decode("utf-8", "backslashreplace")
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"))
    return "".join(out)


def path_text(path: str | os.PathLike[str]) -> str:
    """How a path is shown and stored in reports and logs (:func:`printable`)."""
    return printable(os.fspath(path))


def one_line(text: object) -> str:
    """Collapse whitespace (newlines included) to single spaces; escape what cannot be shown."""
    return printable(" ".join(str(text).split()))


def pack_path(path: str | os.PathLike[str]) -> str:
    """A path as JSON-safe text: itself when it is valid UTF-8, else a marked hex of its bytes."""
    s = os.fspath(path)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return _PACKED + os.fsencode(s).hex()
    return s


def unpack_path(text: str) -> str:
    """The path :func:`pack_path` packed (any other text comes back as it is)."""
    if not text.startswith(_PACKED):
        return text
    try:
        raw = bytes.fromhex(text[len(_PACKED) :])
    except ValueError:
        return text
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:  # only names that are not UTF-8 are ever packed
        return os.fsdecode(raw)
    return text


class OneLineFormatter:
    """A log formatter that writes a record on one line, without its traceback (that stays in the flow
    run's log on the Prefect server and in ``run.json``'s ``error_detail``)."""

    def __init__(self, inner):
        import logging

        self.inner = inner or logging.Formatter()

    def format(self, record) -> str:
        import copy

        plain = copy.copy(record)
        plain.msg, plain.args = one_line(record.getMessage())[:400], ()
        plain.exc_info = plain.exc_text = plain.stack_info = None
        return self.inner.format(plain)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def one_line_console() -> list:
    """Give every console handler of every logger a :class:`OneLineFormatter`; returns ``[(handler,
    old formatter)]`` to undo it. Prefect and Dask log one fault with a traceback each (four for one
    lost scheduler, measured), and a Dask worker logs its last heartbeat's failure with one when the
    cluster closes; those would bury the CLI's own one-line error."""
    import logging

    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    changed = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h).__name__ in ("StreamHandler", "PrefectConsoleHandler") and not isinstance(
                h.formatter, OneLineFormatter
            ):
                changed.append((h, h.formatter))
                h.setFormatter(OneLineFormatter(h.formatter))
    return changed
