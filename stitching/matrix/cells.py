"""A matrix's cells read back from the tidy results table, with the relative depth of each cut.

Owns: which result rows belong to a matrix and which cell each is (:func:`cell_of`: control, sender cut,
receiver cut -- from the result columns ``random_init``, ``source_stage``/``destination_stage`` or
``source_block``/``destination_block``), the cell table (:func:`cell_table`: one row per control and cell,
top-1 mean, standard error and count over seeds; written as ``matrix.csv``) and the relative depth of a cut
(:func:`cut_depths`): the fraction of a model's blocks that run on its side of the join. A sender cut's
depth is (blocks in the prefix) / (blocks of the sender); a receiver cut's, (blocks of the receiver *before*
the join, i.e. skipped) / (blocks of the receiver). Their difference (receiver - sender) is > 0 where the
stitch skips layers, < 0 where it goes backwards (the receiver repeats layers), 0 where it joins
corresponding depths.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from stitching.config import CUT_KEYS
from stitching.matrix.spec import CONTROLS, Matrix

CELL_COLUMNS = ["control", "sender_cut", "receiver_cut"]
TABLE_COLUMNS = [*CELL_COLUMNS, "sender", "receiver", "sender_depth", "receiver_depth", "depth_difference",
                 "top1_mean", "top1_se", "n", "run_dirs"]


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
    rows = results[(results["kind"] == "stitched") & (results["source"] == matrix.sender)
                   & (results["destination"] == matrix.receiver)]
    s_col, r_col = result_columns(matrix.cuts)
    if s_col not in rows.columns or r_col not in rows.columns:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    rows = rows.dropna(subset=[s_col, r_col, "top1"])
    if run_names is not None:
        rows = rows[rows["run_dir"].map(lambda d: str(d).split("/")[-1] in run_names)]
    out = []
    cells = {}
    for _, row in rows.iterrows():
        cells.setdefault(cell_of(row, matrix.cuts), []).append(row)
    for (control, i, j), group in cells.items():
        if control not in matrix.controls or i not in matrix.sender_cuts or j not in matrix.receiver_cuts:
            continue
        top1 = np.array([float(g["top1"]) for g in group])
        kwargs = _kwargs(group[0])
        d_s, d_r = cut_depths(matrix.cuts, matrix.sender, kwargs.get("source"), matrix.receiver,
                              kwargs.get("destination"), i, j, int(float(group[0]["img_size"])))
        out.append({"control": control, "sender_cut": i, "receiver_cut": j, "sender": matrix.sender,
                    "receiver": matrix.receiver, "sender_depth": d_s, "receiver_depth": d_r,
                    "depth_difference": d_r - d_s, "top1_mean": top1.mean(),
                    "top1_se": top1.std(ddof=1) / np.sqrt(len(top1)) if len(top1) > 1 else np.nan,
                    "n": len(top1), "run_dirs": "|".join(sorted(str(g["run_dir"]) for g in group))})
    table = pd.DataFrame(out, columns=TABLE_COLUMNS)
    order = {c: k for k, c in enumerate(CONTROLS)}
    return table.sort_values(["control", "sender_cut", "receiver_cut"], key=lambda c: c.map(order)
                             if c.name == "control" else c, kind="stable").reset_index(drop=True)


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
