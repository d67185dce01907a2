"""``python -m stitching.sweep SWEEP.yaml --launcher local|slurm [--runs-dir DIR] [--dry-run]``.

Expands the sweep into one run directory per run (``DIR/<run name>/config.yaml``), prints how many grid
points were excluded, impossible or duplicates (and why), skips finished runs, and launches the rest:
``local`` runs them here (``--parallel N`` at a time); ``slurm`` submits one job array per distinct set of
resources (``slurm:`` in the sweep file, overridden by ``--slurm key=value``), never a second job for a run
directory that already has a pending or running task. ``--dry-run`` prints the table of runs (count per
architecture pair and method) and the totals, and writes or submits nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import yaml

from stitching.config import ConfigError, run_cli
from stitching.sweep.spec import Run, expand


def _status(run: Run) -> str:
    d = Path(run.config.output.dir)
    if (d / "result.csv").is_file():
        return "finished"
    return "started" if (d / "checkpoint.pt").is_file() else "new"


def table(runs: list[Run]) -> str:
    import pandas as pd

    if not runs:
        return "(no runs)"
    df = pd.DataFrame({"pair": [r.pair for r in runs], "method": [r.method for r in runs]})
    tab = pd.crosstab(df["pair"], df["method"], margins=True, margins_name="total")
    return tab.to_string()


def _print_dropped(title: str, counter: Counter) -> None:
    if not counter:
        return
    by_reason = Counter()
    for (_, reason), n in counter.items():
        by_reason[reason] += n
    print(f"{title}: {sum(counter.values())}")
    for reason, n in by_reason.most_common():
        print(f"  {n:6d}  {reason}")


def _write_config(run: Run) -> None:
    from stitching.train.rundir import atomic_write, comparable_config

    d = Path(run.config.output.dir)
    path = d / "config.yaml"
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        if comparable_config(old) != comparable_config(run.config.to_dict()):
            raise ConfigError("output.dir", str(d), "sweep", "holds a different run's config.yaml")
        return
    atomic_write(path, run.config.to_yaml().encode())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitching.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--launcher", choices=("local", "slurm"), required=True)
    parser.add_argument("--runs-dir", help="where run directories go (default: runs/<sweep name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs; write and submit nothing")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="override a slurm resource (partition, gpus_per_task, cpus_per_task, mem, time, "
                             "max_parallel, requeue, signal, account, qos, ...)")
    args = parser.parse_args(argv)

    from stitching.sweep.spec import load_sweep

    name, _ = load_sweep(args.sweep)
    runs_dir = Path(args.runs_dir or Path("runs") / name)
    name, blocks, exp = expand(args.sweep, runs_dir)
    status = Counter(_status(r) for r in exp.runs)
    print(f"sweep {name}: {exp.total} grid points -> {len(exp.runs)} runs in {runs_dir}")
    _print_dropped("excluded by rules", exp.excluded)
    _print_dropped("impossible combinations dropped", exp.impossible)
    _print_dropped("duplicates dropped (same model, same recipe)", exp.duplicates)
    print()
    print(table(exp.runs))
    print()
    print(f"total runs: {len(exp.runs)} ({status['finished']} finished, {status['started']} started, "
          f"{status['new']} new)")
    todo = [r for r in exp.runs if _status(r) != "finished"]
    if args.dry_run:
        print("dry run: nothing written or submitted")
        return 0
    if not todo:
        print("nothing to do: every run has finished")
        return 0
    for run in todo:
        _write_config(run)

    if args.launcher == "local":
        from stitching.launch.local import run_local

        codes = run_local([r.config.output.dir for r in todo], parallel=max(1, args.parallel))
        failed = {d: c for d, c in codes.items() if c not in (0, 75)}
        print(f"local: {sum(c == 0 for c in codes.values())} done, {sum(c == 75 for c in codes.values())} "
              f"preempted, {len(failed)} failed")
        return 1 if failed else (75 if any(c == 75 for c in codes.values()) else 0)
    return _submit_slurm(todo, blocks, runs_dir, name, args.slurm)


def _submit_slurm(todo: list[Run], blocks, runs_dir: Path, name: str, overrides: list[str]) -> int:
    from stitching.launch import slurm

    extra = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--slurm", item, "command line", "write --slurm key=value")
        extra[key] = yaml.safe_load(value)
    groups: dict[str, tuple[slurm.SlurmResources, list[Run]]] = {}
    by_block = {b.name: b for b in blocks}
    for run in todo:
        spec = {**by_block[run.block].slurm, **extra}
        try:
            res = slurm.SlurmResources.from_dict(spec, source=f"slurm resources of block {run.block}")
        except ValueError as err:
            raise ConfigError("slurm", spec, "sweep", str(err)) from None
        key = repr(res)
        groups.setdefault(key, (res, []))[1].append(run)
    submitted = 0
    for res, runs in groups.values():
        command = slurm.train_command(sys.executable, res.gpus_per_task)
        job, dirs = slurm.submit_array([r.config.output.dir for r in runs], runs_dir.absolute() / "slurm", res,
                                       name, command, chdir=Path.cwd())
        skipped = len(runs) - len(dirs)
        if job:
            print(f"slurm: submitted job array {job} with {len(dirs)} tasks"
                  + (f" ({skipped} already queued or running, not resubmitted)" if skipped else ""))
        else:
            print(f"slurm: all {len(runs)} unfinished runs are already queued or running")
        submitted += len(dirs)
    print(f"logs: {runs_dir / 'slurm' / 'logs'}; collect with: python -m stitching.collect {runs_dir} "
          f"-o {runs_dir}/results.csv")
    return 0


if __name__ == "__main__":
    run_cli(main)
