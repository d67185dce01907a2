#!/usr/bin/env python
"""Draw the paper's figures and Table 1 from a results CSV.

    python scripts/plot_results.py results.csv --out figures/ [--where COLUMN=VALUE ...] [--default-options]

``--where`` keeps the rows whose column has that value (repeatable; values compared in the results' canonical
spelling, so ``lr=0.002`` matches ``0.002``); ``--default-options`` keeps the rows whose training options
(``init``, ``objective``, ``pos_embed``, ``frozen_bn``) are at their defaults, the originals included -- the
main figures of a sweep whose extension blocks vary them. The CSV is the one written by ``python -m stitching.collect RUNS_DIR -o results.csv``. Prints each file
written; a missing, empty or malformed CSV gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    import stitching  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stitching.plots import draw_all, load_results  # noqa: E402
from stitching.plots.options import at_defaults  # noqa: E402
from stitching.results.recipe import canonical  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results CSV from `python -m stitching.collect`")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures/)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep only the rows with this value in this column (repeatable)")
    parser.add_argument("--default-options", action="store_true",
                        help="keep only the rows whose training options are at their defaults")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        df = load_results(args.results)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for condition in args.where:
        column, sep, value = condition.partition("=")
        if not sep or column not in df.columns:
            print(f"error: --where {condition}: expected COLUMN=VALUE with a column of {args.results}",
                  file=sys.stderr)
            return 2
        df = df[df[column].map(canonical) == canonical(value)]
    if args.default_options:
        df = at_defaults(df)
    written = draw_all(df, args.out)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to draw from {args.results} ({len(df)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
