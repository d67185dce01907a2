"""How well cheap numbers predict a trained stitching matrix: Spearman's rho over cells and the top cells' agreement.

Owns the predictors (:data:`PREDICTORS`: a closed-form matrix's top-1, and the similarity at the join before
any training -- linear CKA, the least-squares residual -- which a closed-form matrix measures in every cell),
the comparison (:func:`compare`) and its command line::

    python -m stitching.matrix.predict TRAINED_MATRIX.csv CLOSED_FORM_MATRIX.csv [--out DIR]

Both files are ``matrix.csv`` tables (:mod:`stitching.matrix.cells`) of the same matrix. A cell is (control,
sender cut, receiver cut); only cells present in both (with a value) are compared. Per predictor and per scope
-- every cell of every matrix together (``all``), and each matrix (trained, each random-init control) alone:

- ``rho``: Spearman's rank correlation between the trained top-1 and the predictor (the residual with its
  sign flipped: a lower residual predicts a better stitch), ranks averaged over ties;
- ``top``: agreement of the top cells: of the trained matrix's best k cells (k = a quarter of the cells
  compared, at least 1), the fraction that are also among the predictor's best k.

The calibrated scores are compared the same way (the closed-form matrix's ``calibrated_<control>`` against the
trained one's). ``--out DIR`` writes ``prediction.md`` (the table) and ``prediction.png``
(:func:`stitching.plots.matrix.plot_prediction`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stitching import cli
from stitching import rundir as R
from stitching.cli import run_cli
from stitching.config import ConfigError
from stitching.matrix.cells import CALIBRATED_COLUMNS, CELL_COLUMNS
from stitching.matrix.spec import CONTROL_NAMES, CONTROLS

#: label -> (matrix.csv column of the predicting table, +1 if higher predicts higher top-1, -1 if lower does)
PREDICTORS = {"closed-form top-1": ("top1_mean", 1), "CKA before training": ("cka", 1),
              "least-squares residual": ("ls_residual", -1)}
TRUTH = "top1_mean"


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN for fewer than 3 pairs or a constant
    side)."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    if len(x) < 3:
        return float("nan")
    rx, ry = x.rank(method="average"), y.rank(method="average")
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def top_agreement(truth, predicted, k: int) -> float:
    """Of the ``k`` largest ``truth`` entries, the fraction also among the ``k`` largest ``predicted`` (ties
    broken by position, stable)."""
    truth, predicted = np.asarray(truth, dtype=float), np.asarray(predicted, dtype=float)
    best = set(np.argsort(-truth, kind="stable")[:k])
    return len(best & set(np.argsort(-predicted, kind="stable")[:k])) / k


def paired(trained: pd.DataFrame, other: pd.DataFrame, column: str, truth: str = TRUTH) -> pd.DataFrame:
    """The cells in both tables with a value: ``control``, the cuts, ``trained`` and ``predictor``."""
    if column not in other.columns or truth not in trained.columns:
        return pd.DataFrame(columns=[*CELL_COLUMNS, "trained", "predictor"])
    left = trained[CELL_COLUMNS + [truth]].rename(columns={truth: "trained"})
    right = other[CELL_COLUMNS + [column]].rename(columns={column: "predictor"})
    both = left.merge(right, on=CELL_COLUMNS).dropna(subset=["trained", "predictor"])
    return both.reset_index(drop=True)


def _scores(df: pd.DataFrame, sign: int) -> dict:
    n = len(df)
    k = max(1, round(n / 4))
    return {"n": n, "rho": spearman(df["trained"], sign * df["predictor"]), "top_k": k,
            "top": top_agreement(df["trained"], sign * df["predictor"], k) if n else float("nan")}


def compare(trained: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """One row per predictor and scope (see the module docstring): ``predictor``, ``scope``, ``n``, ``rho``,
    ``top_k``, ``top``."""
    rows = []
    for label, (column, sign) in PREDICTORS.items():
        both = paired(trained, other, column)
        if not len(both):
            continue
        rows.append({"predictor": label, "scope": "all", **_scores(both, sign)})
        for control in CONTROLS:
            part = both[both["control"] == control]
            if len(part):
                rows.append({"predictor": label, "scope": CONTROL_NAMES[control], **_scores(part, sign)})
    for control, column in CALIBRATED_COLUMNS.items():
        both = paired(trained, other, column, truth=column)
        if len(both):
            rows.append({"predictor": f"closed-form {column}", "scope": f"calibrated against the {CONTROL_NAMES[control]}",
                         **_scores(both, 1)})
    return pd.DataFrame(rows, columns=["predictor", "scope", "n", "rho", "top_k", "top"])


def markdown(table: pd.DataFrame) -> str:
    lines = ["| predictor | cells | n | Spearman rho | top cells agreeing |", "| --- | --- | ---: | ---: | ---: |"]
    for _, r in table.iterrows():
        rho = "--" if not np.isfinite(r["rho"]) else f"{r['rho']:.2f}"
        top = f"{round(r['top'] * r['top_k'])} of {r['top_k']}"
        lines.append(f"| {r['predictor']} | {r['scope']} | {r['n']} | {rho} | {top} |")
    return "\n".join(lines) + "\n"


def _read(path: str, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(what, path, "command line", "file not found (a matrix.csv written by python -m stitching.matrix)")
    df = pd.read_csv(p)
    missing = [c for c in CELL_COLUMNS + [TRUTH] if c not in df.columns]
    if missing:
        raise ConfigError(what, path, "command line", f"not a matrix.csv: no column {', '.join(missing)}")
    return df


def main(argv=None) -> int:
    parser = cli.parser("python -m stitching.matrix.predict", __doc__, [
        "python -m stitching.matrix.predict runs/tiny_matrix/matrix.csv runs/tiny_matrix-closed-form/matrix.csv "
        "--out figures/"],
        {R.EXIT_OK: "the table is printed (and written with its figure under --out)",
         R.EXIT_CONFIG: "a file is missing or not a matrix.csv: one line names it"})
    parser.add_argument("trained", help="the trained matrix's matrix.csv")
    parser.add_argument("closed_form", help="the closed-form matrix's matrix.csv (the predictors)")
    parser.add_argument("--out", help="write prediction.md and prediction.png into this folder")
    args = parser.parse_args(argv)
    trained, other = _read(args.trained, "trained"), _read(args.closed_form, "closed_form")
    table = compare(trained, other)
    text = markdown(table)
    print(text, end="")
    if args.out:
        from stitching.plots.figures import NoData
        from stitching.plots.labels import arch_name
        from stitching.plots.matrix import plot_prediction
        from stitching.rundir import atomic_write

        out = Path(args.out)
        atomic_write(out / "prediction.md", text.encode())
        pairs, rhos = {}, {}
        for label, (column, sign) in PREDICTORS.items():     # rho of the oriented predictor, as in the table
            label += "\n(lower: better; rho of its negative)" if sign < 0 else ""
            pairs[label] = paired(trained, other, column)
            rhos[label] = spearman(pairs[label]["trained"], sign * pairs[label]["predictor"])
        title = ""
        if {"sender", "receiver"} <= set(trained.columns) and len(trained):
            title = f"{arch_name(trained['sender'].iloc[0])} → {arch_name(trained['receiver'].iloc[0])}: " \
                    "what predicts the trained matrix"
        try:
            print(f"wrote {out / 'prediction.md'}, {plot_prediction(pairs, rhos, out / 'prediction.png', title)}")
        except NoData as err:
            print(f"wrote {out / 'prediction.md'}; no figure: {err}")
    return 0


if __name__ == "__main__":
    run_cli(main)
