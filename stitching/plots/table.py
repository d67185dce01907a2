"""Table 1 of the paper: stitched self-stitch models next to the original models of similar cost.

Owns :func:`table1_numbers` (numeric), :func:`table1` (the paper's shape: Model, Accuracy, MACs, sorted
by MACs), :func:`table1_rows` (the runs it shows) and :func:`write_table1` (``table1.md`` and ``table1.tex``).

Rows: every original model present, and the self-stitched source (``resnet50`` when present) with
bottleneck adapters and bilinear resize from source stage 1 to every destination stage. Accuracy is the
mean over seeds ± standard error; MACs are the paper's "FLOPs" (``1.67e09``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from stitching.kinds import BOTTLENECK, ORIGINAL, STITCHED
from stitching.plots.aggregate import aggregate, originals, prepare
from stitching.plots.figures import NoData
from stitching.plots.labels import arch_name, gap_label
from stitching.results.recipe import dataset_label, recipe_label, recipe_of
from stitching.rundir import atomic_write

PREFERRED_SOURCE = "resnet50"
TABLE_COLUMNS = ["Model", "Accuracy", "MACs"]
CAPTION = ("Stitching parts of a {name} (source stage 1, bottleneck adapters, bilinear resize) next to the "
           "original models. Accuracy: top-1 %, mean ± standard error over seeds. MACs: multiply-accumulates "
           "of one forward pass (the paper's \"FLOPs\").")


def _self_stitch_rows(prepared: pd.DataFrame, source: str | None) -> tuple[str | None, pd.DataFrame]:
    rows = prepared[(prepared["kind"] == STITCHED) & (prepared["source"] == prepared["destination"])
                    & (prepared["adapter"] == BOTTLENECK.name) & (prepared["resize"] == "bilinear")
                    & (prepared["source_stage"] == 1)]
    if source is None:
        counts = rows["source"].value_counts()
        if counts.empty:
            return None, rows.iloc[0:0]
        source = PREFERRED_SOURCE if PREFERRED_SOURCE in counts.index else str(counts.index[0])
    return source, rows[rows["source"] == source]


def _original_models(df: pd.DataFrame, models: list[str] | None) -> pd.DataFrame:
    orig = originals(df)
    return orig if models is None else orig[orig["model"].isin(models)]


def table1_rows(df: pd.DataFrame, source: str | None = None, models: list[str] | None = None) -> pd.DataFrame:
    """The rows of the runs Table 1 shows: the self-stitched source's runs (:func:`table1_numbers`) and the
    original models' rows."""
    _, df = recipe_of(df, "Table 1")
    _, rows = _self_stitch_rows(prepare(df), source)
    orig = df[df["kind"] == ORIGINAL]
    model = orig["source"].where(orig["source"].notna(), orig["destination"]).astype(str)
    return pd.concat([rows, orig if models is None else orig[model.isin(models)]])


def table1_numbers(df: pd.DataFrame, source: str | None = None,
                   models: list[str] | None = None) -> pd.DataFrame:
    """Numeric Table 1: columns ``model``, ``kind``, ``top1_mean``, ``top1_se``, ``n``, ``macs``.

    ``source``: the self-stitched architecture (default ``resnet50`` if it has such rows, else the one with
    most). ``models``: restrict the original rows to these raw names (default: all originals present).
    Sorted by MACs. Raises :class:`NoData` when neither originals nor stitched rows exist, and
    :class:`~stitching.results.recipe.MixedRecipes` when ``df`` holds runs of several recipes.
    """
    _, df = recipe_of(df, "Table 1")
    source, rows = _self_stitch_rows(prepare(df), source)
    orig = _original_models(df, models)
    parts = []
    if not rows.empty:
        agg = aggregate(rows)
        several = agg["method"].nunique() > 1  # e.g. two adapter-shape schedules: say which is which
        name = arch_name(source)
        parts.append(pd.DataFrame({
            "model": [gap_label(name, s, name, t) + (f" [{m}]" if several else "")
                      for s, t, m in zip(agg["source_stage"], agg["destination_stage"], agg["method"])],
            "kind": STITCHED,
            "top1_mean": agg["top1_mean"].to_numpy(),
            "top1_se": agg["top1_se"].to_numpy(),
            "n": agg["n"].to_numpy(),
            "macs": agg["macs_mean"].to_numpy(),
        }))
    if not orig.empty:
        parts.append(pd.DataFrame({
            "model": orig["name"].to_numpy(), "kind": ORIGINAL, "top1_mean": orig["top1_mean"].to_numpy(),
            "top1_se": orig["top1_se"].to_numpy(), "n": orig["n"].to_numpy(), "macs": orig["macs_mean"].to_numpy(),
        }))
    if not parts:
        raise NoData("no original models and no self-stitched bottleneck (bilinear) runs from stage 1")
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["macs", "model"], na_position="last", kind="stable").reset_index(drop=True)


