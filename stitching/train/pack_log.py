"""The trainer's log while it trains a pack (:mod:`stitching.train.pack`): each branch's lines go to its own
``train.log`` and to stderr marked with its number, the pack's own lines to every branch's ``train.log``.

:func:`working_on` marks the branch being worked on (a context variable), :func:`open_log` routes the trainer's
logger (:data:`stitching.train.loop.log`) by it; :func:`stitching.train.loop._teardown_logging` undoes it when
the pack ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys

from stitching import rundir as R
from stitching.train import loop as L

#: the branch the pack is working on (its log lines go to its own train.log; None: every branch's)
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("stitching_pack_branch", default=None)


@contextlib.contextmanager
def working_on(branch):
    """Log lines in this block are ``branch``'s (a :class:`stitching.train.pack.Branch`)."""
    token = _CURRENT.set(branch)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def open_log(branches: list) -> None:
    """Route the trainer's log to ``branches``' ``train.log`` files (replacing the handlers each branch's run
    directory opened) and to stderr."""
    L._teardown_logging()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    files = {}
    for b in branches:
        handler = logging.FileHandler(b.rundir.file(R.LOG))
        handler.setFormatter(fmt)
        files[b.index] = handler
    L.log.setLevel(logging.INFO)
    L.log.addHandler(PackLog(files, fmt))
    L.log.propagate = False


class PackLog(logging.Handler):
    """Routes a record by the branch being worked on (:func:`working_on`): its ``train.log`` or, outside any
    branch, every branch's; and stderr, a branch's lines marked with its number."""

    def __init__(self, files: dict, fmt: logging.Formatter):
        super().__init__()
        self.files, self.fmt = files, fmt
        self.stderr = logging.StreamHandler(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        b = _CURRENT.get()
        for index, handler in self.files.items():
            if b is None or b.index == index:
                handler.handle(record)
        line = self.fmt.format(record)
        if b is not None:
            stamp, _, rest = line.partition(" ")
            day, _, rest = rest.partition(" ") if stamp.count("-") == 2 else ("", "", rest)
            line = " ".join(x for x in (stamp, day, b.label.strip(), rest) if x)
        try:
            self.stderr.stream.write(line + "\n")
            self.stderr.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        for handler in self.files.values():
            handler.close()
        super().close()
