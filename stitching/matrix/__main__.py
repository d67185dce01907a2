"""Train a stitching matrix (every sender cut x every receiver cut, with random controls), collect and draw it.

``python -m stitching.matrix MATRIX.yaml --launcher local|slurm [--closed-form] [--runs-dir DIR]
[--dry-run|--status] [--draw] [--pack K]``:
expands the matrix file (:mod:`stitching.matrix.spec`) into sweep blocks -- the trained matrix and each
random-init control, every sender cut x every receiver cut x seed -- and hands them to the sweep machinery
(:func:`stitching.sweep.spec.expand_blocks`, :func:`stitching.sweep.launching.launch`): impossible cells are
dropped and counted with their reason, duplicates dropped, each cell gets a stable run directory under
``DIR`` (default ``runs/<matrix name>``), finished cells are skipped and unfinished ones resume. It prints
one table per matrix (rows sender cuts, columns receiver cuts; each cell's state) and the counts.

``--launcher local`` trains the unfinished cells here (``--parallel N`` at a time), then collects every
finished cell into ``DIR/results.csv`` (:mod:`stitching.results.collect`), the cell table into
``DIR/matrix.csv`` (:mod:`stitching.matrix.cells`) and draws ``DIR/figures/matrix_heatmaps.png``,
``DIR/figures/accuracy_vs_depth.png``, ``calibrated_heatmaps.png`` (with the controls and the receiver's
accuracy) and ``similarity_heatmaps.png`` (where the cells measured it) (:mod:`stitching.plots.matrix`).
``--launcher slurm`` submits job arrays (``slurm:`` in the matrix file, ``--slurm key=value``); once they have
run, ``--draw`` collects and draws. ``--pack K`` trains up to K cells that share a sender, seed and recipe as one
job over one data pass (:mod:`stitching.train.pack`; the default 1: one cell per job). ``--dry-run`` prints the
tables and counts, the jobs, data passes and frozen-prefix GMACs separate vs packed by ``--pack``, and what the
cells cost per matrix (as ``python -m stitching.sweep --dry-run``: MACs, GPU-hours at ``--rate``, wall time;
``--images``, ``--loader-rate``) and writes or submits nothing. ``--status`` (no ``--launcher`` needed) prints, per
matrix, how many cells are done, running, preempted, interrupted, failed or not started and every failed cell's
directory and last error line; exit 0 when every cell has finished, 1 when any failed, 75 when some are still to
finish. The receiver is also evaluated alone (one more run, :data:`~stitching.matrix.spec.RECEIVER_BLOCK`): the
ceiling of the calibrated scores.

``--closed-form``: the same cells with their adapters fitted by least squares and evaluated, no gradient step
(:mod:`stitching.matrix.closed_form`; default runs folder ``runs/<matrix name>-closed-form``): one group per
(control, seed), ``DIR/<group>/<cell run>``, each group one process ``python -m stitching.matrix.closed_form
GROUP_DIR``: here through the local launcher (``--parallel N`` groups at a time, its thread counts; each group's
log echoed when it ends) or as one SLURM job array with a task per group (``slurm``); finished cells are
skipped, an interrupted group is computed again for its unfinished cells. Then the same ``results.csv``,
``matrix.csv`` (its ``fit`` column says ``closed_form``) and figures. ``--status`` and ``--draw`` read the
closed-form runs folder with ``--closed-form``; ``--dry-run`` prints no cost (nothing is trained).
"""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path

from stitching import cli
from stitching import rundir as R
from stitching.cli import run_cli
from stitching.config import CUT_KEYS, ConfigError
from stitching.kinds import STITCHED, kinds_with
from stitching.launch.slurm.queue import LOG_DIR, submit_arrays, sweep_dir
from stitching.launch.slurm.resources import UnsatisfiableJob
from stitching.matrix.spec import CONTROL_NAMES, RECEIVER_BLOCK, Matrix, MatrixError, load_matrix
from stitching.sweep import estimate as E
from stitching.sweep.launching import launch, local_summary, runs_dir_of, write_config
from stitching.sweep.report import print_cost, print_dropped, print_reused, print_slurm_plan
from stitching.sweep.spec import slurm_groups
from stitching.sweep.packs import check_pack, describe, pack_runs, savings
from stitching.sweep.status import report

