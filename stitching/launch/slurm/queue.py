"""The queue: submitting job arrays with ``sbatch`` and asking ``squeue`` / ``scontrol`` about them.

Layout of a submission (see :func:`submit_arrays`)::

    <work_dir>/tasks-<stamp>[-<k>].txt      one task per line: an absolute run directory, or a
                                            pack's, separated by tabs
    <work_dir>/array-<stamp>[-<k>].sbatch   the script from render_array_script()
    <work_dir>/logs/<jobid>_<task>.out

Arrays of any size: a cluster takes arrays of at most ``MaxArraySize`` tasks
(indices 0 to ``MaxArraySize - 1``; SLURM's default is 1001), read from
``scontrol show config`` (:func:`max_array_size`).  :func:`submit_arrays` splits
a larger submission into consecutive arrays ``<k>`` = 1, 2, ... of at most that
many tasks, each with its own task file.  The ``%`` throttle
(``SlurmResources.max_parallel``) is kept across them by *chaining*: array
``k + 1`` carries ``--dependency=afterany:<array k>``, so it starts only once
every task of array ``k`` has ended (a requeued task counts as not ended), and
each array keeps the full ``%N``; at most ``N`` tasks run at any moment, the
user's throttle, whatever ``N`` and however many arrays.  (Dividing the
throttle among arrays running side by side would leave slots idle as soon as
one array finishes before the others, and cannot divide ``%1`` at all; the
chain costs only the tail of each array, at most ``N - 1`` idle slots while its
last tasks run.)  Without a throttle the arrays are independent and SLURM runs
whatever fits.

One job per run directory:  jobs submitted here are named ``stitching:<name>``
and carry ``--comment=stitching-tasks=<task file>``.  :func:`active_run_dirs`
lists this user's pending/running array tasks of such jobs with ``squeue`` and
maps each task index back to its run directory through the task file.  SLURM
is the source of truth (no stale lock files): :func:`submit_arrays` skips run
directories for which :func:`pending_or_running` is true.  It also writes a
``slurm_job`` marker file (``<jobid>_<task>``) into each run directory, for
humans; nothing relies on it.  Task files must therefore stay in place while
their jobs are queued.

No accounting is assumed (``sacct`` may not work): states come from ``squeue``
and, for tasks that already finished, ``scontrol show job`` (which remembers
them for ``MinJobAge`` seconds, 300 by default).

A request the cluster can never satisfy is said at once, not left queued
(what it can be refused for: :mod:`stitching.launch.slurm.resources`):
sbatch's refusal (e.g. more memory than any node has) and, after
submitting, a pending reason that no waiting clears (:data:`NEVER_REASONS`,
e.g. ``PartitionConfig`` for more CPUs than the partition's nodes have, found
by polling ``squeue`` for up to ``check_s`` seconds) raise
:class:`UnsatisfiableJob` naming the job, the reason, the request and what
the partition offers; such a job is cancelled, so the corrected sweep can be
submitted again.  Its :attr:`~UnsatisfiableJob.cause` says what was refused
(:data:`REFUSALS`): the request (resources, partition, QOS), the array (more
tasks than ``MaxArraySize``) or the cluster's limit on queued jobs.
"""

from __future__ import annotations

import os
import pwd
import re
import time
from pathlib import Path
from typing import Iterable

from stitching.launch.slurm.resources import (SlurmResources, UnsatisfiableJob, array_chunks, max_array_size,
                                              max_array_size_said, never_clears, partition_offer, request_said,
                                              run_tool)
from stitching.launch.slurm.script import (COMMENT_PREFIX, JOB_NAME_PREFIX, abs_dir, render_array_script,
                                           task_dirs, write_task_file)
from stitching.messages import short_repr
from stitching.rundir import SLURM_MARKER

MARKER_FILE = SLURM_MARKER
#: a sweep's SLURM files (task files, batch scripts, logs) go into this folder of its runs directory
SWEEP_DIR = "slurm"
LOG_DIR = "logs"


def sweep_dir(runs_dir: str | os.PathLike) -> Path:
    """Where a sweep (or matrix) whose runs go into ``runs_dir`` keeps its job arrays' files."""
    return Path(runs_dir) / SWEEP_DIR


