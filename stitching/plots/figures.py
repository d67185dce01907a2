"""The paper's figures, drawn from one-row-per-run results.

Owns three figure kinds (PNG, Agg canvas, no global pyplot state):

- :func:`plot_accuracy_vs_stage`: Figures 3, 4 (left) and 9-11. One panel per source stage; x is the
  destination stage; one line per method with a shaded ± standard-error band; the original destination
  (and source, when different) model as a grey horizontal line.
- :func:`plot_accuracy_vs_macs`: Figures 4 (right), 5 and 12-14. The same lines against MACs (the paper's
  "FLOPs"), the original models as stars.
- :func:`plot_cross_architecture`: Figures 6 and 15. For every architecture combination its best adapter
  (bottleneck with bilinear resize; ViT block for ViT -> ViT) against MACs, source stages 1 and 2.

Each takes the raw results (it runs :func:`stitching.plots.aggregate.prepare` itself), writes ``out_path``
and returns it; with ``out_path=None`` it returns the :class:`~matplotlib.figure.Figure` instead (for
notebooks). A figure with nothing to draw raises :class:`NoData`; one asked to draw rows of several recipes
raises :class:`~stitching.results.recipe.MixedRecipes` (filter first, or let
:func:`stitching.plots.draw.draw_all` split them). Every figure names its recipe (the legend's title).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib  # the colormap registry only; the global backend is never selected
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stitching.plots.aggregate import aggregate, originals, prepare
from stitching.plots.labels import ORIGINAL_COLOR, arch_name, method_sort_key, method_style
from stitching.results.recipe import recipe_label, recipe_of

DPI = 150
PANEL_SIZE = (4.6, 3.6)
MIN_WIDTH = 6.0
LEGEND_COLUMN_WIDTH = 2.9  # inches per legend column ("Integrated Downsample, Linear + ReLU")
LEGEND_ROW_HEIGHT = 0.22
RECIPE_CHARS_PER_INCH = 17  # the recipe line (legend title, x-small) wraps at this many characters per inch
BAND_ALPHA = 0.2
ACCURACY_LABEL = "Top-1 accuracy (%)"
MACS_LABEL = "GMACs (the paper's \"FLOPs\")"


class NoData(ValueError):
    """The results hold nothing this figure or table could show."""


# ----------------------------------------------------------------------------------------- helpers

def _new_figure(ncols: int, nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(PANEL_SIZE[0] * ncols, MIN_WIDTH), PANEL_SIZE[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    return fig, list(axes.ravel())


def _one_recipe(df: pd.DataFrame, what: str, keep: pd.Series | None = None) -> tuple[pd.DataFrame, dict]:
    """The rows a figure draws (``keep`` and the originals evaluated like them) and their one recipe."""
    rows = df if keep is None else df[keep | (df["kind"] == "original")]
    recipe, rows = recipe_of(rows, what)
    return rows, recipe


def _finish(fig: Figure, out_path: str | os.PathLike | None, recipe: dict) -> Path | Figure:
    handles, labels, seen = [], [], set()
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in seen and not label.startswith("_"):
                seen.add(label)
                handles.append(handle)
                labels.append(label)
    # below the panels, as many columns as fit, titled with the recipe; the figure grows by the legend's rows
    width, height = fig.get_size_inches()
    title = textwrap.fill(recipe_label(recipe), int(width * RECIPE_CHARS_PER_INCH))
    ncols = max(1, min(len(handles), int(width // LEGEND_COLUMN_WIDTH)))
    rows = -(-len(handles) // ncols) + title.count("\n") + 1
    fig.set_size_inches(width, height + LEGEND_ROW_HEIGHT * rows + 0.2)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False,
               title=title, title_fontsize="x-small")
    return save_figure(fig, out_path)


def save_figure(fig: Figure, out_path: str | os.PathLike | None) -> Path | Figure:
    """``fig`` written to ``out_path`` (PNG at :data:`DPI`, folders made) and the path returned; the figure
    itself when ``out_path`` is None (notebooks)."""
    if out_path is None:
        return fig
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
    return out_path


def _pair_scenarios(df: pd.DataFrame, source: str, destination: str) -> pd.DataFrame:
    """Aggregated stitched + fine-tuning scenarios of one architecture pair (one lr per scenario)."""
    prepared = prepare(df)
    rows = prepared[prepared["kind"].isin(["stitched", "finetune"])
                    & (prepared["source"] == source) & (prepared["destination"] == destination)]
    rows = rows.dropna(subset=["source_stage", "destination_stage", "top1"])
    if rows.empty:
        raise NoData(f"no stitched or fine-tuning runs for {source} -> {destination}")
    return aggregate(rows)


def _original(df: pd.DataFrame, model: str) -> pd.Series | None:
    table = originals(df)
    match = table[table["model"] == model]
    return None if match.empty else match.iloc[0]


def _methods(scenarios: pd.DataFrame) -> list[pd.DataFrame]:
    """Rows of each method, in legend order."""
    groups = [g for _, g in scenarios.groupby("method", sort=False)]
    return sorted(groups, key=lambda g: (method_sort_key(*g[["kind", "adapter", "resize"]].iloc[0]),
                                         g["method"].iloc[0]))


def _line(ax, x, mean, se, label: str, style: dict) -> None:
    """A line with markers and a shaded ± se band (an error bar where there is only one point).

    Points are joined in the order given (by destination stage), so a MACs axis shows the gap's path.
    """
    x, mean, se = (np.asarray(v, dtype=float) for v in (x, mean, se))
    se = np.nan_to_num(se)
    if len(x) == 1:
        ax.errorbar(x, mean, yerr=se, label=label, capsize=3, markersize=5, **style)
        return
    ax.plot(x, mean, label=label, markersize=4.5, linewidth=1.6, **style)
    # a polygon rather than fill_between: along a MACs axis the path need not be monotonic in x
    ax.fill(np.r_[x, x[::-1]], np.r_[mean + se, (mean - se)[::-1]], color=style["color"], alpha=BAND_ALPHA,
            linewidth=0)


def _stars(ax, models: list[pd.Series], colors: list[str] | None = None) -> list[float]:
    """Original models as stars annotated with their names; returns their x (GMACs) values.

    With ``colors`` each star gets its own legend entry; without, all share one ("original models").
    """
    xs = []
    for i, row in enumerate(models):
        if row is None or pd.isna(row["macs_mean"]):
            continue
        x = row["macs_mean"] / 1e9
        color = colors[i] if colors else ORIGINAL_COLOR
        label = f"{row['name']} (original)" if colors else "original models"
        ax.plot([x], [row["top1_mean"]], linestyle="none", marker="*", markersize=14, color=color,
                markeredgecolor="black", markeredgewidth=0.6, label=label, zorder=5)
        ax.annotate(row["name"], (x, row["top1_mean"]), textcoords="offset points", xytext=(6, 4),
                    fontsize="x-small", color="0.2")
        xs.append(x)
    return xs


def _macs_axis(axes: list, xs: list[float]) -> None:
    xs = [x for x in xs if np.isfinite(x) and x > 0]
    if xs and max(xs) / min(xs) > 8:
        for ax in axes:
            ax.set_xscale("log")
    for ax in axes:
        ax.set_xlabel(MACS_LABEL)


def _pair_title(source: str, destination: str) -> str:
    if source == destination:
        return f"{arch_name(source)} stitched to itself"
    return f"{arch_name(source)} → {arch_name(destination)}"


def _source_stages(scenarios: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in scenarios["source_stage"].dropna().unique())


# ----------------------------------------------------------------------------------------- figures

def plot_accuracy_vs_stage(df: pd.DataFrame, source: str, destination: str,
                           out_path: str | os.PathLike | None = None) -> Path | Figure:
    """Accuracy vs. destination stage, one panel per source stage (paper Figures 3, 4 left, 9-11)."""
    df, recipe = _one_recipe(df, f"accuracy vs. stage {source} -> {destination}",
                             (df["source"] == source) & (df["destination"] == destination))
    scenarios = _pair_scenarios(df, source, destination)
    stages = _source_stages(scenarios)
    fig, axes = _new_figure(len(stages))
    refs = [(destination, "-")] + ([(source, "--")] if source != destination else [])
    for ax, stage in zip(axes, stages):
        panel = scenarios[scenarios["source_stage"] == stage]
        for rows in _methods(panel):
            rows = rows.sort_values("destination_stage")
            style = method_style(*rows[["kind", "adapter", "resize"]].iloc[0])
            _line(ax, rows["destination_stage"], rows["top1_mean"], rows["top1_se"], rows["method"].iloc[0],
                  style)
        for model, linestyle in refs:
            ref = _original(df, model)
            if ref is not None:
                ax.axhline(ref["top1_mean"], color=ORIGINAL_COLOR, linestyle=linestyle, linewidth=1.2,
                           label=f"{ref['name']} (original)", zorder=1)
        targets = sorted(int(t) for t in panel["destination_stage"].dropna().unique())
        ax.set_xticks(targets)
        ax.set_xlim(min(targets) - 0.25, max(targets) + 0.25)
        ax.set_xlabel(f"{arch_name(destination)} stage (destination)")
        ax.set_title(f"{arch_name(source)} Stage {stage} → ·", fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle(f"{_pair_title(source, destination)}: accuracy vs. stitching gap")
    return _finish(fig, out_path, recipe)


def plot_accuracy_vs_macs(df: pd.DataFrame, source: str, destination: str,
                          out_path: str | os.PathLike | None = None) -> Path | Figure:
    """Accuracy vs. MACs, one panel per source stage, originals as stars (Figures 4 right, 5, 12-14)."""
    df, recipe = _one_recipe(df, f"accuracy vs. MACs {source} -> {destination}",
                             (df["source"] == source) & (df["destination"] == destination))
    scenarios = _pair_scenarios(df, source, destination).dropna(subset=["macs_mean"])
    if scenarios.empty:
        raise NoData(f"no MACs recorded for {source} -> {destination}")
    stages = _source_stages(scenarios)
    fig, axes = _new_figure(len(stages))
    models = [_original(df, destination)] + ([_original(df, source)] if source != destination else [])
    xs = list(scenarios["macs_mean"] / 1e9)
    for ax, stage in zip(axes, stages):
        panel = scenarios[scenarios["source_stage"] == stage]
        for rows in _methods(panel):
            rows = rows.sort_values("destination_stage")
            style = method_style(*rows[["kind", "adapter", "resize"]].iloc[0])
            _line(ax, rows["macs_mean"] / 1e9, rows["top1_mean"], rows["top1_se"], rows["method"].iloc[0],
                  style)
        xs += _stars(ax, models, colors=[ORIGINAL_COLOR, "white"][:len(models)])
        ax.set_title(f"{arch_name(source)} Stage {stage} → {arch_name(destination)} stages",
                     fontsize="medium")
        ax.grid(alpha=0.3)
    _macs_axis(axes, xs)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle(f"{_pair_title(source, destination)}: accuracy vs. compute")
    return _finish(fig, out_path, recipe)


def best_adapter_rows(prepared: pd.DataFrame, source: str, destination: str) -> pd.DataFrame:
    """The rows of a pair's "full block" adapter: ViT block for a model stitched to itself where it was
    run (ViT -> ViT), otherwise bottleneck with bilinear resize. Empty when the pair has neither."""
    rows = prepared[(prepared["kind"] == "stitched") & (prepared["source"] == source)
                    & (prepared["destination"] == destination)]
    if source == destination:
        vit = rows[rows["adapter"] == "vit_block"]
        if not vit.empty:
            # the ViT block has no resize: every mode is the same module; keep one
            for mode in ("none", "bilinear", "strided"):
                if (vit["resize"] == mode).any():
                    return vit[vit["resize"] == mode]
            return vit[vit["resize"] == vit["resize"].iloc[0]]
    return rows[(rows["adapter"] == "bottleneck") & (rows["resize"] == "bilinear")]


def plot_cross_architecture(df: pd.DataFrame, out_path: str | os.PathLike | None = None,
                            stages: tuple[int, ...] = (1, 2)) -> Path | Figure:
    """Best adapter of every architecture combination vs. MACs, for source stages 1 and 2 (Figures 6, 15).

    Stars mark the original models (accuracy and MACs of each architecture that appears).
    """
    df, recipe = _one_recipe(df, "the cross-architecture figure")
    prepared = prepare(df)
    stitched = prepared[prepared["kind"] == "stitched"]
    pairs = sorted(set(zip(stitched["source"].astype(str), stitched["destination"].astype(str))))
    lines = []
    for source, destination in pairs:
        rows = best_adapter_rows(prepared, source, destination).dropna(subset=["source_stage", "macs"])
        rows = rows[rows["source_stage"].isin(stages)]
        if not rows.empty:
            lines.append((source, destination, aggregate(rows)))
    if not lines:
        raise NoData("no bottleneck (bilinear) or ViT-block runs at the requested source stages")
    present = sorted({int(s) for *_, agg in lines for s in agg["source_stage"].dropna()})
    fig, axes = _new_figure(len(present))
    cmap_name = "tab10" if len(lines) <= 10 else "tab20"
    cmap = matplotlib.colormaps[cmap_name]
    colors = [cmap(i % cmap.N) for i in range(len(lines))]
    archs = sorted({a for s, d, _ in lines for a in (s, d)})
    models = [m for m in (_original(df, a) for a in archs) if m is not None]
    xs: list[float] = []
    for ax, stage in zip(axes, present):
        for (source, destination, agg), color in zip(lines, colors):
            rows = agg[agg["source_stage"] == stage].sort_values("destination_stage")
            if rows.empty:
                continue
            style = {"color": color, "linestyle": "-", "marker": "o"}
            label = f"{arch_name(source)} → {arch_name(destination)}"
            _line(ax, rows["macs_mean"] / 1e9, rows["top1_mean"], rows["top1_se"], label, style)
            xs += list(rows["macs_mean"] / 1e9)
        xs += _stars(ax, models)
        ax.set_title(f"Stitching Stage {stage} to other stages", fontsize="medium")
        ax.grid(alpha=0.3)
    _macs_axis(axes, xs)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle("Best adapter per architecture combination (Bottleneck; ViT Block for ViT → ViT)")
    return _finish(fig, out_path, recipe)