def format_macs(value) -> str:
    """``1.67e09`` (the paper's format); ``–`` when missing."""
    if pd.isna(value):
        return "–"
    mantissa, exponent = f"{float(value):.2e}".split("e")
    return f"{mantissa}e{int(exponent):02d}"


def format_accuracy(mean, se, n) -> str:
    """``67.4 ± 0.1`` (mean ± standard error), or just the mean for a single run."""
    if pd.isna(mean):
        return "–"
    if pd.isna(n) or int(n) <= 1 or pd.isna(se):
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {se:.1f}"


def table1(df: pd.DataFrame, source: str | None = None, models: list[str] | None = None) -> pd.DataFrame:
    """Table 1 in the paper's shape: columns Model, Accuracy (mean ± s.e.), MACs; sorted by MACs."""
    numbers = table1_numbers(df, source, models)
    return pd.DataFrame({
        "Model": numbers["model"],
        "Accuracy": [format_accuracy(m, s, n) for m, s, n in
                     zip(numbers["top1_mean"], numbers["top1_se"], numbers["n"])],
        "MACs": [format_macs(v) for v in numbers["macs"]],
    })[TABLE_COLUMNS]


def to_markdown(table: pd.DataFrame, right=None) -> str:
    """A GitHub-flavoured Markdown table: the columns ``right`` right-aligned (default: all but the first), the
    others left-aligned."""
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    header = [str(c) for c in table.columns]
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(len(header))]
    flush = [i > 0 if right is None else c in right for i, c in enumerate(header)]
    def line(values):
        return "| " + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, flush)) + " |"
    rule = "| " + " | ".join(("-" * (w - 1) + ":") if r else ("-" * w) for w, r in zip(widths, flush)) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in cells)]) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_cell(value) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(value))
    text = re.sub(r'"([^"]*)"', r"``\1''", text)
    return text.replace("±", r"$\pm$").replace("→", r"$\rightarrow$").replace("–", "--")


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """LaTeX ``table`` with ``tabular`` (pandas ``to_latex`` when jinja2 is there, hand-written otherwise)."""
    escaped = table.map(_latex_cell)
    escaped.columns = [_latex_cell(c) for c in table.columns]
    caption = _latex_cell(caption)
    try:
        return escaped.to_latex(index=False, escape=False, column_format="l" + "r" * (len(table.columns) - 1),
                                caption=caption, label="tab:table1", position="t")
    except ImportError:  # pandas' Styler needs jinja2
        rows = [" & ".join(escaped.columns) + r" \\", r"\midrule"]
        rows += [" & ".join(r) + r" \\" for r in escaped.itertuples(index=False)]
        body = "\n".join(rows)
        return (f"\\begin{{table}}[t]\n\\caption{{{caption}}}\n\\label{{tab:table1}}\n"
                f"\\begin{{tabular}}{{l{'r' * (len(table.columns) - 1)}}}\n\\toprule\n{body}\n\\bottomrule\n"
                f"\\end{{tabular}}\n\\end{{table}}\n")


#: the files of Table 1
TABLE1_FILES = ("table1.md", "table1.tex")


def table1_files(df: pd.DataFrame, source: str | None = None, models: list[str] | None = None) -> dict[str, str]:
    """The text of ``table1.md`` and ``table1.tex`` (:data:`TABLE1_FILES`); the caption names the recipe of the
    runs shown."""
    table = table1(df, source, models)
    chosen, _ = _self_stitch_rows(prepare(df), source)
    recipe, rows = recipe_of(df, "Table 1")
    caption = CAPTION.format(name=arch_name(chosen) if chosen else "model") + \
        f" {recipe_label(recipe, dataset_label(rows))}."
    md, tex = TABLE1_FILES
    return {md: f"**Table 1.** {caption}\n\n" + to_markdown(table), tex: to_latex(table, caption)}


def write_table1(df: pd.DataFrame, out_dir: str | os.PathLike, source: str | None = None,
                 models: list[str] | None = None) -> list[Path]:
    """Write ``table1.md`` and ``table1.tex`` into ``out_dir`` (through temporary files); returns their paths."""
    return [atomic_write(Path(out_dir) / name, text.encode("utf-8"))
            for name, text in table1_files(df, source, models).items()]
