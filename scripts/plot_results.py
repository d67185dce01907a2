#!/usr/bin/env python
"""Draw the paper's figures and Table 1 from a results CSV, and say which runs they show and which they leave out.

    python scripts/plot_results.py results.csv --out figures/ [--where COLUMN=VALUE ...] [--default-options]
        [--all-lrs] [--format png,pdf,svg] [--dpi 300] [--recipe-footer] [--data-label NAME]

The CSV is the one written by ``python -m stitching.collect RUNS_DIR -o results.csv``. ``--where`` keeps the
rows whose column has that value (repeatable; values compared in the results' canonical spelling, so
``lr=0.002`` matches ``0.002``); ``--default-options`` keeps the rows whose training options (``init``,
``objective``, ``pos_embed``, ``frozen_bn``) are at their defaults, the originals included -- the main figures of
a sweep whose extension blocks vary them. A scenario run at several learning rates is drawn at one (a stitch
at the recipe's adapter lr 0.002, fine-tuning at its best mean over seeds); ``--all-lrs`` draws each lr as its
own line. Each figure's legend names the dataset, the epochs and the learning rates shown; ``captions.md``
holds every figure's caption with the whole recipe (``--recipe-footer`` puts it under the legend as well);
``--data-label`` names the dataset of runs that do not (written before ``data.label``). Figures are PNG at
``--dpi`` 300 unless ``--format`` asks for PDF or SVG too. A table of several recipes is drawn into one
folder per recipe (``recipe-1/``, ...).

Prints each file written, then the selection: every scenario's runs, drawn (in which figures) or left out and
why -- all of it in ``OUT/selection.md``. Exit status 0 when drawn (or nothing to draw); 2 for a missing, empty
or malformed CSV or a bad option (one line, nothing drawn); 74 when a file cannot be written (disk full: the
files already there are intact).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

try:
    import stitching  # noqa: F401
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stitching.plots import load_results  # noqa: E402
from stitching.plots.draw import DrawOptions, draw  # noqa: E402
from stitching.plots.figures import DPI, FORMATS  # noqa: E402
from stitching.plots.selection import selection_text  # noqa: E402
from stitching.results.recipe import canonical  # noqa: E402
from stitching import cli  # noqa: E402
from stitching.rundir import EXIT_CONFIG, EXIT_IO, EXIT_OK, WriteError  # noqa: E402


class BadOption(ValueError):
    """An option that cannot be used with this results table: one line, exit 2."""


def _where(conditions: list[str], df, path: Path) -> tuple[tuple[str, str], ...]:
    out = []
    for condition in conditions:
        column, sep, value = condition.partition("=")
        if not sep or column not in df.columns:
            raise BadOption(f"--where {condition}: expected COLUMN=VALUE with a column of {path}")
        out.append((column, value))
    return tuple(out)


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise BadOption(f"--format {text}: expected a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _data_label(label: str | None, df, path: Path) -> str:
    if not label:
        return ""
    unnamed = df if "data_label" not in df.columns else df[df["data_label"].map(canonical) == ""]
    datasets = sorted(set(unnamed["dataset"].map(canonical)) - {""}) if "dataset" in unnamed.columns else []
    if len(datasets) > 1:
        raise BadOption(f"--data-label {label}: the runs of {path} without a data_label hold {len(datasets)} "
                        f"datasets ({', '.join(datasets)}); one name cannot stand for them all")
    return label


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("python scripts/plot_results.py", __doc__, [
        "python scripts/plot_results.py results.csv --out figures/",
        "python scripts/plot_results.py results.csv --out figures/ --all-lrs --format png,pdf"],
        {EXIT_OK: "the figures and tables are written",
         EXIT_CONFIG: "bad options, or a CSV that cannot be read as results (one line says why)",
         EXIT_IO: "a figure or table could not be written"})
    parser.add_argument("results", type=Path, help="results CSV from `python -m stitching.collect`")
    parser.add_argument("--out", type=Path, default=Path("figures"), help="output folder (default: figures/)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep only the rows with this value in this column (repeatable)")
    parser.add_argument("--default-options", action="store_true",
                        help="keep only the rows whose training options are at their defaults")
    parser.add_argument("--all-lrs", action="store_true",
                        help="draw every learning rate of a scenario as its own line (default: one lr per scenario)")
    parser.add_argument("--format", default="png", metavar="png,pdf,svg",
                        help="figure file formats, comma-separated (default: png)")
    parser.add_argument("--dpi", type=int, default=DPI, help=f"PNG resolution (default: {DPI})")
    parser.add_argument("--recipe-footer", action="store_true",
                        help="the whole recipe under each figure's legend (default: dataset, epochs and image size "
                             "there, the whole recipe in captions.md)")
    parser.add_argument("--data-label", metavar="NAME",
                        help="the dataset's name in figures and tables for runs that give none (data.label)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.dpi < 1:
            raise BadOption(f"--dpi {args.dpi}: must be a positive number of dots per inch")
        formats = _formats(args.format)
        df = load_results(args.results)
        options = DrawOptions(where=_where(args.where, df, args.results), default_options=args.default_options,
                              all_lrs=args.all_lrs, footer=args.recipe_footer,
                              data_label=_data_label(args.data_label, df, args.results))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    drawn = draw(df, options)
    try:
        written = drawn.save(args.out, formats, args.dpi)
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IO
    for path in written:
        print(path)
    if not drawn.figures:
        print(f"nothing to draw from {args.results} ({len(df)} rows)", file=sys.stderr)
    print()
    print(selection_text(drawn.selection, drawn.recipes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
