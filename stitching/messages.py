"""How an error message quotes what it was given: the one bound on how much of a value a message prints.

A value from a file or the command line can be of any size (a YAML alias bomb expands to gigabytes, a string
can be a megabyte), and an error about it must stay one short line. Every error that quotes a value
(:class:`ConfigError` and the others) quotes it with :func:`short_repr`, which never walks
more of the value than it prints (:mod:`reprlib`: a few items per level, a few levels), and clips what it names
in free text (a key, a message from a library) with :func:`clip`.

It also owns :class:`ConfigError`, the one-line error of a bad key, value or file, and :data:`CLI` (how it names
the command line as a source), which :mod:`stitching.config` re-exports. Standard library only, so every module
may import it.
"""

from __future__ import annotations

import reprlib

__all__ = ["MAX_VALUE_CHARS", "MAX_MESSAGE_CHARS", "short_repr", "clip", "ConfigError", "CLI"]

#: the most characters of a value an error message prints
MAX_VALUE_CHARS = 200
#: the most characters of free text (a library's own message, a list of keys) an error message passes on
MAX_MESSAGE_CHARS = 1000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxarray = 6
_REPR.maxstring = _REPR.maxother = MAX_VALUE_CHARS
_REPR.maxlong = 40


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` itself when it has at most ``limit`` characters, else its start and how long it was."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def short_repr(value) -> str:
    """``repr(value)`` of at most about :data:`MAX_VALUE_CHARS` characters, computed from a bounded part of the
    value (the first items of each collection, the first levels of nesting, ``...`` for the rest)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a repr that fails (an int too long to print, a broken __repr__)
        text = f"<{type(value).__name__}>"
    return clip(text)


CLI = "command line"


class ConfigError(ValueError):
    """A bad key, value or combination: ``str()`` is the one line naming the source (file, command line or the
    Python call), the key and the value; :func:`stitching.cli.run_cli` prints it and exits with
    ``stitching.rundir.EXIT_CONFIG``. The value is quoted with :func:`short_repr` and the key and message are
    clipped, so the line stays short whatever the value (an alias bomb, a megabyte string)."""

    def __init__(self, key: str, value, source: str, message: str):
        self.key, self.value, self.source, self.message = key, value, source, message
        key, message = clip(key), clip(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{source}: {key}={short_repr(value)}: {message}" if key else f"{source}: {message}")
