"""One training option against its default, scenario by scenario: the table of a sweep's extension blocks.

Owns :data:`OPTIONS` (the recipe columns compared this way, and the measurements shown next to accuracy for
each), :func:`compare_options` / :func:`options_markdown`, and :func:`at_defaults` / :func:`off_defaults` (the
rows at the options' defaults, and why the others are not). An option's default is the config's own default
(:class:`stitching.config.Config`, through the column's config key in :data:`stitching.results.recipe.RECIPE`),
so a new default changes the table with it.

A *scenario* is one stitched model trained one way except for the option: the same source, destination,
cut, adapter, resize mode and learning rate, and the same value of every other recipe column. For each
scenario in which the option takes a non-default value, the table shows one line per value (the default
first): runs (seeds), top-1 after the first epoch (read from each run's ``metrics.csv`` when the runs folder
is given) and at the end, as mean ± standard error over seeds, then the option's own measurements (e.g. the
least-squares fit's residual for ``init``, the match MSE after training for ``objective``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from stitching import rundir as R
from stitching.config import READ_ONLY_WHEN, Config
from stitching.kinds import ORIGINAL, STITCHED
from stitching.plots.aggregate import standard_error
from stitching.plots.labels import add_labels, arch_name
from stitching.plots.table import format_accuracy, to_markdown
from stitching.results.collect import RUN_DIR_COLUMN
from stitching.results.recipe import RECIPE, RECIPE_KEYS, canonical, group_columns

#: option column -> measurements (result columns) shown next to its accuracy
OPTIONS: dict[str, list[str]] = {
    "init": ["init_residual", "cka_after", "match_mse_after"],
    "objective": ["cka_after", "match_mse_after"],
    "pos_embed": ["cka_after", "match_mse_after"],
    "frozen_bn": ["cka_after", "match_mse_after"],
}
#: columns that only have a value under some option value (never part of the scenario): the recipe columns of
#: the keys read only under the option's own key (:data:`stitching.config.READ_ONLY_WHEN`). Derived.
_COMPANIONS = {column: [c for c, k in RECIPE_KEYS.items() if READ_ONLY_WHEN.get(k, ("",))[0] == key]
               for column, key in RECIPE_KEYS.items() if any(when == key for when, _ in READ_ONLY_WHEN.values())}
_SCENARIO = ["source", "destination", "gap", "method", "lr"]


def option_default(column: str) -> str:
    """The config's default for a recipe column (canonical spelling)."""
    section, key = RECIPE[column].split(".")
    return canonical(getattr(getattr(Config(), section), key))


def _epoch1_top1(runs_dir: Path | None, run_dir) -> float:
    if runs_dir is None or not isinstance(run_dir, str):
        return float("nan")
    path = runs_dir / run_dir / R.METRICS
    if not path.is_file():
        return float("nan")
    metrics = pd.read_csv(path)
    first = metrics[(metrics["epoch"] == 1) & metrics["top1"].notna()]
    return float(first["top1"].iloc[-1]) if len(first) else float("nan")


