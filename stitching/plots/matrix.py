"""Stitching-matrix figures, drawn from a matrix's cell table (:func:`stitching.matrix.cells.cell_table`).

Owns two figure kinds (PNG, Agg canvas, no global pyplot state), in the style of
:mod:`stitching.plots.figures` (``out_path=None`` returns the :class:`~matplotlib.figure.Figure`; nothing to
draw raises :class:`~stitching.plots.figures.NoData`):

- :func:`plot_matrix_heatmaps`: one heatmap per matrix side by side -- the trained matrix, then each
  random-init control -- rows the sender cut, columns the receiver cut, colour the top-1 accuracy (mean over
  seeds, written in the cell) on one shared scale; a cell without a result (not stitchable, or not finished)
  is grey and empty.
- :func:`plot_accuracy_vs_depth`: top-1 against the relative depth difference of the cut (receiver depth
  minus sender depth; > 0 skips layers, < 0 repeats them), every cell a point and each matrix's mean per
  difference a line.
- :func:`plot_calibrated_heatmaps`: the trained matrix's calibrated score against each random-init control
  (:func:`stitching.matrix.cells.calibrated`: 0 = no better than the control, 1 = the receiver's own accuracy),
  one panel per control, a diverging scale centred on 0.
- :func:`plot_similarity_heatmaps`: the trained matrix's top-1 next to the similarity at the join before any
  training, linear CKA and the least-squares residual, per cell.
- :func:`plot_prediction`: how well each predictor (a closed-form matrix's top-1, CKA, the residual) ranks the
  trained matrix's cells: the trained top-1 against each, a point per cell and control, Spearman's rho in the
  panel title (:mod:`stitching.matrix.predict`).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stitching.matrix.cells import CALIBRATED_COLUMNS
from stitching.matrix.spec import CONTROL_NAMES, CONTROLS
from stitching.plots.figures import ACCURACY_LABEL, RECIPE_CHARS_PER_INCH, NoData, save_figure
from stitching.plots.labels import arch_name

HEATMAP_SIZE = (3.6, 3.3)          # inches per panel
CMAP = "viridis"
MISSING_COLOR = "0.85"
CONTROL_COLORS = {"none": "tab:blue", "source": "tab:orange", "destination": "tab:green", "both": "tab:red"}
CUT_LABELS = {"stages": "stage", "blocks": "block"}
TITLE_CHARS_PER_INCH = 8           # a panel figure's title (suptitle, "large") wraps at this many characters per inch


def _controls(table: pd.DataFrame) -> list[str]:
    present = set(table["control"])
    return [c for c in CONTROLS if c in present]


def _save(fig: Figure, out_path, caption: str = "") -> Path | Figure:
    if caption:         # the recipe, wrapped to the figure's width, under the panels
        width = fig.get_size_inches()[0]
        fig.supxlabel(textwrap.fill(caption, int(width * RECIPE_CHARS_PER_INCH)), fontsize="x-small")
    return save_figure(fig, out_path)


def _title(table: pd.DataFrame) -> str:
    """The pair, and "adapters in closed form" where every cell's adapters were fitted without training (the
    panels' "trained" names the networks, not the adapters)."""
    sender, receiver = table["sender"].iloc[0], table["receiver"].iloc[0]
    pair = (f"{arch_name(sender)} stitched to itself" if sender == receiver
            else f"{arch_name(sender)} (sender) → {arch_name(receiver)} (receiver)")
    closed = "fit" in table.columns and len(table) and (table["fit"] == "closed_form").all()
    return pair + (", adapters in closed form (no training)" if closed else "")


def heatmap_values(table: pd.DataFrame, control: str, senders: list[int], receivers: list[int],
                   column: str = "top1_mean") -> np.ndarray:
    """The matrix of one control: rows ``senders``, columns ``receivers``, ``column`` (default the top-1 mean;
    NaN: no result)."""
    rows = table[table["control"] == control]
    if column not in rows.columns or rows[column].isna().all():
        return np.full((len(senders), len(receivers)), np.nan)
    grid = rows.pivot_table(index="sender_cut", columns="receiver_cut", values=column, aggfunc="mean")
    return grid.reindex(index=senders, columns=receivers).to_numpy(dtype=float)


