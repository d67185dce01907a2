"""Run a list of run directories as SLURM job arrays.

Layout of a submission (see :func:`submit_arrays`)::

    <work_dir>/tasks-<stamp>[-<k>].txt      one task per line: an absolute run directory, or a
                                            pack's, separated by tabs
    <work_dir>/array-<stamp>[-<k>].sbatch   the script from render_array_script()
    <work_dir>/logs/<jobid>_<task>.out

Array task ``i`` reads line ``i`` (0-based) of the task file: its run
directories (one, or a pack's: :mod:`stitching.train.pack`) are the command's
arguments (``"$@"``), the first is ``$RUN_DIR``; it runs the command (e.g.
:func:`train_command`) in the background, so that the batch shell stays
responsive to signals.  A pack's requeue request lives in its first directory.

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

Preemption / time limit protocol (what the trainer must do):

* ``SlurmResources.signal`` (default ``USR1@300``) is submitted as
  ``--signal=B:USR1@300``: SLURM sends SIGUSR1 to the *batch shell* only, 300 s
  before the time limit.  The shell traps it (and SIGTERM) and forwards it to
  the command: to the command's process itself, or, for a ``torchrun`` /
  ``torch.distributed.run`` command, to the agent's children (the workers),
  because the agent would die on SIGUSR1.  On preemption or ``scancel`` SLURM
  sends SIGTERM to every process of the job anyway (so a trainer may see
  SIGTERM twice).
* On SIGUSR1/SIGTERM the trainer saves a checkpoint into ``$RUN_DIR`` and
  exits with :data:`EXIT_REQUEUE` (``stitching.rundir.EXIT_PREEMPTED``,
  ``EX_TEMPFAIL``: "preempted, please requeue").  It should set both signals to ``SIG_IGN`` when the first one
  arrives: the forwarded copy of a SIGTERM that SLURM also sent directly can
  arrive while Python is exiting (handlers are reset to the default by then),
  turning exit 75 into "killed by SIGTERM" (143).  ``torchrun`` does not pass worker exit codes through, so a
  multi-process trainer instead creates the file named by
  ``$STITCHING_REQUEUE_FILE`` (rank 0, before exiting); the batch script
  treats that exactly like exit code 75.  ``$SLURM_RESTART_COUNT`` tells a
  restarted trainer how many times it was requeued.
* Exit code 130 (``EXIT_INTERRUPTED``: SIGINT, e.g. ``scancel --signal=INT``; the command runs in the
  background of a non-interactive shell, so a SIGINT sent to the whole job is ignored, as Python leaves it)
  is a deliberate stop: the script says so and exits 130 without requeueing; submitting the sweep again
  resumes the run.
* On exit code 75 the batch script requeues *itself* with
  ``scontrol requeue ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}`` while the
  task is still RUNNING (this is why the signal comes before the time limit:
  a job that already reached TIMEOUT or was cancelled cannot be requeued),
  then exits 0.  ``--requeue`` alone would not do it: it only covers node
  failure and preemption; exit-code based requeue (``RequeueExit=75``) is a
  cluster setting we cannot rely on.  If ``scontrol requeue`` fails (or
  ``requeue=False``), the script exits 75, so a cluster that does configure
  ``RequeueExit=75`` still requeues it.  Logs use ``--open-mode=append`` so a
  requeued task appends to its ``%A_%a.out`` instead of truncating it.

One job per run directory:  jobs submitted here are named ``stitching:<name>``
and carry ``--comment=stitching-tasks=<task file>``.  :func:`active_run_dirs`
lists this user's pending/running array tasks of such jobs with ``squeue`` and
maps each task index back to its run directory through the task file.  SLURM
is the source of truth (no stale lock files): :func:`submit_array` skips run
directories for which :func:`pending_or_running` is true.  It also writes a
``slurm_job`` marker file (``<jobid>_<task>``) into each run directory, for
humans; nothing relies on it.  Task files must therefore stay in place while
their jobs are queued.

No accounting is assumed (``sacct`` may not work): states come from ``squeue``
and, for tasks that already finished, ``scontrol show job`` (which remembers
them for ``MinJobAge`` seconds, 300 by default).

A request the cluster can never satisfy is said at once, not left queued:
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

import dataclasses
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from stitching.messages import short_repr
from stitching.rundir import EXIT_INTERRUPTED, EXIT_PREEMPTED, REQUEUE_ENV, REQUEUE_REQUEST, SLURM_MARKER

__all__ = [
    "EXIT_REQUEUE",
    "JOB_NAME_PREFIX",
    "COMMENT_PREFIX",
    "MARKER_FILE",
    "TERMINAL_STATES",
    "SlurmResources",
    "train_command",
    "render_array_script",
    "write_task_file",
    "submit",
    "submit_array",
    "submit_arrays",
    "max_array_size",
    "array_chunks",
    "DEFAULT_MAX_ARRAY_SIZE",
    "REFUSALS",
    "job_states",
    "job_info",
    "wait_for",
    "active_run_dirs",
    "pending_or_running",
    "NEVER_REASONS",
    "UnsatisfiableJob",
    "check_startable",
]

#: Exit code meaning "checkpointed after a signal, please requeue me" (EX_TEMPFAIL): the run directory's.
EXIT_REQUEUE = EXIT_PREEMPTED
JOB_NAME_PREFIX = "stitching:"
COMMENT_PREFIX = "stitching-tasks="
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

_TIME_RE = re.compile(r"^(?:\d+-)?\d{1,2}:\d{2}:\d{2}$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_SIGNAL_RE = re.compile(r"^(?:B:)?(?:SIG)?([A-Z][A-Z0-9]*)@(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+=@,/-]+$")
_GPU_FLAGS = ("gpus-per-task", "gres")


def time_seconds(time: str) -> int:
    """Seconds of a SLURM time limit as :class:`SlurmResources` holds it (``HH:MM:SS`` or ``D-HH:MM:SS``)."""
    return _time_to_seconds(time)


def _time_to_seconds(time: str) -> int:
    """Seconds of a SLURM time limit ``[D-]HH:MM:SS``."""
    days, _, hms = time.rpartition("-")
    h, m, sec = (int(v) for v in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _seconds_to_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


@dataclass
class SlurmResources:
    """Per-task resources and policy of a job array.

    ``time`` is ``HH:MM:SS`` or ``D-HH:MM:SS``; an int is taken as seconds
    (YAML 1.1 reads an unquoted ``12:00:00`` as the integer 43200).  ``mem`` is
    e.g. ``"32G"``; an int is taken as MB.  ``gpu_flag`` selects how GPUs are
    requested: ``--gpus-per-task=N`` (default) or ``--gres=gpu:N``.
    ``extra`` holds raw ``#SBATCH`` lines (with or without the ``#SBATCH``).
    """

    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 4
    mem: str | int = "16G"                   # (an int: MB)
    time: str | int = "12:00:00"             # (an int: seconds)
    max_parallel: int | None = None
    requeue: bool = True
    signal: str = "USR1@300"
    account: str | None = None
    qos: str | None = None
    extra: list[str] = field(default_factory=list)
    gpu_flag: str = "gpus-per-task"

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ValueError(f"SlurmResources.{key}: {why} (got {short_repr(getattr(self, key))})")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for key in ("partition", "account", "qos"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not _NAME_RE.match(v)):
                fail(key, "must be None or a non-empty name without spaces")
        if not is_int(self.gpus_per_task) or self.gpus_per_task < 0:
            fail("gpus_per_task", "must be an int >= 0")
        if not is_int(self.cpus_per_task) or self.cpus_per_task < 1:
            fail("cpus_per_task", "must be an int >= 1")
        if is_int(self.mem):
            self.mem = f"{self.mem}M"
        if not isinstance(self.mem, str) or not _MEM_RE.match(self.mem.upper()):
            fail("mem", "must look like '32G', '500M' or be an int (MB)")
        self.mem = self.mem.upper()
        if is_int(self.time) and self.time > 0:
            self.time = _seconds_to_time(self.time)
        if not isinstance(self.time, str) or not _TIME_RE.match(self.time):
            fail("time", "must be 'HH:MM:SS' or 'D-HH:MM:SS'")
        if self.max_parallel is not None and (not is_int(self.max_parallel) or self.max_parallel < 1):
            fail("max_parallel", "must be None or an int >= 1")
        if not isinstance(self.requeue, bool):
            fail("requeue", "must be a bool")
        if self.signal is not None and self.signal != "":
            if not isinstance(self.signal, str) or not _SIGNAL_RE.match(self.signal.upper()):
                fail("signal", "must look like 'USR1@300' (signal@seconds before the time limit)")
            lead = int(_SIGNAL_RE.match(self.signal.upper()).group(2))
            if lead >= _time_to_seconds(self.time):
                fail("signal", f"{self.signal} signals {lead} s before a time limit of {self.time}, i.e. as soon "
                               "as a task starts: use a longer time or a shorter lead")
        if isinstance(self.extra, str) or not isinstance(self.extra, (list, tuple)):
            fail("extra", "must be a list of '#SBATCH ...' lines")
        lines = []
        for line in self.extra:
            if not isinstance(line, str) or "\n" in line:
                fail("extra", "each entry must be a single-line string")
            line = line.strip()
            if line.startswith("#SBATCH"):
                line = line[len("#SBATCH"):].strip()
            if not line.startswith("-"):
                fail("extra", f"{short_repr(line)} is not an sbatch option")
            lines.append(line)
        self.extra = lines
        if self.gpu_flag not in _GPU_FLAGS:
            fail("gpu_flag", f"must be one of {_GPU_FLAGS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, source: str = "<dict>") -> "SlurmResources":
        """Build from a config mapping; unknown keys and bad values raise
        ValueError naming the key and ``source`` (e.g. the YAML file)."""
        d = dict(d or {})
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(
                    f"{source}: unknown SLURM resource key {short_repr(key)} (known keys: {', '.join(known)})"
                )
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def signal_parts(self) -> tuple[str, int] | None:
        """``("USR1", 300)`` for ``signal="USR1@300"``; None when disabled."""
        if not self.signal:
            return None
        m = _SIGNAL_RE.match(self.signal.upper())
        assert m is not None
        return m.group(1), int(m.group(2))

    def sbatch_options(self) -> list[str]:
        """The per-task ``#SBATCH`` options (without the array/output ones)."""
        opts = ["--ntasks=1", f"--cpus-per-task={self.cpus_per_task}", f"--mem={self.mem}",
                f"--time={self.time}"]
        if self.partition:
            opts.append(f"--partition={self.partition}")
        if self.account:
            opts.append(f"--account={self.account}")
        if self.qos:
            opts.append(f"--qos={self.qos}")
        if self.gpus_per_task:
            if self.gpu_flag == "gres":
                opts.append(f"--gres=gpu:{self.gpus_per_task}")
            else:
                opts.append(f"--gpus-per-task={self.gpus_per_task}")
        opts.append("--requeue" if self.requeue else "--no-requeue")
        sig = self.signal_parts()
        if sig:
            opts.append(f"--signal=B:{sig[0]}@{sig[1]}")
        return opts + list(self.extra)


