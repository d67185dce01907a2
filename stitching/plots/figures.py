"""The paper's figures, drawn from one-row-per-run results.

Owns three figure kinds (Agg canvas, no global pyplot state), and how every figure of the package is finished
and saved:

- :func:`plot_accuracy_vs_stage`: Figures 3, 4 (left) and 9-11. One panel per source stage; x is the
  destination stage; one line per method with a shaded ± standard-error band; the original destination
  (and source, when different) model as a grey horizontal line.
- :func:`plot_accuracy_vs_macs`: Figures 4 (right), 5 and 12-14. The same lines against MACs (the paper's
  "FLOPs"), the original models as stars.
- :func:`plot_cross_architecture`: Figures 6 and 15. For every architecture combination its best adapter
  (bottleneck with bilinear resize; ViT block for ViT -> ViT) against MACs, source stages 1 and 2.

Each takes the raw results (it runs :func:`stitching.plots.aggregate.prepare` itself), writes ``out_path``
and returns it; with ``out_path=None`` it returns the :class:`~matplotlib.figure.Figure` instead (for
notebooks). ``options`` (:class:`FigureOptions`) draws every learning rate as its own line (``all_lrs``) or
puts the whole recipe back under the legend (``footer``); by default the legend's title is the short recipe
(dataset, epochs, image size) and the learning rates the figure shows and why
(:func:`stitching.plots.aggregate.lr_statement`); ``note`` adds a line (``draw_all``: the runs its selection left
out). The ``*_figure`` functions return the figure and the rows of the runs it draws (what
:mod:`stitching.plots.draw` lists in ``selection.md``). A figure with nothing to draw raises :class:`NoData`;
one asked to draw rows of several recipes raises :class:`~stitching.results.recipe.MixedRecipes` (filter first,
or let :func:`stitching.plots.draw.draw_all` split them).

Finished figures fit their canvas (:func:`fit_to_canvas` grows a figure whose title or legend would be cut) and
are saved by :func:`save_figure` (PNG at :data:`DPI` by default, PDF, SVG: the file name's suffix), through a
temporary file, so an interrupted save never leaves half a figure.
"""

from __future__ import annotations

import io
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib  # the colormap registry only; the global backend is never selected
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from stitching.kinds import BOTTLENECK, ORIGINAL, RESIZES, STITCHED, TRAINED_KINDS, VIT_BLOCK
from stitching.plots.aggregate import ADAPTER_LR, aggregate, lr_statement, originals, prepare
from stitching.plots.labels import ORIGINAL_COLOR, arch_name, method_sort_key, method_style
from stitching.results.recipe import SHORT_RECIPE, dataset_label, recipe_label, recipe_of
from stitching.rundir import atomic_write

#: PNG resolution by default (print quality); PDF and SVG are vector graphics
DPI = 300
#: the file formats :func:`save_figure` writes (the suffix of the path)
FORMATS = ("png", "pdf", "svg")
PANEL_SIZE = (4.6, 3.6)
MIN_WIDTH = 6.0
LEGEND_COLUMN_WIDTH = 2.9  # inches per legend column ("Integrated Downsample, Linear + ReLU")
LEGEND_ROW_HEIGHT = 0.22
RECIPE_CHARS_PER_INCH = 17  # the recipe line (legend title, x-small) wraps at this many characters per inch
BAND_ALPHA = 0.2
ACCURACY_LABEL = "Top-1 accuracy (%)"
MACS_LABEL = "GMACs (the paper's \"FLOPs\")"
#: how far (inches) the drawn content may reach past the canvas before :func:`fit_to_canvas` grows it
FIT_TOLERANCE = 0.01
STAR_LABEL = "star-label"       # the gid of an original model's name next to its star
#: said where a figure draws a run for several resize modes (:func:`stitching.plots.aggregate.share_resize_free`)
SHARED_NOTE = "resize modes that build one module share its runs (their lines may coincide)"


class NoData(ValueError):
    """The results hold nothing this figure or table could show."""