def task_log(work_dir: str | os.PathLike, task: str) -> Path:
    """The log of array task ``task`` (``<jobid>_<index>``, as :data:`MARKER_FILE` holds it) of a submission
    into ``work_dir`` (:func:`submit_array`)."""
    return Path(work_dir) / LOG_DIR / f"{task}.out"


#: Job states after which a task will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",  # held after RequeueExitHold: needs a human
    }
)

# sbatch refusals that are about the request (not a controller that is busy or down)
_TRANSIENT = ("Socket timed out", "Unable to contact", "temporarily unavailable", "Slurm backup controller")
# sbatch's words for each cause but the request (SLURM 20-24)
_ARRAY_REFUSAL = ("Invalid job array specification", "job array index", "MaxArraySize")
_LIMIT_REFUSAL = ("MaxSubmitJob", "MaxJobCount", "job count limit", "Job violates accounting/QOS policy")


def check_startable(job_id: str, resources: SlurmResources, check_s: float = 15.0, poll_s: float = 0.5) -> None:
    """Poll ``squeue`` (up to ``check_s`` seconds, until SLURM gives a pending reason or starts the job) and
    raise :class:`UnsatisfiableJob` after cancelling ``job_id`` if its reason is one of :data:`NEVER_REASONS`."""
    deadline = time.monotonic() + check_s
    while True:
        proc = run_tool(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], check=False)
        rows = [line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line]
        never = sorted({r for state, r in rows if state == "PENDING" and (never_clears(r))})
        if never:
            run_tool(["scancel", str(job_id)], check=False)
            offer = partition_offer(resources.partition)
            raise UnsatisfiableJob(
                f"job {job_id} can never start: SLURM keeps it PENDING with reason {never[0]} for the request "
                f"{request_said(resources)}" + (f" ({offer})" if offer else "")
                + "; cancelled it -- ask for less (the sweep's slurm: section or --slurm key=value) and submit again")
        decided = not rows or any(state != "PENDING" or r not in ("None", "") for state, r in rows)
        if decided or time.monotonic() >= deadline:
            return
        time.sleep(poll_s)


