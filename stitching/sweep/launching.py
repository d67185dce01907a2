"""A sweep's unfinished runs carried out: their run directories written, then run here (the local launcher) or
submitted as SLURM job arrays (one submission per set of resources), and what the launcher's tally means as an
exit code. Shared by every command that expands runs (``stitching.sweep``, ``stitching.matrix``).
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from pathlib import Path

from stitching import rundir as R, rundir_paths
from stitching.config import IDENTITY, ConfigError
from stitching.launch.slurm import queue, resources, script
from stitching.sweep.packs import job_of, pack_runs, runs_in
from stitching.sweep.report import arrays_said
from stitching.sweep.spec import Run, slurm_groups
from stitching.train import curves
from stitching.yamlio import read_yaml


def runs_dir_of(given: str | None, name: str) -> Path:
    """Where the run directories of a sweep (or matrix) called ``name`` go: ``--runs-dir`` as typed (a plain
    path), else ``runs/<name>``; resolved (:func:`stitching.rundir_paths.canonical`) before anything is read or
    written there. A path that cannot be a directory is a :class:`ConfigError` naming ``--runs-dir``."""
    try:
        return rundir_paths.canonical(given if given is not None else Path(R.RUNS) / name)
    except R.PathError as err:
        raise ConfigError("--runs-dir", given, "command line", str(err)) from None


def write_config(run: Run) -> None:
    d = R.RunDir(run.config.output.dir)
    if d.config.is_file():
        old = read_yaml(d.config) or {}          # (bounded: an alias bomb there is one line, exit 2)
        diff = R.differing_keys(old, run.config.to_dict(), IDENTITY)      # none: the same run
        if diff:
            raise ConfigError("output.dir", str(d.path), "sweep", f"holds a different run's {R.CONFIG} (differs in "
                              f"{', '.join(diff)})")
        return
    d.write_text(R.CONFIG, run.config.to_yaml())


def launch(todo: list[Run], blocks, runs_dir: Path, name: str, launcher: str, parallel: int = 1,
           slurm_overrides: list[str] = (), pack: int = 1) -> int:
    """Write each unfinished run's ``config.yaml`` and run them, up to ``pack`` to a job
    (:func:`stitching.sweep.packs.pack_runs`): ``local`` here (``parallel`` jobs at a time; the exit code says
    whether any failed or was preempted), ``slurm`` as job arrays, a job per task (never twice for a run
    directory already queued or running). Shared by every command that expands runs (sweeps, matrices)."""
    for log_to in {tuple(r.config.output.log_to or ()) for r in todo}:     # their extras, before anything is written
        curves.check_installed(next(r.config for r in todo if tuple(r.config.output.log_to or ()) == log_to))
    for run in todo:
        write_config(run)

    if launcher == "local":
        from stitching.launch.local import run_local

        jobs = pack_runs(todo, pack)
        if len(jobs) < len(todo):
            print(f"local: {len(todo)} runs in {len(jobs)} jobs (--pack {pack})")
        return local_summary(run_local([job_of(p) for p in jobs], parallel=max(1, parallel)))
    return _submit_slurm(todo, blocks, runs_dir, name, list(slurm_overrides), pack)


def local_summary(result) -> int:
    """Print the local launcher's tally (:class:`stitching.launch.local.LocalResult`) and return the command's
    exit code: ``EXIT_FAILED`` if a run failed, else ``EXIT_INTERRUPTED`` after a Ctrl-C, ``EXIT_PREEMPTED``
    if runs are left to resume or start (run the command again), else 0 -- also when other trainers finished
    some of the runs."""
    endings = list(result.endings.values())
    n = Counter(e.status for e in endings if not e.elsewhere)
    killed = n[R.NEW] + n[R.STARTED]        # ended by a signal before saying how (rundir_ending.ending)
    failed = n[R.FAILED] + (0 if result.stopped_by else killed)
    extra = [f"{n[R.INTERRUPTED]} interrupted" if n[R.INTERRUPTED] else "",
             f"{killed} stopped while starting" if killed and result.stopped_by else "",
             f"{sum(e.elsewhere for e in endings)} finished by another trainer" if any(e.elsewhere for e in endings)
             else ""]
    why = f"the launcher was stopped by {result.stopped_by}" if result.stopped_by else "in use by another trainer"
    print(f"local: {n[R.FINISHED]} done, {n[R.PREEMPTED]} preempted, {failed} failed"
          + "".join(f", {x}" for x in extra if x)
          + (f" ({len(result.not_started)} not started: {why})" if result.not_started else "")
          + ("; run the same command again to resume" if n[R.PREEMPTED] + n[R.INTERRUPTED] + len(result.not_started)
             + killed and not failed else ""))
    if failed:
        return R.EXIT_FAILED
    if result.stopped_by == "SIGINT" or n[R.INTERRUPTED]:
        return R.EXIT_INTERRUPTED
    return R.EXIT_PREEMPTED if n[R.PREEMPTED] or killed or result.not_started else R.EXIT_OK


def _submit_slurm(todo: list[Run], blocks, runs_dir: Path, name: str, overrides: list[str], pack: int = 1) -> int:
    submitted = 0
    refused: dict[str, int] = {}                      # cause (resources.REFUSALS) -> runs not submitted
    for res, runs in slurm_groups(todo, blocks, overrides).values():
        jobs_of = pack_runs(runs, pack)
        command = script.train_command(sys.executable, res.gpus_per_task, pack=len(jobs_of) < len(runs))
        try:
            arrays = queue.submit_arrays([job_of(p) for p in jobs_of], queue.sweep_dir(runs_dir.absolute()), res,
                                         name, command, chdir=Path.cwd())
        except resources.UnsatisfiableJob as err:  # more than the cluster has or allows: said now, not left queued
            print(f"error: slurm resources of block {runs[0].block} ({len(runs)} runs): {err}", file=sys.stderr)
            done = sum(runs_in(tasks) for _, tasks in err.submitted)
            refused[err.cause] = refused.get(err.cause, 0) + len(runs) - done
            submitted += done
            continue
        except RuntimeError as err:   # no SLURM client here, or its controller cannot be reached: one line
            raise ConfigError("--launcher", "slurm", "command line", str(err).strip().splitlines()[0]) from None
        tasks = [t for _, ts in arrays for t in ts]
        n = runs_in(tasks)
        skipped = len(runs) - n
        jobs = [job for job, _ in arrays]
        ids = ", ".join(jobs if len(jobs) <= 4 else [*jobs[:2], "...", jobs[-1]])
        packed = f" ({n} runs in packs of up to {pack})" if len(tasks) < n else ""
        if len(arrays) == 1:
            print(f"slurm: submitted job array {ids} with {len(tasks)} tasks{packed}"
                  + (f", at most {res.max_parallel} running at once" if res.max_parallel else "")
                  + (f" ({skipped} already queued or running, not resubmitted)" if skipped else ""))
        elif arrays:
            print(f"slurm: submitted {arrays_said([len(ts) for _, ts in arrays], res)}{packed}: job arrays {ids}"
                  + (f" ({skipped} already queued or running, not resubmitted)" if skipped else ""))
        else:
            print(f"slurm: all {len(runs)} unfinished runs are already queued or running")
        submitted += n
    logs = queue.sweep_dir(runs_dir) / queue.LOG_DIR
    print(f"logs: {logs}; collect with: python -m stitching.collect {shlex.quote(str(runs_dir))} "
          f"-o {shlex.quote(str(runs_dir / 'results.csv'))}")
    for cause, n in refused.items():
        print(f"error: {n} runs not submitted: {resources.REFUSALS[cause]} (see above)", file=sys.stderr)
    return R.EXIT_CONFIG if refused else 0
