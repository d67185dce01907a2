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

import itertools
import math
import shlex
import sys
import textwrap
import typing
from collections import Counter
from pathlib import Path

from stitching import cli
from stitching import rundir as R, rundir_paths
from stitching.config import IDENTITY, ConfigError, parse_value, read_yaml
from stitching.kinds import FINETUNE, ORIGINAL
from stitching.launch.slurm import queue, resources, script
from stitching.sweep import estimate as E
from stitching.sweep import status as S
from stitching.sweep.packs import check_pack, describe, job_of, pack_runs, runs_in, savings
from stitching.sweep.spec import EXTENSION, PAPER, Run, expand, load_sweep
from stitching.train import curves

#: the widest line the dry run's tables aim for
WIDTH = 120
#: the table's second header row: a method's resize mode, in one letter
RESIZE_CODES = {"none": "n", "bilinear": "b", "strided": "s"}


def _status(run: Run) -> str:
    return R.status(run.config.output.dir)


def pair_label(pair: str) -> str:
    """A table's row label for an architecture pair: ``a -> b``, or ``a (self)`` for a network stitched to itself."""
    src, arrow, dst = pair.partition(" -> ")
    return f"{src} (self)" if arrow and src == dst else pair


def _method_order(method: str) -> tuple:
    adapter, _, resize = method.partition("/")
    kind = 2 if method == ORIGINAL else 1 if method == FINETUNE else 0
    return kind, adapter, list(RESIZE_CODES).index(resize) if resize in RESIZE_CODES else 9


def table(runs: list[Run], part: str | None = None) -> str:
    """Runs to train per architecture pair (rows) and method (columns: the adapter, and under it the resize mode
    in one letter, :data:`RESIZE_CODES`). A cell ``18+9`` is a line with 18 runs of its own and 9 rows shared
    from a run that builds the same module (a duplicate: e.g. the three resize modes where sizes already match, or
    an integrated variant that must upsample); ``-``: no such line. ``part``: count only the runs and duplicates
    of that part (``paper``/``extension``); the ``total`` column counts runs."""
    own = [r.points[0] for r in runs if part is None or r.part == part]
    shared = [p for r in runs for p in r.shared if part is None or p["part"] == part]
    if not own and not shared:
        return "(no runs)"
    trained, rows = Counter(), Counter()
    for p in own:
        trained[(p["pair"], p["method"])] += 1
    for p in own + shared:
        rows[(p["pair"], p["method"])] += 1
    pairs = sorted({pair for pair, _ in rows})
    methods = sorted({m for _, m in rows}, key=_method_order)

    def cell(pair: str, method: str) -> str:
        a, n = trained[(pair, method)], rows[(pair, method)]
        return "-" if n == 0 else str(a) if a == n else f"{a}+{n - a}"

    body = {pair: [cell(pair, m) for m in methods] + [str(sum(trained[(pair, m)] for m in methods))]
            for pair in pairs}
    body["total"] = [str(sum(trained[(p, m)] for p in pairs)) for m in methods] + [str(sum(trained.values()))]
    heads = [(m.partition("/")[0], RESIZE_CODES.get(m.partition("/")[2], "")) for m in methods] + [("total", "")]
    widths = [max(len(sub), *(len(v[k]) for v in body.values())) for k, (_, sub) in enumerate(heads)]
    groups: list[list[int]] = []            # columns sharing a top heading (an adapter)
    for k, (top, _) in enumerate(heads):
        if groups and heads[groups[-1][0]][0] == top:
            groups[-1].append(k)
        else:
            groups.append([k])
    for g in groups:                        # the top heading fits over its columns
        span = sum(widths[k] for k in g) + len(g) - 1
        widths[g[-1]] += max(0, len(heads[g[0]][0]) - span)
    label = max(len(pair_label(p)) for p in body) + 1
    top = f"{'':<{label}}" + "".join("  " + f"{heads[g[0]][0]:<{sum(widths[k] for k in g) + len(g) - 1}}"
                                     for g in groups)
    sub = f"{'pair':<{label}}" + "".join("  " + " ".join(f"{heads[k][1]:>{widths[k]}}" for k in g) for g in groups)
    lines = [top.rstrip(), sub.rstrip()]
    for pair, cells in body.items():
        lines.append(f"{pair_label(pair):<{label}}" + "".join("  " + " ".join(f"{cells[k]:>{widths[k]}}" for k in g)
                                                           for g in groups))
    return "\n".join(lines)


