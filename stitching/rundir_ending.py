"""How a trainer process ended, in the words a launcher prints: :class:`Ending` and :func:`ending`, read from
the exit code and what the trainer wrote into the run directory's ``state.json`` (:mod:`stitching.rundir`
owns the exit codes and statuses)."""

from __future__ import annotations

import dataclasses
import os

from stitching.rundir import (ENDED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, FAILED, FINISHED, RunDir,
                              describe_exit, status)


@dataclasses.dataclass(frozen=True)
class Ending:
    """How one trainer process ended, as a launcher reports it (:func:`ending`)."""

    code: int               # its exit code (negative: killed by that signal)
    status: str             # one of STATUSES: what the run directory is now
    message: str            # what happened, in a few words
    elsewhere: bool = False  # the run was finished by another trainer, not by this process

    @property
    def failed(self) -> bool:
        return self.status == FAILED


def ending(path: str | os.PathLike, code: int, pid: int | None = None) -> Ending:
    """How the trainer process ``pid`` that exited with ``code`` on run directory ``path`` ended: what it wrote
    into ``state.json`` when it wrote it (status and message), else what its exit code and the directory say
    -- never that a checkpoint was saved unless the trainer said so. A trainer killed by a signal before it
    said anything (still starting up, or SIGKILL) is reported with what the directory holds: its last
    checkpoint, or nothing saved."""
    d = RunDir(path)
    state = d.read_state()
    if pid is not None and state.get("pid") == pid and state.get("exit_code") == code \
            and state.get("status") in (*ENDED, FINISHED):
        return Ending(code, state["status"], state.get("message") or describe_exit(code))
    if code == EXIT_OK:         # it wrote no state of its own: it found the run finished (by another trainer)
        by = f" by pid {state['pid']} on host {state.get('host')}" if state.get("pid") not in (None, pid) else ""
        return Ending(code, FINISHED, f"already finished{by}", elsewhere=pid is not None)
    if code < 0 or code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):   # stopped while starting, or killed
        saved = "its last checkpoint is kept" if d.checkpoint_candidates() else "nothing was saved"
        return Ending(code, status(path), f"{describe_exit(code)} before it said how it ended; {saved}")
    return Ending(code, FAILED, describe_exit(code).removeprefix("FAILED: "))