#: a cell's mark in the printed tables
MARKS = {R.NEW: ".", R.STARTED: "~", R.PREEMPTED: "~", R.INTERRUPTED: "~", R.FINISHED: "#", R.FAILED: "!"}
IMPOSSIBLE, MISSING = "x", " "
CLOSED_FORM_SUFFIX = "-closed-form"     # the default runs folder of a closed-form matrix: runs/<name>-closed-form
LEGEND = (f"'{MARKS[R.NEW]}' to train, '{MARKS[R.FINISHED]}' finished, '~' started, preempted or interrupted (resumes), "
          f"'{MARKS[R.FAILED]}' failed, '{IMPOSSIBLE}' cannot be stitched (see above), '=' built by another cell")


def expand_matrix(matrix: Matrix, runs_dir: Path):
    """The matrix's runs through the sweep machinery: an :class:`stitching.sweep.spec.Expansion`."""
    from stitching.sweep.spec import expand_blocks

    return expand_blocks(matrix.blocks(), runs_dir, src=str(matrix.path))


def cell_marks(matrix: Matrix, exp) -> dict[str, dict[tuple[int, int], str]]:
    """Per matrix (sweep block name), the mark of every cell (several seeds: the marks joined)."""
    src_key, dst_key = (k.partition(".")[2] for k in CUT_KEYS[matrix.cuts])
    marks: dict[str, dict[tuple[int, int], list[str]]] = {}
    for run in exp.runs:
        for k, point in enumerate(run.points):
            if point["block"] == RECEIVER_BLOCK:
                continue
            i, j = point["grid"][f"model.{src_key}"], point["grid"][f"model.{dst_key}"]
            mark = MARKS[R.status(run.config.output.dir)] if k == 0 else "="
            marks.setdefault(point["block"], {}).setdefault((i, j), []).append(mark)
    return {b: {cell: "".join(m) for cell, m in cells.items()} for b, cells in marks.items()}


def print_tables(matrix: Matrix, exp) -> None:
    marks = cell_marks(matrix, exp)
    unit = "stage" if matrix.cuts == "stages" else "block"
    width = max(3, len(str(max(matrix.receiver_cuts))) + 1, len(matrix.seeds or [0]) + 1)
    for control in matrix.controls:
        block = matrix.block_name(control)
        cells = marks.get(block, {})
        print(f"{CONTROL_NAMES[control]} ({sum(len(m) for m in cells.values())} runs): rows sender {unit}, "
              f"columns receiver {unit}")
        print(f"{'':>8}" + "".join(f"{j:>{width}}" for j in matrix.receiver_cuts))
        for i in matrix.sender_cuts:
            row = "".join(f"{cells.get((i, j), IMPOSSIBLE):>{width}}" for j in matrix.receiver_cuts)
            print(f"{i:>8}" + row)
        print()


def summary_line(matrix: Matrix) -> str:
    seeds = len(matrix.seeds or [0])
    what = f"{matrix.sender}" + ("" if matrix.sender == matrix.receiver else f" -> {matrix.receiver}")
    controls = ", ".join(CONTROL_NAMES[c] for c in matrix.controls[1:]) or "none"
    return (f"matrix {matrix.name}: {what}, {matrix.cuts} (stride {matrix.stride}): {len(matrix.sender_cuts)} sender "
            f"x {len(matrix.receiver_cuts)} receiver cuts x {seeds} seed{'s' * (seeds > 1)} = "
            f"{matrix.cells * seeds} cells per matrix; {len(matrix.controls)} matrices (trained; controls: "
            f"{controls})")


def draw(matrix: Matrix, runs_dir: Path, run_names: set[str]) -> int:
    """Collect the finished cells, write ``results.csv`` and ``matrix.csv``, draw the figures."""
    from stitching.matrix.cells import cell_table
    from stitching.plots.figures import NoData
    from stitching.plots.matrix import (plot_accuracy_vs_depth, plot_calibrated_heatmaps, plot_matrix_heatmaps,
                                        plot_similarity_heatmaps)
    from stitching.results.collect import collect, summarize, write_csv_atomic
    from stitching.results.recipe import recipe_label, split_by_recipe

    if not runs_dir.is_dir():
        print(f"nothing to draw: {runs_dir} does not exist (run the matrix first)")
        return 0
    df, problems = collect(runs_dir)
    print(summarize(df, problems))
    write_csv_atomic(df, runs_dir / "results.csv")
    table = cell_table(df, matrix, run_names)
    write_csv_atomic(table, runs_dir / "matrix.csv")
    print(f"wrote {runs_dir / 'results.csv'} ({len(df)} rows), {runs_dir / 'matrix.csv'} ({len(table)} cells)")
    mine = df[df["run_dir"].map(lambda d: str(d).split("/")[-1] in run_names) & (df["kind"] == STITCHED)] \
        if len(df) else df
    recipes = [r for r, _ in split_by_recipe(mine.drop(columns=["random_init"], errors="ignore"))] if len(mine) \
        else []
    caption = recipe_label(recipes[0]) if len(recipes) == 1 else ""
    figures = runs_dir / "figures"
    try:
        written = [plot_matrix_heatmaps(table, figures / "matrix_heatmaps.png", matrix.cuts, matrix.sender_cuts,
                                        matrix.receiver_cuts, matrix.controls, caption),
                   plot_accuracy_vs_depth(table, figures / "accuracy_vs_depth.png", caption)]
    except NoData as err:
        print(f"no figures: {err}")
        return 0
    for name, plot in (("calibrated_heatmaps.png", plot_calibrated_heatmaps),
                       ("similarity_heatmaps.png", plot_similarity_heatmaps)):
        try:
            written.append(plot(table, figures / name, matrix.cuts, matrix.sender_cuts, matrix.receiver_cuts, caption))
        except NoData as err:
            print(f"no {name}: {err}")
    for path in written:
        print(f"wrote {path}")
    return 0


