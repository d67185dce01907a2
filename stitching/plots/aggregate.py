"""From one row per run to one row per scenario: what every figure and table plots.

Owns:

- :func:`load_results`: read a results CSV written by ``python -m stitching.collect``.
- :func:`share_resize_free`: where a gap needs no resizing, the three resize modes build the same module,
  so the sweep trains it once and the row says ``resize=none`` (see :mod:`stitching.results.schema`);
  this copies those rows to the other resize modes so every method's line is complete.
- :func:`lr_choice`: the learning rate drawn for every scenario and why: the fine-tuning baseline's by the best
  **mean over seeds** (never the best single seed), as the paper does; a stitched scenario's the recipe's
  adapter lr where it ran it. :func:`best_finetune_lr` / :func:`select_adapter_lr` keep those rows;
  :func:`lr_statement` says in words what a figure's rows show.
- :func:`aggregate`: mean, standard error (std / sqrt(n), ddof=1; 0 for n = 1) and n over seeds.
- :func:`prepare`: all of the above in the order the figures need (``all_lrs``: every lr, each its own line).

Every grouping (scenarios, learning-rate choices, originals) also keys on the recipe
(:data:`stitching.results.recipe.RECIPE_COLUMNS`): rows of two recipes are never averaged together.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from stitching.kinds import FINETUNE, ORIGINAL, RESIZES, STITCHED
from stitching.plots.labels import add_labels, arch_name
from stitching.results.collect import infer_resize_modes, normalize_columns
from stitching.results.schema import REQUIRED_COLUMNS
from stitching.results.recipe import EVAL_COLUMNS, canonical, group_columns

#: One scenario = one point of one line in a figure; seeds are averaged within it.
SCENARIO_KEYS = ["source", "destination", "source_stage", "destination_stage", "method", "lr"]
#: The recipe's learning rate for adapters (paper: AdamW lr 0.002).
ADAPTER_LR = 0.002


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results CSV; raise ``FileNotFoundError`` / ``ValueError`` with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results CSV not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"gap": str, "run_id": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"results CSV is empty: {path}") from None
    if df.empty:
        raise ValueError(f"results CSV has no rows: {path}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results CSV {path} lacks columns: {', '.join(missing)}")
    return normalize_columns(df)


def recipe_keys(df: pd.DataFrame, columns: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with its recipe columns in canonical spelling (so ``10`` and ``10.0`` group together), and them."""
    columns = group_columns(df) if columns is None else [c for c in columns if c in df.columns]
    if not columns:
        return df, []
    return df.assign(**{c: df[c].map(canonical) for c in columns}), columns


