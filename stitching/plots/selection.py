"""What the figures and tables of a results table show of it, what they leave out, and why: no run hidden.

Owns the reasons a run is not drawn, the table that lists every run (``selection.md``), and the line a figure's
legend gets about the runs its selection left out. A run is left out

- by ``--where COLUMN=VALUE`` (:func:`where_reasons`) or ``--default-options``
  (:func:`stitching.plots.options.off_defaults`: a training option not at its default);
- by the learning rate its scenario is drawn at (:func:`stitching.plots.aggregate.lr_choice`: the recipe's
  adapter lr for a stitch, the best mean over seeds for fine-tuning; ``--all-lrs`` draws every lr);
- as an original model evaluated unlike every trained run (it belongs to no recipe), a block cut (the figures
  draw stage cuts; ``python -m stitching.matrix`` draws block cuts), or a run no figure's definition takes.

The runs are the rows of the results table, numbered in the column :data:`ROW` before anything is chosen, so
each figure's rows (resize-free rows copied to other resize modes included) name the runs they came from.
:func:`selection_table` lists them by scenario (pair, gap, method, lr and, where the table holds several, the
recipe), shown or left out, with the figures each is in or why it is in none; :func:`selection_markdown` writes
it for ``selection.md`` and :func:`selection_text` for the command line.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stitching.kinds import ORIGINAL as ORIGINAL_RUN
from stitching.kinds import STITCHED
from stitching.plots.aggregate import LR_KEYS, recipe_keys, standard_error, lr_candidates
from stitching.plots.labels import add_labels, arch_name, method_sort_key
from stitching.plots.table import format_accuracy, to_markdown
from stitching.results.recipe import canonical

#: the column numbering the runs of a results table (added by :func:`number_runs`)
ROW = "_run"
#: why a run is not drawn, in short (the figures' legend line counts them by these)
WHERE, OPTIONS, LR, ORIGINAL, BLOCKS, NO_FIGURE = ("--where", "--default-options", "another lr", "evaluated otherwise",
                                                  "block cut", "in no figure")
#: the columns of :func:`selection_table`
SELECTION_COLUMNS = ["shown", "recipe", "pair", "gap", "method", "lr", "runs", "top1", "where"]
#: at most this many lines of the table are printed on the command line (left-out runs always)
PRINT_LINES = 60


def number_runs(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its rows numbered in :data:`ROW` (0, 1, ...) and a plain index."""
    return df.reset_index(drop=True).assign(**{ROW: np.arange(len(df))})


def where_reasons(df: pd.DataFrame, conditions) -> pd.Series:
    """Per row: '' where it has every ``(column, value)`` of ``conditions`` (canonical spellings compared),
    else the first condition it fails, as ``--where column=value``."""
    reasons = pd.Series("", index=df.index)
    for column, value in conditions:
        fails = (df[column].map(canonical) != canonical(value)) & (reasons == "")
        reasons[fails] = f"{WHERE} {column}={value}"
    return reasons


def lr_reasons(rows: pd.DataFrame, adapter_lr: float, all_lrs: bool) -> pd.Series:
    """Per row of ``rows`` (numbered, one recipe): '' where its learning rate is drawn, else why not, e.g.
    ``another lr: lr 0.002 drawn (the recipe's adapter lr; mean 57.8 % over 2 runs, this lr 64.5 %)``.

    Exact for rows shared between resize modes too: the choice is made on the shared rows
    (:func:`stitching.plots.aggregate.lr_candidates`, as :func:`~stitching.plots.aggregate.prepare` makes it), and
    a run counts as drawn where any of its copies is."""
    reasons = pd.Series("", index=rows.index)
    if all_lrs or rows.empty:
        return reasons
    every, recipe = recipe_keys(lr_candidates(rows, adapter_lr))
    trained = every["kind"].isin(list(LR_KEYS))
    every["_lr"] = every["lr"].map(canonical)
    drawn = set(every.loc[~trained | (every["_lr"] == every["chosen_lr"]), ROW])
    own = every[trained & ~every["resize_shared"].astype(bool) & ~every[ROW].isin(drawn)]
    if own.empty:
        return reasons
    # the mean top-1 of each lr of each scenario: what the choice compared
    scenario = ["kind", *LR_KEYS[STITCHED], *recipe]
    stats = every[trained].groupby(scenario + ["_lr"], dropna=False)["top1"].agg(["mean", "count"]).reset_index()
    own = own.merge(stats.rename(columns={"mean": "mine"})[scenario + ["_lr", "mine"]], how="left",
                    on=scenario + ["_lr"])
    own = own.merge(stats.rename(columns={"_lr": "chosen_lr", "mean": "chosen", "count": "n"}), how="left",
                    on=scenario + ["chosen_lr"])
    why = {}
    for _, r in own.iterrows():
        compared = (f"; mean {r['chosen']:.1f} % over {int(r['n'])} run{'s' * (int(r['n']) != 1)}, this lr "
                    f"{r['mine']:.1f} %") if pd.notna(r["chosen"]) and pd.notna(r["mine"]) else ""
        why[r[ROW]] = f"{LR}: lr {r['chosen_lr']} drawn ({r['lr_rule']}{compared}; --all-lrs draws every lr)"
    mapped = rows[ROW].map(why)
    reasons[mapped.notna()] = mapped[mapped.notna()]
    return reasons


