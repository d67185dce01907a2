"""The options table (stitching/plots/options.py) and the plot script's row filters, on run directories
written the way the trainer writes them: one ``result.csv`` and one ``metrics.csv`` per run, collected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stitching import rundir as R
from stitching.plots.options import at_defaults, compare_options, option_default, options_markdown
from stitching.results.collect import collect, write_csv_atomic
from stitching.results.schema import METRICS_COLUMNS, RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = dict(init="default", objective="task", pos_embed="none", frozen_bn="eval")


def _row(seed, top1, **options) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, None)
    row.update(kind="stitched", source="resnet18", destination="resnet18", source_stage=1, destination_stage=3,
               gap="1->3", adapter="bottleneck", resize="bilinear", resize_modes="bilinear", lr=0.002,
               seed=seed, top1=top1, top5=99.0, macs=5e7, flops=1e8, dataset="synthetic", num_classes=10,
               pretrained="weights_file", img_size=64, epochs=2, batch_size=64, precision="fp32",
               random_init="none", finished_at="2026-11-22T00:00:00+00:00", **DEFAULTS)
    row.update(options)
    row["run_id"] = "-".join(f"{k}={row[k]}" for k in ("destination_stage", "seed", *DEFAULTS))
    return row


def _write_run(root: Path, i: int, row: dict, epoch1_top1: float) -> None:
    run = root / f"run{i:02d}"
    run.mkdir(parents=True)
    (run / R.CONFIG).write_text(f"run_id: {row['run_id']}\n")
    pd.DataFrame([row], columns=RESULT_COLUMNS).to_csv(run / R.RESULT, index=False)
    metrics = [dict.fromkeys(METRICS_COLUMNS) | {"epoch": 1, "step": 32, "top1": epoch1_top1},
               dict.fromkeys(METRICS_COLUMNS) | {"epoch": 2, "step": 64, "top1": row["top1"]}]
    pd.DataFrame(metrics, columns=METRICS_COLUMNS).to_csv(run / R.METRICS, index=False)


@pytest.fixture()
def runs(tmp_path) -> Path:
    root = tmp_path / "sweep"
    rows = [  # (row, top-1 after epoch 1)
        (_row(0, 70.0), 50.0), (_row(1, 72.0), 52.0),
        (_row(0, 75.0, init="least_squares", init_residual=0.1), 65.0),
        (_row(1, 77.0, init="least_squares", init_residual=0.2), 67.0),
        (_row(0, 60.0, objective="match", match_mse_after=0.30), 40.0),
        (_row(1, 62.0, objective="match", match_mse_after=0.50), 42.0),
        # two options off their defaults at once: part of neither comparison
        (_row(0, 99.0, init="least_squares", objective="match", init_residual=0.9), 99.0),
        # a scenario without a non-default value: not in the table
        (_row(0, 80.0, destination_stage=4, gap="1->4"), 60.0),
    ]
    original = dict.fromkeys(RESULT_COLUMNS) | dict(kind="original", source="resnet18", destination="resnet18",
                                                    seed=0, top1=97.9, top5=100.0, macs=1.5e8, epochs=0,
                                                    dataset="synthetic", num_classes=10, img_size=64,
                                                    run_id="original", finished_at="2026-11-22T00:00:00+00:00")
    for i, (row, first) in enumerate(rows + [(original, float("nan"))]):
        _write_run(root, i, row, first)
    return root


def test_defaults_come_from_the_config():
    assert [option_default(o) for o in DEFAULTS] == ["default", "task", "", "eval"]


def test_each_option_against_its_default_scenario_by_scenario(runs):
    df, problems = collect(runs)
    assert not problems and len(df) == 9
    table = compare_options(df, runs)
    init = table[table["option"] == "init"].set_index("value")
    assert list(init.index) == ["default", "least_squares"]          # the default first
    assert init.loc["default", "n"] == 2 and init.loc["least_squares", "n"] == 2
    assert init.loc["default", "top1_mean"] == pytest.approx(71.0)
    assert init.loc["least_squares", "top1_mean"] == pytest.approx(76.0)
    assert init.loc["least_squares", "top1_se"] == pytest.approx(1.0)  # std 1.414 / sqrt(2)
    assert init.loc["default", "top1_epoch1_mean"] == pytest.approx(51.0)
    assert init.loc["least_squares", "top1_epoch1_mean"] == pytest.approx(66.0)
    assert init.loc["least_squares", "init_residual"] == pytest.approx(0.15)
    objective = table[table["option"] == "objective"].set_index("value")
    assert list(objective.index) == ["task", "match"]
    assert objective.loc["match", "match_mse_after"] == pytest.approx(0.4)
    assert set(table["gap"]) == {"1->3"}                           # 1->4 varies nothing
    assert 99.0 not in set(table["top1_mean"])                      # two options at once: left out
    text = options_markdown(table)
    assert "**init** (default: default)" in text and "**objective** (default: task)" in text
    assert "76.0 ± 1.0" in text and "66.0 ± 1.0" in text

    # without the runs folder the epoch-1 column is empty, the rest the same
    assert compare_options(df)["top1_epoch1_mean"].isna().all()


def test_at_defaults_keeps_the_default_rows_and_the_originals(runs):
    df, _ = collect(runs)
    kept = at_defaults(df)
    assert sorted(kept["top1"]) == [70.0, 72.0, 80.0, 97.9]


def test_plot_script_filters_rows(runs, tmp_path):
    df, _ = collect(runs)
    csv = write_csv_atomic(df, tmp_path / "results.csv")
    script = [sys.executable, str(REPO / "scripts" / "plot_results.py"), str(csv)]

    def draw(out, *flags):
        proc = subprocess.run([*script, "--out", str(tmp_path / out), *flags], capture_output=True, text=True,
                              timeout=120)
        return proc

    from tests.conftest import together

    mixed, plain, chosen, bad = together(        # four independent commands, two at a time
        lambda: draw("all"),                     # four recipes: one folder each
        lambda: draw("defaults", "--default-options"),   # one recipe: drawn in place
        lambda: draw("ls", "--where", "init=least_squares", "--where", "objective=task"),
        lambda: draw("bad", "--where", "no_such_column=1"))
    assert mixed.returncode == 0, mixed.stderr
    assert (tmp_path / "all" / "recipe-1").is_dir()
    assert plain.returncode == 0, plain.stderr
    assert not (tmp_path / "defaults" / "recipe-1").exists()
    assert "init: default" in (tmp_path / "defaults" / "recipe.txt").read_text()
    assert chosen.returncode == 0, chosen.stderr
    assert "init: least_squares" in (tmp_path / "ls" / "recipe.txt").read_text()
    assert bad.returncode == 2 and "no_such_column" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
