"""Accuracy against the similarity of the representations at the join, across a sweep.

Owns :func:`plot_accuracy_vs_cka` and the table it draws (:func:`cka_scenarios`): one point per stitched
scenario (seeds averaged: mean top-1 with a ± standard-error bar, mean CKA), coloured and marked like its
method in the paper's figures, labelled with its gap. Left panel: linear CKA at the join *before training*
between the source's features and the destination's own activation (``cka_before``) -- how far apart the two
representations start. Right panel (where measured): CKA *after training* between the adapters' output and
the destination's own activation (``cka_after``) -- whether the trained stitch copies the destination's
representation or finds another one. Each panel's title gives Spearman's rank correlation of the points
(:func:`spearman`: pandas ranks and numpy, so the plots need no scipy).
The columns are :data:`stitching.results.schema.SIMILARITY_COLUMNS` (written by every stitched run);
fine-tuning runs and original models have none and are not drawn. Like the other figures it draws one recipe
(:class:`~stitching.results.recipe.MixedRecipes` otherwise) and raises :class:`NoData` when no run has a CKA.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from stitching.plots.aggregate import SCENARIO_KEYS, _recipe_keys, _se, select_adapter_lr
from stitching.plots.figures import ACCURACY_LABEL, NoData, _finish, _new_figure, _one_recipe
from stitching.plots.labels import add_labels, arch_name, method_sort_key, method_style

PANELS = (("cka_before", "CKA at the join before training\n(source's features vs. destination's own)"),
          ("cka_after", "CKA after training\n(adapters' output vs. destination's own)"))


def cka_scenarios(df: pd.DataFrame) -> pd.DataFrame:
    """Stitched runs with a CKA, one row per scenario and recipe: the scenario keys, ``kind``, ``adapter``,
    ``resize``, ``n``, ``top1_mean``, ``top1_se`` and the mean of ``cka_before`` / ``cka_after``."""
    rows = df[(df["kind"] == "stitched") & df["top1"].notna()]
    present = [c for c, _ in PANELS if c in rows.columns]
    rows = rows[rows[present].notna().any(axis=1)] if present else rows.iloc[0:0]
    columns = SCENARIO_KEYS + ["kind", "adapter", "resize", "n", "top1_mean", "top1_se"] + [c for c, _ in PANELS]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = select_adapter_lr(add_labels(rows))
    rows, recipe = _recipe_keys(rows)
    grouped = rows.groupby(SCENARIO_KEYS + recipe, dropna=False, sort=True)
    out = pd.DataFrame({
        "kind": grouped["kind"].first(), "adapter": grouped["adapter"].first(), "resize": grouped["resize"].first(),
        "n": grouped["top1"].count(), "top1_mean": grouped["top1"].mean(), "top1_se": _se(grouped["top1"]),
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


def _point_label(row: pd.Series, several_pairs: bool) -> str:
    gap = f"{int(row['source_stage'])}→{int(row['destination_stage'])}"
    if not several_pairs:
        return gap
    return f"{arch_name(row['source'])}→{arch_name(row['destination'])} {gap}"


def plot_accuracy_vs_cka(df: pd.DataFrame, out_path: str | os.PathLike | None = None) -> Path | Figure:
    """Top-1 accuracy against CKA at the join before (and, where measured, after) training; one point per
    stitched scenario of a sweep (see the module docstring)."""
    df, recipe = _one_recipe(df, "accuracy vs. CKA at the join", df["kind"] == "stitched")
    points = cka_scenarios(df)
    panels = [(c, label) for c, label in PANELS if points[c].notna().any()] if not points.empty else []
    if not panels:
        raise NoData("no stitched run with a CKA at the join (train.similarity_images: 0, or runs written "
                     "before it was measured)")
    several = len(set(zip(points["source"], points["destination"]))) > 1
    fig, axes = _new_figure(len(panels))
    for ax, (column, xlabel) in zip(axes, panels):
        shown = points.dropna(subset=[column])
        groups = sorted(((m, g) for m, g in shown.groupby("method", sort=False)),
                        key=lambda mg: (method_sort_key(*mg[1][["kind", "adapter", "resize"]].iloc[0]), mg[0]))
        for method, rows in groups:
            style = method_style(*rows[["kind", "adapter", "resize"]].iloc[0])
            ax.errorbar(rows[column], rows["top1_mean"], yerr=np.nan_to_num(rows["top1_se"].astype(float)),
                        linestyle="none", marker=style["marker"], color=style["color"], markersize=6,
                        capsize=3, label=method)
            for _, row in rows.iterrows():
                ax.annotate(_point_label(row, several), (row[column], row["top1_mean"]),
                            textcoords="offset points", xytext=(5, 3), fontsize="x-small", color="0.25")
        rho = spearman(shown[column], shown["top1_mean"])
        ax.set_title(f"Spearman ρ = {rho:.2f} ({len(shown)} scenarios)" if np.isfinite(rho)
                     else f"{len(shown)} scenarios", fontsize="medium")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle("Accuracy vs. similarity of the representations at the join")
    return _finish(fig, out_path, recipe)
