"""Command line: collect every finished run under a folder into one tidy CSV.

    python -m stitching.collect RUNS_DIR -o results.csv

Prints how many runs are finished, unfinished and damaged (with their paths) and how many recipes the
finished ones were trained with (never averaged together by the plots), and exits 0 even when some
runs have problems; exits 2 with a one-line message when RUNS_DIR does not exist. The CSV is written
atomically (temporary file + rename). The work is done by :mod:`stitching.results.collect`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stitching.results.collect import collect, summarize, write_csv_atomic
from stitching.results.recipe import describe_recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitching.collect", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path, help="folder holding run directories (searched recursively)")
    parser.add_argument("-o", "--output", type=Path, default=Path("results.csv"),
                        help="CSV to write (default: results.csv)")
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        print(f"error: runs directory does not exist: {args.runs_dir}", file=sys.stderr)
        return 2
    df, problems = collect(args.runs_dir)
    print(summarize(df, problems))
    if len(df):
        print(f"recipes:    {describe_recipes(df)}")
    write_csv_atomic(df, args.output)
    print(f"wrote {args.output} ({len(df)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
