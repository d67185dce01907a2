"""Every stitched training run writes the similarity at the join (real CLI, tiny models, synthetic data);
``collect`` carries it with the objective, and the accuracy-vs-CKA figure is drawn from the real run dirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stitching.validate import load_config
from stitching.stitch.cost import count_cost
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT, together
from tests.test_train import rows, train

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
COMMON = ("train.device=cpu", "train.similarity_images=64")
RUNS = {   # run dir -> overrides of configs/synthetic/tiny.yaml (resnet18 1 -> 3, bottleneck, 1 epoch)
    "task_1_3": (),
    "task_2_3": ("model.source_stage=2",),
    "task_1_2": ("model.destination_stage=2",),
    "match_1_3": ("train.objective=match",),
    "finetune_1_3": ("model.adapter=finetune",),
    "off_1_3": ("train.similarity_images=0", "train.epochs=0"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    together(*(lambda name=name, overrides=overrides: train("--config", TINY, f"output.dir={root / name}", *COMMON,
                                                            *overrides) for name, overrides in RUNS.items()))
    return root


def _row(runs: Path, name: str) -> dict:
    [row] = rows(runs / name / "result.csv")
    return row


@pytest.mark.slow
def test_every_stitched_run_writes_the_similarity_before_and_after_training(runs):
    for name in ("task_1_3", "task_2_3", "task_1_2", "match_1_3"):
        row = _row(runs, name)
        assert row["similarity_images"] == "64", name
        assert 0 < float(row["cka_before"]) <= 1 and 0 <= float(row["ls_residual_before"]) <= 1, name
        assert -1 <= float(row["cka_after"]) <= 1 and float(row["match_mse_after"]) >= 0, name
    task, match = _row(runs, "task_1_3"), _row(runs, "match_1_3")
    # before training the join does not depend on the objective (same weights, same images)
    assert task["cka_before"] == match["cka_before"] and task["ls_residual_before"] == match["ls_residual_before"]
    assert task["cka_after"] != match["cka_after"]
    # the cost: macs stays the inference cost; match adds the destination's own forward up to the join
    cfg = load_config(TINY, list(COMMON))
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    assert task["macs"] == match["macs"] and int(task["train_macs"]) == int(task["macs"])
    assert int(match["train_macs"]) == int(match["macs"]) + count_cost(built.target, cfg.data.img_size)["macs"]
    assert task["objective"] == "task" and match["objective"] == "match"


@pytest.mark.slow
def test_no_join_or_switched_off_leaves_the_cells_empty(runs):
    from stitching.results.schema import SIMILARITY_COLUMNS

    finetune, off = _row(runs, "finetune_1_3"), _row(runs, "off_1_3")
    assert finetune["kind"] == "finetune" and off["kind"] == "stitched"
    for row in (finetune, off):
        assert all(row[c] == "" for c in SIMILARITY_COLUMNS)
    assert off["train_macs"] == "" and int(finetune["train_macs"]) == int(finetune["macs"])


@pytest.mark.slow
def test_collect_and_the_accuracy_vs_cka_figure_from_real_runs(runs, tmp_path):
    from stitching.plots import NoData, plot_accuracy_vs_cka
    from stitching.plots.aggregate import load_results
    from stitching.results.recipe import split_by_recipe

    table = tmp_path / "results.csv"
    proc = subprocess.run([sys.executable, "-m", "stitching.collect", str(runs), "-o", str(table)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    df = load_results(table)
    assert len(df) == len(RUNS) and set(df["objective"]) == {"task", "match"}
    assert df["cka_before"].dtype == "float64" and df["cka_before"].notna().sum() == 4
    # the objective keeps two setups apart: task and match runs are never one recipe
    recipes = split_by_recipe(df)
    assert {"task", "match"} <= {recipe["objective"] for recipe, _ in recipes}

    task_rows = df[(df["objective"] == "task") & (df["epochs"] == 1)]
    fig = plot_accuracy_vs_cka(task_rows)
    before, after = fig.axes[0], fig.axes[1]
    def points(ax, axis):      # the data line of every errorbar (its caps are lines too)
        return sorted(v for c in ax.containers for v in getattr(c.lines[0], f"get_{axis}data")())

    drawn = points(before, "x")
    stitched = task_rows[task_rows["kind"] == "stitched"]
    assert drawn == pytest.approx(sorted(stitched["cka_before"]))              # one point per scenario
    assert points(before, "y") == pytest.approx(sorted(stitched["top1"]))
    assert points(after, "x") == pytest.approx(sorted(stitched["cka_after"]))
    assert "Spearman" in before.get_title() and "CKA" in before.get_xlabel()
    with pytest.raises(NoData):
        plot_accuracy_vs_cka(df[df["kind"] == "finetune"])

    out = tmp_path / "figures"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_results.py"), str(table), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = [Path(line) for line in proc.stdout.splitlines() if line.endswith("accuracy_vs_cka.png")]
    assert len(figures) == 2 and all(p.is_file() and p.stat().st_size > 10_000 for p in figures)
    notes = {(p.parent / "recipe.txt").read_text() for p in figures}
    assert any("objective: match" in n for n in notes) and any("objective: task" in n for n in notes)
    assert pd.read_csv(table)["train_macs"].notna().sum() == len(RUNS) - 1
