"""Run a grid of runs (a sweep file) here or as SLURM job arrays, skipping what has finished.

``python -m stitching.sweep SWEEP.yaml --launcher local|slurm [--runs-dir DIR] [--dry-run|--status] [--paper-only]
[--pack K]``:
expands the sweep into one run directory per run (``DIR/<run name>/config.yaml``), prints how many grid
points were excluded, impossible or duplicates (and why), skips finished runs, and launches the rest:
``local`` runs them here (``--parallel N`` at a time); ``slurm`` submits one job array per distinct set of
resources (``slurm:`` in the sweep file, overridden by ``--slurm key=value``) -- split into several arrays
where the cluster's ``MaxArraySize`` asks for it, chained so the ``%`` throttle holds across them
(:mod:`stitching.launch.slurm`) -- never a second job for a run directory that already has a pending or
running task. ``--dry-run`` prints, for the paper part and the extension part (blocks with ``extension:``)
each, the table of runs per architecture pair and method, the totals per seed of the paper part alone and of
the full sweep, with ``--launcher slurm`` how many job arrays the submission becomes, and what it costs
(:mod:`stitching.sweep.estimate`: training and evaluation MACs per pair and per method, GPU-hours at ``--rate``
-- a GPU of the rate table, ``a100`` by default, or the images/s at which your GPU trains ResNet-50 -- and the
wall time at the SLURM throttle or ``--parallel``; ``--images TRAIN,VAL`` and ``--loader-rate`` refine it); it
writes or submits nothing. ``--status`` (no ``--launcher`` needed) reads the run directories and prints, per
part and pair, how many runs are done, running, preempted, interrupted, failed or not started, and every failed
run's directory and last error line; it exits 0 when every run has finished, 1 when any failed, 75 when some
are still to finish (:mod:`stitching.sweep.status`). ``--paper-only`` / ``--extensions`` switch the extension
blocks off / on (default: the file's ``extensions:``, itself true by default).
``--pack K`` trains up to K runs that share a source, data, seed and recipe as one pack (one SLURM task or local
job, one data pass, the frozen source prefix run once: :mod:`stitching.train.pack`, grouped by
:mod:`stitching.sweep.packs`); the default ``--pack 1`` is one run per job. The dry run then also prints, for the
whole sweep, the jobs, passes over the training data and frozen-prefix GMACs per image, separate vs packed.
"""

from __future__ import annotations

import math
import textwrap
from collections import Counter

from stitching import cli
from stitching import rundir as R
from stitching.sweep import estimate as E
from stitching.sweep import status as S
from stitching.sweep.launching import launch, runs_dir_of
from stitching.sweep.packs import check_pack, describe, pack_runs, savings
from stitching.sweep.report import (WIDTH, groupings, print_cost, print_dropped, print_reused, print_slurm_plan,
                                    status_of, table, totals)
from stitching.sweep.spec import EXTENSION, PAPER, expand, load_sweep


