"""Every figure and Table 1 for whatever a results table holds.

Owns :func:`draw_all`: for each (source, destination) combination with stitched or fine-tuning runs, the
accuracy-vs-stage and accuracy-vs-MACs figures; the cross-architecture figure; accuracy vs. CKA at the join;
Table 1. Combinations
without data for a figure are skipped (logged), never fatal. A table holding runs of several recipes is
split: one folder ``recipe-<i>/`` per recipe, each with its figures, Table 1 and ``recipe.txt``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from stitching.plots.figures import NoData, plot_accuracy_vs_macs, plot_accuracy_vs_stage, \
    plot_cross_architecture
from stitching.plots.similarity import plot_accuracy_vs_cka
from stitching.plots.table import write_table1
from stitching.results.recipe import recipe_label, split_by_recipe

log = logging.getLogger(__name__)


def _slug(name) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "unnamed"


def pairs(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(source, destination) combinations with stitched or fine-tuning runs, sorted."""
    rows = df[df["kind"].isin(["stitched", "finetune"])].dropna(subset=["source", "destination"])
    return sorted(set(zip(rows["source"].astype(str), rows["destination"].astype(str))))


def draw_all(df: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """Draw every figure and Table 1 into ``out_dir``; return the files written (PNG, ``.md``, ``.tex``).

    Files: ``accuracy_vs_stage_<source>_to_<destination>.png``,
    ``accuracy_vs_macs_<source>_to_<destination>.png``, ``cross_architecture.png``, ``accuracy_vs_cka.png``
    (accuracy vs. CKA at the join, :mod:`stitching.plots.similarity`), ``table1.md``,
    ``table1.tex`` and ``recipe.txt`` (the recipe they show) -- in ``out_dir``, or, when ``df`` holds several
    recipes, in ``out_dir/recipe-1``, ``recipe-2``, ... (never two recipes in one figure).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = split_by_recipe(df) or [({}, df)]
    if len(groups) == 1:
        return _draw_one(groups[0][1], out_dir, groups[0][0])
    log.warning("the results hold %d recipes: drawing each into its own folder", len(groups))
    written: list[Path] = []
    for i, (recipe, rows) in enumerate(groups, 1):
        written += _draw_one(rows, out_dir / f"recipe-{i}", recipe)
    return written


def _draw_one(df: pd.DataFrame, out_dir: Path, recipe: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    note = out_dir / "recipe.txt"
    note.write_text(recipe_label(recipe) + "\n\n" + "".join(f"{k}: {v}\n" for k, v in recipe.items()),
                    encoding="utf-8")
    written: list[Path] = [note]

    def attempt(what: str, draw) -> None:
        try:
            result = draw()
        except NoData as exc:
            log.warning("skipped %s: %s", what, exc)
            return
        written.extend(result if isinstance(result, list) else [result])

    for source, destination in pairs(df):
        stem = f"{_slug(source)}_to_{_slug(destination)}"
        attempt(f"accuracy vs stage {source} -> {destination}", lambda: plot_accuracy_vs_stage(
            df, source, destination, out_dir / f"accuracy_vs_stage_{stem}.png"))
        attempt(f"accuracy vs MACs {source} -> {destination}", lambda: plot_accuracy_vs_macs(
            df, source, destination, out_dir / f"accuracy_vs_macs_{stem}.png"))
    attempt("cross-architecture figure", lambda: plot_cross_architecture(df, out_dir / "cross_architecture.png"))
    attempt("accuracy vs CKA at the join", lambda: plot_accuracy_vs_cka(df, out_dir / "accuracy_vs_cka.png"))
    attempt("Table 1", lambda: write_table1(df, out_dir))
    return written
