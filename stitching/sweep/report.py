"""What a sweep says before it runs: the dry run's table of runs per architecture pair and method, the totals,
what the grid dropped or reused, and what it costs (:mod:`stitching.sweep.estimate`) per group.
"""

from __future__ import annotations

import itertools
import textwrap
from collections import Counter

from stitching import rundir as R
from stitching.kinds import FINETUNE, ORIGINAL, RESIZES
from stitching.launch.slurm import resources
from stitching.sweep import estimate as E
from stitching.sweep.packs import pack_runs
from stitching.sweep.spec import EXTENSION, PAPER, Run, slurm_groups


#: the widest line the dry run's tables aim for
WIDTH = 120


#: the table's second header row: a method's resize mode, in one letter
RESIZE_CODES = {mode: mode[0] for mode in RESIZES}


def status_of(run: Run) -> str:
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


def print_dropped(title: str, counter: Counter) -> None:
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


def arrays_said(sizes: list[int], res) -> str:
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
            arrays = arrays_said(resources.array_chunks(len(jobs), limit), res)
        except resources.UnsatisfiableJob as err:  # a cluster that takes no arrays at all
            arrays = f"none: {err}"
        packs = f" in {len(jobs)} packs of up to {pack}" if len(jobs) < len(runs) else ""
        print(textwrap.fill(f"slurm: {len(runs)} unfinished runs of {', '.join(blocks_of)}{packs} -> {arrays} "
                            f"(MaxArraySize {limit}: {where}; runs already queued or running are left out when "
                            "submitting)", WIDTH, subsequent_indent="  "))