def plot_matrix_heatmaps(table: pd.DataFrame, out_path: str | os.PathLike | None = None, cuts: str = "stages",
                         senders: list[int] | None = None, receivers: list[int] | None = None,
                         controls: list[str] | None = None, caption: str = "") -> Path | Figure:
    """Heatmaps of the trained matrix and its controls, side by side (see the module docstring).
    ``senders``/``receivers``/``controls``: the matrix's cut lists and matrices (default: those found in
    ``table``; a matrix without any finished cell is an empty panel); ``caption``: a line under the panels
    (the recipe)."""
    if table.empty:
        raise NoData("no finished matrix cells to draw")
    senders = sorted(set(table["sender_cut"])) if senders is None else list(senders)
    receivers = sorted(set(table["receiver_cut"])) if receivers is None else list(receivers)
    controls = _controls(table) if controls is None else [c for c in CONTROLS if c in controls]
    fig = Figure(figsize=(HEATMAP_SIZE[0] * len(controls) + 1.0, HEATMAP_SIZE[1] + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(controls), squeeze=False)[0]
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad=MISSING_COLOR)
    vmax = max(1.0, float(np.nanmax(table["top1_mean"])))
    annotate = len(senders) * len(receivers) <= 144
    unit = CUT_LABELS[cuts]
    image = None
    for ax, control in zip(axes, controls):
        values = heatmap_values(table, control, senders, receivers)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=vmax, origin="upper",
                          aspect="auto", interpolation="nearest")
        _label_axes(ax, CONTROL_NAMES[control], senders, receivers, unit, first=ax is axes[0])
        if annotate:
            for (r, c), v in np.ndenumerate(values):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.0f}" if vmax > 10 else f"{v:.1f}", ha="center", va="center",
                            fontsize="x-small", color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(image, ax=list(axes), label=ACCURACY_LABEL, shrink=0.9)
    fig.suptitle(_title(table))
    return _save(fig, out_path, caption)


def plot_accuracy_vs_depth(table: pd.DataFrame, out_path: str | os.PathLike | None = None,
                           caption: str = "") -> Path | Figure:
    """Top-1 against the relative depth difference, one colour per matrix (see the module docstring)."""
    if table.empty:
        raise NoData("no finished matrix cells to draw")
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for control in _controls(table):
        rows = table[table["control"] == control]
        color = CONTROL_COLORS[control]
        ax.scatter(rows["depth_difference"], rows["top1_mean"], s=14, color=color, alpha=0.45, linewidths=0)
        line = rows.assign(d=rows["depth_difference"].round(2)).groupby("d")["top1_mean"].mean()
        ax.plot(line.index, line.to_numpy(), marker="o", markersize=4, linewidth=1.6, color=color,
                label=CONTROL_NAMES[control])
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xlabel("relative depth difference (receiver − sender)")
    ax.set_ylabel(ACCURACY_LABEL)
    ax.set_title(_title(table))
    ax.legend(fontsize="small", frameon=False)
    return _save(fig, out_path, caption)


def _label_axes(ax, title: str, senders: list, receivers: list, unit: str, first: bool) -> None:
    """A heatmap panel's title, cut ticks and axis labels (the sender label on the first panel only)."""
    ax.set_title(title, fontsize="medium")
    ax.set_xticks(range(len(receivers)), [str(r) for r in receivers], fontsize="small")
    ax.set_yticks(range(len(senders)), [str(x) for x in senders], fontsize="small")
    ax.set_xlabel(f"receiver {unit}")
    if first:
        ax.set_ylabel(f"sender {unit}")


def _panels(table, cuts, senders, receivers, panels, title, caption, out_path, shared: bool = False):
    """Heatmap panels side by side: ``panels`` = [(title, values, cmap, norm, format, colorbar label)];
    ``shared``: one colour bar for all (the first panel's scale)."""
    senders = sorted(set(table["sender_cut"])) if senders is None else list(senders)
    receivers = sorted(set(table["receiver_cut"])) if receivers is None else list(receivers)
    fig = Figure(figsize=(HEATMAP_SIZE[0] * 1.25 * len(panels), HEATMAP_SIZE[1] + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    annotate = len(senders) * len(receivers) <= 144
    unit = CUT_LABELS[cuts]
    for ax, (name, values, cmap, norm, fmt, label) in zip(axes, panels):
        cmap = matplotlib.colormaps[cmap].with_extremes(bad=MISSING_COLOR)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin="upper", aspect="auto",
                          interpolation="nearest")
        _label_axes(ax, name, senders, receivers, unit, first=ax is axes[0])
        if annotate:
            for (r, c), v in np.ndenumerate(values):
                if np.isfinite(v):
                    rgba = image.cmap(image.norm(v))
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(c, r, fmt(v), ha="center", va="center", fontsize="x-small",
                            color="white" if dark else "black")
        if not shared:
            fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    if shared:
        fig.colorbar(image, ax=list(axes), label=panels[0][5], shrink=0.85)
    chars = int(fig.get_size_inches()[0] * TITLE_CHARS_PER_INCH)    # wrapped to the figure's width
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in title.split("\n")))
    return _save(fig, out_path, caption)


