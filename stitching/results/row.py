"""The row of ``result.csv``: one finished run's values, in the columns :mod:`stitching.results.schema` declares.

Owns :func:`result_row` (built from plain values the trainer and the closed-form matrices pass: the config, the
stitch plan, the cost counts, the evaluation, the similarity measures, times, the device's name) and the run's
provenance (:func:`git_sha`, the finishing time). It imports nothing from ``stitching.train``: the trainer calls it.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

from stitching.kinds import STITCHED
from stitching.results.recipe import recipe_columns, resize_modes
from stitching.results.schema import RESULT_COLUMNS, SIMILARITY_COLUMNS


def git_sha() -> str:
    """The package's git commit (12 hex digits, ``-dirty`` with uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def similarity_cells(before: dict | None, after: dict | None) -> dict:
    """The row's similarity cells (:data:`~stitching.results.schema.SIMILARITY_COLUMNS`; empty where not
    measured) from the measures before and after training (``n``, ``cka``, ``ls_residual`` / ``mse``)."""
    cells = dict.fromkeys(SIMILARITY_COLUMNS, "")
    if before:
        cells.update(similarity_images=before["n"], cka_before=before["cka"], ls_residual_before=before["ls_residual"])
    if after:
        cells.update(similarity_images=after["n"], cka_after=after["cka"], match_mse_after=after["mse"])
    return cells


def plan_cells(cfg, kind: str, plan) -> dict:
    """Which network, cut, adapter and resizing the row is (``plan``: the stitch plan, None for an original model)."""
    m = cfg.model
    stitched = plan is not None and plan.kind == STITCHED
    return {
        "kind": kind, "source": m.source, "destination": plan.destination if plan else m.source,
        "source_stage": plan.source_stage if plan else "", "destination_stage": plan.destination_stage if plan else "",
        "source_block": plan.source_block if plan else "", "destination_block": plan.destination_block if plan else "",
        "gap": plan.cut_label if plan else "",
        "adapter": plan.adapter if plan else "", "resize": plan.effective_resize if stitched else "",
        "resamples": any(s.size_in != s.size_out for s in plan.steps) if stitched else "",
        "resize_modes": resize_modes(cfg) if stitched else "",
        "schedule": plan.schedule if stitched else "",
        "num_adapters": plan.num_adapters if plan else 0,
    }


def result_row(*, run_id: str, cfg, kind: str, plan, precision: str, world_size: int, evaluation: dict,
               train_loss, init_residual, cost: dict, train_macs, before: dict | None, after: dict | None,
               images_per_s: float, wall_time_s: float, pack: str, device: str) -> dict:
    """The ``result.csv`` row of a finished run, keys in :data:`~stitching.results.schema.RESULT_COLUMNS` order.

    ``cfg``: its :class:`stitching.config.Config`; ``evaluation``: the last ``top1``/``top5``/``val_loss``;
    ``cost``: ``macs``/``flops``/``params``/``trainable_params`` (:func:`stitching.stitch.cost.count_cost`);
    ``before``/``after``: the similarity measures (:func:`similarity_cells`); ``train_loss``, ``init_residual``:
    '' where there is none; ``device``: the device's name (``cpu`` or the CUDA device's)."""
    row = {
        "run_id": run_id, **plan_cells(cfg, kind, plan),
        **recipe_columns(cfg, world_size, precision), "data_label": cfg.data.label or "",
        "seed": cfg.train.seed, "top1": evaluation["top1"], "top5": evaluation["top5"],
        "val_loss": evaluation["val_loss"], "train_loss": train_loss, "init_residual": init_residual,
        **cost, "train_macs": train_macs, **similarity_cells(before, after),
        "images_per_s": images_per_s, "wall_time_s": wall_time_s, "world_size": world_size, "pack": pack,
        "device": device, "git_sha": git_sha(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if list(row) != RESULT_COLUMNS:       # a declared column without its value here, or a value without its column
        raise ValueError(f"the result row's keys differ from RESULT_COLUMNS: {sorted(set(row) ^ set(RESULT_COLUMNS))}"
                         " (a new column is its declaration in stitching/results/schema.py and its value here)")
    return row
