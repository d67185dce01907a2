"""One branch of a pack (:mod:`stitching.train.pack`): its state, working on it, and the log it writes to.

:class:`Branch` is a run of the pack: the single run's state (:class:`stitching.train.trainer.Trainer`) and what the
pack keeps per branch. :func:`scope` works on one branch: its own global random state swapped in (and kept when
done) and its log lines to its own ``train.log``. :func:`open_log` routes the trainer's logger
(:data:`stitching.train.trainer.log`) by the branch being worked on (on the main process, as a run alone logs):
each branch's lines to its ``train.log`` and to stderr marked with its number, the pack's own lines to every
branch's; :func:`stitching.train.ending.restore_logging` gives the log back as it was before the pack
(:func:`adopt`: each branch's run directory set it up for itself first).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import sys

from stitching import rundir as R
from stitching.train import checkpoint as C
from stitching.train.trainer import Trainer, log

#: the branch the pack is working on (its log lines go to its own train.log; None: every branch's)
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("stitching_pack_branch", default=None)


@dataclasses.dataclass(eq=False)
class Branch(Trainer):
    """One run of a pack: the single run's state (:class:`stitching.train.trainer.Trainer`) and what the pack keeps per
    branch."""

    index: int = 0
    rng: dict | None = None                 # its own global random state (stitching.train.checkpoint.get_rng)
    code: int | None = None                 # its exit code once it has ended (None: still in the pack)
    message: str = ""
    shared: bool = False                    # its runner reads the pack's source prefix
    last_eval: dict | None = None
    meter: object = None
    joined: bool = False                    # it has trained in the current epoch of the data pass
    step_images: int = 0
    loss: object = None

    @property
    def label(self) -> str:
        return f"[{self.index + 1}] "


@contextlib.contextmanager
def scope(b: Branch, rng: bool = True):
    """Work on branch ``b``: its own global random state swapped in (and kept when done), its log lines to its
    ``train.log`` only."""
    token = _CURRENT.set(b)
    if rng and b.rng is not None:
        C.set_rng(b.rng, b.device)
    try:
        yield
    finally:
        if rng:
            b.rng = C.get_rng(b.device)
        _CURRENT.reset(token)


def adopt(branches: list) -> tuple | None:
    """The trainer's log as it was before the pack, taken over from ``branches``, whose run directories each set
    it up for themselves (:func:`stitching.train.ending.setup_logging`: the first found it as it was, each later
    one the handlers of the one before, closed here); the handlers now on the log (the last one's) removed and
    closed. None when no branch set it up (or it was taken over already)."""
    was = None
    for b in branches:
        if b.logging_was is None:
            continue
        if was is None:
            was = b.logging_was
        else:
            for handler in b.logging_was[1]:
                handler.close()
        b.logging_was = None
    if was is not None:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
    return was


def open_log(branches: list, live: list) -> tuple | None:
    """Route the trainer's log to the ``train.log`` files of ``live`` (the branches still in the pack) and to
    stderr, replacing the handlers the run directories of ``branches`` (all of the pack's) opened; the log as it
    was before the pack (:func:`adopt`), for :func:`stitching.train.ending.restore_logging` when it ends."""
    was = adopt(branches)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    files = {}
    for b in live:
        handler = logging.FileHandler(b.rundir.file(R.LOG))
        handler.setFormatter(fmt)
        files[b.index] = handler
    log.setLevel(logging.INFO)
    log.addHandler(PackLog(files, fmt))
    log.propagate = False
    return was


class PackLog(logging.Handler):
    """Routes a record by the branch being worked on (:func:`scope`): its ``train.log`` or, outside any
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
