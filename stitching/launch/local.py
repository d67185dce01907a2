"""Run a list of run directories on this machine, one after another or N at a time.

Each run is ``python -m stitching.train --run-dir DIR`` (or another ``command`` given the directory: a
closed-form matrix's groups) in its own process (and its own session, so that a terminal's Ctrl-C reaches
the launcher only, which passes it on once), its output appended to ``DIR/launcher.log``; a pack (a list of run
directories, :mod:`stitching.train.pack`) is one job, ``--run-dir`` once per directory (:func:`job_command`),
its output in its first directory's ``launcher.log`` (the others' say where), each of its runs reported by the
ending its ``state.json`` holds from that job. Placement: each
run gets one of the GPUs this process may use -- the entries of the parent's ``CUDA_VISIBLE_DEVICES`` when it
is set (``"2,5"``: runs get ``"2"`` and ``"5"``, never ``"0"``), else every device CUDA reports -- the least
busy one, so runs go round-robin when they outnumber the GPUs; and each of the N runs at a time gets
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` = the CPUs this process may use (its
affinity, e.g. a SLURM allocation) / N, unless the parent sets them (then the first it sets serves the others).

Signals to the launcher: nothing new is started afterwards, and each running trainer is told -- SIGINT
(Ctrl-C) is passed on as SIGINT (the trainers checkpoint at their next step and exit interrupted; a second
Ctrl-C aborts them at once, keeping their last complete checkpoints), SIGTERM and SIGHUP as SIGTERM (they
checkpoint and exit preempted). Each run's real ending is printed as it ends (:func:`stitching.rundir_ending.ending`:
what the trainer wrote into ``state.json``, else what its exit code and directory say), never "checkpoint
saved" unless the trainer saved one. Re-running the launcher resumes them.

Another trainer on a run directory (a second copy of the same sweep, another user): a run whose lock is
held by a live process is not started (a pack starts without it); the launcher starts the others first and
waits for it, then reports it finished by the other trainer (or, if that one stopped without finishing, starts
it, alone: it resumes).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stitching import rundir as R
from stitching import rundir_ending
from stitching.rundir_lock import run_lock

#: what each run directory is given to (``python`` + this + the directory)
TRAIN_COMMAND = ("-m", "stitching.train", "--run-dir")


@dataclasses.dataclass
class _LauncherStop:
    """What the launcher was asked: the signals it received, in order (the main loop passes them on)."""

    signal: int | None = None                   # the first one
    queue: list = dataclasses.field(default_factory=list)    # not passed on yet
    interrupts: int = 0                         # Ctrl-Cs passed on


@dataclasses.dataclass
class LocalResult:
    """What :func:`run_local` did."""

    endings: dict[str, rundir_ending.Ending]  # run dir -> how it ended: every run started, or finished elsewhere
    not_started: list[str]              # runs never started (the launcher was stopped first, or another held them)
    stopped_by: str | None = None       # the signal that stopped the launcher (its name), if one did


def run_local(run_dirs: list, parallel: int = 1, python: str = sys.executable,
              command: tuple[str, ...] = TRAIN_COMMAND) -> LocalResult:
    """Run every job -- a directory, or a pack's list of them -- as ``python`` + :func:`job_command` (see the
    module docstring)."""
    pending = [[Path(x) for x in d] if isinstance(d, (list, tuple)) else [Path(d)] for d in run_dirs]
    running: dict[Path, tuple[subprocess.Popen, object, str | None]] = {}    # by the job's first directory
    jobs: dict[Path, list[Path]] = {}
    endings: dict[str, rundir_ending.Ending] = {}
    waiting: dict[Path, str] = {}            # run dir -> who holds it (said once)
    stop = _LauncherStop()
    gpus = visible_gpus()
    threads = max(1, usable_cpus() // max(1, min(parallel, len(pending))))

    def handle(signum, frame):
        stop.queue.append(signum)
        if stop.signal is None:
            stop.signal = signum

    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while pending or running:
            _pass_on(stop, running)
            if stop.signal is None:
                for job in _startable(pending, waiting, endings, parallel - len(running)):
                    running[job[0]] = _start(job, (python, *command), gpus, running, threads)
                    jobs[job[0]] = job
            if stop.signal is not None and not running:
                break
            for first, (proc, log, _) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[first]
                job = jobs.pop(first)
                for d in job:
                    own = code if len(job) == 1 else _member_code(d, proc.pid, code)
                    if own == R.EXIT_BUSY:          # taken by another trainer meanwhile: wait for it
                        holder = run_lock(d).holder()
                        waiting[d] = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "a trainer"
                        print(f"[local] waiting: {d} is in use by {waiting[d]} (another trainer)", flush=True)
                        pending.append([d])
                        continue
                    endings[str(d)] = ending = rundir_ending.ending(d, own, proc.pid)
                    _say(d, ending, first)
            if not running and pending and stop.signal is None:
                time.sleep(1.0)              # every run left is held by another trainer
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    left = [d for job in pending for d in job]
    for d in left:
        if d in waiting:
            print(f"[local] not started: {d} (in use by {waiting[d]})", flush=True)
    return LocalResult(endings, [str(d) for d in left],
                       signal.Signals(stop.signal).name if stop.signal is not None else None)


def _startable(pending: list[list[Path]], waiting: dict[Path, str], endings: dict, slots: int) -> list[list[Path]]:
    """Up to ``slots`` pending jobs that may start now, in order, taken out of ``pending``: their runs not held by
    another trainer (said once; such a run stays pending, waited for, and a pack starts without it), not
    finished meanwhile (reported as such)."""
    chosen = []
    for job in list(pending):
        if len(chosen) >= slots:
            break
        free, held = [], []
        for d in job:
            if R.status(d) == R.FINISHED:
                state = R.RunDir(d).read_state()
                by = f" by pid {state['pid']} on host {state.get('host')}" if state.get("pid") else ""
                endings[str(d)] = ending = rundir_ending.Ending(R.EXIT_OK, R.FINISHED, f"finished{by}", elsewhere=True)
                _say(d, ending)
                waiting.pop(d, None)
                continue
            holder = run_lock(d).holder()
            if holder is not None:
                who = f"pid {holder.get('pid')} on host {holder.get('host')}"
                if d not in waiting:
                    print(f"[local] waiting: {d} is in use by {who} (another trainer); starting the others first",
                          flush=True)
                waiting[d] = who
                held.append(d)
                continue
            waiting.pop(d, None)
            free.append(d)
        at = pending.index(job)
        pending[at:at + 1] = [[d] for d in held]        # (each run waited for is a job of its own now)
        if free:
            chosen.append(free)
    return chosen


def _start(job: list[Path], command: tuple[str, ...], gpus: list[str], running: dict, threads: int):
    d = job[0]
    slot = least_busy(gpus, [gpu for _, _, gpu in running.values()])
    env = run_env(os.environ, slot, threads)
    log = open(d / R.LAUNCHER_LOG, "a")
    for other in job[1:]:
        with open(other / R.LAUNCHER_LOG, "a") as note:
            note.write(f"[local] trained in a pack of {len(job)} runs: its output is in {d / R.LAUNCHER_LOG}\n")
    what = f"a pack of {len(job)} runs: {d}, ..." if len(job) > 1 else str(d)
    print(f"[local] start {what}" + (f" on GPU {slot}" if slot is not None else "")
          + f", {env['OMP_NUM_THREADS']} threads", flush=True)
    proc = subprocess.Popen(job_command(command, job), stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, log, slot


def job_command(command: tuple[str, ...], job: list) -> list[str]:
    """The command line of a job of run directories: ``command`` and the directory; for several (a pack), the
    command's last word before each of them where it is an option (``--run-dir A --run-dir B``), else the
    directories one after another."""
    if len(job) > 1 and command[-1].startswith("-"):
        return [*command[:-1], *(a for d in job for a in (command[-1], str(d)))]
    return [*command, *map(str, job)]


def _member_code(d: Path, pid: int, code: int) -> int:
    """The exit code of one run of a pack's job (``pid``, exit ``code``): the one its ``state.json`` says that job
    ended it with; 0 for a run already finished; ``EXIT_BUSY`` for a run another trainer holds (the pack left it
    out); else the job's own ``code``."""
    rd = R.RunDir(d)
    state = rd.read_state()
    if state.get("pid") == pid and isinstance(state.get("exit_code"), int):
        return state["exit_code"]
    if rd.finished:
        return R.EXIT_OK
    return R.EXIT_BUSY if run_lock(rd.path).holder() is not None else code


