"""Collect every finished run under a folder into one tidy CSV (one row per run), saying what it left out.

    python -m stitching.collect RUNS_DIR -o results.csv

Prints how many runs are finished, unfinished and damaged (with their paths) and how many recipes the
finished ones were trained with (never averaged together by the plots), and exits 0 even when some
runs have problems. Exits 2 with a one-line message, before reading any run, when RUNS_DIR does not exist
or ``-o`` is a directory or a run directory's own file (its ``result.csv``, ``config.yaml``, ...: that run's
record would be overwritten); 74 when the CSV cannot be written. Both are plain paths, taken as typed. The
CSV is written atomically (temporary file + rename). The work is done by :mod:`stitching.results.collect`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stitching import cli
from stitching import rundir as R
from stitching.rundir_paths import canonical
from stitching.results.collect import collect, summarize, write_csv_atomic
from stitching.results.recipe import describe_recipes


def output_file(output: Path) -> tuple[Path, str | None]:
    """Where ``-o`` puts the collected CSV -- its folder resolved (:func:`stitching.rundir_paths.canonical`), so ``..``
    and symlinked folders cannot hide a run directory -- and why it cannot go there (None: it can): ``-o`` is a
    directory, or a file of a run directory (:data:`stitching.rundir.RUN_FILES`, e.g. its ``result.csv``)."""
    if output.is_dir():
        return output, "is a directory; give the CSV's file name (e.g. results.csv inside it)"
    try:
        folder = canonical(output.parent)
    except R.PathError as err:
        return output, str(err)
    if output.name in R.RUN_FILES and R.is_run_dir(folder):
        return output, (f"is the {output.name} of the run directory {folder}: collecting there would overwrite "
                        "that run's own file; write the CSV elsewhere")
    return folder / output.name, None


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python -m stitching.collect", __doc__, [
        "python -m stitching.collect runs/paper -o results.csv"],
        {R.EXIT_OK: "the CSV is written (also when some runs are unfinished or damaged: they are listed)",
         R.EXIT_CONFIG: "RUNS_DIR does not exist, or -o is a directory or a run directory's own file",
         R.EXIT_IO: "the CSV could not be written"})
    parser.add_argument("runs_dir", type=Path, help="folder holding run directories (searched recursively)")
    parser.add_argument("-o", "--output", type=Path, default=Path("results.csv"),
                        help="CSV to write (default: results.csv)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: runs directory does not exist: {args.runs_dir}", file=sys.stderr)
        return R.EXIT_CONFIG
    target, why = output_file(args.output)
    if why:
        print(f"error: -o {str(args.output)!r}: {why}", file=sys.stderr)
        return R.EXIT_CONFIG
    df, problems = collect(args.runs_dir)
    print(summarize(df, problems))
    if len(df):
        print(f"recipes:    {describe_recipes(df)}")
    try:
        write_csv_atomic(df, target)
    except OSError as err:
        print(f"error: cannot write {args.output}: {err.strerror or err} (errno {err.errno}); nothing was "
              "written", file=sys.stderr)
        return R.EXIT_IO
    print(f"wrote {target} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
