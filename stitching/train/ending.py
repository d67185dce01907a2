"""How a run ends: the trainer's log set up and given back, the lock and ``state.json`` at the end, what Ctrl-C
keeps and how to go on, said to the user.

Owns :func:`close` (curves closed, ``state.json`` says how the trainer ended, the lock given back, as far as the
run directory allows), :func:`interrupted` (Ctrl-C outside the orderly stop), :func:`rerun` / :func:`tell` (the
words) and :func:`setup_logging` / :func:`restore_logging` (the ``stitching.train`` log to ``train.log`` and
stderr for the run, then as it was: the trainer may run inside a notebook or a test session).
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from stitching import rundir as R
from stitching.train.trainer import Trainer, log


def close(r: Trainer, code: int, message: str) -> str:
    """Close the run's curves (``output.log_to``), say in ``state.json`` how this trainer ended and give the lock
    back, as far as the run directory still allows (it may have become unwritable); what could not be done, as
    words for the error line ("" if all went well)."""
    if r.trackers is not None:
        r.trackers.close()
        r.trackers = None
    if r.lock is None or not r.lock.held:
        return ""
    wrote = r.rundir.write_state(R.status_of_exit(code), code, message)
    released = r.lock.release()
    if wrote and released:
        return ""
    said = r.rundir.read_state().get("status")
    notes = [] if wrote else [f"{R.STATE} could not be updated (it still says {said!r})"]
    if not released:
        marked = "marked released" if r.lock.read().get("released") else "left as it was"
        notes.append(f"the lock could not be removed ({marked}; the next trainer takes it over, this process "
                     "being gone)")
    return f"; {r.rundir.path} takes no new files: " + ", ".join(notes)


def interrupted(r: Trainer, aborted: bool) -> str:
    """Ctrl-C without the orderly stop (while starting up, or a second one): say what is kept; the words for
    ``state.json``."""
    if aborted:
        kept = f"the last complete checkpoint ({r.saved}) is kept" if r.saved else "no checkpoint was written yet"
        what = f"aborted by a second Ctrl-C: {kept}"
    else:
        what = "interrupted (Ctrl-C) while starting, before any training step" + (
            f"; the checkpoint ({r.saved}) is kept" if r.saved else "")
    if r.info.is_main:
        tell(f"{what}; to {'resume' if r.saved else 'start it'}, run the same command again ({rerun(r)})")
    return what


def rerun(r: Trainer) -> str:
    return f"or: python -m stitching.train --run-dir {shlex.quote(str(r.rundir.path))}"


def tell(line: str) -> None:
    """One line for the user: on the log once it is set up (stderr and train.log), else on stderr."""
    if log.handlers:
        log.info(line)
    else:
        print(line, file=sys.stderr)


def setup_logging(file: Path) -> tuple:
    """The trainer's log (``stitching.train`` and its children) to ``file`` and stderr, and only there; returns
    how it was before, for :func:`restore_logging` when the run ends (``stitching.train()`` runs in the
    caller's process: a notebook, a script, a test session, which go on using ``logging``)."""
    was = (log.level, list(log.handlers), log.propagate)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    for handler in (logging.FileHandler(file), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False
    return was


def restore_logging(was: tuple) -> None:
    """The trainer's log as :func:`setup_logging` found it; this run's handlers flushed and closed (the log
    file's handle; the stream handler leaves stderr open)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    level, handlers, propagate = was
    log.setLevel(level)
    for handler in handlers:
        log.addHandler(handler)
    log.propagate = propagate