def train_command(python: str, gpus_per_task: int, pack: bool = False) -> str:
    """Shell command (referring to "$RUN_DIR") that trains one run directory; with ``pack``, every run directory
    of the task (``"$@"``) as one pack."""
    py = shlex.quote(python)
    launcher = "" if gpus_per_task <= 1 else \
        f"-m torch.distributed.run --standalone --nproc_per_node={int(gpus_per_task)} "
    if pack:
        return (f'args=(); for d in "$@"; do args+=(--run-dir "$d"); done; '
                f'exec {py} {launcher}-m stitching.train "${{args[@]}}"')
    return f'{py} {launcher}-m stitching.train --run-dir "$RUN_DIR"'


def _is_launcher(command: str) -> bool:
    return bool(re.search(r"(^|[\s/])(torchrun|torch\.distributed\.run)(\s|$)", command))


def _sbatch_quote(value: str) -> str:
    # sbatch splits #SBATCH lines on blanks but honours double quotes.
    if re.search(r'\s|"', value):
        if '"' in value or "\n" in value:
            raise ValueError(f"cannot put {short_repr(value)} on an #SBATCH line")
        return f'"{value}"'
    return value


_SCRIPT_BODY = r"""
# Generated by stitching.launch.slurm (see its module docstring).
# Array task i runs line i (0-based) of TASK_FILE: its run directories (a pack's are separated by tabs)
# are the command's arguments, the first one $RUN_DIR.
# Exit status @EXIT_REQUEUE@ of the command (or $@REQUEUE_ENV@ existing) means
# "checkpointed after a signal, please requeue": the task requeues itself.
set -euo pipefail

TASK_FILE=@TASK_FILE@
REQUEUE=@REQUEUE@
SIGNAL_CHILDREN=@SIGNAL_CHILDREN@
EXIT_REQUEUE=@EXIT_REQUEUE@
EXIT_INTERRUPTED=@EXIT_INTERRUPTED@

: "${SLURM_ARRAY_TASK_ID:?this script must run as a SLURM array task}"
TASK_ID="${SLURM_ARRAY_JOB_ID:-local}_${SLURM_ARRAY_TASK_ID}"
LINE="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$TASK_FILE")"
if [[ -z "$LINE" ]]; then
    echo "[stitching] task $TASK_ID: no line $((SLURM_ARRAY_TASK_ID + 1)) in $TASK_FILE" >&2
    exit 2
fi
IFS=$'\t' read -r -a RUN_DIRS <<< "$LINE"
RUN_DIR="${RUN_DIRS[0]}"
export RUN_DIR
export @REQUEUE_ENV@="$RUN_DIR/@REQUEUE_REQUEST@"
rm -f "$@REQUEUE_ENV@"
say() { echo "[stitching] $(date '+%F %T') task $TASK_ID: $*"; }
PACK=""
if ((${#RUN_DIRS[@]} > 1)); then PACK=" (a pack of ${#RUN_DIRS[@]} runs)"; fi
say "start (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) RUN_DIR=$RUN_DIR$PACK"

child=""
caught=""
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
    caught="$1"
    if [[ -z "$child" ]]; then return 0; fi
    if ((SIGNAL_CHILDREN)); then
        say "caught SIG$1, forwarding to the workers of pid $child"
        pkill -"$1" -P "$child" 2>/dev/null || true
    else
        say "caught SIG$1, forwarding to pid $child"
        kill -s "$1" "$child" 2>/dev/null || true
    fi
}
@TRAPS@

bash -c @COMMAND@ stitching-task "${RUN_DIRS[@]}" &
child=$!

# A trapped signal makes `wait` return early (status > 128) after running the
# trap; keep waiting until the command itself has exited, then take its status.
rc=0
while :; do
    caught=""
    if wait "$child"; then rc=0; else rc=$?; fi
    [[ -n "$caught" ]] || break
    if kill -0 "$child" 2>/dev/null; then continue; fi
    if wait "$child" 2>/dev/null; then rc=0; else r=$?; ((r == 127)) || rc=$r; fi
    break
done
# From here on, signals are caught and do nothing (SLURM sends SIGTERM after a requeue).
trap 'true' @SIGNALS@
say "command exited with status $rc"

if ((rc == EXIT_REQUEUE)) || [[ -e "$@REQUEUE_ENV@" ]]; then
    rm -f "$@REQUEUE_ENV@"
    if ((REQUEUE)); then
        say "requeue requested; scontrol requeue $TASK_ID"
        if scontrol requeue "$TASK_ID"; then
            exit 0
        fi
        say "scontrol requeue failed"
    fi
    exit "$EXIT_REQUEUE"
fi
if ((rc == EXIT_INTERRUPTED)); then
    say "interrupted (SIGINT): the trainer kept its checkpoint; not requeued (a deliberate stop): submit the sweep again to resume"
fi
exit "$rc"
"""