def totals(runs: list[Run], has_extensions: bool = True) -> str:
    """Runs of the paper part alone and of the whole sweep, per seed and overall (one row, ``all runs``,
    for a sweep without extension blocks)."""
    seeds = sorted({r.config.train.seed for r in runs})
    parts = [("paper only", [r for r in runs if r.part == PAPER]), ("full (paper + extensions)", runs)] \
        if has_extensions else [("all runs", runs)]
    head = f"{'':28}" + "".join(f"{'seed ' + str(s):>10}" for s in seeds) + f"{'total':>10}"
    lines = [head]
    for label, rs in parts:
        per = Counter(r.config.train.seed for r in rs)
        lines.append(f"{label:28}" + "".join(f"{per[s]:>10}" for s in seeds) + f"{len(rs):>10}")
    return "\n".join(lines)


def _print_dropped(title: str, counter: Counter) -> None:
    if not counter:
        return
    by_reason = Counter()
    for (_, reason), n in counter.items():
        by_reason[reason] += n
    print(f"{title}: {sum(counter.values())}")
    for reason, n in by_reason.most_common():
        print(textwrap.fill(reason, WIDTH, initial_indent=f"  {n:6d}  ", subsequent_indent=" " * 10))


def print_reused(reused: list) -> None:
    """Say which existing directories are reused under an older version's name (:attr:`Expansion.reused`)."""
    if reused:
        print(f"reusing {len(reused)} run directories named by an older version's run key (the same run; "
              "the name is kept):")
        for name, found in reused:
            print(f"  {found.name}  (this version names it {name})")


def runs_dir_of(given: str | None, name: str) -> Path:
    """Where the run directories of a sweep (or matrix) called ``name`` go: ``--runs-dir`` as typed (a plain
    path), else ``runs/<name>``; resolved (:func:`stitching.rundir_paths.canonical`) before anything is read or
    written there. A path that cannot be a directory is a :class:`ConfigError` naming ``--runs-dir``."""
    try:
        return rundir_paths.canonical(given if given is not None else Path(R.RUNS) / name)
    except R.PathError as err:
        raise ConfigError("--runs-dir", given, "command line", str(err)) from None


def _write_config(run: Run) -> None:
    d = R.RunDir(run.config.output.dir)
    if d.config.is_file():
        old = read_yaml(d.config) or {}          # (bounded: an alias bomb there is one line, exit 2)
        diff = R.differing_keys(old, run.config.to_dict(), IDENTITY)      # none: the same run
        if diff:
            raise ConfigError("output.dir", str(d.path), "sweep", f"holds a different run's {R.CONFIG} (differs in "
                              f"{', '.join(diff)})")
        return
    d.write_text(R.CONFIG, run.config.to_yaml())


def groupings(runs: list[Run], has_extensions: bool, by_method: bool = True) -> list[tuple[str, callable]]:
    """The row groups of the status and cost tables: per part (where the sweep has extension blocks), the runs by
    architecture pair and, with ``by_method``, by method."""
    parts = [(PAPER, "paper part"), (EXTENSION, "extension part")] if has_extensions else [(None, "")]
    out = []
    for part, title in parts:
        if not any(part is None or r.part == part for r in runs):
            continue

        def keyed(attr, part=part):
            return lambda r: (pair_label(r.pair) if attr == "pair" else r.method) if part in (None, r.part) else None

        out.append((f"{title}, by pair".lstrip(", "), keyed("pair")))
        if by_method:
            out.append((f"{title}, by method".lstrip(", "), keyed("method")))
    return out