@dataclass(frozen=True)
class FigureOptions:
    """How the figures draw a results table.

    ``all_lrs``: every learning rate a scenario ran, each its own line (shade of the method's colour), instead
    of one per scenario; ``footer``: the whole recipe under the legend (as the legend's title), instead of its
    short form (the whole recipe then goes into the caption); ``adapter_lr``: the recipe's adapter lr, which
    a stitched scenario that ran several shows (:func:`stitching.plots.aggregate.lr_choice`).
    """

    all_lrs: bool = False
    footer: bool = False
    adapter_lr: float = ADAPTER_LR


DEFAULT_OPTIONS = FigureOptions()


# ----------------------------------------------------------------------------------------- helpers

def _new_figure(ncols: int, nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(max(PANEL_SIZE[0] * ncols, MIN_WIDTH), PANEL_SIZE[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    return fig, list(axes.ravel())


def _one_recipe(df: pd.DataFrame, what: str, keep: pd.Series | None = None) -> tuple[pd.DataFrame, dict]:
    """The rows a figure draws (``keep`` and the originals evaluated like them) and their one recipe."""
    rows = df if keep is None else df[keep | (df["kind"] == ORIGINAL)]
    recipe, rows = recipe_of(rows, what)
    return rows, recipe


def legend_title(recipe: dict, rows: pd.DataFrame, drawn: pd.DataFrame, options: FigureOptions,
                 note: str = "", width: float = MIN_WIDTH) -> str:
    """The legend's title: the recipe (short: dataset, epochs, image size; whole with ``options.footer``), the
    learning rates the figure shows and why (and :data:`SHARED_NOTE` where runs stand for several resize
    modes), and ``note``; wrapped to ``width`` inches."""
    dataset = dataset_label(rows)
    recipe_line = recipe_label(recipe, dataset, None if options.footer else SHORT_RECIPE)
    if not options.footer:
        recipe_line = recipe_line.removeprefix("Recipe: ")
    shared = "resize_shared" in drawn.columns and drawn["resize_shared"].fillna(False).astype(bool).any()
    lines = [recipe_line, lr_statement(drawn, options.all_lrs) + (f" · {SHARED_NOTE}" if shared else ""), note]
    chars = int(width * RECIPE_CHARS_PER_INCH)
    return "\n".join(textwrap.fill(line, chars) for line in lines if line)


def finish_figure(fig: Figure, title: str) -> Figure:
    """The figure's one legend below the panels (every labelled artist once), titled ``title``; star labels
    kept inside their panels; the canvas grown until nothing is cut."""
    handles, labels, seen = [], [], set()
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in seen and not label.startswith("_"):
                seen.add(label)
                handles.append(handle)
                labels.append(label)
        _keep_star_labels_inside(ax)
    # below the panels, as many columns as fit; the figure grows by the legend's rows
    width, height = fig.get_size_inches()
    ncols = max(1, min(len(handles), int(width // LEGEND_COLUMN_WIDTH)))
    rows = -(-len(handles) // ncols) + title.count("\n") + 1
    fig.set_size_inches(width, height + LEGEND_ROW_HEIGHT * rows + 0.2)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False,
               title=title, title_fontsize="x-small")
    return fit_to_canvas(fig)


def _keep_star_labels_inside(ax) -> None:
    """An original model's name goes left of its star when the star is in the right fifth of the panel, and
    below it when the star is in the top tenth."""
    ax.autoscale_view()
    for text in ax.texts:
        if text.get_gid() != STAR_LABEL:
            continue
        x, y = ax.transAxes.inverted().transform(ax.transData.transform(text.xy))
        right, top = x > 0.8, y > 0.9
        text.set_horizontalalignment("right" if right else "left")
        text.set_verticalalignment("top" if top else "baseline")
        text.xyann = (-8 if right else 6, -8 if top else 4)


def fit_to_canvas(fig: Figure, tries: int = 4) -> Figure:
    """Grow ``fig`` until everything drawn (titles, legend, labels) lies on its canvas; returns it.

    A constrained layout fits the panels to the canvas but not a title or legend wider than it: those would be
    cut on both sides. The canvas grows by the overflow (both sides, the content being centred) and the layout
    is redone, a few times at most."""
    for _ in range(tries):
        fig.draw_without_rendering()
        box = fig.get_tightbbox()
        width, height = fig.get_size_inches()
        over_x = max(-box.x0, box.x1 - width, 0.0)
        over_y = max(-box.y0, box.y1 - height, 0.0)
        if over_x <= FIT_TOLERANCE and over_y <= FIT_TOLERANCE:
            break
        fig.set_size_inches(width + 2 * over_x + 0.1 * (over_x > 0), height + 2 * over_y + 0.1 * (over_y > 0))
    return fig


def save_figure(fig: Figure, out_path: str | os.PathLike | None, dpi: int = DPI) -> Path | Figure:
    """``fig`` written to ``out_path`` (its format from the suffix, one of :data:`FORMATS`; PNG at ``dpi``;
    folders made; through a temporary file) and the path returned; the figure itself when ``out_path`` is None
    (notebooks)."""
    if out_path is None:
        return fig
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{out_path}: figures are saved as {', '.join(FORMATS)}")
    buffer = io.BytesIO()
    # the date and the library's version stay out of PDF and SVG files: the same figure, the same bytes
    fig.savefig(buffer, format=fmt, dpi=dpi, metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    return atomic_write(out_path, buffer.getvalue())


def _pair_rows(df: pd.DataFrame, source: str, destination: str, options: FigureOptions) -> pd.DataFrame:
    """The prepared stitched + fine-tuning runs of one architecture pair (one lr per scenario, or all)."""
    prepared = prepare(df, options.adapter_lr, options.all_lrs)
    rows = prepared[prepared["kind"].isin(TRAINED_KINDS)
                    & (prepared["source"] == source) & (prepared["destination"] == destination)]
    rows = rows.dropna(subset=["source_stage", "destination_stage", "top1"])
    if rows.empty:
        raise NoData(f"no stitched or fine-tuning runs for {source} -> {destination}")
    return rows


def _original_rows(df: pd.DataFrame, models) -> pd.DataFrame:
    rows = df[df["kind"] == ORIGINAL]
    model = rows["source"].where(rows["source"].notna(), rows["destination"]).astype(str)
    return rows[model.isin(list(models))]


def _original(df: pd.DataFrame, model: str) -> pd.Series | None:
    table = originals(df)
    match = table[table["model"] == model]
    return None if match.empty else match.iloc[0]


def _methods(scenarios: pd.DataFrame) -> list[pd.DataFrame]:
    """Rows of each method, in legend order."""
    groups = [g for _, g in scenarios.groupby("method", sort=False)]
    return sorted(groups, key=lambda g: (method_sort_key(*g[["kind", "adapter", "resize"]].iloc[0]),
                                         g["method"].iloc[0]))


#: a method of one pair whose lines, with every lr drawn, are told apart by shade
_FAMILY = ["kind", "source", "destination", "adapter", "resize"]


def lr_shades(rows: pd.DataFrame) -> dict[tuple, float]:
    """With every lr drawn: how far each lr's line of a method is lightened (0: the method's own colour, up to
    0.6 towards white, the lrs in increasing order), keyed by the method of its pair and the lr; 0 for a method
    drawn at one lr only."""
    out = {}
    for family, of in rows.groupby(_FAMILY, dropna=False, sort=False):
        lrs = sorted({float(v) for v in of["lr"].dropna()})
        for lr, shade in zip(lrs, np.linspace(0.0, 0.6, len(lrs)) if len(lrs) > 1 else [0.0]):
            out[(*family, f"{lr:g}")] = float(shade)
    return out


def _shade(color, rows: pd.DataFrame, shades: dict[tuple, float] | None):
    """``color`` lightened by the shade of ``rows``' method and lr (:func:`lr_shades`)."""
    if not shades:
        return color
    first = rows.iloc[0]
    shade = shades.get((*(first[c] for c in _FAMILY), f"{float(first['lr']):g}"), 0.0)
    return tuple((1 - shade) * c + shade * 0.85 for c in to_rgb(color))


def _style(rows: pd.DataFrame, shades: dict[tuple, float] | None = None) -> dict:
    style = dict(method_style(*rows[["kind", "adapter", "resize"]].iloc[0]))
    style["color"] = _shade(style["color"], rows, shades)
    return style


def _line(ax, x, mean, se, label: str, style: dict) -> None:
    """A line with markers and a shaded ± se band (an error bar where there is only one point).

    Points are joined in the order given (by destination stage), so a MACs axis shows the gap's path.
    """
    x, mean, se = (np.asarray(v, dtype=float) for v in (x, mean, se))
    se = np.nan_to_num(se)
    if len(x) == 1:     # the marker carries the label, so the legend keeps the order the lines are drawn in
        ax.errorbar(x, mean, yerr=se, capsize=3, color=style["color"], linestyle="none")
        ax.plot(x, mean, label=label, markersize=5, **style)
        return
    ax.plot(x, mean, label=label, markersize=4.5, linewidth=1.6, **style)
    # a polygon rather than fill_between: along a MACs axis the path need not be monotonic in x
    ax.fill(np.r_[x, x[::-1]], np.r_[mean + se, (mean - se)[::-1]], color=style["color"], alpha=BAND_ALPHA,
            linewidth=0)


def _stars(ax, models: list[pd.Series], colors: list[str] | None = None) -> None:
    """Original models as stars annotated with their names.

    With ``colors`` each star gets its own legend entry; without, all share one ("original models").
    """
    for i, row in enumerate(models):
        if row is None or pd.isna(row["macs_mean"]):
            continue
        x = row["macs_mean"] / 1e9
        color = colors[i] if colors else ORIGINAL_COLOR
        label = f"{row['name']} (original)" if colors else "original models"
        ax.plot([x], [row["top1_mean"]], linestyle="none", marker="*", markersize=14, color=color,
                markeredgecolor="black", markeredgewidth=0.6, label=label, zorder=5)
        ax.annotate(row["name"], (x, row["top1_mean"]), textcoords="offset points", xytext=(6, 4),
                    fontsize="x-small", color="0.2", gid=STAR_LABEL)


def _macs_axis(axes: list) -> None:
    """Each panel's MACs axis: log where its points span more than 8x (ticks at 1, 2 and 5 of each decade,
    written as plain numbers: ``0.02``, not ``2 x 10^-2``, which run into each other), linear otherwise."""
    for ax in axes:
        ax.set_xlabel(MACS_LABEL)
        low, high = ax.dataLim.intervalx
        if not (np.isfinite(low) and low > 0 and high / low > 8):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
            continue
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def pair_title(source: str, destination: str) -> str:
    """``ResNet-18 stitched to itself`` or ``ResNet-18 → ViT-Ti``."""
    if source == destination:
        return f"{arch_name(source)} stitched to itself"
    return f"{arch_name(source)} → {arch_name(destination)}"


def _stages(stages) -> str:
    stages = sorted(int(s) for s in stages)
    if len(stages) == 1:
        return f"Stage {stages[0]}"
    if stages == list(range(stages[0], stages[-1] + 1)):
        return f"Stages {stages[0]}–{stages[-1]}"
    return "Stages " + ", ".join(str(s) for s in stages)


def panel_title(source: str, stage: int, destination: str, targets) -> str:
    """``ResNet-18 Stage 1 → ViT-Ti Stages 2–4``: the source's stage and the destination's stages drawn."""
    return f"{arch_name(source)} Stage {int(stage)} → {arch_name(destination)} {_stages(targets)}"


def _source_stages(scenarios: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in scenarios["source_stage"].dropna().unique())


def _result(fig_rows: tuple[Figure, pd.DataFrame], out_path, dpi: int = DPI) -> Path | Figure:
    return save_figure(fig_rows[0], out_path, dpi)


# ----------------------------------------------------------------------------------------- figures

def accuracy_vs_stage_figure(df: pd.DataFrame, source: str, destination: str,
                             options: FigureOptions = DEFAULT_OPTIONS, note: str = "") -> tuple[Figure, pd.DataFrame]:
    """:func:`plot_accuracy_vs_stage`'s figure and the rows of the runs it draws."""
    df, recipe = _one_recipe(df, f"accuracy vs. stage {source} -> {destination}",
                             (df["source"] == source) & (df["destination"] == destination))
    rows = _pair_rows(df, source, destination, options)
    scenarios = aggregate(rows)
    shades = lr_shades(rows) if options.all_lrs else None
    stages = _source_stages(scenarios)
    fig, axes = _new_figure(len(stages))
    refs = [(destination, "-")] + ([(source, "--")] if source != destination else [])
    for ax, stage in zip(axes, stages):
        panel = scenarios[scenarios["source_stage"] == stage]
        for lines in _methods(panel):
            lines = lines.sort_values("destination_stage")
            style = _style(rows[rows["method"] == lines["method"].iloc[0]], shades)
            _line(ax, lines["destination_stage"], lines["top1_mean"], lines["top1_se"], lines["method"].iloc[0],
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
        ax.set_title(panel_title(source, stage, destination, targets), fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle(f"{pair_title(source, destination)}: accuracy vs. stitching gap")
    title = legend_title(recipe, df, rows, options, note, fig.get_size_inches()[0])
    drawn = pd.concat([rows, _original_rows(df, {source, destination})])
    return finish_figure(fig, title), drawn


def plot_accuracy_vs_stage(df: pd.DataFrame, source: str, destination: str,
                           out_path: str | os.PathLike | None = None, options: FigureOptions = DEFAULT_OPTIONS,
                           note: str = "", dpi: int = DPI) -> Path | Figure:
    """Accuracy vs. destination stage, one panel per source stage (paper Figures 3, 4 left, 9-11)."""
    return _result(accuracy_vs_stage_figure(df, source, destination, options, note), out_path, dpi)


def accuracy_vs_macs_figure(df: pd.DataFrame, source: str, destination: str,
                            options: FigureOptions = DEFAULT_OPTIONS, note: str = "") -> tuple[Figure, pd.DataFrame]:
    """:func:`plot_accuracy_vs_macs`'s figure and the rows of the runs it draws."""
    df, recipe = _one_recipe(df, f"accuracy vs. MACs {source} -> {destination}",
                             (df["source"] == source) & (df["destination"] == destination))
    rows = _pair_rows(df, source, destination, options).dropna(subset=["macs"])
    if rows.empty:
        raise NoData(f"no MACs recorded for {source} -> {destination}")
    scenarios = aggregate(rows)
    shades = lr_shades(rows) if options.all_lrs else None
    stages = _source_stages(scenarios)
    fig, axes = _new_figure(len(stages))
    models = [_original(df, destination)] + ([_original(df, source)] if source != destination else [])
    for ax, stage in zip(axes, stages):
        panel = scenarios[scenarios["source_stage"] == stage]
        for lines in _methods(panel):
            lines = lines.sort_values("destination_stage")
            style = _style(rows[rows["method"] == lines["method"].iloc[0]], shades)
            _line(ax, lines["macs_mean"] / 1e9, lines["top1_mean"], lines["top1_se"], lines["method"].iloc[0],
                  style)
        _stars(ax, models, colors=[ORIGINAL_COLOR, "white"][:len(models)])
        targets = sorted(int(t) for t in panel["destination_stage"].dropna().unique())
        ax.set_title(panel_title(source, stage, destination, targets), fontsize="medium")
        ax.grid(alpha=0.3)
    _macs_axis(axes)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle(f"{pair_title(source, destination)}: accuracy vs. compute")
    title = legend_title(recipe, df, rows, options, note, fig.get_size_inches()[0])
    drawn = pd.concat([rows, _original_rows(df, {source, destination}).dropna(subset=["macs"])])
    return finish_figure(fig, title), drawn


def plot_accuracy_vs_macs(df: pd.DataFrame, source: str, destination: str,
                          out_path: str | os.PathLike | None = None, options: FigureOptions = DEFAULT_OPTIONS,
                          note: str = "", dpi: int = DPI) -> Path | Figure:
    """Accuracy vs. MACs, one panel per source stage, originals as stars (Figures 4 right, 5, 12-14)."""
    return _result(accuracy_vs_macs_figure(df, source, destination, options, note), out_path, dpi)


def best_adapter_rows(prepared: pd.DataFrame, source: str, destination: str) -> pd.DataFrame:
    """The rows of a pair's "full block" adapter: ViT block for a model stitched to itself where it was
    run (ViT -> ViT), otherwise bottleneck with bilinear resize. Empty when the pair has neither."""
    rows = prepared[(prepared["kind"] == STITCHED) & (prepared["source"] == source)
                    & (prepared["destination"] == destination)]
    if source == destination:
        vit = rows[rows["adapter"] == VIT_BLOCK.name]
        if not vit.empty:
            # the ViT block has no resize: every mode is the same module; keep one
            for mode in RESIZES:
                if (vit["resize"] == mode).any():
                    return vit[vit["resize"] == mode]
            return vit[vit["resize"] == vit["resize"].iloc[0]]
    return rows[(rows["adapter"] == BOTTLENECK.name) & (rows["resize"] == "bilinear")]


#: what the cross-architecture figure draws of each pair (its caption and the selection's words)
CROSS_ARCHITECTURE_ADAPTER = "Bottleneck with bilinear resize; ViT Block for ViT → ViT"


def cross_architecture_figure(df: pd.DataFrame, options: FigureOptions = DEFAULT_OPTIONS, note: str = "",
                              stages: tuple[int, ...] = (1, 2)) -> tuple[Figure, pd.DataFrame]:
    """:func:`plot_cross_architecture`'s figure and the rows of the runs it draws."""
    df, recipe = _one_recipe(df, "the cross-architecture figure")
    prepared = prepare(df, options.adapter_lr, options.all_lrs)
    stitched = prepared[prepared["kind"] == STITCHED]
    pairs = sorted(set(zip(stitched["source"].astype(str), stitched["destination"].astype(str))))
    lines = []
    absent = []
    for source, destination in pairs:
        rows = best_adapter_rows(prepared, source, destination).dropna(subset=["source_stage", "macs"])
        rows = rows[rows["source_stage"].isin(stages)]
        if not rows.empty:
            lines.append((source, destination, rows))
        else:
            absent.append(f"{arch_name(source)} → {arch_name(destination)}")
    if not lines:
        raise NoData("no bottleneck (bilinear) or ViT-block runs at the requested source stages")
    drawn_rows = pd.concat([rows for *_, rows in lines])
    shades = lr_shades(drawn_rows) if options.all_lrs else None
    present = sorted({int(s) for s in drawn_rows["source_stage"].dropna()})
    fig, axes = _new_figure(len(present))
    cmap_name = "tab10" if len(lines) <= 10 else "tab20"
    cmap = matplotlib.colormaps[cmap_name]
    colors = [cmap(i % cmap.N) for i in range(len(lines))]
    archs = sorted({a for s, d, _ in lines for a in (s, d)})
    models = [m for m in (_original(df, a) for a in archs) if m is not None]
    for ax, stage in zip(axes, present):
        for (source, destination, rows), color in zip(lines, colors):
            for method, of_lr in rows[rows["source_stage"] == stage].groupby("method", sort=True):
                agg = aggregate(of_lr).sort_values("destination_stage")
                style = {"color": _shade(color, of_lr, shades), "linestyle": "-", "marker": "o"}
                label = f"{arch_name(source)} → {arch_name(destination)}" + method.partition(" · ")[1] \
                    + method.partition(" · ")[2]
                _line(ax, agg["macs_mean"] / 1e9, agg["top1_mean"], agg["top1_se"], label, style)
        _stars(ax, models)
        ax.set_title(f"Stitching Stage {stage} to other stages", fontsize="medium")
        ax.grid(alpha=0.3)
    _macs_axis(axes)
    axes[0].set_ylabel(ACCURACY_LABEL)
    fig.suptitle(f"Best adapter per architecture combination ({CROSS_ARCHITECTURE_ADAPTER})")
    if absent:      # pairs with stitches, none of them this figure's adapter at these stages: say so
        stages_text = " or ".join(str(s) for s in stages)
        note = "; ".join(p for p in (note, f"not here (no such adapter from source stage {stages_text}): "
                                           + ", ".join(absent)) if p)
    title = legend_title(recipe, df, drawn_rows, options, note, fig.get_size_inches()[0])
    drawn = pd.concat([drawn_rows, _original_rows(df, archs).dropna(subset=["macs"])])
    return finish_figure(fig, title), drawn


def plot_cross_architecture(df: pd.DataFrame, out_path: str | os.PathLike | None = None,
                            stages: tuple[int, ...] = (1, 2), options: FigureOptions = DEFAULT_OPTIONS,
                            note: str = "", dpi: int = DPI) -> Path | Figure:
    """Best adapter of every architecture combination vs. MACs, for source stages 1 and 2 (Figures 6, 15).

    Stars mark the original models (accuracy and MACs of each architecture that appears).
    """
    return _result(cross_architecture_figure(df, options, note, stages), out_path, dpi)
