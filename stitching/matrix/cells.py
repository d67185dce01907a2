"""A matrix's cells read back from the tidy results table, with the relative depth of each cut.

Owns: which result rows belong to a matrix and which cell each is (:func:`cell_of`: control, sender cut,
receiver cut -- from the result columns ``random_init``, ``source_stage``/``destination_stage`` or
``source_block``/``destination_block``), the cell table (:func:`cell_table`: one row per control and cell,
top-1 mean, standard error and count over seeds; written as ``matrix.csv``), what its columns beyond accuracy
mean -- ``fit`` (:data:`FITS`: trained, or ``closed_form``: least-squares adapters without training), the
receiver's own accuracy (``receiver_top1``), the calibrated scores (:func:`calibrated`, columns
:data:`CALIBRATED_COLUMNS` and their standard errors), the similarity at the join (``cka``, ``ls_residual``:
before any training; ``init_residual``: the least-squares fit's) -- and the relative depth of a cut
(:func:`cut_depths`): the fraction of a model's blocks that run on its side of the join. A sender cut's
depth is (blocks in the prefix) / (blocks of the sender); a receiver cut's, (blocks of the receiver *before*
the join, i.e. skipped) / (blocks of the receiver). Their difference (receiver - sender) is > 0 where the
stitch skips layers, < 0 where it goes backwards (the receiver repeats layers), 0 where it joins
corresponding depths.

Calibrated scores: a cell of the trained matrix (control ``none``) is read against the same cell of each
random-init control c, seed by seed (the control's random weights follow the seed):
``(acc - acc_c) / (acc_receiver - acc_c)``, where ``acc_receiver`` is the receiver's own top-1 (its original
network evaluated alone, with its own preprocessing: the accuracy a stitch that hands the receiver exactly its own
representation reaches, so 1 means "as good as the receiver itself", 0 "no better than the control"; above 1
the stitched network beats the receiver). Mean and standard error over the seeds both matrices ran; undefined
(empty) where the control reaches the receiver's accuracy.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from stitching.config import CUT_KEYS
from stitching.kinds import ORIGINAL, STITCHED
from stitching.matrix.spec import CONTROLS, Matrix

CELL_COLUMNS = ["control", "sender_cut", "receiver_cut"]
#: how a cell's adapters came about: trained (the recipe's epochs), or fitted by least squares with no training
FITS = ("trained", "closed_form")
#: per random-init control, the column of the trained cells' calibrated score against it
CALIBRATED_COLUMNS = {c: f"calibrated_{c}" for c in CONTROLS[1:]}
TABLE_COLUMNS = [*CELL_COLUMNS, "sender", "receiver", "sender_depth", "receiver_depth", "depth_difference",
                 "top1_mean", "top1_se", "n", "fit", "receiver_top1",
                 *(x for col in CALIBRATED_COLUMNS.values() for x in (col, f"{col}_se")),
                 "cka", "ls_residual", "init_residual", "run_dirs"]


def calibrated(acc: float, control: float, receiver: float) -> float:
    """``(acc - control) / (receiver - control)``; NaN where the control reaches the receiver's accuracy."""
    return (acc - control) / (receiver - control) if receiver > control else float("nan")


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def _number(row, column: str) -> float:
    value = pd.to_numeric(pd.Series([row.get(column)]), errors="coerce").iloc[0]
    return float(value) if pd.notna(value) else float("nan")


def fit_of(row) -> str:
    """A row's :data:`FITS`: ``closed_form`` for least-squares adapters evaluated without training."""
    return "closed_form" if str(row.get("init")) == "least_squares" and _number(row, "epochs") == 0 else "trained"


def result_columns(cuts: str) -> tuple[str, str]:
    """The result columns holding a cell's sender and receiver cut (the config keys without ``model.``)."""
    return tuple(k.partition(".")[2] for k in CUT_KEYS[cuts])


def control_of(value) -> str:
    """A row's control (``random_init``; an empty cell -- a run from before the key existed -- is ``none``)."""
    text = "" if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else str(value)
    return text.strip() or "none"


def cell_of(row, cuts: str) -> tuple[str, int, int]:
    """(control, sender cut, receiver cut) of one result row."""
    s, r = result_columns(cuts)
    return control_of(row.get("random_init")), int(float(row[s])), int(float(row[r]))