def share_resize_free(df: pd.DataFrame) -> pd.DataFrame:
    """Copy stitched rows to the resize modes that share their module.

    Rows with ``resize_modes`` (the trainer names every mode that builds the row's module; for rows of older runs
    collection infers it, :func:`stitching.results.collect.infer_resize_modes`) are copied to each of those
    modes -- resize-free gaps and "integrated" chains that must upsample (the bilinear module) -- unless that mode
    was also run on its own. Copies carry ``resize_shared=True``; every other row has ``False``. Non-stitched rows
    are untouched.
    """
    out = infer_resize_modes(df)        # (a collected table has them already; a hand-made one gets them here)
    if "resize_shared" in out.columns:
        out["resize_shared"] = out["resize_shared"].fillna(False).astype(bool)
    else:
        out["resize_shared"] = False
    stitched = out[out["kind"] == STITCHED]
    if stitched.empty or "resize_modes" not in stitched.columns:
        return out
    # (raw strings: the canonical spelling of the value "none" is empty, which would read as unknown)
    modes = stitched["resize_modes"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    known = modes != ""
    own = stitched["resize"].map(canonical)
    copies = [stitched[known & modes.map(lambda ms, m=mode: m in ms.split("|")) & (own != mode)]
              .assign(resize=mode) for mode in RESIZES]
    shared = pd.concat(copies, ignore_index=True)
    if not shared.empty:
        # a mode that was also run on its own (outside a sweep) keeps its own rows only
        same = [c for c in ["source", "destination", "source_stage", "destination_stage", "adapter",
                            "schedule", "resize", "lr", "seed", *group_columns(stitched)] if c in shared]
        mine = recipe_keys(shared, same)[0][same]                      # canonical strings
        theirs = recipe_keys(stitched, same)[0][same].drop_duplicates()
        run_too = mine.merge(theirs, how="left", on=same, indicator=True)["_merge"] == "both"
        shared = shared[~run_too.to_numpy()]
    if not shared.empty:
        shared["resize_shared"] = True
        out = pd.concat([out, shared[out.columns]], ignore_index=True)
    return out


#: the keys within which one learning rate is chosen, per kind of run (a stitched scenario is also its method)
LR_KEYS = {FINETUNE: ["source", "destination", "source_stage", "destination_stage"],
           STITCHED: ["source", "destination", "source_stage", "destination_stage", "method"]}
#: why a scenario's learning rate was chosen
RULE_ADAPTER_LR = "the recipe's adapter lr"
RULE_BEST_MEAN = "best mean top-1 over seeds"
#: the columns :func:`lr_choice` adds (and :func:`prepare` keeps)
LR_CHOICE_COLUMNS = ["chosen_lr", "lr_rule", "lrs_run"]


def lr_choice(df: pd.DataFrame, adapter_lr: float = ADAPTER_LR) -> pd.DataFrame:
    """The learning rate the figures draw for every stitched and fine-tuning run's scenario, row by row.

    Returns a frame indexed like ``df`` with ``chosen_lr`` (the chosen lr, canonical spelling), ``lr_rule``
    (why: :data:`RULE_ADAPTER_LR` or :data:`RULE_BEST_MEAN`) and ``lrs_run`` (how many lrs the scenario ran);
    '' / '' / 0 for other kinds. A scenario is :data:`LR_KEYS` of its kind and its recipe. Fine-tuning takes the
    lr with the best **mean** top-1 over seeds (never the best single seed), as the paper does; a stitched
    scenario the recipe's ``adapter_lr`` where it ran it, else the best mean. Ties go to the smaller lr.
    """
    index = df.index
    df = df.reset_index(drop=True)          # row positions: the caller's index need not be unique
    out = pd.DataFrame({"chosen_lr": "", "lr_rule": "", "lrs_run": 0}, index=df.index)
    if df.empty:
        return out.set_axis(index)
    df = df if "method" in df.columns else add_labels(df)
    for kind, keys in LR_KEYS.items():
        rows = df[df["kind"] == kind]
        if rows.empty:
            continue
        rows, recipe = recipe_keys(rows)
        group = rows.groupby(keys + recipe, dropna=False, sort=False).ngroup()
        lr = rows["lr"].map(canonical)
        means = rows.groupby([group, lr], sort=False)["top1"].mean().rename("top1").reset_index()
        means.columns = ["group", "lr", "top1"]
        means["value"] = pd.to_numeric(means["lr"], errors="coerce")
        # highest mean first; ties go to the smaller lr so the choice is deterministic
        best = means.sort_values(["top1", "value"], ascending=[False, True], kind="stable").drop_duplicates("group")
        chosen = best.set_index("group")["lr"]
        rule = pd.Series(RULE_BEST_MEAN, index=chosen.index)
        if kind == STITCHED:
            at = means[np.isclose(means["value"].astype(float), adapter_lr)].drop_duplicates("group")
            chosen.loc[at["group"].to_numpy()] = at["lr"].to_numpy()
            rule.loc[at["group"].to_numpy()] = RULE_ADAPTER_LR
        out.loc[rows.index, "chosen_lr"] = group.map(chosen).to_numpy()
        out.loc[rows.index, "lr_rule"] = group.map(rule).to_numpy()
        out.loc[rows.index, "lrs_run"] = group.map(means.groupby("group").size()).to_numpy()
    return out.set_axis(index)


def _keep_chosen_lr(df: pd.DataFrame, kind: str, adapter_lr: float) -> pd.DataFrame:
    choice = lr_choice(df, adapter_lr)
    other = (df["kind"] != kind).to_numpy()
    return df[other | (df["lr"].map(canonical) == choice["chosen_lr"]).to_numpy()].reset_index(drop=True)


def best_finetune_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, per fine-tuning scenario, only the rows of the lr with the best **mean** top1 over seeds.

    A scenario is (source, destination, source_stage, destination_stage) and its recipe. Rows of other kinds are
    returned unchanged. (Choosing by the best single seed would reward noise; the paper reports the best mean.)
    """
    return _keep_chosen_lr(df, FINETUNE, ADAPTER_LR)


def select_adapter_lr(df: pd.DataFrame, adapter_lr: float = ADAPTER_LR) -> pd.DataFrame:
    """Keep one lr per stitched scenario when several were run (e.g. the paper's Figure 7 sweep).

    The recipe's ``adapter_lr`` where that scenario ran it, otherwise the lr with the best mean over seeds.
    Rows of other kinds are returned unchanged.
    """
    df = df if "method" in df.columns else add_labels(df)
    return _keep_chosen_lr(df, STITCHED, adapter_lr)


def prepare(df: pd.DataFrame, adapter_lr: float = ADAPTER_LR, all_lrs: bool = False) -> pd.DataFrame:
    """Runs ready for plotting: shared resize-free rows, ``method`` labels, one lr per scenario (every lr with
    ``all_lrs``, each then a method of its own where a scenario ran several: ``"Downsample, Linear · lr 0.01"``),
    and :func:`lr_choice`'s columns, so a figure can say which lr it shows and why."""
    return choose_lrs(add_labels(share_resize_free(df)), adapter_lr, all_lrs)


def lr_candidates(df: pd.DataFrame, adapter_lr: float = ADAPTER_LR) -> pd.DataFrame:
    """:func:`prepare`'s rows before the choice: every lr, labels unchanged, with :func:`lr_choice`'s columns."""
    out = add_labels(share_resize_free(df)).reset_index(drop=True).drop(columns=LR_CHOICE_COLUMNS, errors="ignore")
    return pd.concat([out, lr_choice(out, adapter_lr)], axis=1)


def choose_lrs(df: pd.DataFrame, adapter_lr: float = ADAPTER_LR, all_lrs: bool = False) -> pd.DataFrame:
    """:func:`prepare`'s last step on rows that already have ``method`` labels."""
    out = df.reset_index(drop=True).drop(columns=LR_CHOICE_COLUMNS, errors="ignore")
    out = pd.concat([out, lr_choice(out, adapter_lr)], axis=1)
    if all_lrs:
        # a method of a pair run at several lrs (at any gap): one line per lr, named by it
        keyed, recipe = recipe_keys(out)
        family = ["kind", "source", "destination", "method", *recipe]
        lrs = out["lr"].map(canonical)
        several = lrs.groupby([keyed[c] for c in family], dropna=False).transform("nunique") > 1
        out.loc[several, "method"] = out.loc[several, "method"] + " · lr " + lrs[several]
        return out
    keep = ~out["kind"].isin(list(LR_KEYS)) | (out["lr"].map(canonical) == out["chosen_lr"])
    return out[keep].reset_index(drop=True)


def lr_statement(rows: pd.DataFrame, all_lrs: bool = False) -> str:
    """What learning rates ``rows`` (:func:`prepare`'s, one figure's) show, in words, e.g. ``adapters at lr 0.002
    (the recipe's adapter lr; another lr left out) · fine-tuning at its best mean lr (0.0002, 0.002)``."""
    parts = []
    for kind, who in ((STITCHED, "adapters"), (FINETUNE, "fine-tuning")):
        mine = rows[rows["kind"] == kind] if "lrs_run" in rows.columns else rows.iloc[0:0]
        if mine.empty:
            continue
        lrs = ", ".join(sorted(set(mine["lr"].map(canonical)), key=float))
        several = int(mine["lrs_run"].max()) > 1
        if all_lrs:
            parts.append(f"{who} at every lr run ({lrs})")
        elif kind == FINETUNE and several:
            parts.append(f"{who} at its best mean lr per gap ({lrs}; other lrs left out)")
        elif several:
            rules = sorted(set(mine.loc[mine["lrs_run"] > 1, "lr_rule"]))
            parts.append(f"{who} at lr {lrs} ({'; '.join(rules)}; other lrs left out)")
        else:
            parts.append(f"{who} at lr {lrs}")
    return " · ".join(parts)


def standard_error(values: pd.core.groupby.SeriesGroupBy) -> pd.Series:
    count = values.count()
    se = values.std(ddof=1) / np.sqrt(count)
    return se.where(count > 1, 0.0).where(count > 0)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per scenario (source, destination, source_stage, destination_stage, method, lr) and recipe.

    Columns: the scenario keys, the recipe columns ``df`` has (canonical spelling; see
    :mod:`stitching.results.recipe`), ``kind``, ``adapter``, ``resize``, ``n`` (runs averaged), ``top1_mean``,
    ``top1_se``, ``macs_mean``, ``macs_se``. Standard error is std (ddof=1) / sqrt(n), 0 when n = 1.
    Adds ``method`` labels first when ``df`` has none. Does not choose learning rates: see :func:`prepare`.
    Two recipes in ``df`` give two rows per scenario, never one average.
    """
    df = df if "method" in df.columns else add_labels(df)
    df, recipe = recipe_keys(df)
    keys = SCENARIO_KEYS + recipe
    columns = keys + ["kind", "adapter", "resize", "n", "top1_mean", "top1_se", "macs_mean", "macs_se"]
    if df.empty:
        return pd.DataFrame(columns=columns)
    grouped = df.groupby(keys, dropna=False, sort=True)
    out = pd.DataFrame({
        "kind": grouped["kind"].first(),
        "adapter": grouped["adapter"].first(),
        "resize": grouped["resize"].first(),
        "n": grouped["top1"].count(),
        "top1_mean": grouped["top1"].mean(),
        "top1_se": standard_error(grouped["top1"]),
        "macs_mean": grouped["macs"].mean(),
        "macs_se": standard_error(grouped["macs"]),
    }).reset_index()
    return out[columns]


def originals(df: pd.DataFrame) -> pd.DataFrame:
    """The unstitched reference models (``kind`` :data:`~stitching.kinds.ORIGINAL`), one row per model.

    Columns: ``model`` (raw name), ``name`` (short name), ``n``, ``top1_mean``, ``top1_se``, ``macs_mean``.
    """
    rows = df[df["kind"] == ORIGINAL]
    columns = ["model", "name", "n", "top1_mean", "top1_se", "macs_mean"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.assign(model=rows["source"].where(rows["source"].notna(), rows["destination"]).astype(str))
    rows, recipe = recipe_keys(rows, list(EVAL_COLUMNS))   # evaluated otherwise: another reference row
    grouped = rows.groupby(["model", *recipe], sort=True, dropna=False)
    out = pd.DataFrame({
        "n": grouped["top1"].count(),
        "top1_mean": grouped["top1"].mean(),
        "top1_se": standard_error(grouped["top1"]),
        "macs_mean": grouped["macs"].mean(),
    }).reset_index()
    out["name"] = out["model"].map(arch_name)
    return out[columns + recipe]