def unexplained_reason(row: pd.Series) -> str:
    """Why a run that no selection step left out is in no figure."""
    if row["kind"] == ORIGINAL_RUN:
        return f"{ORIGINAL}: an original model evaluated unlike every trained run (no recipe of the figures)"
    blocks = [c for c in ("source_block", "destination_block") if c in row.index]
    if pd.isna(row["source_stage"]) and any(pd.notna(row[c]) and str(row[c]) != "" for c in blocks):
        return f"{BLOCKS}: the figures draw stage cuts (python -m stitching.matrix draws block cuts)"
    return f"{NO_FIGURE}: none of the figures draws this kind of run"


def left_out_note(reasons: pd.Series, noun: tuple[str, str] = ("run", "runs")) -> str:
    """The legend's line about the runs (``noun``: singular, plural) the selection left out, e.g. ``not drawn: 4
    runs of this pair (another lr: 2; --default-options: 2), listed in selection.md``; '' when none."""
    reasons = reasons[reasons != ""]
    if reasons.empty:
        return ""
    counts = reasons.map(lambda r: r.split(":")[0]).value_counts(sort=False)
    parts = "; ".join(f"{why}: {n}" for why, n in counts.items())
    return f"not drawn: {len(reasons)} {noun[len(reasons) != 1]} ({parts}), listed in selection.md"


def _places(names: list[str]) -> str:
    """``stage, MACs, Table 1``; a name repeated (an original drawn in several pairs' figures) once, counted:
    ``stage ×3``."""
    counts = {name: names.count(name) for name in names}
    return ", ".join(name if n == 1 else f"{name} ×{n}" for name, n in counts.items())


def _gap(row) -> str:
    if pd.notna(row["source_stage"]) and pd.notna(row["destination_stage"]):
        return f"{int(row['source_stage'])}->{int(row['destination_stage'])}"
    return str(row["gap"]) if "gap" in row.index and pd.notna(row["gap"]) else ""