def main(argv=None) -> int:
    parser = cli.parser("python -m stitching.sweep", __doc__, [
        "python -m stitching.sweep configs/sweeps/paper.yaml --launcher slurm --dry-run   # its runs and cost",
        "python -m stitching.sweep configs/sweeps/paper.yaml --launcher slurm --slurm partition=gpu",
        "python -m stitching.sweep configs/sweeps/smoke.yaml --launcher local --parallel 2",
        "python -m stitching.sweep configs/sweeps/paper.yaml --launcher slurm --pack 16   # fewer, longer tasks",
        "python -m stitching.sweep configs/sweeps/paper.yaml --paper-only --status        # where it stands"],
        cli.LAUNCHER_EXITS)
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--launcher", choices=("local", "slurm"), help="where the runs train (required unless "
                        "--status)")
    parser.add_argument("--runs-dir", help="where run directories go (default: runs/<sweep name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their cost; write and submit "
                        "nothing")
    parser.add_argument("--status", action="store_true", help="print where the runs stand, read from their "
                        "directories; write and submit nothing (exit 0: all done, 1: some failed, 75: not yet)")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--paper-only", dest="extensions", action="store_false", default=None,
                      help="leave the extension blocks out (the sweep file's 'extensions: false' does the same)")
    part.add_argument("--extensions", dest="extensions", action="store_true",
                      help="include the extension blocks even where the sweep file switches them off")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs at a time")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="override a slurm resource (partition, gpus_per_task, cpus_per_task, mem, time, "
                             "max_parallel, requeue, signal, account, qos, ...)")
    parser.add_argument("--pack", type=int, default=1, metavar="K",
                        help="train up to K runs that share a source, data, seed and recipe as one job, over one "
                             "data pass (default 1: one run per job)")
    E.add_options(parser)
    args = parser.parse_args(argv)
    if args.launcher is None and not args.status:
        parser.error("--launcher is required (or --status: where the runs stand)")
    E.parse_rate(args.rate), E.parse_images(args.images)       # a bad value: one line before any work
    check_pack(args.pack)

    name, _, switch = load_sweep(args.sweep)
    extensions = switch if args.extensions is None else args.extensions
    runs_dir = runs_dir_of(args.runs_dir, name)
    # the whole sweep is expanded for the totals; the paper part's runs do not depend on the extensions
    name, blocks, exp = expand(args.sweep, runs_dir, extensions=True)
    ext_blocks = {b.name: b.extension for b in blocks if b.extension}
    runs = exp.runs if extensions else exp.part(PAPER)

    def chosen(counter: Counter) -> Counter:
        return Counter({k: v for k, v in counter.items() if extensions or k[0] not in ext_blocks})

    points = exp.total - (0 if extensions else sum(math.prod(map(len, b.grid.values()))
                                                   for b in blocks if b.extension))
    off = "" if extensions else " (paper part only: extension blocks switched off)"
    if args.status:
        print(f"sweep {name}: {len(runs)} runs in {runs_dir}{off}; where they stand, read from their directories "
              "(nothing written or submitted)")
        return S.report(runs, runs_dir, groupings(runs, bool(ext_blocks) and extensions, by_method=False))
    status = Counter(status_of(r) for r in runs)
    print(f"sweep {name}: {points} grid points -> {len(runs)} runs in {runs_dir}{off}")
    print_dropped("excluded by rules", chosen(exp.excluded))
    print_dropped("impossible combinations dropped", chosen(exp.impossible))
    print_dropped("duplicates dropped (same model, same recipe; their rows are shared)", chosen(exp.duplicates))
    dirs = {r.config.output.dir for r in runs}
    print_reused([(n, d) for n, d in exp.reused if str(d) in dirs])
    print()
    legend = ("rows: pairs; columns: the adapter over its resize modes, n none, b bilinear, s strided; a+b: a runs, "
              "b rows shared from a duplicate")
    print(textwrap.fill(f"paper part: the runs the paper's study needs ({legend})" if ext_blocks
                        else f"runs ({legend})", WIDTH))
    print(table(runs, PAPER))
    if ext_blocks:
        print()
        state = "on" if extensions else "OFF (--paper-only or 'extensions: false'; shown for reference)"
        print(f"extension part ({state}): runs beyond the paper's own")
        for block, why in ext_blocks.items():
            print(textwrap.fill(f"{block}: {why}", WIDTH, initial_indent="  ", subsequent_indent="    "))
        print(table(exp.runs, EXTENSION))
    print()
    print(totals(exp.runs, bool(ext_blocks)))
    print()
    print(f"total runs: {len(runs)} (" + ", ".join(f"{status[s]} {s}" for s in R.STATUSES) + ")")
    todo = [r for r in runs if status_of(r) != R.FINISHED]
    if args.dry_run:
        print()
        print(describe(savings(runs, pack_runs(runs, args.pack)), args.pack))
        if args.launcher == "slurm":
            print_slurm_plan(todo, blocks, args.slurm, args.pack)
        print()
        print_cost(runs, blocks, groupings(runs, bool(ext_blocks)), args, bool(ext_blocks))
        print("dry run: nothing written or submitted")
        return 0
    if not todo:
        print("nothing to do: every run has finished")
        return 0
    return launch(todo, blocks, runs_dir, name, args.launcher, args.parallel, args.slurm, args.pack)


if __name__ == "__main__":
    cli.run_cli(main)
