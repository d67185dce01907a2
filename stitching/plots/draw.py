"""Every figure and table for whatever a results table holds, what they leave out of it, and the files.

Owns the output folder and its file names (:data:`SELECTION`, :data:`CAPTIONS`, :data:`RECIPE_NOTE`, the
figures' names), :class:`DrawOptions` and the one function both ``scripts/plot_results.py`` and
``notebooks/results.ipynb`` go through, :func:`draw`: it chooses the runs (``--where``, ``--default-options``,
the learning rate of each scenario: :mod:`stitching.plots.selection`) and draws, for each (source, destination)
combination with stitched or fine-tuning runs, the accuracy-vs-stage and accuracy-vs-MACs figures, then the
cross-architecture figure, accuracy vs. CKA at the join and Table 1. Combinations without data for a figure are
skipped (logged), never fatal. A table holding runs of several recipes is split: one folder ``recipe-<i>/`` per
recipe (never two recipes in one figure), each with its figures, Table 1, ``captions.md`` and ``recipe.txt``.

Each figure's legend says what it shows (the short recipe, the learning rates and why, the runs of its scope
the selection left out); ``captions.md`` holds each figure's caption with the whole recipe; ``selection.md``
(top folder) lists every run of the table: the figures it is in, or why it is in none. :meth:`Drawn.save` writes
the files (figures as PNG at 300 dpi by default, PDF or SVG), :func:`draw_all` draws and saves in one call.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from stitching.kinds import ORIGINAL, STITCHED, TRAINED_KINDS
from stitching.plots.aggregate import ADAPTER_LR, aggregate, lr_statement
from stitching.plots.figures import (CROSS_ARCHITECTURE_ADAPTER, DPI, FORMATS, SHARED_NOTE, FigureOptions,
                                     NoData, accuracy_vs_macs_figure, accuracy_vs_stage_figure,
                                     cross_architecture_figure, pair_title, save_figure)
from stitching.plots.options import off_defaults
from stitching.plots.selection import (OPTIONS, ROW, left_out_note, lr_reasons, number_runs, selection_markdown,
                                       selection_table, where_reasons)
from stitching.plots.similarity import accuracy_vs_cka_figure
from stitching.plots.table import table1_files, table1_rows
from stitching.results.recipe import canonical, dataset_label, recipe_label, split_by_recipe
from stitching.rundir import atomic_write

log = logging.getLogger(__name__)

#: the list of every run, drawn or left out and why (top folder)
SELECTION = "selection.md"
#: each figure's caption with the whole recipe (per recipe folder)
CAPTIONS = "captions.md"
#: the recipe the folder's figures show (per recipe folder)
RECIPE_NOTE = "recipe.txt"
#: the folder of the i-th recipe when a table holds several
RECIPE_FOLDER = "recipe-{}"
#: what each figure is called in ``selection.md``, and its file name
FIGURE_NAMES = {"stage": "accuracy_vs_stage_{pair}", "MACs": "accuracy_vs_macs_{pair}",
                "cross-architecture": "cross_architecture", "CKA": "accuracy_vs_cka", "Table 1": "table1"}


@dataclass(frozen=True)
class DrawOptions:
    """Which runs to draw and how (``scripts/plot_results.py``'s options).

    ``where``: ``(column, value)`` pairs a run must have; ``default_options``: only runs whose training options
    are at their defaults; ``all_lrs``: every learning rate its own line; ``footer``: the whole recipe under the
    legend; ``adapter_lr``: the recipe's adapter lr; ``data_label``: the dataset's name for runs that give none
    (results written before ``data.label``).
    """

    where: tuple[tuple[str, str], ...] = ()
    default_options: bool = False
    all_lrs: bool = False
    footer: bool = False
    adapter_lr: float = ADAPTER_LR
    data_label: str = ""

    @property
    def figures(self) -> FigureOptions:
        return FigureOptions(all_lrs=self.all_lrs, footer=self.footer, adapter_lr=self.adapter_lr)


@dataclass
class Drawing:
    """One figure (or Table 1, ``figure`` None): its file name without suffix (relative to the output folder),
    what ``selection.md`` calls it, its caption, and the runs (:data:`~stitching.plots.selection.ROW`) it shows."""

    name: str
    what: str
    figure: Figure | None
    caption: str
    runs: frozenset[int]


@dataclass
class Drawn:
    """What :func:`draw` made: the figures and Table 1 (:class:`Drawing`), the text files (relative path ->
    text: Table 1, captions, recipe notes, the selection), the selection table and, for a table of several
    recipes, what sets each recipe's folder apart (folder -> words)."""

    drawings: list[Drawing] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    recipes: dict[str, str] = field(default_factory=dict)

    @property
    def figures(self) -> list[Drawing]:
        return [d for d in self.drawings if d.figure is not None]

    def save(self, out_dir: str | os.PathLike, formats: tuple[str, ...] = ("png",), dpi: int = DPI) -> list[Path]:
        """Write every figure in each of ``formats`` (PNG at ``dpi``) and every text file into ``out_dir``,
        each through a temporary file; return the files written (recipe notes, figures, tables, captions,
        the selection)."""
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown figure format {bad[0]!r}: one of {', '.join(FORMATS)}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [atomic_write(out_dir / name, text.encode("utf-8"))
                   for name, text in self.texts.items() if name.endswith(RECIPE_NOTE)]
        for drawing in self.figures:
            written += [save_figure(drawing.figure, out_dir / f"{drawing.name}.{fmt}", dpi) for fmt in formats]
        written += [atomic_write(out_dir / name, text.encode("utf-8"))
                    for name, text in self.texts.items() if not name.endswith(RECIPE_NOTE)]
        return written


def _slug(name) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "unnamed"


def pairs(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(source, destination) combinations with stitched or fine-tuning runs, sorted."""
    rows = df[df["kind"].isin(TRAINED_KINDS)].dropna(subset=["source", "destination"])
    return sorted(set(zip(rows["source"].astype(str), rows["destination"].astype(str))))


def draw(df: pd.DataFrame, options: DrawOptions = DrawOptions()) -> Drawn:
    """Choose the runs of ``df`` (a results table) and draw every figure and Table 1 of them (see the module
    docstring); nothing is written (:meth:`Drawn.save`)."""
    runs = number_runs(df)
    if options.data_label:
        given = runs["data_label"].map(canonical) if "data_label" in runs.columns else pd.Series("", index=runs.index)
        runs["data_label"] = runs.get("data_label", given).where(given != "", options.data_label)
    reasons = where_reasons(runs, options.where)
    if options.default_options:
        off = off_defaults(runs)
        newly = (off != "") & (reasons == "")
        reasons[newly] = f"{OPTIONS}: " + off[newly]
    before_split = reasons != ""
    kept = runs[~before_split]
    groups = split_by_recipe(kept) if len(kept) else []
    differ = [c for c in (groups[0][0] if groups else {}) if len({r[c] for r, _ in groups}) > 1]
    drawn = Drawn()
    tags: dict[int, str] = {}
    for i, (recipe, rows) in enumerate(groups, 1):
        folder = f"{RECIPE_FOLDER.format(i)}/" if len(groups) > 1 else ""
        words = recipe_label(recipe, columns=differ).removeprefix("Recipe: ") if differ else ""
        tag = RECIPE_FOLDER.format(i) if folder else ""
        if folder:
            drawn.recipes[tag] = words
            log.warning("the results hold %d recipes: drawing %s (%s) into its own folder", len(groups), tag, words)
        for run in rows[ROW]:       # an original model is the reference of every recipe evaluated like it
            tags[run] = f"{tags[run]}, {tag}" if run in tags else tag
        lr = lr_reasons(rows, options.adapter_lr, options.all_lrs)
        reasons[lr.index[lr != ""]] = lr[lr != ""]
        drawn.texts[folder + RECIPE_NOTE] = (recipe_label(recipe, dataset_label(rows)) + "\n\n"
                                             + "".join(f"{k}: {v}\n" for k, v in recipe.items()))
        pool = runs[before_split | runs.index.isin(rows.index)]
        mine = _draw_recipe(rows, folder, recipe, options, reasons[pool.index], pool,
                            f"{tag} of {len(groups)}: {words}" if folder else "")
        drawn.drawings += mine
        drawn.texts.update(_table1(rows, folder, drawn.drawings))
        captions = [f"**{d.name.removeprefix(folder)}** {d.caption}" for d in mine if d.figure is not None]
        if captions:
            drawn.texts[folder + CAPTIONS] = "\n\n".join(captions) + "\n"
    shown: dict[int, list[str]] = {}
    for d in drawn.drawings:
        for run in d.runs:
            shown.setdefault(run, []).append(d.what)
    every = ", ".join(drawn.recipes)
    tags = {run: "every recipe" if every and tag == every else tag for run, tag in tags.items()}
    drawn.selection = selection_table(runs, reasons, shown, tags)
    legend = ("Drawn in: stage = `accuracy_vs_stage_<source>_to_<destination>`, MACs = "
              "`accuracy_vs_macs_<source>_to_<destination>` (the line's pair), cross-architecture = "
              "`cross_architecture`, CKA = `accuracy_vs_cka`, Table 1 = `table1.md`"
              + (f", in the recipe's folder (`{RECIPE_FOLDER.format('<i>')}/`)" if len(groups) > 1 else "") + ".")
    drawn.texts[SELECTION] = selection_markdown(drawn.selection, legend, drawn.recipes)
    return drawn


def _attempt(what: str, make):
    try:
        return make()
    except NoData as exc:
        log.warning("skipped %s: %s", what, exc)
        return None


def _seeds(rows: pd.DataFrame) -> str:
    counts = aggregate(rows[rows["kind"] != ORIGINAL])["n"]
    if counts.empty:
        return "seeds"
    low, high = int(counts.min()), int(counts.max())
    return f"{low} seed{'s' * (low != 1)}" if low == high else f"{low}-{high} seeds"


def _sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}."


def _caption(what: str, figure_rows: pd.DataFrame, all_rows: pd.DataFrame, recipe: dict, options: DrawOptions,
             note: str, source: str = "", destination: str = "") -> str:
    seeds = _seeds(figure_rows)
    size = canonical(recipe.get("img_size", ""))
    body = {
        "stage": f"{pair_title(source, destination)}: top-1 accuracy against the destination stage, one panel per "
                 f"source stage; lines: mean over {seeds} (band: ± standard error); grey: the original "
                 + ("model." if source == destination else "destination (solid) and source (dashed)."),
        "MACs": f"{pair_title(source, destination)}: top-1 accuracy against the MACs of one forward pass"
                + (f" at {size} px" if size else "") + f" (the paper's \"FLOPs\"), one panel per source stage; "
                f"lines: mean over {seeds} (band: ± standard error); stars: the original models.",
        "cross-architecture": f"The best adapter of each architecture pair ({CROSS_ARCHITECTURE_ADAPTER}): top-1 "
                              f"accuracy against MACs, one panel per source stage; mean over {seeds} (band: ± "
                              f"standard error); stars: the original models.",
        "CKA": f"Top-1 accuracy against linear CKA at the join before training (and after, where measured), one "
               f"point per stitched scenario (mean over {seeds}, bar: ± standard error); each panel's title gives "
               f"Spearman's rank correlation of its points.",
    }[what]
    shown = lr_statement(figure_rows, options.all_lrs)
    shared = "resize_shared" in figure_rows.columns and figure_rows["resize_shared"].fillna(False).astype(bool).any()
    parts = [body, f"Shown: {shown}." if shown else "", _sentence(SHARED_NOTE) if shared else "",
             _sentence(note) if note else "", recipe_label(recipe, dataset_label(all_rows)) + "."]
    return " ".join(p for p in parts if p)


def _draw_recipe(rows: pd.DataFrame, folder: str, recipe: dict, options: DrawOptions, reasons: pd.Series,
                 pool: pd.DataFrame, tag: str) -> list[Drawing]:
    """The figures of one recipe's rows; ``reasons``/``pool``: the runs the selection left out that a figure's
    legend counts (this recipe's and those left out before the split); ``tag``: what sets the recipe apart
    from the table's others ('' for a table of one recipe)."""
    fig_options = options.figures
    out: list[Drawing] = []

    def note(scope: pd.Series, noun: tuple[str, str]) -> str:
        return "; ".join(p for p in (tag, left_out_note(reasons[scope.to_numpy()], noun)) if p)

    def add(what: str, name: str, made, caption_args: tuple = (), note_text: str = "") -> None:
        if made is None:
            return
        figure, drawn_rows = made
        out.append(Drawing(folder + name, what, figure,
                           _caption(what, drawn_rows, rows, recipe, options, note_text, *caption_args),
                           frozenset(int(r) for r in drawn_rows[ROW])))

    trained = pool["kind"].isin(TRAINED_KINDS)
    for source, destination in pairs(rows):
        stem = f"{_slug(source)}_to_{_slug(destination)}"
        scope = trained & (pool["source"] == source) & (pool["destination"] == destination)
        text = note(scope, ("run of this pair", "runs of this pair"))
        add("stage", FIGURE_NAMES["stage"].format(pair=stem), _attempt(
            f"accuracy vs stage {source} -> {destination}",
            lambda: accuracy_vs_stage_figure(rows, source, destination, fig_options, text)),
            (source, destination), text)
        add("MACs", FIGURE_NAMES["MACs"].format(pair=stem), _attempt(
            f"accuracy vs MACs {source} -> {destination}",
            lambda: accuracy_vs_macs_figure(rows, source, destination, fig_options, text)),
            (source, destination), text)
    stitched = pool["kind"] == STITCHED
    text = note(stitched, ("stitched run", "stitched runs"))
    add("cross-architecture", FIGURE_NAMES["cross-architecture"], _attempt(
        "cross-architecture figure", lambda: cross_architecture_figure(rows, fig_options, text)), (), text)
    add("CKA", FIGURE_NAMES["CKA"], _attempt(
        "accuracy vs CKA at the join", lambda: accuracy_vs_cka_figure(rows, fig_options, text)), (), text)
    return out


def _table1(rows: pd.DataFrame, folder: str, drawings: list[Drawing]) -> dict[str, str]:
    try:
        files = table1_files(rows)
    except NoData as exc:
        log.warning("skipped Table 1: %s", exc)
        return {}
    drawings.append(Drawing(folder + FIGURE_NAMES["Table 1"], "Table 1", None, "",
                            frozenset(int(r) for r in table1_rows(rows)[ROW])))
    return {folder + name: text for name, text in files.items()}


def draw_all(df: pd.DataFrame, out_dir: str | os.PathLike, options: DrawOptions = DrawOptions(),
             formats: tuple[str, ...] = ("png",), dpi: int = DPI) -> list[Path]:
    """Draw every figure and Table 1 (:func:`draw`) and write them into ``out_dir`` (:meth:`Drawn.save`); return
    the files written: ``recipe.txt``, ``accuracy_vs_stage_<source>_to_<destination>.png``,
    ``accuracy_vs_macs_<source>_to_<destination>.png``, ``cross_architecture.png``, ``accuracy_vs_cka.png``,
    ``table1.md``, ``table1.tex``, ``captions.md`` -- in ``out_dir``, or, when ``df`` holds several recipes, in
    ``out_dir/recipe-1``, ``recipe-2``, ... -- and ``selection.md``."""
    return draw(df, options).save(out_dir, formats, dpi)