def print_cost(runs: list[Run], blocks, groups: list[tuple[str, callable]], args, has_extensions: bool = False
               ) -> None:
    """The dry run's cost of ``runs`` (:mod:`stitching.sweep.estimate`): the rate, the table (rows ``groups``, as
    :func:`groupings` gives them), the totals of the paper part and the full sweep where there are both, what is
    still to run, and its wall time at the launcher's parallelism (``args``: the command's options)."""
    rate = E.parse_rate(args.rate)
    est = E.estimate_runs(runs, rate, E.parse_images(args.images), args.loader_rate)
    ref = E.reference_macs()
    print(textwrap.fill(f"cost: an estimate (its conventions and what it leaves out: docs/method.md, \"MACs\"). "
                        f"GPU-hours at {rate.describe()}, i.e. {rate.images_per_s['mixed'] * ref:.2e} MACs/s per GPU "
                        f"(ResNet-50 trains at {ref:.3g} MACs per image) for every run"
                        + (f", at most {args.loader_rate:g} images/s from the data loader" if args.loader_rate
                           else "; data loading not counted (--loader-rate caps it)"), WIDTH, subsequent_indent="  "))
    for note in est.notes:
        print(textwrap.fill(note, WIDTH, initial_indent="note: ", subsequent_indent="  "))
    if est.unknown:
        print(f"note: {len(est.unknown)} runs have unknown image counts and are left out of the sums")
    print()
    print(E.cost_table(est.runs, groups))
    if has_extensions and any(r.part == EXTENSION for r in runs):
        print()
        for label, ests in (("paper only", [e for e in est.runs if e.run.part == PAPER]),
                            ("full (paper + extensions)", est.runs)):
            known = [e for e in ests if e.known]
            print(f"{label:28}{len(ests):>7} runs  {E.macs(sum(e.train_macs + e.eval_macs for e in known)):>9} MACs"
                  f"  {E.hours(sum(e.gpu_hours for e in known)):>9} GPU-hours")
    todo = [e for e in est.runs if R.status(e.run.config.output.dir) != R.FINISHED and e.known]
    if len(todo) < len([e for e in est.runs if e.known]):
        print(f"still to run: {len(todo)} runs, {E.hours(sum(e.gpu_hours for e in todo))} GPU-hours")
    if args.pack > 1:
        packed = E.jobs(todo, args.pack)
        print(f"packed (--pack {args.pack}): {len(todo)} runs in {len(packed)} jobs, "
              f"{E.hours(sum(e.gpu_hours for e in packed))} GPU-hours (the frozen source prefix run once per pack)")
    files = [e for e in todo if e.train_hours and e.run.config.data.name == "imagefolder"]    # decoded from files
    fastest = max(files, key=lambda e: e.train_images / e.train_hours, default=None)
    if fastest is not None and not args.loader_rate:
        print(textwrap.fill(f"the fastest run would train at {fastest.train_images / fastest.train_hours / 3600:,.0f} "
                            "images/s: check that its data loader keeps up (benchmarks/keep_up.py measures a node's), "
                            "or cap it with --loader-rate", WIDTH, subsequent_indent="  "))
    print(wall_line(todo, blocks, args))


def wall_line(todo: list[E.Estimate], blocks, args) -> str:
    """What the runs still to run take from submission to the last result, at the launcher's parallelism (its
    jobs: runs, or with ``--pack K`` packs, :func:`stitching.sweep.estimate.jobs`)."""
    if args.launcher == "slurm":
        groups = [(res.max_parallel, res.gpus_per_task, E.jobs([e for e in todo if e.run in runs], args.pack),
                   resources.time_seconds(res.time) / 3600, res.time)
                  for res, runs in slurm_groups([e.run for e in todo], blocks, args.slurm).values()]
    else:
        groups = [(max(1, args.parallel), 1, E.jobs(todo, args.pack), None, "")]
    wall = E.wall_time(groups)
    if wall is None:
        return "wall time: nothing to run"
    at = (f"{wall.tasks} task{'s' * (wall.tasks > 1)} at a time" if wall.tasks
          else "no % throttle: as many tasks at a time as the cluster gives")
    at += f" x {wall.gpus} GPUs" if wall.gpus > 1 else ""
    where = "the job array's slurm.max_parallel" if args.launcher == "slurm" else "--parallel"
    longest = "pack" if args.pack > 1 else "run"
    line = (f"wall time: {E.duration(wall.hours)} ({at}, {where}; the longest {longest} {E.duration(wall.longest)})"
            + (" if the cluster grants them" if args.launcher == "slurm" else ""))
    if wall.over_limit:
        line += (f"; {wall.over_limit} {longest}s outlast the time limit {wall.limit} of their task (they checkpoint "
                 "and requeue themselves)")
    return textwrap.fill(line, WIDTH, subsequent_indent="  ")


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
    status = Counter(_status(r) for r in runs)
    print(f"sweep {name}: {points} grid points -> {len(runs)} runs in {runs_dir}{off}")
    _print_dropped("excluded by rules", chosen(exp.excluded))
    _print_dropped("impossible combinations dropped", chosen(exp.impossible))
    _print_dropped("duplicates dropped (same model, same recipe; their rows are shared)", chosen(exp.duplicates))
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
    todo = [r for r in runs if _status(r) != R.FINISHED]
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