def status_groups(matrix: Matrix) -> list[tuple]:
    """The ``--status`` / cost rows of a matrix's runs: one per matrix (trained, each control), in the matrix's
    order, then the receiver alone (:func:`stitching.sweep.status.report`'s groupings)."""
    matrices = {matrix.block_name(c): CONTROL_NAMES[c] for c in matrix.controls}
    shown = list(matrices.values())
    return [("", lambda r: matrices.get(r.block, r.block), lambda name: (shown + [name]).index(name))]


def print_receiver(exp) -> None:
    runs = [r for r in exp.runs if r.block == RECEIVER_BLOCK]
    for run in runs:
        print(f"receiver alone (evaluated; the calibrated scores' ceiling): {MARKS[R.status(run.config.output.dir)]} "
              f"{run.name}")


def print_plan(matrix: Matrix, exp, impossible: str) -> None:
    """What was dropped and reused, the matrix's tables, its receiver run, the legend and the runs' statuses."""
    print_dropped(impossible, exp.impossible)
    print_dropped("duplicates dropped (same model, same recipe)", exp.duplicates)
    print_reused(exp.reused)
    print()
    print_tables(matrix, exp)
    print_receiver(exp)
    print(f"legend: {LEGEND}")
    status = Counter(R.status(r.config.output.dir) for r in exp.runs)
    print(f"total runs: {len(exp.runs)} (" + ", ".join(f"{status[s]} {s}" for s in R.STATUSES) + ")")


def combined(expansions: list):
    """One :class:`stitching.sweep.spec.Expansion` of several (the runs, counts added up)."""
    from stitching.sweep.spec import Expansion

    out = Expansion([], Counter(), Counter(), Counter(), 0)
    for exp in expansions:
        out.runs += exp.runs
        out.impossible += exp.impossible
        out.duplicates += exp.duplicates
        out.excluded += exp.excluded
        out.reused += exp.reused
        out.total += exp.total
    return out


def check_closed_form(matrix: Matrix) -> None:
    """A matrix whose adapters have no map to fit is refused in one line before anything is built."""
    from stitching.validate import load_config

    cfg = load_config(matrix.base, check=False)
    if cfg.model.adapter not in kinds_with("fit"):
        raise MatrixError("model.adapter", cfg.model.adapter, cfg.source_of("model.adapter"),
                          f"--closed-form fits the adapters by least squares: {', '.join(kinds_with('fit'))} have a "
                          f"map to fit")


