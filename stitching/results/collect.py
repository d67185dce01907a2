"""Collect many run directories into one tidy results table.

Owns: walking a runs folder, reading each run's ``result.csv``, deciding which runs are finished,
unfinished (``config.yaml`` but no ``result.csv``; reported with :func:`stitching.rundir.status` and, for a
run whose trainer said how it ended -- preempted, interrupted, failed -- its last message), damaged (a
``result.csv`` that cannot be read, is too large, does not parse, has other than one row or lacks a required
column; a ``config.yaml`` beside it that cannot be read within :func:`stitching.config.read_yaml`'s bounds:
unreadable, too large, an alias bomb, not YAML) or duplicated (the same run twice: two directories whose ``config.yaml``
are the same run by :func:`stitching.rundir.run_key`, or, without a config, the same ``run_id``; the newest
``finished_at`` wins), and writing the table atomically. Problems are reported, never fatal.

The command line front end is :mod:`stitching.collect`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stitching import rundir
from stitching.config import IDENTITY, ConfigError
from stitching.yamlio import read_yaml
from stitching.kinds import RESIZES, RUN_KINDS, STITCHED, kinds_with
from stitching.messages import clip, short_repr
from stitching.results.recipe import canonical, fill_missing_recipe
from stitching.results.schema import FLOAT_COLUMNS, INT_COLUMNS, REQUIRED_COLUMNS, RESULT_COLUMNS

CONFIG_NAME = rundir.CONFIG
RESULT_NAME = rundir.RESULT


#: The largest ``result.csv`` read (a header and one row: a few KiB); a larger one is reported as damaged unread.
MAX_RESULT_BYTES = 256 * 1024

#: Extra column added by :func:`collect`: the run directory, relative to the runs folder.
RUN_DIR_COLUMN = "run_dir"

@dataclass(frozen=True)
class Problem:
    """One run that was not collected (or was superseded).

    ``kind`` is ``"unfinished"``, ``"damaged"`` or ``"duplicate"``; ``path`` is the run directory
    (for ``duplicate``: the directory whose row was dropped).
    """

    kind: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


class DamagedResult(ValueError):
    """A ``result.csv`` that cannot be used."""


def read_result(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check one ``result.csv``; return its single row (all values as strings).

    Raises :class:`DamagedResult` when it cannot be read, is larger than :data:`MAX_RESULT_BYTES`, cannot be
    parsed, does not have exactly one row, lacks a required column, has an unknown ``kind`` or a non-numeric
    ``top1``.
    """
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise DamagedResult(f"cannot be read: {exc.strerror or type(exc).__name__}") from exc
    if size > MAX_RESULT_BYTES:
        raise DamagedResult(f"{size:,} bytes, larger than a result row can be ({MAX_RESULT_BYTES // 1024} KiB, "
                            "MAX_RESULT_BYTES): not read")
    try:
        row = pd.read_csv(path, dtype=str)
    except Exception as exc:  # pandas raises several types (EmptyDataError, ParserError, Unicode...)
        raise DamagedResult(clip(f"cannot parse: {type(exc).__name__}: {exc}".splitlines()[0])) from exc
    if len(row) != 1:
        raise DamagedResult(f"expected exactly 1 row, found {len(row)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in row.columns]
    if missing:
        raise DamagedResult(f"missing required columns: {', '.join(missing)}")
    kind = row["kind"].iloc[0]
    if kind not in RUN_KINDS:
        raise DamagedResult(f"unknown kind {short_repr(kind)} (expected one of {', '.join(RUN_KINDS)})")
    if pd.isna(pd.to_numeric(row["top1"], errors="coerce").iloc[0]):
        raise DamagedResult(f"top1 is not a number: {short_repr(row['top1'].iloc[0])}")
    return row


def normalize_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Order the columns (RESULT_COLUMNS first, extras after) and give numeric columns the dtypes their
    declaration says (:data:`stitching.results.schema.COLUMNS`: ``float64``; ``Int64`` where whole). A
    recipe column the whole table lacks (collected by a version before it existed) takes its baseline
    (:func:`stitching.results.recipe.fill_missing_recipe`); stitched rows written before ``resize_modes`` get it
    (:func:`infer_resize_modes`), so the plots read one shape."""
    df = fill_missing_recipe(df) if len(df) else df.copy()
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in INT_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        whole = values.dropna()
        df[col] = values.astype("Int64") if (whole == whole.round()).all() else values
    df = infer_resize_modes(df)
    extras = [c for c in df.columns if c not in RESULT_COLUMNS]
    return df[RESULT_COLUMNS + extras]


def _none_like(series: pd.Series) -> pd.Series:
    return series.isna() | (series.astype(str) == "none")


def infer_resize_modes(df: pd.DataFrame) -> pd.DataFrame:
    """``resize_modes`` (every resize mode that builds a row's module) for stitched rows written before the
    trainer said it, so they are shared among those modes as newer rows are
    (:func:`stitching.plots.aggregate.share_resize_free`). Rows that say ``resamples``: one that says
    ``resize=none`` and resamples nothing stands for ``none``, ``bilinear`` and, for an adapter that can stride,
    ``strided``. Older rows without ``resamples``: within each (source, destination, adapter[, schedule]) whose
    rows use a resize mode other than ``none`` somewhere, a gap where *every* row says ``none`` is a gap whose
    sizes already match (the modes build the same module, the sweep trained it once): its rows stand for
    ``none`` and each of those other modes. Rows that say ``resize_modes`` and other rows are left as they are."""
    df = df.assign(**{c: pd.NA for c in ("resize_modes", "resamples", "schedule") if c not in df.columns})
    modes = df["resize_modes"].map(lambda v: "" if pd.isna(v) else str(v).strip())
    legacy = (df["kind"] == STITCHED) & (modes == "")
    if not legacy.any():
        return df
    rows = df[legacy]
    none = _none_like(rows["resize"])
    if "resamples" in rows.columns and rows["resamples"].notna().any() and (rows["resamples"].astype(str) != "").any():
        said = rows["resamples"].notna() & (rows["resamples"].astype(str) != "")
        free = none & said & ~rows["resamples"].map(lambda v: str(v).strip().lower() in ("true", "1"))
        strides = rows["adapter"].isin(kinds_with("strided"))
        found = pd.Series("", index=rows.index, dtype=object)
        found[free] = "none|bilinear"
        found[free & strides] = "none|bilinear|strided"
    else:
        keys = ["source", "destination", "adapter"]
        if rows["schedule"].notna().any() and (rows["schedule"].astype(str) != "").any():
            keys.append("schedule")
        used = rows.loc[~none, keys + ["resize"]].drop_duplicates()
        group = rows[keys].astype(str).agg("\x1f".join, axis=1)
        others = used.assign(_g=used[keys].astype(str).agg("\x1f".join, axis=1)).groupby("_g")["resize"] \
            .agg(lambda r: {canonical(m) or "none" for m in r}) if len(used) else pd.Series(dtype=object)
        gap = [rows[k].astype(str) for k in keys + ["source_stage", "destination_stage"]]
        all_none = none.groupby(gap, dropna=False).transform("all").astype(bool)
        found = pd.Series("", index=rows.index, dtype=object)
        for i in rows.index[all_none & group.isin(others.index)]:
            extra = others[group[i]]
            found[i] = "|".join(m for m in RESIZES if m == "none" or m in extra)
    column = df["resize_modes"].astype(object)          # (all empty when read back: a float column)
    column[found.index[found != ""]] = found[found != ""]
    return df.assign(resize_modes=column)


def collect(runs_dir: str | os.PathLike) -> tuple[pd.DataFrame, list[Problem]]:
    """Walk ``runs_dir`` recursively and return ``(results, problems)``.

    ``results`` has one row per finished run: the columns of RESULT_COLUMNS first (numeric ones typed),
    any extra columns after, plus ``run_dir`` (relative to ``runs_dir``). A run directory is any folder
    holding ``config.yaml`` or ``result.csv``. Unfinished and damaged runs are skipped and reported; for a
    duplicated ``run_id`` the row with the newest ``finished_at`` is kept and the others reported.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory does not exist: {root}")
    rows: list[pd.DataFrame] = []
    problems: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        if RESULT_NAME in filenames:
            try:
                row = read_result(here / RESULT_NAME)
            except DamagedResult as exc:
                problems.append(Problem("damaged", here, str(exc)))
                continue
            try:
                config = _config(here)
            except ConfigError as exc:   # unreadable, too large, an alias bomb, not YAML: not walked, reported
                problems.append(Problem("damaged", here, f"{CONFIG_NAME}: {exc.message}"))
                continue
            row = fill_missing_recipe(row, config)
            row[RUN_DIR_COLUMN] = str(here.relative_to(root))
            if pd.isna(row["run_id"].iloc[0]) or not str(row["run_id"].iloc[0]).strip():
                row["run_id"] = here.name
            row[_SAME_RUN] = _run_key(config) or f"run_id:{row['run_id'].iloc[0]}"
            rows.append(row)
        elif CONFIG_NAME in filenames:
            state = rundir.RunDir(here).read_state()
            why = f": {state.get('message')}" if rundir.status(here) in rundir.ENDED and state.get("message") else ""
            problems.append(Problem("unfinished", here, f"{CONFIG_NAME} but no {RESULT_NAME} "
                                                        f"({rundir.status(here)}{why})"))
    if not rows:
        return normalize_columns(pd.DataFrame(columns=RESULT_COLUMNS + [RUN_DIR_COLUMN])), problems

    df = pd.concat(rows, ignore_index=True)
    df, dropped = _drop_duplicates(df)
    for _, row in dropped.iterrows():
        problems.append(Problem(
            "duplicate", root / row[RUN_DIR_COLUMN],
            f"the same run ({short_repr(row['run_id'])}) also finished at {row['_kept_at']} in {row['_kept_dir']}; "
            f"kept the newest",
        ))
    df = df.drop(columns=_SAME_RUN).sort_values(RUN_DIR_COLUMN, kind="stable").reset_index(drop=True)
    return normalize_columns(df), problems


_SAME_RUN = "_same_run"


def _config(run_dir: Path) -> dict | None:
    """The directory's ``config.yaml`` when it holds a resolved config (a mapping of sections), else None (no
    such file, or another mapping); :class:`~stitching.config.ConfigError` when it cannot be read within the
    bounds of :func:`stitching.config.read_yaml` (unreadable, too large, an alias bomb, not YAML)."""
    if not (run_dir / CONFIG_NAME).is_file():
        return None
    config = read_yaml(run_dir / CONFIG_NAME)
    return config if isinstance(config, dict) and rundir.identity_sections(config) else None


def _run_key(config: dict | None) -> str | None:
    """:func:`stitching.rundir.run_key` of a run directory's resolved config (None without one)."""
    return None if config is None else rundir.run_key(config, IDENTITY)


def _drop_duplicates(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep, per run (same run key, or same run_id without a config), the row with the newest
    ``finished_at`` (unparseable times count as oldest)."""
    when = pd.to_datetime(df["finished_at"], errors="coerce", utc=True, format="mixed")
    order = df.assign(_when=when).sort_values([_SAME_RUN, "_when", RUN_DIR_COLUMN], na_position="first",
                                              kind="stable")
    keep_mask = ~order.duplicated(_SAME_RUN, keep="last")
    kept = order[keep_mask]
    dropped = order[~keep_mask].copy()
    if len(dropped):
        kept_by_key = kept.set_index(_SAME_RUN)
        dropped["_kept_at"] = dropped[_SAME_RUN].map(kept_by_key["finished_at"])
        dropped["_kept_dir"] = dropped[_SAME_RUN].map(kept_by_key[RUN_DIR_COLUMN])
    return kept.drop(columns="_when"), dropped


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            df.to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def summarize(df: pd.DataFrame, problems: list[Problem]) -> str:
    """Human-readable counts: finished, unfinished, damaged (with paths) and duplicates."""
    lines = [f"finished:   {len(df)}"]
    for kind in ("unfinished", "damaged", "duplicate"):
        found = [p for p in problems if p.kind == kind]
        lines.append(f"{kind + ':':<11} {len(found)}")
        for p in found:
            lines.append(f"  {p.path}" + ("" if kind == "unfinished" else f"  ({p.message})"))
    return "\n".join(lines)