def render_array_script(
    task_file: Path,
    n_tasks: int,
    resources: SlurmResources,
    log_dir: Path,
    job_name: str,
    command: str,
    *,
    chdir: Path | None = None,
    signal_children: bool | None = None,
    after: str | None = None,
) -> str:
    """An sbatch script running ``command`` once per line of ``task_file``.

    ``command`` is a shell command string referring to "$RUN_DIR" (or to
    ``"$@"``: every run directory of the task, a pack's).  Paths are
    made absolute; ``log_dir`` must exist when the job starts (:func:`submit`
    creates it).  ``signal_children`` (default: auto, true for torchrun
    commands) forwards USR1/TERM to the command's children instead of the
    command itself.  ``after``: a job id this array waits for
    (``--dependency=afterany:<id>``: the chain that keeps the throttle across
    the arrays of one submission).
    """
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {short_repr(n_tasks)}")
    if not job_name or not _NAME_RE.match(job_name):
        raise ValueError(f"bad job name {short_repr(job_name)} (no blanks or quotes)")
    if not command.strip():
        raise ValueError("empty command")
    if not job_name.startswith(JOB_NAME_PREFIX):
        job_name = JOB_NAME_PREFIX + job_name
    task_file = Path(task_file).absolute()
    log_dir = Path(log_dir).absolute()
    if signal_children is None:
        signal_children = _is_launcher(command)

    array = f"0-{n_tasks - 1}"
    if resources.max_parallel:
        array += f"%{resources.max_parallel}"
    opts = [
        f"--job-name={job_name}",
        f"--array={array}",
        f"--output={_sbatch_quote(str(log_dir / '%A_%a.out'))}",
        "--open-mode=append",
        f"--comment={_sbatch_quote(COMMENT_PREFIX + str(task_file))}",
    ]
    if chdir is not None:
        opts.append(f"--chdir={_sbatch_quote(str(Path(chdir).absolute()))}")
    if after is not None:
        if not str(after).isdigit():
            raise ValueError(f"after must be a job id, got {short_repr(after)}")
        opts.append(f"--dependency=afterany:{after}")
    opts += resources.sbatch_options()

    signals = ["USR1", "TERM"]
    sig = resources.signal_parts()
    if sig and sig[0] not in signals:
        signals.append(sig[0])
    traps = "\n".join(f"trap 'forward {s}' {s}" for s in signals)

    body = (
        _SCRIPT_BODY.replace("@TASK_FILE@", shlex.quote(str(task_file)))
        .replace("@REQUEUE@", "1" if resources.requeue else "0")
        .replace("@SIGNAL_CHILDREN@", "1" if signal_children else "0")
        .replace("@EXIT_REQUEUE@", str(EXIT_REQUEUE))
        .replace("@EXIT_INTERRUPTED@", str(EXIT_INTERRUPTED))
        .replace("@REQUEUE_ENV@", REQUEUE_ENV)
        .replace("@REQUEUE_REQUEST@", REQUEUE_REQUEST)
        .replace("@TRAPS@", traps)
        .replace("@SIGNALS@", " ".join(signals))
        .replace("@COMMAND@", shlex.quote(command))
    )
    return "#!/bin/bash\n" + "".join(f"#SBATCH {o}\n" for o in opts) + body