def closed_form(matrix: Matrix, args, runs_dir: Path) -> int:
    """``--closed-form``: expand the groups, print the tables, compute the groups (here or on SLURM), draw."""
    from stitching.sweep.spec import expand_blocks

    check_closed_form(matrix)
    groups = [(name, runs_dir / name, expand_blocks([block], runs_dir / name, src=str(matrix.path)))
              for name, block in matrix.groups()]
    receiver = expand_blocks([matrix.receiver_block()], runs_dir, src=str(matrix.path))
    exp = combined([e for _, _, e in groups] + [receiver])
    names = {r.name for r in exp.runs}
    if args.draw:
        return draw(matrix, runs_dir, names)
    if args.status:
        print(f"{summary_line(matrix)} -- closed form\n{len(exp.runs)} runs in {runs_dir}; where they stand, read from "
              "their directories (nothing written or submitted; a group's cells finish together)")
        return report(exp.runs, runs_dir, status_groups(matrix))
    print(summary_line(matrix) + " -- closed form (least squares, no training)")
    print(f"{exp.total} grid points -> {len(exp.runs)} runs in {runs_dir}, {len(groups)} groups (one per control and "
          f"seed; a group's cells share their passes)")
    print_plan(matrix, exp, "cells that cannot be stitched or fitted in closed form")
    todo = [(name, d, [r for r in e.runs if R.status(r.config.output.dir) != R.FINISHED]) for name, d, e in groups]
    todo = [t for t in todo if t[2]]
    todo_receiver = [r for r in receiver.runs if R.status(r.config.output.dir) != R.FINISHED]
    if args.dry_run:
        print("dry run: nothing written or submitted")
        return 0
    for _, _, runs in todo:
        for run in runs:
            write_config(run)
    code = 0
    stopped = (R.EXIT_PREEMPTED, R.EXIT_INTERRUPTED)
    if todo_receiver:
        code = launch(todo_receiver, [matrix.receiver_block()], runs_dir, matrix.name, args.launcher, 1, args.slurm)
    if not todo and not todo_receiver:
        print("nothing to do: every cell has finished")
    elif args.launcher == "local" and todo and code not in stopped:
        code = _run_groups([d for _, d, _ in todo], args.parallel) or code
    elif args.launcher == "slurm" and todo:
        code = _submit_groups(todo, matrix, runs_dir, args.slurm) or code
    if args.launcher == "local" and code not in stopped:
        draw(matrix, runs_dir, names)
    elif args.launcher == "slurm":
        print(f"once the jobs have run: python -m stitching.matrix {shlex.quote(args.matrix)} --closed-form --draw"
              + (f" --runs-dir {shlex.quote(str(runs_dir))}" if args.runs_dir else ""))
    return code


def _run_groups(dirs: list[Path], parallel: int = 1) -> int:
    """The groups here, each in its own process (``python -m stitching.matrix.closed_form GROUP_DIR``), ``parallel``
    at a time with the local launcher's placement, thread counts and signals (:mod:`stitching.launch.local`);
    each group's lines of this launch are echoed when it ends; the exit code as the local launcher's."""
    from stitching.launch.local import run_local
    from stitching.matrix.closed_form import MODULE

    logs = {d: d / R.LAUNCHER_LOG for d in dirs}
    seen = {d: log.stat().st_size if log.is_file() else 0 for d, log in logs.items()}
    result = run_local(dirs, parallel=max(1, parallel), command=("-m", MODULE))
    for d in dirs:
        if logs[d].is_file():
            with open(logs[d], "rb") as f:
                f.seek(seen[d])
                for line in f.read().decode(errors="replace").splitlines():
                    print(f"[closed form] {line}", flush=True)
    return local_summary(result)


def _submit_groups(groups: list[tuple[str, Path, list]], matrix: Matrix, runs_dir: Path, overrides: list[str]) -> int:
    """SLURM job arrays, a task per group (split at the cluster's MaxArraySize; never a second task for a group
    already queued or running); the resources are the matrix's ``slurm:`` with ``--slurm key=value`` typed as a
    sweep's are."""
    import sys

    from stitching.matrix.closed_form import group_command

    dirs = [d for _, d, _ in groups]
    blocks = [block for _, block in matrix.groups()]
    res = next(iter(slurm_groups([r for _, _, runs in groups for r in runs], blocks, overrides).values()))[0]
    try:
        arrays = submit_arrays(dirs, sweep_dir(runs_dir.absolute()), res, f"{matrix.name}-closed-form",
                                     group_command(), chdir=Path.cwd())
    except UnsatisfiableJob as err:
        print(f"error: slurm resources of the matrix: {err}", file=sys.stderr)
        return R.EXIT_CONFIG
    except RuntimeError as err:
        raise ConfigError("--launcher", "slurm", "command line", str(err).strip().splitlines()[0]) from None
    submitted = sum(len(d) for _, d in arrays)
    if arrays:
        jobs = ", ".join(job for job, _ in arrays)
        print(f"slurm: submitted job array{'s' if len(arrays) > 1 else ''} {jobs} with {submitted} group tasks"
              + (f" ({len(dirs) - submitted} already queued or running)" if submitted < len(dirs) else ""))
    else:
        print(f"slurm: all {len(dirs)} unfinished groups are already queued or running")
    print(f"logs: {sweep_dir(runs_dir) / LOG_DIR}")
    return 0


