"""The run directory: the one module that knows what a run directory holds and what a trainer's exit means.

Standard library only, so the trainer, the sweep, the launchers and results collection all import it
(and nothing else spells a run-directory file name or an exit code).

What a run directory holds (:class:`RunDir`; every file written to a temporary name, flushed to disk and
renamed into place, so a file is either the old complete one or the new complete one, never half):

==========================  =====================================================================
``config.yaml``             the resolved config: the whole truth of the run
``metrics.csv``             a row per epoch
``result.csv``              one row once finished; its presence means *finished*
``checkpoint.pt``           weights being trained, optimizer, scheduler, scaler, RNG, position
``checkpoint.prev.pt``      the checkpoint before it (the fallback when the newest is damaged)
``model.safetensors``       the final model, with the config in its metadata
``train.log``               the trainer's log
``state.json``              how the last trainer process ended (status, exit code, one-line message)
``lock``                    who trains in it now (host, pid): one trainer per directory
                            (:mod:`stitching.rundir_lock`)
``launcher.log``            output of ``stitching.launch.local``
``slurm_job``               ``<jobid>_<task>`` of the last SLURM submission (for humans)
``.requeue_requested``      the requeue request of a multi-process trainer (see below)
``tensorboard/``            the curves for TensorBoard (``output.log_to``, :mod:`stitching.train.curves`)
``wandb/``                  W&B's files (``output.log_to``; offline unless configured)
``previous/<stamp>/``       an earlier run's files moved aside by ``--force``
==========================  =====================================================================

A run's status (:func:`status`, one of :data:`STATUSES`): ``new`` (nothing trained yet), ``started`` (a
checkpoint or a trainer that has not said how it ended: running, or killed), ``preempted`` (checkpointed after
SIGTERM/SIGUSR1; run it again to resume), ``interrupted`` (stopped by Ctrl-C: checkpointed after the first,
aborted by a second keeping the last complete checkpoint; run it again to resume), ``finished``
(``result.csv``) or ``failed`` (the trainer stopped with an error). ``state.json``'s message says how
(:func:`error_line`), and :func:`stitching.rundir_ending.ending` turns a trainer process's exit into the words a
launcher prints. :func:`stitching.rundir_lock.live_status` tells ``started`` apart by the lock: ``running`` (a
live trainer holds it) or ``killed`` (gone without saying how it ended).

Identity (:func:`identity`, :func:`run_key`, :func:`same_run`, :func:`differing_keys`): a run is its resolved
config without the ``output`` section (where a run writes and whether it also saves the model do not change
what it computes), restricted to the keys whose value differs from a *baseline*:
``stitching.config.IDENTITY_BASELINE``, a frozen table giving every key the value a run directory written
before the key existed implicitly had (normally the key's default when it was introduced). A key missing from
an older ``config.yaml`` counts as its baseline, so adding a key with a default never changes what earlier
runs are: an old ``config.yaml`` without ``data.hflip`` is the same run as a new one with ``data.hflip: 0.5``
(its baseline), a different run from one with ``data.hflip: 0`` (and :func:`differing_keys` names
``data.hflip``). The functions take the rules as an argument (this module stays standard-library only;
the config module owns the keys and the table, and gives them as one :class:`IdentityRules`,
``stitching.config.IDENTITY``). Keys a run never reads are left out too (:attr:`IdentityRules.unread`): keys
that change how a run is carried out but not what it computes (``data.workers``, ``train.log_every``,
``train.preempt_check_every``), and a key that only another key's value makes read (``model.init_images``
under ``model.init: default``). The sweep names directories with :func:`run_key` (and reuses
a directory of the same run named by an older version's key), the trainer refuses a directory holding a
different run with :func:`same_run`, and collection treats two finished directories with the same key as
duplicates. A run directory's name (:func:`run_dir_name`: a readable head and the run key) is what a sweep
calls its runs and what a single run without ``output.dir`` is called (under ``runs/<config name>/``).

Paths: :mod:`stitching.rundir_paths` (a run directory is known by its resolved path).

Exit codes (of ``python -m stitching.train``; the launchers and the SLURM batch script read them):
:data:`EXIT_OK` 0, :data:`EXIT_FAILED` 1 (an unexpected error; traceback in the log),
:data:`EXIT_CONFIG` 2 (bad config or input, nothing computed or overwritten), :data:`EXIT_NONFINITE` 65
(the loss became NaN/Inf: no result, the last good checkpoint kept), :data:`EXIT_BUSY` 73 (another
trainer holds the directory), :data:`EXIT_IO` 74 (a file could not be written, e.g. disk full or a
directory that became unwritable; earlier files intact), :data:`EXIT_PREEMPTED` 75 (``EX_TEMPFAIL``:
checkpoint saved after SIGTERM/SIGUSR1, run the same command again), :data:`EXIT_INTERRUPTED` 130 (128 +
SIGINT, the shell's convention: Ctrl-C; run the same command again).

Requeue request: ``torch.distributed.run`` does not pass its workers' exit codes through (it exits 1 when
a worker exits 75), so when ``$STITCHING_REQUEUE_FILE`` is set (the SLURM batch script sets it to
``<run dir>/.requeue_requested``) rank 0 creates that file (:func:`request_requeue`) before exiting with
:data:`EXIT_PREEMPTED`; the batch script treats it exactly like exit code 75.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

# ------------------------------------------------------------------------------------------- file names
CONFIG = "config.yaml"
METRICS = "metrics.csv"
RESULT = "result.csv"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_PREVIOUS = "checkpoint.prev.pt"
MODEL = "model.safetensors"
LOG = "train.log"
STATE = "state.json"
LOCK = "lock"
LAUNCHER_LOG = "launcher.log"
SLURM_MARKER = "slurm_job"
REQUEUE_REQUEST = ".requeue_requested"
PREVIOUS_DIR = "previous"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
#: where run directories go unless told otherwise (``runs/<config, sweep or matrix name>/...``)
RUNS = "runs"
#: what ``--force`` moves aside (the lock stays: it is the current trainer's)
RUN_FILES = (CONFIG, METRICS, RESULT, CHECKPOINT, CHECKPOINT_PREVIOUS, MODEL, LOG, STATE, TENSORBOARD_DIR, WANDB_DIR)

# ------------------------------------------------------------------------------------------- exit codes
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 65      # EX_DATAERR: the loss became NaN/Inf
EXIT_BUSY = 73           # EX_CANTCREAT: another trainer holds the run directory
EXIT_IO = 74             # EX_IOERR: a run-directory file could not be written (disk full, ...)
EXIT_PREEMPTED = 75      # EX_TEMPFAIL: checkpoint saved after SIGTERM/SIGUSR1; run the same command again
EXIT_INTERRUPTED = 130   # 128 + SIGINT: Ctrl-C (checkpoint saved, or aborted by a second one); run it again
REQUEUE_ENV = "STITCHING_REQUEUE_FILE"

# ------------------------------------------------------------------------------------------- statuses
NEW, STARTED, PREEMPTED, FINISHED, FAILED = "new", "started", "preempted", "finished", "failed"
INTERRUPTED = "interrupted"
#: every status, in the order summaries list them
STATUSES = (FINISHED, PREEMPTED, INTERRUPTED, STARTED, FAILED, NEW)
#: statuses a trainer writes into ``state.json`` when it ends (:func:`status` reads them back)
ENDED = (PREEMPTED, INTERRUPTED, FAILED)
#: :func:`stitching.rundir_lock.live_status` tells a started run apart by its trainer: still running, or gone
#: without saying how
RUNNING, KILLED = "running", "killed"
LIVE_STATUSES = (FINISHED, RUNNING, PREEMPTED, INTERRUPTED, KILLED, FAILED, NEW)
#: ``state.json``'s message when the trainer stopped on an unexpected error (its traceback is in the trainer's
#: output: ``launcher.log``, or the SLURM task's log)
UNEXPECTED = "unexpected error (traceback above)"



_FAILURES = {EXIT_CONFIG: "bad config", EXIT_NONFINITE: "non-finite loss", EXIT_BUSY: "run directory in use",
             EXIT_IO: "could not write the run directory"}


def describe_exit(code: int) -> str:
    """A few words for a trainer's exit code alone (what it says without ``state.json``:
    :func:`stitching.rundir_ending.ending`)."""
    if code < 0:
        return f"killed by {_signal_name(-code)}"
    if code in (EXIT_OK, EXIT_PREEMPTED, EXIT_INTERRUPTED):
        return {EXIT_OK: "done", EXIT_PREEMPTED: "preempted", EXIT_INTERRUPTED: "interrupted"}[code]
    return f"FAILED: {_FAILURES.get(code, 'error')} (exit {code})"


def status_of_exit(code: int) -> str:
    return {EXIT_OK: FINISHED, EXIT_PREEMPTED: PREEMPTED, EXIT_INTERRUPTED: INTERRUPTED}.get(code, FAILED)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class RunDirError(Exception):
    """A run-directory problem the trainer reports as one line with :attr:`exit_code`."""

    exit_code = EXIT_FAILED


class WriteError(RunDirError):
    exit_code = EXIT_IO


class BusyError(RunDirError):
    exit_code = EXIT_BUSY


class PathError(RunDirError):
    """A path that cannot be a run directory (a symlink loop, a file in the way): bad input."""

    exit_code = EXIT_CONFIG


# ------------------------------------------------------------------------------------------- identity
#: the section of a config that is not part of a run's identity
NOT_IDENTITY = ("output",)


def identity_sections(config: dict) -> dict:
    """The sections of a resolved config (``Config.to_dict()`` or a loaded ``config.yaml``) a run's identity
    reads: every mapping but ``output``."""
    return {s: v for s, v in config.items() if s not in NOT_IDENTITY and isinstance(v, dict)}


@dataclasses.dataclass(frozen=True)
class IdentityRules:
    """What a run's identity reads (given by the config module, which owns the keys; this module stays
    standard-library only). ``baseline``: dotted key -> the value a run had before the key existed (a key at
    its baseline, or missing from an older ``config.yaml``, is left out). ``unread``: a config -> the dotted
    keys its run never reads (left out whatever their value)."""

    baseline: Mapping[str, Any]
    unread: Callable[[dict], Collection[str]] = lambda config: ()


def identity(config: dict, rules: IdentityRules) -> dict:
    """What makes a run this run: ``{dotted key: value}`` of the identity sections' keys whose value differs
    from ``rules.baseline`` (``stitching.config.IDENTITY``), without the keys ``rules.unread(config)`` names.
    A key at its baseline, or missing (an older ``config.yaml``), is left out; a key the baseline does not
    know is always kept."""
    baseline, unread = rules.baseline, set(rules.unread(config))
    out = {}
    for section, values in identity_sections(config).items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in unread and (dotted not in baseline or not _equal(value, baseline[dotted])):
                out[dotted] = value
    return out


def _equal(a, b) -> bool:
    """``==``, except that a bool never equals a number (``True == 1`` in Python)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


