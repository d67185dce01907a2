"""The figures as a researcher uses them: nothing hidden, nothing clipped, no optional extra needed.

- Spearman's rank correlation of the CKA figure without scipy, equal to scipy's where scipy is installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stitching.plots import load_results
from stitching.plots.similarity import spearman
from stitching.results.schema import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ rank correlation

def test_spearman_without_scipy_by_hand():
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): r = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([10, 20, 30, 40], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ties take their average rank: x ranks (1.5, 1.5, 3, 4), y ranks (1, 2, 3, 4)
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.arange(1.0, 5.0)
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman([5, 5, 6, 9], [1, 2, 3, 4]) == pytest.approx(expected) and expected < 1
    # missing pairs are left out; too few pairs or a constant side give NaN
    assert spearman([1, np.nan, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)
    assert np.isnan(spearman([1, 2], [2, 1])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_equals_scipys():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 7, 30, 200):
        x = rng.normal(size=n).round(1)             # rounded: ties
        y = (x + rng.normal(size=n)).round(1)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


# ------------------------------------------------------------------------------------------ helpers

def _row(**values) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, "")
    row.update(dataset="synthetic", num_classes=10, img_size=32, epochs=1, batch_size=64, weight_decay=0.05,
               precision="fp32", adapter_style="code", init="default", objective="task", frozen_bn="eval",
               pos_embed="none", pretrained=False, seed=0, lr=0.002)
    row.update(values)
    if row["kind"] != "original":
        row["gap"] = f"{row['source_stage']}->{row['destination_stage']}"
        row["resize_modes"] = row["resize"]
    row["run_id"] = "-".join(str(row[k]) for k in ("kind", "source", "destination", "source_stage",
                                                   "destination_stage", "adapter", "resize", "lr", "seed"))
    return row


def lr_study() -> pd.DataFrame:
    """ResNet-18 stitched to itself (stage 1 -> 2, 3), bottleneck + bilinear, two seeds, at the recipe's adapter
    lr 0.002 and at 0.01 (better: 64.5 % at 1 -> 3 against 57.8 %); the original."""
    rows = []
    for t, (at_002, at_01), macs in ((2, (70.0, 72.0), 1.2e8), (3, (57.8, 64.5), 0.9e8)):
        for lr, top1 in ((0.002, at_002), (0.01, at_01)):
            for seed, off in enumerate((-0.5, 0.5)):
                rows.append(_row(kind="stitched", source="resnet18", destination="resnet18", source_stage=1,
                                 destination_stage=t, adapter="bottleneck", resize="bilinear", lr=lr, seed=seed,
                                 top1=top1 + off, top5=99.0, macs=macs))
    rows.append(_row(kind="original", source="resnet18", destination="resnet18", source_stage="",
                     destination_stage="", adapter="", resize="", top1=80.0, top5=99.0, macs=1.5e8, epochs=0))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def plot(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "plot_results.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def printed(proc: subprocess.CompletedProcess) -> tuple[list[Path], str]:
    """The files ``plot_results.py`` says it wrote, and the selection table it printed after them."""
    files, _, selection = proc.stdout.partition("\n\n")
    return [Path(line) for line in files.splitlines()], selection


def table_rows(text: str) -> list[dict]:
    """The rows of the Markdown table in ``text`` as dicts (header -> cell)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


# ------------------------------------------------------------------------------------------ no run hidden

def test_a_second_learning_rate_is_named_where_it_is_left_out_and_drawn_with_all_lrs(tmp_path):
    """A stitch run at lr 0.01 (64.5 % at 1 -> 3) and at the recipe's 0.002 (57.8 %): by default the figures
    show 0.002, and the printed table, selection.md and the figure's legend say that the 0.01 runs are left out
    and why; with --all-lrs both are drawn, each its own line."""
    folder = tmp_path / "an lr study #1"
    folder.mkdir()
    csv = folder / "results.csv"
    lr_study().to_csv(csv, index=False)

    proc = plot(csv, "--out", folder / "figures")
    assert proc.returncode == 0, proc.stderr
    files, selection = printed(proc)
    assert all(f.is_file() for f in files) and folder / "figures" / "selection.md" in files
    rows = table_rows(selection)
    left_out = [r for r in rows if r["Shown"] == "no"]
    assert [(r["Gap"], r["lr"], r["Runs"]) for r in left_out] == [("1->2", "0.01", "2"), ("1->3", "0.01", "2")]
    why = [r["Drawn in / left out because"] for r in left_out]
    assert all(w.startswith("another lr: lr 0.002 drawn (the recipe's adapter lr") for w in why)
    assert "this lr 64.5 %" in why[1] and "mean 57.8 % over 2 runs" in why[1]   # what the choice passed over
    drawn = [r for r in rows if r["Shown"] == "yes"]
    assert [(r["Gap"], r["lr"]) for r in drawn] == [("1->2", "0.002"), ("1->3", "0.002"), ("", "")]
    assert drawn[0]["Drawn in / left out because"] == "stage, MACs, cross-architecture, Table 1"
    assert "selection: 5 of 9 runs drawn, 4 left out" in selection
    assert (folder / "figures" / "selection.md").read_text().count("another lr: lr 0.002 drawn") == 2
    captions = (folder / "figures" / "captions.md").read_text()
    assert "Not drawn: 4 runs of this pair (another lr: 4), listed in selection.md" in captions

    from stitching.plots.draw import DrawOptions, draw

    drawn = draw(load_results(csv))
    stage = next(d for d in drawn.drawings if d.what == "stage").figure
    title = stage.legends[0].get_title().get_text().replace("\n", " ")
    assert "adapters at lr 0.002 (the recipe's adapter lr; other lrs left out)" in title
    assert "not drawn: 4 runs of this pair (another lr: 4)" in title
    assert [t.get_text() for t in stage.legends[0].get_texts()] == ["Downsample, Bottleneck", "ResNet-18 (original)"]

    proc = plot(csv, "--out", folder / "all", "--all-lrs")
    assert proc.returncode == 0, proc.stderr
    _, selection = printed(proc)
    assert "selection: 9 of 9 runs drawn, 0 left out" in selection
    rows = [r for r in table_rows(selection) if r["Method"] == "Downsample, Bottleneck"]
    assert [(r["Gap"], r["lr"], r["Shown"]) for r in rows] == [("1->2", "0.002", "yes"), ("1->2", "0.01", "yes"),
                                                               ("1->3", "0.002", "yes"), ("1->3", "0.01", "yes")]
    assert all(r["Drawn in / left out because"].startswith("stage, MACs, cross-architecture") for r in rows)
    stage = next(d for d in draw(load_results(csv), DrawOptions(all_lrs=True)).drawings if d.what == "stage").figure
    labels = [t.get_text() for t in stage.legends[0].get_texts()]
    assert labels[:2] == ["Downsample, Bottleneck · lr 0.002", "Downsample, Bottleneck · lr 0.01"]
    lines = {line.get_label(): line for line in stage.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert list(lines["Downsample, Bottleneck · lr 0.01"].get_ydata()) == [72.0, 64.5]
    assert list(lines["Downsample, Bottleneck · lr 0.002"].get_ydata()) == [70.0, 57.8]
    assert lines["Downsample, Bottleneck · lr 0.01"].get_color() != lines["Downsample, Bottleneck · lr 0.002"] \
        .get_color()