def submit(script_path: Path) -> str:
    """``sbatch --parsable script`` -> job id.  Creates the directories of the
    script's ``--output``/``--error`` paths first (sbatch does not)."""
    script_path = Path(script_path)
    for line in script_path.read_text().splitlines():
        m = re.match(r'^#SBATCH\s+--(?:output|error)=("?)(.+)\1\s*$', line)
        if m and m.group(2).startswith("/"):
            Path(m.group(2)).parent.mkdir(parents=True, exist_ok=True)
    proc = run_tool(["sbatch", "--parsable", str(script_path)], check=False)
    refused = any(m in proc.stderr for m in ("submission failed", "Invalid", "can not be satisfied"))
    if proc.returncode != 0 and refused and not any(t in proc.stderr for t in _TRANSIENT):
        why = "; ".join(line.removeprefix("sbatch: error: ").strip() for line in proc.stderr.splitlines()
                        if line.strip())
        if any(m in proc.stderr for m in _ARRAY_REFUSAL):
            m = re.search(r"^#SBATCH --array=0-(\d+)", script_path.read_text(), re.M)
            tasks = f"{int(m.group(1)) + 1} tasks" if m else "its tasks"
            raise UnsatisfiableJob(f"sbatch refused {script_path}: {why}: the array has {tasks}, more than the "
                                   f"cluster's MaxArraySize ({max_array_size_said()}) allows", "array")
        if any(m in proc.stderr for m in _LIMIT_REFUSAL):
            raise UnsatisfiableJob(f"sbatch refused {script_path}: {why}: the cluster limits how many jobs a user "
                                   "may queue; submit again when some have finished", "limit")
        raise UnsatisfiableJob(f"sbatch refused {script_path}: {why}")
    if proc.returncode != 0:
        raise RuntimeError(
            f"sbatch {script_path} failed (exit code {proc.returncode}): {proc.stderr.strip()}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"unexpected sbatch output: {short_repr(proc.stdout)} {short_repr(proc.stderr)}")
    return job_id



def submit_arrays(
    run_dirs: Iterable[str | os.PathLike],
    work_dir: Path,
    resources: SlurmResources,
    job_name: str,
    command: str,
    *,
    chdir: Path | None = None,
    skip_active: bool = True,
    check_s: float = 15.0,
    max_size: int | None = None,
) -> list[tuple[str, list[str]]]:
    """Submit ``run_dirs`` (one task each: a run directory, or a pack's list of them; minus those already
    pending or running when ``skip_active``) as job arrays of at most ``max_size`` tasks (default: the cluster's :func:`max_array_size`), chained with
    ``afterany`` dependencies when ``resources.max_parallel`` throttles them (the module docstring says why).
    Returns ``[(job_id, tasks of that array), ...]`` in order (a task: a run directory, or a pack's tuple of
    them); empty when there was nothing to submit.
    :class:`UnsatisfiableJob` when sbatch refuses an array or (:func:`check_startable` on the first array, up
    to ``check_s`` seconds; 0: no check) SLURM accepts but can never start it; its :attr:`submitted` lists the
    arrays that went in before (a second submission skips them: they are queued)."""
    tasks = [tuple(abs_dir(d) for d in task_dirs(t)) for t in run_dirs]
    active = active_run_dirs() if skip_active else set()
    seen: set[str] = set()
    dirs: list = []
    for task in tasks:                # no duplicates within one submission either
        kept = tuple(d for d in dict.fromkeys(task) if d not in active and d not in seen)
        seen.update(kept)
        if kept:
            dirs.append(kept[0] if len(kept) == 1 else kept)
    if not dirs:
        return []
    sizes = array_chunks(len(dirs), max_array_size() if max_size is None else max_size)
    work_dir = Path(work_dir).absolute()
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    submitted: list[tuple[str, list[str]]] = []
    start = 0
    for k, size in enumerate(sizes, 1):
        chunk, start = dirs[start:start + size], start + size
        suffix = f"-{k}" if len(sizes) > 1 else ""
        task_file = work_dir / f"tasks-{stamp}{suffix}.txt"
        script = work_dir / f"array-{stamp}{suffix}.sbatch"
        write_task_file(task_file, chunk)
        after = submitted[-1][0] if submitted and resources.max_parallel else None
        script.write_text(render_array_script(task_file, len(chunk), resources, work_dir / LOG_DIR, job_name,
                                              command, chdir=chdir, after=after))
        try:
            try:
                job_id = submit(script)
            except UnsatisfiableJob as err:
                request = f" (request: {request_said(resources)})" if err.cause == "request" else ""
                raise UnsatisfiableJob(f"{err}{request}", err.cause) from None
            if check_s > 0 and k == 1:
                check_startable(job_id, resources, check_s)
        except UnsatisfiableJob as err:
            done = (f"; submitted before it: {len(submitted)} arrays ({', '.join(j for j, _ in submitted)}) with "
                    f"{sum(len(d) for _, d in submitted)} tasks" if submitted else "")
            raise UnsatisfiableJob(f"{err}{done}", err.cause, submitted) from None
        for i, task in enumerate(chunk):
            for d in task_dirs(task):
                try:
                    (Path(d) / MARKER_FILE).write_text(f"{job_id}_{i}\n")
                except OSError:
                    pass  # informational only
        submitted.append((job_id, chunk))
    return submitted


def submit_array(run_dirs: Iterable[str | os.PathLike], work_dir: Path, resources: SlurmResources, job_name: str,
                 command: str, **options) -> tuple[str | None, list[str]]:
    """:func:`submit_arrays` (same arguments, but ``max_size``) for a submission that fits one array:
    ``(job_id, submitted run dirs)``, ``job_id`` None when there was nothing to submit; ValueError (nothing
    submitted) when it needs more than one array."""
    dirs = list(dict.fromkeys(tuple(abs_dir(d) for d in t) if isinstance(t, (list, tuple)) else abs_dir(t)
                              for t in run_dirs))
    limit = max_array_size()
    if len(dirs) > limit:
        raise ValueError(f"{len(dirs)} run directories do not fit one job array (MaxArraySize {limit}): use "
                         "submit_arrays")
    arrays = submit_arrays(dirs, work_dir, resources, job_name, command, max_size=limit, **options)
    return arrays[0] if arrays else (None, [])


# ---------------------------------------------------------------------------
# state queries (no accounting: squeue + scontrol)
# ---------------------------------------------------------------------------
def _task_indices(spec: str) -> list[int]:
    """'3', '0-4%2', '1,3-5', '[0-2]' -> indices."""
    spec = spec.strip("[]").split("%")[0]
    out: list[int] = []
    for part in spec.split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _squeue_states(job_id: str) -> dict[int, str]:
    proc = run_tool(["squeue", "-h", "-j", str(job_id), "-r", "-o", "%i %T"], check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}
        raise RuntimeError(f"squeue -j {job_id} failed: {proc.stderr.strip()}")
    states: dict[int, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        jid, state = parts
        head, _, idx = jid.partition("_")
        if head != str(job_id):
            continue
        for i in _task_indices(idx) if idx else [0]:
            states[i] = state.rstrip("+")
    return states


def job_info(job_id: str) -> dict[int, dict[str, str]]:
    """Array task index -> fields of ``scontrol show job`` (JobState,
    Restarts, ExitCode, JobId, ...) for the records slurmctld still has."""
    proc = run_tool(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr + proc.stdout:
            return {}
        raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    info: dict[int, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(?:^|\s)([A-Za-z_:]+)=(\S*)", line))
        if fields.get("ArrayJobId", fields.get("JobId")) != str(job_id):
            continue
        spec = fields.get("ArrayTaskId")
        for i in _task_indices(spec) if spec else [0]:
            info[i] = fields
    return info


def job_states(job_id: str) -> dict[int, str]:
    """Array task index -> state (PENDING, RUNNING, COMPLETED, ...).

    Active tasks come from ``squeue -r``, finished ones from ``scontrol show
    job``.  Empty if slurmctld no longer knows the job (older than MinJobAge).
    """
    job_id = str(job_id)
    states = _squeue_states(job_id)
    for i, fields in job_info(job_id).items():
        if i not in states and "JobState" in fields:
            states[i] = fields["JobState"].rstrip("+")
    return dict(sorted(states.items()))


def wait_for(
    job_id: str, timeout_s: float = 600, poll_s: float = 2.0, *, n_tasks: int | None = None
) -> dict[int, str]:
    """Poll until every task of ``job_id`` is in a terminal state; returns the
    final states.  Raises TimeoutError (with the last states) on timeout and
    RuntimeError if SLURM does not know the job at all.  ``n_tasks``, if
    given, also requires tasks 0..n_tasks-1 to have been seen."""
    deadline = time.monotonic() + timeout_s
    states: dict[int, str] = {}
    while True:
        states = job_states(job_id)
        if not states:
            raise RuntimeError(f"SLURM does not know job {job_id} (purged after MinJobAge?)")
        complete = n_tasks is None or all(i in states for i in range(n_tasks))
        if complete and all(s in TERMINAL_STATES for s in states.values()):
            return states
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f}s: {states}")
        time.sleep(poll_s)


def active_run_dirs() -> set[str]:
    """Run directories of this user's pending/running (i.e. not finished)
    array tasks of jobs submitted by this module."""
    user = pwd.getpwuid(os.getuid()).pw_name
    proc = run_tool(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T|%j|%k"], check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"squeue -u {user} failed: {proc.stderr.strip()}")
    lines_cache: dict[str, list[str] | None] = {}
    out: set[str] = set()
    for line in proc.stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) != 4:
            continue
        jid, state, name, comment = parts
        if not name.startswith(JOB_NAME_PREFIX) or not comment.startswith(COMMENT_PREFIX):
            continue
        if state in TERMINAL_STATES:
            continue
        _, _, idx = jid.partition("_")
        task_file = comment[len(COMMENT_PREFIX):]
        if task_file not in lines_cache:
            try:
                lines_cache[task_file] = Path(task_file).read_text().splitlines()
            except OSError:
                lines_cache[task_file] = None
        lines = lines_cache[task_file]
        if lines is None:
            raise RuntimeError(
                f"job {jid} ({name}) is active but its task file {task_file} is unreadable"
            )
        for i in _task_indices(idx) if idx else [0]:
            if i < len(lines) and lines[i]:
                out.update(d for d in lines[i].split("\t") if d)
    return out


def pending_or_running(run_dir: str | os.PathLike) -> bool:
    """True if a job submitted by this module is pending or running on ``run_dir``."""
    return abs_dir(run_dir) in active_run_dirs()