#: hex digits of a :func:`run_key`
RUN_KEY_CHARS = 8


def run_key(config: dict, rules: IdentityRules) -> str:
    """:data:`RUN_KEY_CHARS` hex digits naming a run's :func:`identity` (the tail of a sweep's directory
    names)."""
    return hashlib.sha1(json.dumps(identity(config, rules), sort_keys=True, default=str).encode()
                        ).hexdigest()[:RUN_KEY_CHARS]


def same_run(a: dict, b: dict, rules: IdentityRules) -> bool:
    return not differing_keys(a, b, rules)


def differing_keys(a: dict, b: dict, rules: IdentityRules) -> list[str]:
    """Dotted keys whose values differ between two configs' identities."""
    ia, ib = identity(a, rules), identity(b, rules)
    return sorted(k for k in set(ia) | set(ib) if k not in ia or k not in ib or not _equal(ia[k], ib[k]))


def run_dir_name(cfg, rules: IdentityRules) -> str:
    """A run directory's name, readable and stable: ``resnet50.1-swin_t.3.bottleneck.bilinear.lr0.002.seed0.<key>``
    (``<key>``: :func:`run_key`). ``cfg`` is a ``stitching.config.Config`` (its ``model``/``train`` sections,
    ``is_original`` and ``to_dict()``; this module imports nothing of the project). The sweep names its runs
    with it, and the trainer a run given no ``output.dir``."""
    m, t = cfg.model, cfg.train
    digest = run_key(cfg.to_dict(), rules)
    if cfg.is_original:
        head = f"original.{m.source}.ep{t.epochs}"
    else:
        src_cut, dst_cut = ((f"b{m.source_block}", f"b{m.destination_block}") if m.source_block is not None
                            else (m.source_stage, m.destination_stage))
        head = f"{m.source}.{src_cut}-{m.destination or m.source}.{dst_cut}.{m.adapter}"
        if m.adapter != "finetune":
            head += f".{m.resize}"
    if m.random_init != "none":         # a random-init control of a stitching matrix
        head += f".random-{m.random_init}"
    return f"{head}.lr{t.lr:g}.seed{t.seed}.{digest}"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory (it holds one of :data:`RUN_FILES`)."""
    return any((Path(path) / name).is_file() for name in RUN_FILES)


# ------------------------------------------------------------------------------------------- writing
def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, flushed and renamed: a
    crash or a kill at any point leaves the old file (or none), never a part. An OSError (disk full, ...)
    removes the temporary file and raises :class:`WriteError` naming the file; the old file is intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise WriteError(f"cannot write {path}: {_write_why(err)}; the files already there are intact") from err
    except BaseException:       # KeyboardInterrupt (a second Ctrl-C) in the middle: no temporary file left
        _discard(tmp)
        raise
    return path


def _write_why(err: OSError) -> str:
    why = "disk full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
    return f"{why} (errno {err.errno})"


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _write_file(path: Path, data: bytes) -> None:
    """The one place bytes reach the disk (tests replace it to simulate a full disk or a slow write)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def csv_bytes(columns: list[str], rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def utc_now() -> str:
    """Now, UTC, to the second (ISO 8601): when a state or a lock was written."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- the directory
class RunDir:
    """Paths and safe writes of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def result(self) -> Path:
        return self.path / RESULT

    @property
    def finished(self) -> bool:
        return self.result.is_file()

    def status(self) -> str:
        return status(self.path)

    def write_bytes(self, name: str, data: bytes) -> Path:
        return atomic_write(self.path / name, data)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def write_rows(self, name: str, columns: list[str], rows: list[dict]) -> Path:
        return self.write_bytes(name, csv_bytes(columns, rows))

    def read_rows(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    # ---- checkpoints: the newest and the one before it
    def checkpoint_candidates(self) -> list[Path]:
        """Existing checkpoints, newest first (``checkpoint.pt``, then ``checkpoint.prev.pt``)."""
        return [p for p in (self.path / CHECKPOINT, self.path / CHECKPOINT_PREVIOUS) if p.is_file()]

    def write_checkpoint(self, data: bytes) -> Path:
        """Write the serialized checkpoint; the former newest becomes ``checkpoint.prev.pt``. A kill between
        the two renames leaves ``checkpoint.prev.pt`` only, which :meth:`checkpoint_candidates` finds."""
        path = self.path / CHECKPOINT
        try:
            tmp = self.write_bytes(f".{CHECKPOINT}.new", data)
        except WriteError as err:
            raise WriteError(f"cannot write {path}: {_write_why(err.__cause__)}; the checkpoints already there are "
                             "intact") from err.__cause__
        try:
            if path.is_file():
                os.replace(path, self.path / CHECKPOINT_PREVIOUS)
            os.replace(tmp, path)
        except OSError as err:
            raise WriteError(f"cannot write {path}: {_write_why(err)}") from err
        return path

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged file to ``<name>.damaged-<stamp>`` (kept for inspection, never deleted)."""
        dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, dest)
        return dest

    def archive(self) -> Path | None:
        """Move the files of an earlier run into ``previous/<timestamp>/`` (``--force``)."""
        present = [self.path / f for f in RUN_FILES if (self.path / f).exists()]
        if not present:
            return None
        dest = self.path / PREVIOUS_DIR / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for f in present:
            shutil.move(str(f), dest / f.name)
        return dest

    # ---- how the last trainer ended
    def write_state(self, status_: str, exit_code: int | None = None, message: str = "") -> bool:
        """Write ``state.json``; False if it could not be written at all. Where the directory refuses new
        files (it became unwritable) but the old ``state.json`` may still be written, it is overwritten in
        place (not atomically: a kill in the middle leaves a file :meth:`read_state` reads as no state)."""
        data = (json.dumps({"status": status_, "exit_code": exit_code, "message": message,
                            "host": socket.gethostname(), "pid": os.getpid(), "at": utc_now()}) + "\n").encode()
        try:
            self.write_bytes(STATE, data)
            return True
        except WriteError:
            return overwrite(self.path / STATE, data)  # the state is a convenience: never hide the real outcome

    def read_state(self) -> dict:
        try:
            return json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return {}



def status(path: str | os.PathLike) -> str:
    """One of :data:`STATUSES` (see the module docstring)."""
    d = Path(path)
    if (d / RESULT).is_file():
        return FINISHED
    state = RunDir(d).read_state().get("status")
    if state in ENDED:
        return state
    if state == STARTED or any((d / f).is_file() for f in (CHECKPOINT, CHECKPOINT_PREVIOUS)):
        return STARTED
    return NEW


def error_line(path: str | os.PathLike, logs: tuple = ()) -> str:
    """The last line of a failed run's error: ``state.json``'s message, or, where that only says the error was
    unexpected, the last line the trainer wrote to the first of ``logs`` that exists (``launcher.log``, a SLURM
    task's log: the traceback's last line), skipping the launchers' own ``[...]`` lines and progress bars."""
    message = RunDir(path).read_state().get("message", "")
    if message and message != UNEXPECTED:
        return message
    for log in (Path(path) / LAUNCHER_LOG, *map(Path, logs)):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("[") and "it/s]" not in ln and "s/it]" not in ln]
        if lines:
            return lines[-1]
    if message == UNEXPECTED:
        return "an unexpected error, and no log of it here (launcher.log, the SLURM task's log)"
    return "no error recorded (state.json, launcher.log and the SLURM task's log say nothing)"


# ------------------------------------------------------------------------------------------- requeue
def request_requeue(env: dict | None = None) -> Path | None:
    """Create the file ``$STITCHING_REQUEUE_FILE`` names (rank 0 of a preempted multi-process trainer)."""
    name = (os.environ if env is None else env).get(REQUEUE_ENV)
    if not name:
        return None
    path = Path(name)
    atomic_write(path, f"{socket.gethostname()} {os.getpid()} {utc_now()}\n".encode())
    return path


def overwrite(path: Path, data: bytes) -> bool:
    """Rewrite an existing file in place (for a directory that no longer takes new files); False if not."""
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