def main(argv=None) -> int:
    parser = cli.parser("python -m stitching.matrix", __doc__, [
        "python -m stitching.matrix configs/matrix/tiny.yaml --launcher local --dry-run   # the cells, their cost",
        "python -m stitching.matrix configs/matrix/tiny.yaml --launcher local",
        "python -m stitching.matrix configs/matrix/tiny.yaml --launcher local --pack 8    # a sender's cells together",
        "python -m stitching.matrix configs/matrix/tiny.yaml --launcher local --closed-form   # no training",
        "python -m stitching.matrix configs/matrix/resnet50_imagenet.yaml --status        # where the cells stand",
        "python -m stitching.matrix configs/matrix/resnet50_imagenet.yaml --draw          # after SLURM"],
        cli.LAUNCHER_EXITS)
    parser.add_argument("matrix", help="matrix YAML file")
    parser.add_argument("--launcher", choices=("local", "slurm"), help="where the cells train (required unless "
                        "--draw)")
    parser.add_argument("--runs-dir", help="where run directories go (default: runs/<matrix name>)")
    parser.add_argument("--dry-run", action="store_true", help="print the cells; write and submit nothing")
    parser.add_argument("--status", action="store_true", help="print where the cells stand, read from their "
                        "directories; write and submit nothing (exit 0: all done, 1: some failed, 75: not yet)")
    parser.add_argument("--draw", action="store_true", help="only collect the finished cells and draw")
    parser.add_argument("--parallel", type=int, default=1, help="local: runs (closed form: groups) at a time")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="override a slurm resource (as python -m stitching.sweep)")
    parser.add_argument("--pack", type=int, default=1, metavar="K",
                        help="train up to K cells that share a sender, seed and recipe as one job, over one data "
                             "pass (default 1: one cell per job)")
    parser.add_argument("--closed-form", action="store_true",
                        help="fit every cell's adapters by least squares and evaluate them, no training (default "
                             "runs folder: runs/<matrix name>-closed-form)")
    E.add_options(parser)
    args = parser.parse_args(argv)
    if args.launcher is None and not (args.draw or args.status):
        parser.error("--launcher is required (or --draw to collect and draw the finished cells, --status to see "
                     "where they stand)")
    E.parse_rate(args.rate), E.parse_images(args.images)       # a bad value: one line before any work
    check_pack(args.pack)
    if args.closed_form and args.pack > 1:
        raise ConfigError("--pack", args.pack, "command line", "packs train cells together; --closed-form trains "
                          "none (each of its groups shares its passes already)")

    matrix = load_matrix(args.matrix)
    if args.closed_form:
        return closed_form(matrix, args, runs_dir_of(args.runs_dir, f"{matrix.name}{CLOSED_FORM_SUFFIX}"))
    runs_dir = runs_dir_of(args.runs_dir, matrix.name)
    exp = expand_matrix(matrix, runs_dir)
    names = {r.name for r in exp.runs}
    if args.draw:
        return draw(matrix, runs_dir, names)
    groups = status_groups(matrix)
    if args.status:
        print(f"{summary_line(matrix)}\n{len(exp.runs)} runs in {runs_dir}; where they stand, read from their "
              "directories (nothing written or submitted)")
        return report(exp.runs, runs_dir, groups)

    print(summary_line(matrix))
    print(f"{exp.total} grid points -> {len(exp.runs)} runs in {runs_dir}")
    print_plan(matrix, exp, "cells that cannot be stitched")
    todo = [r for r in exp.runs if R.status(r.config.output.dir) != R.FINISHED]
    if args.dry_run:
        print(describe(savings(exp.runs, pack_runs(exp.runs, args.pack)), args.pack))
        if args.launcher == "slurm":
            print_slurm_plan(todo, matrix.blocks(), args.slurm, args.pack)
        print()
        print_cost(exp.runs, matrix.blocks(), groups, args)
        print("dry run: nothing written or submitted")
        return 0
    code = 0
    if todo:
        code = launch(todo, matrix.blocks(), runs_dir, matrix.name, args.launcher, args.parallel, args.slurm,
                      args.pack)
    else:
        print("nothing to do: every cell has finished")
    if args.launcher == "local" and code not in (R.EXIT_PREEMPTED, R.EXIT_INTERRUPTED):
        draw(matrix, runs_dir, names)
    elif args.launcher == "slurm":
        print(f"once the jobs have run: python -m stitching.matrix {shlex.quote(args.matrix)} --draw"
              + (f" --runs-dir {shlex.quote(str(runs_dir))}" if args.runs_dir else ""))
    return code


if __name__ == "__main__":
    run_cli(main)