def compare_options(df: pd.DataFrame, runs_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per (option, scenario, value) for every option of :data:`OPTIONS` that ``df`` varies.

    Columns: ``option``, ``value``, ``pair``, ``gap``, ``method``, ``n``, ``top1_epoch1_mean``, ``top1_epoch1_se``,
    ``top1_mean``, ``top1_se`` and, per measurement ``m`` of the option, ``m`` (the mean over seeds).
    """
    runs = Path(runs_dir) if runs_dir is not None else None
    rows = add_labels(df[df["kind"] == STITCHED].copy())
    if rows.empty:
        return pd.DataFrame()
    recipe = group_columns(rows)
    rows = rows.assign(**{c: rows[c].map(canonical) for c in recipe})
    rows["top1_epoch1"] = [_epoch1_top1(runs, d) for d in rows.get(RUN_DIR_COLUMN, [None] * len(rows))]
    rows["pair"] = [f"{arch_name(s)} -> {arch_name(d)}" for s, d in zip(rows["source"], rows["destination"])]
    options = [o for o in OPTIONS if o in rows.columns]
    defaults = {o: option_default(o) for o in options}
    out = []
    for option in options:
        others = [o for o in options if o != option]
        # the other options at their defaults: one option varies at a time
        mine = rows[(rows[others] == pd.Series(defaults)[others]).all(axis=1)] if others else rows
        keys = _SCENARIO + [c for c in recipe if c != option and c not in _COMPANIONS.get(option, [])]
        for _, group in mine.groupby(keys, dropna=False, sort=True):
            values = sorted(group[option].unique(), key=lambda v: (v != defaults[option], v))
            if len(values) < 2 or values[0] != defaults[option]:
                continue
            for value, runs_of in group.groupby(option, sort=False):
                line = {"option": option, "value": value or "none", "pair": runs_of["pair"].iloc[0],
                        "gap": runs_of["gap"].iloc[0], "method": runs_of["method"].iloc[0],
                        "n": int(runs_of["top1"].count()),
                        "top1_epoch1_mean": runs_of["top1_epoch1"].mean(),
                        "top1_epoch1_se": standard_error(runs_of.groupby(option)["top1_epoch1"]).iloc[0],
                        "top1_mean": runs_of["top1"].mean(),
                        "top1_se": standard_error(runs_of.groupby(option)["top1"]).iloc[0]}
                for measure in OPTIONS[option]:
                    line[measure] = (pd.to_numeric(runs_of[measure], errors="coerce").mean()
                                     if measure in runs_of.columns else float("nan"))
                out.append(line)
    table = pd.DataFrame(out)
    if table.empty:
        return table
    order = {o: i for i, o in enumerate(OPTIONS)}
    table["_o"] = table["option"].map(order)
    table["_d"] = [v != (defaults[o] or "none") for o, v in zip(table["option"], table["value"])]
    table = table.sort_values(["_o", "pair", "gap", "method", "_d", "value"], kind="stable")
    return table.drop(columns=["_o", "_d"]).reset_index(drop=True)


def options_markdown(table: pd.DataFrame) -> str:
    """:func:`compare_options`'s table as Markdown, one section per option (accuracy as mean ± s.e.)."""
    if table.empty:
        return "(no option is varied against its default in these results)\n"
    parts = []
    for option, rows in table.groupby("option", sort=False):
        measures = [m for m in OPTIONS[option] if m in rows.columns and rows[m].notna().any()]
        shown = pd.DataFrame({
            "Pair": rows["pair"], "Gap": rows["gap"], "Method": rows["method"], option: rows["value"],
            "Runs": rows["n"],
            "Top-1 after epoch 1": [format_accuracy(m, s, n) for m, s, n in
                                    zip(rows["top1_epoch1_mean"], rows["top1_epoch1_se"], rows["n"])],
            "Top-1 at the end": [format_accuracy(m, s, n) for m, s, n in
                                 zip(rows["top1_mean"], rows["top1_se"], rows["n"])],
            **{m: ["–" if pd.isna(v) else f"{v:.3f}" for v in rows[m]] for m in measures},
        })
        parts.append(f"**{option}** (default: {option_default(option) or 'none'})\n\n" + to_markdown(shown))
    return "\n".join(parts)


def off_defaults(df: pd.DataFrame) -> pd.Series:
    """Per row of ``df``: '' where its options (:data:`OPTIONS`) are all at their defaults (original models
    always), else the options that are not, e.g. ``init: least_squares``."""
    reasons = pd.Series("", index=df.index)
    for option in OPTIONS:
        if option in df.columns:
            value = df[option].map(canonical)
            off = (value != option_default(option)) & (value != "") & (df["kind"] != ORIGINAL)
            joint = reasons[off].where(reasons[off] == "", reasons[off] + "; ")
            reasons[off] = joint + f"{option}: " + value[off]
    return reasons


def at_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose options (:data:`OPTIONS`) are all at their defaults (original models kept):
    what a sweep's main figures show when its extension blocks vary the options."""
    return df[off_defaults(df) == ""]