def _pass_on(stop: _LauncherStop, running: dict) -> None:
    """Pass each signal the launcher received on to the running trainers, once: SIGINT as SIGINT, SIGTERM and
    SIGHUP as SIGTERM (in the main loop, not in the handler, so that printing cannot re-enter a print the
    signal interrupted)."""
    while stop.queue:
        received = stop.queue.pop(0)
        sig = signal.SIGINT if received == signal.SIGINT else signal.SIGTERM
        stop.interrupts += sig == signal.SIGINT
        for proc, _, _ in running.values():
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGTERM:
            what = "stopping them at their next step with a checkpoint (preempted)"
        elif stop.interrupts == 1:
            what = "stopping them at their next step with a checkpoint (Ctrl-C again aborts them at once)"
        else:
            what = "aborting them at once (their last complete checkpoints are kept)"
        print(f"[local] {signal.Signals(received).name}: {len(running)} running, {what}; starting nothing new",
              flush=True)


def _say(d: Path, ending: rundir_ending.Ending, job: Path | None = None) -> None:
    """One line for a run that ended: its real ending (``job``: the directory whose ``launcher.log`` has the
    output of the job it ran in)."""
    job = job or d
    if ending.elsewhere:
        print(f"[local] {ending.message} (another trainer): {d}", flush=True)
    elif ending.status == R.FINISHED:
        print(f"[local] done: {d}", flush=True)
    elif ending.failed:
        print(f"[local] FAILED: {d} ({ending.message}) -- see {job / R.LAUNCHER_LOG}", flush=True)
    elif ending.status in (R.NEW, R.STARTED):     # it said nothing: stopped while starting, or killed
        print(f"[local] stopped: {d} ({ending.message})", flush=True)
    else:
        resumes = "; the next launch resumes it" if ending.status in (R.PREEMPTED, R.INTERRUPTED) else ""
        print(f"[local] {ending.status}: {d} ({ending.message}{resumes})", flush=True)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def visible_gpus(environ=os.environ) -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: the parent's list when set (indices
    or UUIDs, in its order, up to the first invalid entry as CUDA reads it; empty: none), else ``0..n-1`` for
    the n devices CUDA reports."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(_gpu_count())]
    gpus = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return gpus


def least_busy(gpus: list[str], in_use: list[str | None]) -> str | None:
    """The GPU with the fewest runs on it (the first such in ``gpus``), or None without GPUs."""
    return min(gpus, key=lambda g: in_use.count(g)) if gpus else None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM allocation, taskset, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_env(environ, gpu: str | None, threads: int) -> dict[str, str]:
    """A run's environment: ``environ`` with its GPU and thread counts. Thread counts ``environ`` sets are kept,
    and the first one it sets (in :data:`THREAD_VARS` order) is the count for those it leaves unset: a user's
    ``OMP_NUM_THREADS=1`` means one thread for MKL and OpenBLAS too (before, they got ``threads``, and a
    closed-form group on a busy 2-core machine spent 6x the CPU time in a second BLAS thread)."""
    env = dict(environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    given = next((environ[var] for var in THREAD_VARS if environ.get(var)), str(threads))
    for var in THREAD_VARS:
        env.setdefault(var, given)
    return env


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU runs
        return 0
