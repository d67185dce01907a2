"""What a SLURM job array asks for and what the cluster allows.

:class:`SlurmResources` (per-task resources and policy, checked when built, one ``ValueError`` naming the key),
the cluster's ``MaxArraySize`` (:func:`max_array_size`) and how a submission is cut into arrays that fit it
(:func:`array_chunks`), and what a cluster refuses: :class:`UnsatisfiableJob`, whose :attr:`~UnsatisfiableJob.cause`
is a key of :data:`REFUSALS` -- the request (resources, partition, QOS), the array (more tasks than
``MaxArraySize``) or the cluster's limit on queued jobs -- and the pending reasons no waiting clears
(:data:`NEVER_REASONS`, :func:`never_clears`), said with what the partition offers (:func:`partition_offer`).
:func:`run_tool` runs a SLURM command-line tool (``sbatch``, ``squeue``, ``scontrol``, ``sinfo``), for this
module and :mod:`stitching.launch.slurm.queue`.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Mapping

from stitching.messages import short_repr

_TIME_RE = re.compile(r"^(?:\d+-)?\d{1,2}:\d{2}:\d{2}$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_SIGNAL_RE = re.compile(r"^(?:B:)?(?:SIG)?([A-Z][A-Z0-9]*)@(\d+)$")
#: what a partition, account, QOS or job name may look like (no blanks or quotes)
NAME_RE = re.compile(r"^[A-Za-z0-9_.:+=@,/-]+$")
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
            if v is not None and (not isinstance(v, str) or not NAME_RE.match(v)):
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


def run_tool(cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a SLURM tool; RuntimeError when it is not installed, or (``check``) when it fails."""
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


def never_clears(reason: str) -> bool:
    """Whether a job PENDING for ``reason`` can never start (:data:`NEVER_REASONS`, or a QOS per-job limit)."""
    return reason in NEVER_REASONS or _NEVER_RE.match(reason) is not None


#: What an :class:`UnsatisfiableJob` was refused for -> how to say it about the runs it leaves unsubmitted.
REFUSALS = {
    "request": "their SLURM request can never be met",
    "array": "their job array has more tasks than the cluster's MaxArraySize allows",
    "limit": "the cluster's limit on the jobs a user may queue refused them",
}


class UnsatisfiableJob(RuntimeError):
    """A job SLURM refuses, or accepts but can never start (one line); :attr:`cause` is a key of
    :data:`REFUSALS`: ``request`` (what it asks), ``array`` (its size) or ``limit`` (queued jobs)."""

    def __init__(self, message: str, cause: str = "request", submitted: list | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        #: the ``(job id, run directories)`` of the arrays submitted before this one was refused
        self.submitted = list(submitted or [])


def request_said(resources: SlurmResources) -> str:
    """What ``resources`` asks of the cluster, as sbatch options (for messages)."""
    skip = ("--ntasks", "--requeue", "--no-requeue", "--signal")
    return " ".join(o for o in resources.sbatch_options() if not o.startswith(skip))


def partition_offer(partition: str | None) -> str:
    """What ``partition`` (None: the default one) has, per node, from ``sinfo``; '' if unknown."""
    proc = run_tool(["sinfo", "-h", "-o", "%P|%c|%m|%l|%G"] + (["-p", partition] if partition else []), check=False)
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


#: SLURM's default ``MaxArraySize``: arrays of at most 1001 tasks (indices 0-1000)
DEFAULT_MAX_ARRAY_SIZE = 1001
_MAX_ARRAY_RE = re.compile(r"^MaxArraySize\s*=\s*(\d+)\s*$", re.M)


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (``scontrol show config``): the most tasks one array may have, its
    largest index being ``MaxArraySize - 1``.  RuntimeError when ``scontrol`` cannot say."""
    proc = run_tool(["scontrol", "show", "config"], check=False)
    m = _MAX_ARRAY_RE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"scontrol show config failed to give MaxArraySize (exit code {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[:300]}")
    return int(m.group(1))


def max_array_size_said() -> str:
    """:func:`max_array_size` for a message: 'unknown' when scontrol cannot say."""
    try:
        return str(max_array_size())
    except RuntimeError:
        return "unknown"


def array_chunks(n_tasks: int, max_size: int) -> list[int]:
    """The sizes of the arrays ``n_tasks`` tasks are split into, each at most ``max_size`` (in order)."""
    if max_size < 1:
        raise UnsatisfiableJob(f"the cluster's MaxArraySize is {max_size}: it takes no job arrays", "array")
    return [min(max_size, n_tasks - i) for i in range(0, n_tasks, max_size)]
