"""Accuracy against the similarity of the representations at the join, across a sweep.

Owns :func:`plot_accuracy_vs_cka` and the table it draws (:func:`cka_scenarios`): one point per stitched
scenario (seeds averaged: mean top-1 with a ± standard-error bar, mean CKA), coloured and marked like its
method in the paper's figures, filled as its architecture pair (:data:`PAIR_FILLS`; the legend says which),
labelled with its gap. Left panel: linear CKA at the join *before training*
between the source's features and the destination's own activation (``cka_before``) -- how far apart the two
representations start. Right panel (where measured): CKA *after training* between the adapters' output and
the destination's own activation (``cka_after``) -- whether the trained stitch copies the destination's
representation or finds another one. Each panel's title gives Spearman's rank correlation of the points
(:func:`spearman`: pandas ranks and numpy, so the plots need no scipy).
The columns are :data:`stitching.results.schema.SIMILARITY_COLUMNS` (written by every stitched run);
fine-tuning runs and original models have none and are not drawn. Like the other figures it draws one recipe
(:class:`~stitching.results.recipe.MixedRecipes` otherwise) and raises :class:`NoData` when no run has a CKA.
A point's label is placed where it covers no other label when one of a few places is free
(:func:`place_labels`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stitching.kinds import STITCHED
from stitching.plots.aggregate import SCENARIO_KEYS, recipe_keys, standard_error, choose_lrs
from stitching.plots.figures import (ACCURACY_LABEL, DEFAULT_OPTIONS, DPI, FigureOptions, NoData, finish_figure,
                                     _new_figure, _one_recipe, _style, legend_title, lr_shades, save_figure)
from stitching.plots.labels import add_labels, arch_name, method_sort_key

PANELS = (("cka_before", "CKA at the join before training\n(source's features vs. destination's own)"),
          ("cka_after", "CKA after training\n(adapters' output vs. destination's own)"))
#: the marker fill of each architecture pair, in the order of the sorted pairs (one pair: full)
PAIR_FILLS = ("full", "none", "left", "bottom", "right", "top")
#: where a point's label may go, in points from the point, in order of preference
LABEL_OFFSETS = ((5, 3), (5, -9), (-5, 3), (-5, -9), (5, 10), (5, -16), (-5, 10), (-5, -16))


def cka_rows(df: pd.DataFrame, options: FigureOptions = DEFAULT_OPTIONS) -> pd.DataFrame:
    """The stitched runs with a CKA at the join that the figure draws (one lr per scenario unless
    ``options.all_lrs``), with ``method`` labels and :func:`~stitching.plots.aggregate.lr_choice`'s columns. A
    module shared by several resize modes is one point: its rows are not copied to the other modes."""
    rows = df[(df["kind"] == STITCHED) & df["top1"].notna()]
    present = [c for c, _ in PANELS if c in rows.columns]
    rows = rows.assign(**{c: pd.to_numeric(rows[c], errors="coerce") for c in present})    # '' is no CKA
    rows = rows[rows[present].notna().any(axis=1)] if present else rows.iloc[0:0]
    if rows.empty:
        return rows
    return choose_lrs(add_labels(rows), options.adapter_lr, options.all_lrs)


def cka_scenarios(df: pd.DataFrame, options: FigureOptions = DEFAULT_OPTIONS) -> pd.DataFrame:
    """Stitched runs with a CKA, one row per scenario and recipe: the scenario keys, ``kind``, ``adapter``,
    ``resize``, ``n``, ``top1_mean``, ``top1_se`` and the mean of ``cka_before`` / ``cka_after``."""
    return _scenarios(cka_rows(df, options))


def _scenarios(rows: pd.DataFrame) -> pd.DataFrame:
    columns = SCENARIO_KEYS + ["kind", "adapter", "resize", "n", "top1_mean", "top1_se"] + [c for c, _ in PANELS]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows, recipe = recipe_keys(rows)
    grouped = rows.groupby(SCENARIO_KEYS + recipe, dropna=False, sort=True)
    out = pd.DataFrame({
        "kind": grouped["kind"].first(), "adapter": grouped["adapter"].first(), "resize": grouped["resize"].first(),
        "n": grouped["top1"].count(), "top1_mean": grouped["top1"].mean(), "top1_se": standard_error(grouped["top1"]),
        **{c: pd.to_numeric(grouped[c].mean(), errors="coerce") if c in rows.columns else np.nan
           for c, _ in PANELS},
    }).reset_index()
    return out[columns + recipe]


def spearman(x, y) -> float:
    """Spearman's rank correlation of ``x`` and ``y``: Pearson's r of their ranks, ties given their average rank
    (``scipy.stats.spearmanr``'s value); pairs with a missing value are left out. NaN for fewer than three
    pairs or a constant side."""
    x = pd.Series(np.asarray(x, dtype=float))
    y = pd.Series(np.asarray(y, dtype=float))
    keep = x.notna() & y.notna()
    if keep.sum() < 3:
        return float("nan")
    rx, ry = x[keep].rank(method="average").to_numpy(), y[keep].rank(method="average").to_numpy()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / scale) if scale > 0 else float("nan")


def _point_label(row: pd.Series, several_pairs: bool, lr: bool) -> str:
    gap = f"{int(row['source_stage'])}→{int(row['destination_stage'])}"
    if lr:
        gap += f" lr {float(row['lr']):g}"
    if not several_pairs:
        return gap
    return f"{arch_name(row['source'])}→{arch_name(row['destination'])} {gap}"


def place_labels(fig: Figure, texts: list) -> None:
    """Move each annotation of ``texts`` (in order) to the first of :data:`LABEL_OFFSETS` where it overlaps no
    label placed before it and stays inside its panel; where none is free it keeps the first."""
    if not texts:
        return
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    placed = []
    for text in texts:
        panel = text.axes.get_window_extent(renderer)
        for offset in LABEL_OFFSETS:
            text.xyann = offset
            text.set_horizontalalignment("left" if offset[0] > 0 else "right")
            box = text.get_window_extent(renderer)
            inside = panel.x0 <= box.x0 and box.x1 <= panel.x1 and panel.y0 <= box.y0 and box.y1 <= panel.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
        else:
            text.xyann = LABEL_OFFSETS[0]
            text.set_horizontalalignment("left")
            box = text.get_window_extent(renderer)
        placed.append(box)


def accuracy_vs_cka_figure(df: pd.DataFrame, options: FigureOptions = DEFAULT_OPTIONS,
                           note: str = "") -> tuple[Figure, pd.DataFrame]:
    """:func:`plot_accuracy_vs_cka`'s figure and the rows of the runs it draws."""
    df, recipe = _one_recipe(df, "accuracy vs. CKA at the join", df["kind"] == STITCHED)
    rows = cka_rows(df, options)
    points = _scenarios(rows)
    panels = [(c, label) for c, label in PANELS if points[c].notna().any()] if not points.empty else []
    if not panels:
        raise NoData("no stitched run with a CKA at the join (train.similarity_images: 0, or runs written "
                     "before it was measured)")
    pairs = sorted(set(zip(points["source"].astype(str), points["destination"].astype(str))))
    # each pair its marker fill (the legend says which); past that many pairs the labels name them
    fills = dict(zip(pairs, PAIR_FILLS)) if len(pairs) <= len(PAIR_FILLS) else None
    shades = lr_shades(rows) if options.all_lrs else None
    fig, axes = _new_figure(len(panels))
    texts = []
    for ax, (column, xlabel) in zip(axes, panels):
        shown = points.dropna(subset=[column])
        groups = sorted(((m, g) for m, g in shown.groupby("method", sort=False)),
                        key=lambda mg: (method_sort_key(*mg[1][["kind", "adapter", "resize"]].iloc[0]), mg[0]))
        for method, group in groups:
            style = _style(rows[rows["method"] == method], shades)
            for i, (pair, of_pair) in enumerate(group.groupby(["source", "destination"], sort=True)):
                ax.errorbar(of_pair[column], of_pair["top1_mean"],
                            yerr=np.nan_to_num(of_pair["top1_se"].astype(float)), linestyle="none",
                            marker=style["marker"], color=style["color"], markersize=6, capsize=3,
                            fillstyle=fills[tuple(map(str, pair))] if fills else "full",
                            label=method if i == 0 else "_" + method)
            for _, row in group.iterrows():
                texts.append(ax.annotate(_point_label(row, fills is None, " · lr " in method), (row[column],
                                         row["top1_mean"]), textcoords="offset points", xytext=(5, 3),
                                         fontsize="x-small", color="0.25"))
        rho = spearman(shown[column], shown["top1_mean"])
        ax.set_title(f"Spearman ρ = {rho:.2f} ({len(shown)} scenarios)" if np.isfinite(rho)
                     else f"{len(shown)} scenarios", fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if fills and len(pairs) > 1:
        for (source, destination), fill in fills.items():
            axes[0].errorbar([], [], linestyle="none", marker="o", markersize=6, color="0.35", fillstyle=fill,
                             label=f"{arch_name(source)} → {arch_name(destination)}")
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle("Accuracy vs. similarity of the representations at the join")
    fig = finish_figure(fig, legend_title(recipe, df, rows, options, note, fig.get_size_inches()[0]))
    place_labels(fig, texts)
    return fig, rows


def plot_accuracy_vs_cka(df: pd.DataFrame, out_path: str | os.PathLike | None = None,
                         options: FigureOptions = DEFAULT_OPTIONS, note: str = "", dpi: int = DPI) -> Path | Figure:
    """Top-1 accuracy against CKA at the join before (and, where measured, after) training; one point per
    stitched scenario of a sweep (see the module docstring)."""
    return save_figure(accuracy_vs_cka_figure(df, options, note)[0], out_path, dpi)
