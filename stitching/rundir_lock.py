"""One trainer per run directory: its ``lock`` file (:class:`Lock`, :func:`run_lock`), when a lock is stale
(:data:`LOCK_STALE_S`; the holder's host, pid and the pid's start time), and what the lock says of a started
run (:func:`live_status`: ``running`` or ``killed``).  The file's name and the statuses are
:mod:`stitching.rundir`'s."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from stitching.rundir import FINISHED, KILLED, LOCK, RUNNING, STARTED, BusyError, overwrite, status, utc_now

#: a lock taken on another host whose holder has not touched it for this long is stale
LOCK_STALE_S = 900.0


def run_lock(path: str | os.PathLike) -> "Lock":
    """The lock of the run directory ``path``."""
    return Lock(Path(path) / LOCK)


def live_status(path: str | os.PathLike) -> str:
    """:func:`status`, a started run told apart by its lock: :data:`RUNNING` while a live trainer holds it (on
    another host: one that touched the lock within :data:`LOCK_STALE_S`), else :data:`KILLED` (its node lost or
    its process gone without saying how it ended; running it again resumes from its last checkpoint). A run whose new trainer is already working again is running
    whatever the last one said."""
    st = status(path)
    if st == FINISHED:
        return st
    if run_lock(path).alive_holder() is not None:
        return RUNNING
    return KILLED if st == STARTED else st


class Lock:
    """``lock`` = JSON {host, pid, started}: created exclusively; a second trainer is refused with the
    holder's name. A lock whose process is gone (same host: no such pid, or a pid reused by another
    process; another host: not touched for :data:`LOCK_STALE_S` seconds -- the holder touches it at
    every step) is stale and taken over."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False
        self.took_over: dict | None = None

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                "started": utc_now()}

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`BusyError` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read()
                if not holder and time.time() - self._mtime() < 5:
                    time.sleep(0.2)      # being written by another trainer right now
                    continue
                if self._alive(holder):
                    raise BusyError(f"{self.path.parent} is in use by pid {holder.get('pid')} on host "
                                    f"{holder.get('host')} (since {holder.get('started')}); wait for it or stop it "
                                    f"(a lock left by a process that is gone is taken over)") from None
                self._remove_stale(holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._mine()) + "\n")
            self.held = True
            return
        raise BusyError(f"{self.path.parent}: could not take its lock {self.path}")

    def _remove_stale(self, holder: dict) -> None:
        """Move the stale lock aside -- only if it is still the one judged stale (another trainer may have
        taken it over and written a fresh one meanwhile: that one is put back)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != holder:
            try:
                os.link(aside, self.path)      # never replaces a lock created in between
            except FileExistsError:
                pass
        else:
            self.took_over = holder or {"host": "?", "pid": "?"}
        aside.unlink(missing_ok=True)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _alive(self, holder: dict) -> bool:
        if not holder or holder.get("released"):
            return False
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname():
            return time.time() - self._mtime() < LOCK_STALE_S
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        start = holder.get("start")
        return start is None or _process_start(pid) in (None, start)

    def alive_holder(self) -> dict | None:
        """The lock's holder if it is alive (see the class docstring), else None (no lock, or a stale one)."""
        holder = self.read()
        return holder if self._alive(holder) else None

    def touch(self) -> None:
        """Say the holder is alive (cheap; called at every step by the trainer)."""
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def holder(self) -> dict | None:
        """Who holds the lock now (host, pid, started), or None when it is free or its holder is gone (a
        stale lock, which the next trainer takes over)."""
        holder = self.read()
        return holder if holder and self._alive(holder) else None

    def release(self) -> bool:
        """Remove the lock; False when the directory refuses (it became unwritable): the lock is then marked
        ``released`` in place where the file itself can still be written, and is free for the next trainer
        either way (its process is gone)."""
        removed = True
        if self.held:
            if self.read().get("pid") == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    removed = False
                    overwrite(self.path, (json.dumps({**self.read(), "released": utc_now()}) + "\n").encode())
            self.held = False
        return removed


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