def plot_calibrated_heatmaps(table: pd.DataFrame, out_path: str | os.PathLike | None = None, cuts: str = "stages",
                             senders: list[int] | None = None, receivers: list[int] | None = None,
                             caption: str = "") -> Path | Figure:
    """The trained matrix's calibrated scores against each control (see the module docstring); NoData without
    any (no control, or no ``receiver_top1``)."""
    trained = table[table["control"] == "none"] if len(table) else table
    cols = [(c, col) for c, col in CALIBRATED_COLUMNS.items()
            if col in trained.columns and trained[col].notna().any()]
    if not cols:
        raise NoData("no calibrated scores (they need the trained matrix, a control and the receiver's accuracy)")
    senders = sorted(set(table["sender_cut"])) if senders is None else list(senders)
    receivers = sorted(set(table["receiver_cut"])) if receivers is None else list(receivers)
    values = [heatmap_values(table, "none", senders, receivers, col) for _, col in cols]
    low = min(-0.1, float(np.nanmin(np.concatenate([v.ravel() for v in values]))))
    high = max(1.0, float(np.nanmax(np.concatenate([v.ravel() for v in values]))))
    norm = matplotlib.colors.TwoSlopeNorm(vcenter=0.0, vmin=low, vmax=high)
    panels = [(f"against the {CONTROL_NAMES[c]}", v, "RdBu", norm, lambda x: f"{x:.2f}",
               "calibrated score") for (c, _), v in zip(cols, values)]
    title = (_title(table) + ": calibrated scores (acc − acc control) / (acc receiver − acc control)\n"
             "0 = no better than the control, 1 = the receiver's own accuracy")
    return _panels(table, cuts, senders, receivers, panels, title, caption, out_path, shared=True)


def plot_similarity_heatmaps(table: pd.DataFrame, out_path: str | os.PathLike | None = None, cuts: str = "stages",
                             senders: list[int] | None = None, receivers: list[int] | None = None,
                             caption: str = "") -> Path | Figure:
    """The trained matrix's top-1, CKA and least-squares residual at the join (before training) per cell;
    NoData where the cells did not measure the similarity."""
    trained = table[table["control"] == "none"] if len(table) else table
    if trained.empty or "cka" not in trained.columns or trained["cka"].isna().all():
        raise NoData("no similarity at the join in the cells (train.similarity_images: 0)")
    senders = sorted(set(table["sender_cut"])) if senders is None else list(senders)
    receivers = sorted(set(table["receiver_cut"])) if receivers is None else list(receivers)
    top1 = heatmap_values(table, "none", senders, receivers)
    vmax = max(1.0, float(np.nanmax(top1)))
    panels = [("top-1", top1, CMAP, matplotlib.colors.Normalize(0.0, vmax), lambda x: f"{x:.0f}", ACCURACY_LABEL),
              ("linear CKA", heatmap_values(table, "none", senders, receivers, "cka"), CMAP,
               matplotlib.colors.Normalize(0.0, 1.0), lambda x: f"{x:.2f}", "CKA (1: alike)"),
              ("least-squares residual", heatmap_values(table, "none", senders, receivers, "ls_residual"),
               CMAP + "_r", matplotlib.colors.Normalize(0.0, 1.0), lambda x: f"{x:.2f}",
               "relative residual (0: an affine map)")]
    title = _title(table) + ": accuracy and the similarity at the join before training"
    return _panels(table, cuts, senders, receivers, panels, title, caption, out_path)


def plot_prediction(pairs: dict[str, pd.DataFrame], rhos: dict[str, float], out_path: str | os.PathLike | None = None,
                    title: str = "", caption: str = "") -> Path | Figure:
    """The trained top-1 (y) against each predictor (x), one panel per predictor: ``pairs`` maps a predictor's
    label to a table with columns ``control``, ``predictor`` and ``trained`` (one row per cell);
    ``rhos`` its Spearman rho over the cells."""
    pairs = {k: v for k, v in pairs.items() if len(v)}
    if not pairs:
        raise NoData("no cell in both matrices")
    fig = Figure(figsize=(4.0 * len(pairs) + 0.4, 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, (label, df) in zip(axes, pairs.items()):
        for control in CONTROLS:
            rows = df[df["control"] == control]
            if len(rows):
                ax.scatter(rows["predictor"], rows["trained"], s=22, color=CONTROL_COLORS[control], alpha=0.8,
                           linewidths=0, label=CONTROL_NAMES[control])
        ax.set_xlabel(label)
        ax.set_title(f"Spearman ρ = {rhos[label]:.2f} (n = {len(df)})", fontsize="medium")
        if ax is axes[0]:
            ax.set_ylabel("trained top-1 (%)")
    axes[0].legend(fontsize="x-small", frameon=False)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path, caption)