def launch(todo: list[Run], blocks, runs_dir: Path, name: str, launcher: str, parallel: int = 1,
           slurm_overrides: list[str] = (), pack: int = 1) -> int:
    """Write each unfinished run's ``config.yaml`` and run them, up to ``pack`` to a job
    (:func:`stitching.sweep.packs.pack_runs`): ``local`` here (``parallel`` jobs at a time; the exit code says
    whether any failed or was preempted), ``slurm`` as job arrays, a job per task (never twice for a run
    directory already queued or running). Shared by every command that expands runs (sweeps, matrices)."""
    for log_to in {tuple(r.config.output.log_to or ()) for r in todo}:     # their extras, before anything is written
        curves.check_installed(next(r.config for r in todo if tuple(r.config.output.log_to or ()) == log_to))
    for run in todo:
        _write_config(run)

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


def slurm_groups(runs: list[Run], blocks, overrides: list[str]) -> dict[str, tuple]:
    """The runs by job array: ``{key: (SlurmResources, runs)}``, one per distinct set of resources (a block's
    ``slurm:`` with the ``--slurm key=value`` overrides, each typed by the resource it sets, as section.key=value
    is); one submission (one or more job arrays) per group; ConfigError for a malformed override or resource."""
    extra = {}
    fields = typing.get_type_hints(resources.SlurmResources)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError("--slurm", item, "command line", "write --slurm key=value")
        # typed by the resource it sets, as section.key=value is (an unknown key is named by from_dict)
        extra[key] = parse_value(fields[key], value, f"--slurm {key}") if key in fields else value
    groups: dict[str, tuple[resources.SlurmResources, list[Run]]] = {}
    by_block = {b.name: b for b in blocks}
    for run in runs:
        spec = {**by_block[run.block].slurm, **extra}
        try:
            res = resources.SlurmResources.from_dict(spec, source=f"slurm resources of block {run.block}")
        except ValueError as err:
            raise ConfigError("slurm", spec, "sweep", str(err)) from None
        groups.setdefault(repr(res), (res, []))[1].append(run)
    return groups


def _arrays_said(sizes: list[int], res) -> str:
    """``3 job arrays of 2 x 1001 + 737 tasks, chained ...``: how a submission is split and throttled."""
    runs = [[n, sum(1 for _ in group)] for n, group in itertools.groupby(sizes)]
    tasks = " + ".join(f"{k} x {n}" if k > 1 else str(n) for n, k in runs)
    arrays = f"{len(sizes)} job arrays of {tasks} tasks" if len(sizes) > 1 else f"1 job array of {tasks} tasks"
    if res.max_parallel and len(sizes) > 1:
        return (f"{arrays}, chained (each waits for the one before: afterany) so that at most {res.max_parallel} run "
                "at once (max_parallel)")
    return arrays + (f", at most {res.max_parallel} running at once (max_parallel)" if res.max_parallel else "")


def print_slurm_plan(todo: list[Run], blocks, overrides: list[str], pack: int = 1) -> None:
    """What ``--launcher slurm`` would submit (the dry run): per resource group, its tasks (runs, or packs of up
    to ``pack``) and how many job arrays the cluster's ``MaxArraySize`` splits them into (read from ``scontrol
    show config``; SLURM's default where it cannot be)."""
    if not todo:
        return
    try:
        limit, where = resources.max_array_size(), "scontrol show config"
    except RuntimeError as err:
        limit, where = resources.DEFAULT_MAX_ARRAY_SIZE, f"SLURM's default; not read here: {str(err).splitlines()[0]}"
    for res, runs in slurm_groups(todo, blocks, overrides).values():
        blocks_of = sorted({r.block for r in runs})
        jobs = pack_runs(runs, pack)
        try:
            arrays = _arrays_said(resources.array_chunks(len(jobs), limit), res)
        except resources.UnsatisfiableJob as err:  # a cluster that takes no arrays at all
            arrays = f"none: {err}"
        packs = f" in {len(jobs)} packs of up to {pack}" if len(jobs) < len(runs) else ""
        print(textwrap.fill(f"slurm: {len(runs)} unfinished runs of {', '.join(blocks_of)}{packs} -> {arrays} "
                            f"(MaxArraySize {limit}: {where}; runs already queued or running are left out when "
                            "submitting)", WIDTH, subsequent_indent="  "))


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
            print(f"slurm: submitted {_arrays_said([len(ts) for _, ts in arrays], res)}{packed}: job arrays {ids}"
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


if __name__ == "__main__":
    cli.run_cli(main)