def write_task_file(path: Path, run_dirs: Iterable) -> list[str]:
    """Write one task per line: an absolute run directory, or a pack's (a list of them) separated by tabs;
    returns the lines."""
    lines = []
    for task in run_dirs:
        dirs = [_norm(d) for d in _task_dirs(task)]
        for s in dirs:
            if "\n" in s or "\r" in s or "\t" in s:
                raise ValueError(f"run directory with a newline or a tab: {short_repr(s)}")
        lines.append("\t".join(dirs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return lines


def _norm(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def _task_dirs(task) -> list:
    """The run directories of a task: one (a path) or a pack's (a list or tuple of paths)."""
    return list(task) if isinstance(task, (list, tuple)) else [task]


def _run(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    exe = cmd[0]
    if shutil.which(exe) is None:
        raise RuntimeError(
            f"{exe!r} not found on PATH: is this a SLURM login node? "
            "(locally: sudo scripts/slurm/start_local_slurm.sh)"
        )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed with exit code {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()}"
        )
    return proc


#: Pending reasons that waiting never clears: the request exceeds what the partition, QOS or account allows.
NEVER_REASONS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                           "InvalidQOS", "InvalidAccount", "AccountNotAllowed", "QOSNotAllowed"})
_NEVER_RE = re.compile(r"^QOS(Max\w*PerJob\w*|Min\w+)$")
# sbatch refusals that are about the request (not a controller that is busy or down)
_TRANSIENT = ("Socket timed out", "Unable to contact", "temporarily unavailable", "Slurm backup controller")


#: What an :class:`UnsatisfiableJob` was refused for -> how to say it about the runs it leaves unsubmitted.
REFUSALS = {
    "request": "their SLURM request can never be met",
    "array": "their job array has more tasks than the cluster's MaxArraySize allows",
    "limit": "the cluster's limit on the jobs a user may queue refused them",
}
# sbatch's words for each cause but the request (SLURM 20-24)
_ARRAY_REFUSAL = ("Invalid job array specification", "job array index", "MaxArraySize")
_LIMIT_REFUSAL = ("MaxSubmitJob", "MaxJobCount", "job count limit", "Job violates accounting/QOS policy")


class UnsatisfiableJob(RuntimeError):
    """A job SLURM refuses, or accepts but can never start (one line); :attr:`cause` is a key of
    :data:`REFUSALS`: ``request`` (what it asks), ``array`` (its size) or ``limit`` (queued jobs)."""

    def __init__(self, message: str, cause: str = "request", submitted: list | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        #: the ``(job id, run directories)`` of the arrays submitted before this one was refused
        self.submitted = list(submitted or [])


def _request(resources: "SlurmResources") -> str:
    skip = ("--ntasks", "--requeue", "--no-requeue", "--signal")
    return " ".join(o for o in resources.sbatch_options() if not o.startswith(skip))


def partition_offer(partition: str | None) -> str:
    """What ``partition`` (None: the default one) has, per node, from ``sinfo``; '' if unknown."""
    proc = _run(["sinfo", "-h", "-o", "%P|%c|%m|%l|%G"] + (["-p", partition] if partition else []), check=False)
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 4]
    if not partition:
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if proc.returncode != 0 or not rows:
        return ""
    name = rows[0][0].rstrip("*")
    cpus = max((int(r[1].rstrip("+")) for r in rows if r[1].rstrip("+").isdigit()), default="?")
    mem = max((int(r[2].rstrip("+")) for r in rows if r[2].rstrip("+").isdigit()), default="?")
    gres = sorted({r[4] for r in rows if r[4] not in ("(null)", "")})
    return (f"partition {name} has nodes with at most {cpus} CPUs and {mem}M memory, time limit {rows[0][3]}, "
            f"GPUs/GRES: {', '.join(gres) or 'none'}")


def check_startable(job_id: str, resources: "SlurmResources", check_s: float = 15.0, poll_s: float = 0.5) -> None:
    """Poll ``squeue`` (up to ``check_s`` seconds, until SLURM gives a pending reason or starts the job) and
    raise :class:`UnsatisfiableJob` after cancelling ``job_id`` if its reason is one of :data:`NEVER_REASONS`."""
    deadline = time.monotonic() + check_s
    while True:
        proc = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r"], check=False)
        rows = [line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line]
        never = sorted({r for state, r in rows if state == "PENDING" and (r in NEVER_REASONS or _NEVER_RE.match(r))})
        if never:
            _run(["scancel", str(job_id)], check=False)
            offer = partition_offer(resources.partition)
            raise UnsatisfiableJob(
                f"job {job_id} can never start: SLURM keeps it PENDING with reason {never[0]} for the request "
                f"{_request(resources)}" + (f" ({offer})" if offer else "")
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
    proc = _run(["sbatch", "--parsable", str(script_path)], check=False)
    refused = any(m in proc.stderr for m in ("submission failed", "Invalid", "can not be satisfied"))
    if proc.returncode != 0 and refused and not any(t in proc.stderr for t in _TRANSIENT):
        why = "; ".join(line.removeprefix("sbatch: error: ").strip() for line in proc.stderr.splitlines()
                        if line.strip())
        if any(m in proc.stderr for m in _ARRAY_REFUSAL):
            m = re.search(r"^#SBATCH --array=0-(\d+)", script_path.read_text(), re.M)
            tasks = f"{int(m.group(1)) + 1} tasks" if m else "its tasks"
            raise UnsatisfiableJob(f"sbatch refused {script_path}: {why}: the array has {tasks}, more than the "
                                   f"cluster's MaxArraySize ({_max_array_size_said()}) allows", "array")
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


#: SLURM's default ``MaxArraySize``: arrays of at most 1001 tasks (indices 0-1000)
DEFAULT_MAX_ARRAY_SIZE = 1001
_MAX_ARRAY_RE = re.compile(r"^MaxArraySize\s*=\s*(\d+)\s*$", re.M)


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (``scontrol show config``): the most tasks one array may have, its
    largest index being ``MaxArraySize - 1``.  RuntimeError when ``scontrol`` cannot say."""
    proc = _run(["scontrol", "show", "config"], check=False)
    m = _MAX_ARRAY_RE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"scontrol show config failed to give MaxArraySize (exit code {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[:300]}")
    return int(m.group(1))


def _max_array_size_said() -> str:
    try:
        return str(max_array_size())
    except RuntimeError:
        return "unknown"


def array_chunks(n_tasks: int, max_size: int) -> list[int]:
    """The sizes of the arrays ``n_tasks`` tasks are split into, each at most ``max_size`` (in order)."""
    if max_size < 1:
        raise UnsatisfiableJob(f"the cluster's MaxArraySize is {max_size}: it takes no job arrays", "array")
    return [min(max_size, n_tasks - i) for i in range(0, n_tasks, max_size)]


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
    tasks = [tuple(_norm(d) for d in _task_dirs(t)) for t in run_dirs]
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
                request = f" (request: {_request(resources)})" if err.cause == "request" else ""
                raise UnsatisfiableJob(f"{err}{request}", err.cause) from None
            if check_s > 0 and k == 1:
                check_startable(job_id, resources, check_s)
        except UnsatisfiableJob as err:
            done = (f"; submitted before it: {len(submitted)} arrays ({', '.join(j for j, _ in submitted)}) with "
                    f"{sum(len(d) for _, d in submitted)} tasks" if submitted else "")
            raise UnsatisfiableJob(f"{err}{done}", err.cause, submitted) from None
        for i, task in enumerate(chunk):
            for d in _task_dirs(task):
                try:
                    (Path(d) / MARKER_FILE).write_text(f"{job_id}_{i}\n")
                except OSError:
                    pass  # informational only
        submitted.append((job_id, chunk))
    return submitted


def submit_array(
    run_dirs: Iterable[str | os.PathLike],
    work_dir: Path,
    resources: SlurmResources,
    job_name: str,
    command: str,
    *,
    chdir: Path | None = None,
    skip_active: bool = True,
    check_s: float = 15.0,
) -> tuple[str | None, list[str]]:
    """:func:`submit_arrays` for a submission that fits one array: ``(job_id, submitted run dirs)``, ``job_id``
    None when there was nothing to submit; ValueError (nothing submitted) when it needs more than one array."""
    dirs = list(dict.fromkeys(tuple(_norm(d) for d in t) if isinstance(t, (list, tuple)) else _norm(t)
                              for t in run_dirs))
    limit = max_array_size()
    if len(dirs) > limit:
        raise ValueError(f"{len(dirs)} run directories do not fit one job array (MaxArraySize {limit}): use "
                         "submit_arrays")
    arrays = submit_arrays(dirs, work_dir, resources, job_name, command, chdir=chdir, skip_active=skip_active,
                           check_s=check_s, max_size=limit)
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
    proc = _run(["squeue", "-h", "-j", str(job_id), "-r", "-o", "%i %T"], check=False)
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
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
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
    proc = _run(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T|%j|%k"], check=False)
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
    return _norm(run_dir) in active_run_dirs()
