"""Run a list of run directories on this machine, one after another or N at a time.

Each job is ``python -m stitching.train --run-dir DIR`` in its own process, its output appended to
``DIR/launcher.log``; a pack (a list of run directories, :mod:`stitching.train.pack`) is one job, ``--run-dir``
once per directory, its output in its first directory's ``launcher.log`` (the others' say where), and each of
its runs' exit code is the one its ``state.json`` holds from that job. Placement: each run gets one of the GPUs this process may use -- the entries of
the parent's ``CUDA_VISIBLE_DEVICES`` when it is set (``"2,5"``: runs get ``"2"`` and ``"5"``, never
``"0"``), else every device CUDA reports -- the least busy one, so runs go round-robin when they outnumber
the GPUs; and each of the N runs at a time gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
``OPENBLAS_NUM_THREADS`` = the CPUs this process may use (its affinity, e.g. a SLURM allocation) / N,
unless the parent sets them. SIGTERM/SIGINT to the launcher is forwarded to the running trainers (which
checkpoint and exit with ``EXIT_PREEMPTED``; one still starting up, killed by the signal, counts as preempted
too); nothing new is started afterwards. Re-running the launcher resumes them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stitching.rundir import EXIT_OK, EXIT_PREEMPTED, LAUNCHER_LOG, RunDir, describe_exit


def run_local(run_dirs: list, parallel: int = 1, python: str = sys.executable) -> dict[str, int]:
    """Run every job (a run directory, or a pack's list of them); returns run dir -> exit code
    (``rundir.EXIT_OK`` done, ``rundir.EXIT_PREEMPTED`` preempted, other = failed)."""
    pending = [[Path(x) for x in d] if isinstance(d, (list, tuple)) else Path(d) for d in run_dirs]
    running: dict[Path, tuple[subprocess.Popen, object, int | None]] = {}
    packs: dict[Path, list[Path]] = {}
    codes: dict[str, int] = {}
    stop = {"signal": None}
    gpus = visible_gpus()
    threads = max(1, usable_cpus() // max(1, min(parallel, len(pending))))

    def handle(signum, frame):
        stop["signal"] = signum
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < parallel and stop["signal"] is None:
                job = pending.pop(0)
                dirs = job if isinstance(job, list) else [job]
                d = dirs[0]
                slot = least_busy(gpus, [gpu for _, _, gpu in running.values()])
                env = run_env(os.environ, slot, threads)
                log = open(d / LAUNCHER_LOG, "a")
                for other in dirs[1:]:
                    with open(other / LAUNCHER_LOG, "a") as note:
                        note.write(f"[local] trained in a pack of {len(dirs)} runs: its output is in "
                                   f"{d / LAUNCHER_LOG}\n")
                what = f"a pack of {len(dirs)} runs: {d}, ..." if len(dirs) > 1 else str(d)
                print(f"[local] start {what}" + (f" on GPU {slot}" if slot is not None else "")
                      + f", {env['OMP_NUM_THREADS']} threads", flush=True)
                args = [a for x in dirs for a in ("--run-dir", str(x))]
                proc = subprocess.Popen([python, "-m", "stitching.train", *args], stdout=log,
                                        stderr=subprocess.STDOUT, env=env)
                running[d] = (proc, log, slot)
                packs[d] = dirs
            if stop["signal"] is not None and not running:
                break
            for d, (proc, log, _) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    log.close()
                    if code < 0 and stop["signal"] is not None:
                        # stopped by the forwarded signal before its handler was installed (still starting):
                        # nothing trained is lost, the next launch resumes it -- preempted, not failed
                        code = EXIT_PREEMPTED
                    del running[d]
                    for member in packs[d]:
                        own = _ending(member, proc.pid, code) if len(packs[d]) > 1 else code
                        codes[str(member)] = own
                        print(f"[local] {describe_exit(own)}: {member}" + (
                            "" if own in (EXIT_OK, EXIT_PREEMPTED) else f" -- see {d / LAUNCHER_LOG}"), flush=True)
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return codes


def _ending(run_dir: Path, pid: int, code: int) -> int:
    """The exit code of one run of a pack's job: what its ``state.json`` says the job (``pid``) ended it with,
    0 for a run already finished, else the job's own ``code``."""
    state = RunDir(run_dir).read_state()
    if state.get("pid") == pid and isinstance(state.get("exit_code"), int):
        return state["exit_code"]
    return EXIT_OK if RunDir(run_dir).finished else code


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
    """A run's environment: ``environ`` with its GPU and thread counts (those ``environ`` sets are kept)."""
    env = dict(environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    for var in THREAD_VARS:
        env.setdefault(var, str(threads))
    return env


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch/CUDA: CPU runs
        return 0