def cell_table(results: pd.DataFrame, matrix: Matrix, run_names: set[str] | None = None) -> pd.DataFrame:
    """One row per (control, sender cut, receiver cut) of ``matrix`` found in ``results`` (the stitched rows of
    its sender and receiver; with ``run_names``, only those run directories): top-1 mean over seeds, its
    standard error, the count, and the cuts' relative depths."""
    rows = results[(results["kind"] == STITCHED) & (results["source"] == matrix.sender)
                   & (results["destination"] == matrix.receiver)]
    s_col, r_col = result_columns(matrix.cuts)
    if s_col not in rows.columns or r_col not in rows.columns:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    mine = (lambda d: str(d).split("/")[-1] in run_names) if run_names is not None else (lambda d: True)
    rows = rows.dropna(subset=[s_col, r_col, "top1"])
    rows = rows[rows["run_dir"].map(mine)]
    receiver = receiver_top1(results[results["run_dir"].map(mine)] if len(results) else results, matrix.receiver)
    out = []
    cells = {}
    for _, row in rows.iterrows():
        cells.setdefault(cell_of(row, matrix.cuts), []).append(row)
    by_seed = {cell: {_number(g, "seed"): float(g["top1"]) for g in group} for cell, group in cells.items()}
    for (control, i, j), group in cells.items():
        if control not in matrix.controls or i not in matrix.sender_cuts or j not in matrix.receiver_cuts:
            continue
        top1 = np.array([float(g["top1"]) for g in group])
        kwargs = _kwargs(group[0])
        d_s, d_r = cut_depths(matrix.cuts, matrix.sender, kwargs.get("source"), matrix.receiver,
                              kwargs.get("destination"), i, j, int(float(group[0]["img_size"])))
        fits = {fit_of(g) for g in group}
        row = {"control": control, "sender_cut": i, "receiver_cut": j, "sender": matrix.sender,
               "receiver": matrix.receiver, "sender_depth": d_s, "receiver_depth": d_r,
               "depth_difference": d_r - d_s, "top1_mean": top1.mean(),
               "top1_se": top1.std(ddof=1) / np.sqrt(len(top1)) if len(top1) > 1 else np.nan,
               "n": len(top1), "fit": "|".join(sorted(fits)),
               "receiver_top1": receiver,
               "cka": _mean_se([_number(g, "cka_before") for g in group])[0],
               "ls_residual": _mean_se([_number(g, "ls_residual_before") for g in group])[0],
               "init_residual": _mean_se([_number(g, "init_residual") for g in group])[0],
               "run_dirs": "|".join(sorted(str(g["run_dir"]) for g in group))}
        for c, col in CALIBRATED_COLUMNS.items():
            row[col] = row[f"{col}_se"] = np.nan
            if control == "none" and (c, i, j) in by_seed and np.isfinite(receiver):
                own, other = by_seed[(control, i, j)], by_seed[(c, i, j)]
                row[col], row[f"{col}_se"] = _mean_se([calibrated(own[s], other[s], receiver)
                                                        for s in own if s in other])
        out.append(row)
    table = pd.DataFrame(out, columns=TABLE_COLUMNS)
    order = {c: k for k, c in enumerate(CONTROLS)}
    return table.sort_values(["control", "sender_cut", "receiver_cut"], key=lambda c: c.map(order)
                             if c.name == "control" else c, kind="stable").reset_index(drop=True)


def receiver_top1(results: pd.DataFrame, receiver: str) -> float:
    """The receiver's own top-1: the mean of the original-model rows of ``receiver`` in ``results`` (NaN
    without one)."""
    if not len(results) or "kind" not in results.columns:
        return float("nan")
    rows = results[(results["kind"] == ORIGINAL) & (results["source"] == receiver)]
    top1 = pd.to_numeric(rows["top1"], errors="coerce").dropna()
    return float(top1.mean()) if len(top1) else float("nan")


def _kwargs(row) -> dict:
    text = row.get("model_kwargs")
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return {}
    return json.loads(text)


def cut_depths(cuts: str, sender: str, sender_kwargs: dict | None, receiver: str, receiver_kwargs: dict | None,
               i: int, j: int, img_size: int = 224) -> tuple[float, float]:
    """Relative depths (sender, receiver) of cell (i, j): see the module docstring. A block's depth is its
    ``relative_depth`` in the model's block list (:func:`stitching.models.trace.list_blocks`: blocks up to
    and including it / all blocks). Stage cuts follow the stage convention: the sender cut is the first block
    of stage i, the receiver cut the first block of stage j (j > i) or the last block of stage i (j == i)."""
    from stitching.models.trace import list_blocks

    src = list_blocks(sender, sender_kwargs or None, img_size)
    dst = list_blocks(receiver, receiver_kwargs or None, img_size)
    if cuts == "blocks":            # source_block i: blocks 0..i run; destination_block j: blocks j+1.. run
        return src[i].relative_depth, dst[j].relative_depth
    first = lambda blocks, st: next(b for b in blocks if b.stage == st and b.first)   # noqa: E731
    last = lambda blocks, st: [b for b in blocks if b.stage == st][-1]                # noqa: E731
    received = first(dst, j) if j > i else last(dst, i)
    return first(src, i).relative_depth, received.relative_depth