def selection_table(runs: pd.DataFrame, reasons: pd.Series, shown: dict[int, list[str]],
                    recipes: dict[int, str] | None = None) -> pd.DataFrame:
    """Every run of ``runs`` (numbered), grouped by scenario: columns :data:`SELECTION_COLUMNS` -- ``shown``
    (``yes`` / ``no``), ``recipe`` (what sets the run's recipe apart, where ``recipes`` names it), ``pair``, ``gap``,
    ``method``, ``lr``, ``runs``, ``top1`` (mean ± standard error) and ``where``: the figures and tables it is in
    (``shown``: run number -> their names) or why it is in none (``reasons``, else :func:`unexplained_reason`)."""
    if runs.empty:
        return pd.DataFrame(columns=SELECTION_COLUMNS)
    runs = add_labels(runs)
    model = runs["source"].where(runs["source"].notna(), runs["destination"]).map(arch_name)
    table = pd.DataFrame({
        "shown": ["yes" if shown.get(r) else "no" for r in runs[ROW]],
        "recipe": [(recipes or {}).get(r, "") for r in runs[ROW]],
        "pair": [m if k == ORIGINAL_RUN else f"{arch_name(s)} -> {arch_name(d)}"
                 for k, m, s, d in zip(runs["kind"], model, runs["source"], runs["destination"])],
        "gap": [_gap(r) for _, r in runs.iterrows()],
        "method": runs["method"],
        "lr": ["" if k == ORIGINAL_RUN else canonical(v) for k, v in zip(runs["kind"], runs["lr"])],
        "where": [_places(shown[r]) if shown.get(r) else (why or unexplained_reason(row))
                  for r, why, (_, row) in zip(runs[ROW], reasons.reindex(runs.index).fillna(""), runs.iterrows())],
        "top1": runs["top1"].astype(float),
        "_order": [method_sort_key(k, a, r) for k, a, r in zip(runs["kind"], runs["adapter"], runs["resize"])],
        "_s": pd.to_numeric(runs["source_stage"], errors="coerce"),
        "_t": pd.to_numeric(runs["destination_stage"], errors="coerce"),
        "_lr": pd.to_numeric(runs["lr"], errors="coerce"),
    })
    keys = ["shown", "recipe", "pair", "gap", "method", "lr", "where"]
    grouped = table.groupby(keys, sort=False, dropna=False)
    out = grouped.agg(runs=("top1", "count"), mean=("top1", "mean"), _order=("_order", "first"),
                      _s=("_s", "first"), _t=("_t", "first"), _lr=("_lr", "first")).reset_index()
    se = standard_error(grouped["top1"]).to_numpy()
    out["top1"] = [format_accuracy(m, s, n) for m, s, n in zip(out["mean"], se, out["runs"])]
    out["_original"] = out["method"] == "Original"
    out = out.sort_values(["_original", "recipe", "pair", "_s", "_t", "_order", "method", "_lr"], kind="stable",
                          na_position="first")
    return out[SELECTION_COLUMNS].reset_index(drop=True)


def _shown_table(table: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in SELECTION_COLUMNS if c != "recipe" or (table["recipe"] != "").any()]
    out = table[columns].rename(columns={"shown": "Shown", "recipe": "Recipe", "pair": "Pair", "gap": "Gap",
                                         "method": "Method", "lr": "lr", "runs": "Runs", "top1": "Top-1",
                                         "where": "Drawn in / left out because"})
    return out


def _markdown(table: pd.DataFrame) -> str:
    return to_markdown(_shown_table(table), right=("lr", "Runs", "Top-1"))


def _recipes(recipes: dict[str, str] | None) -> str:
    return "Recipes: " + "; ".join(f"{k} = {v}" for k, v in recipes.items()) + "." if recipes else ""


def selection_markdown(table: pd.DataFrame, legend: str = "", recipes: dict[str, str] | None = None) -> str:
    """``selection.md``: a headline (runs shown and left out), ``legend`` (what the figure names mean), the
    ``recipes`` (folder -> what sets it apart) where there are several, the table."""
    runs = int(table["runs"].sum()) if len(table) else 0
    hidden = int(table.loc[table["shown"] == "no", "runs"].sum()) if len(table) else 0
    head = (f"**What the figures show.** {runs} run{'s' * (runs != 1)}: {runs - hidden} drawn, {hidden} left "
            f"out (the reason on each line; top-1 % as mean ± standard error over the runs of the line).")
    parts = (head, legend, _recipes(recipes), _markdown(table) if len(table) else "")
    return "\n\n".join(p for p in parts if p) + "\n"


def selection_text(table: pd.DataFrame, recipes: dict[str, str] | None = None, limit: int = PRINT_LINES) -> str:
    """The table for the command line: every line when there are at most ``limit``, else the left-out lines and
    a count of the others (all of them are in ``selection.md``); the ``recipes`` where there are several."""
    if table.empty:
        return "selection: no runs"
    hidden = table[table["shown"] == "no"]
    runs, left = int(table["runs"].sum()), int(hidden["runs"].sum())
    head = f"selection: {runs - left} of {runs} runs drawn, {left} left out"
    if recipes:
        head += "\n" + _recipes(recipes)
    if len(table) <= limit:
        return head + "\n" + _markdown(table)
    head += f"\n({len(table) - len(hidden)} lines of drawn runs not printed: every line is in selection.md)"
    return head + ("\n" + _markdown(hidden) if len(hidden) else "")
