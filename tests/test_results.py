"""Results pipeline: run directories -> one CSV -> aggregation -> the paper's figures, Table 1, notebook.

The fixture is a small but realistic sweep: ResNet-50 stitched to itself (source stages 1-2, every
destination stage, linear and bottleneck adapters, bilinear and no resize — where sizes already match the
row says ``none``, as real runs do), the fine-tuning baseline at three learning rates (one scenario where
the best single seed and the best mean disagree), a ResNet-50 -> Swin-T pair, a pair with a single run
(missing data), originals, plus an unfinished run, a damaged ``result.csv`` and a duplicated ``run_id``.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stitching.plots import (
    aggregate,
    best_finetune_lr,
    draw_all,
    load_results,
    plot_accuracy_vs_macs,
    plot_accuracy_vs_stage,
    plot_cross_architecture,
    prepare,
    table1,
    write_table1,
)
from stitching.plots.labels import arch_name, method_label
from stitching.results.collect import DamagedResult, collect, normalize_columns
from stitching.results.schema import RESULT_COLUMNS

REPO = Path(__file__).resolve().parents[1]
SEED_OFFSETS = (-0.2, 0.0, 0.2)  # three seeds: std 0.2, standard error 0.2 / sqrt(3)
SE3 = 0.2 / math.sqrt(3)

# ResNet-50 self-stitch, bottleneck + bilinear: top1 and MACs per gap (1->2 and 1->4 are the paper's Table 1)
R50_BOTTLENECK = {
    (1, 1): (79.4, 3.95e9), (1, 2): (78.3, 3.58e9), (1, 3): (74.0, 2.90e9), (1, 4): (67.4, 1.67e9),
    (2, 2): (79.8, 4.00e9), (2, 3): (76.5, 3.30e9), (2, 4): (70.0, 2.20e9),
}
R50_SWIN = {(1, 1): (79.0, 4.1e9), (1, 2): (78.6, 3.9e9), (1, 3): (78.2, 3.0e9), (1, 4): (69.5, 1.57e9),
            (2, 2): (79.5, 4.3e9), (2, 3): (78.8, 3.4e9), (2, 4): (71.0, 2.0e9)}
ORIGINALS = {"resnet50": (80.4, 4.09e9), "resnet34": (76.4, 3.66e9), "resnet18": (71.5, 1.81e9),
             "swin_t": (81.5, 4.49e9)}
# fine-tuning at gap 1->3: lr 0.002 has the best single seed (79.0) but lr 0.0002 the best mean (74.3)
FT_TRAP = {0.01: [60.0, 61.0, 62.0], 0.002: [66.0, 66.5, 79.0], 0.0002: [74.1, 74.3, 74.5]}


def _row(**kw) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, None)
    row.update(pretrained=True, dataset="imagenet", num_classes=1000, img_size=224, epochs=10,
               batch_size=512, weight_decay=0.05, schedule="doubling", world_size=1, device="cuda",
               precision="bf16", git_sha="abc1234", finished_at="2025-01-02T03:04:05+00:00")
    row.update(kw)
    if row["kind"] != "original":
        row["gap"] = f"{row['source_stage']}->{row['destination_stage']}"
        row["num_adapters"] = max(1, row["destination_stage"] - row["source_stage"])
    row["top5"] = min(99.9, row["top1"] + 15)
    row["flops"] = 2 * row["macs"] if row["macs"] is not None else None
    row["run_id"] = "-".join(str(row[k]) for k in ("kind", "source", "destination", "source_stage",
                                                   "destination_stage", "adapter", "resize", "lr", "seed"))
    return row


def make_results() -> pd.DataFrame:
    rows = []
    for (s, t), (top1, macs) in R50_BOTTLENECK.items():
        for adapter, drop, cost in (("bottleneck", 0.0, 0.0), ("linear", 1.5 * (t - s) + 0.5, -0.1e9)):
            # where sizes match (s == t) the resize modes build one module: the run says "none"
            # (top1 penalty, MACs factor) of each mode: no resize costs more and does a little worse
            modes = {"none": (0.0, 1.0)} if s == t else {"bilinear": (0.0, 1.0), "none": (1.0, 1.4)}
            for resize, (penalty, factor) in modes.items():
                for seed, off in enumerate(SEED_OFFSETS):
                    rows.append(_row(kind="stitched", source="resnet50", destination="resnet50",
                                     source_stage=s, destination_stage=t, adapter=adapter, resize=resize,
                                     lr=0.002, seed=seed, top1=top1 - drop - penalty + off,
                                     macs=(macs + cost) * factor))
        for lr in (0.01, 0.002, 0.0002):
            for seed in range(3):
                if (s, t) == (1, 3):
                    value = FT_TRAP[lr][seed]
                else:
                    value = top1 + {0.01: -5.0, 0.002: -1.0, 0.0002: 0.3}[lr] + SEED_OFFSETS[seed]
                rows.append(_row(kind="finetune", source="resnet50", destination="resnet50", source_stage=s,
                                 destination_stage=t, adapter="finetune", resize="none", lr=lr, seed=seed,
                                 top1=value, macs=macs + 0.05e9))
    for (s, t), (top1, macs) in R50_SWIN.items():
        resize = "none" if (s, t) == (1, 1) else "bilinear"  # ResNet 56x56 -> Swin 56x56: no resize
        for seed, off in enumerate(SEED_OFFSETS):
            rows.append(_row(kind="stitched", source="resnet50", destination="swin_t", source_stage=s,
                             destination_stage=t, adapter="bottleneck", resize=resize, lr=0.002, seed=seed,
                             top1=top1 + off, macs=macs))
    # a combination with a single run and no MACs: figures must skip or cope, never crash
    rows.append(_row(kind="stitched", source="resnet50", destination="vit_small_patch16_224",
                     source_stage=1, destination_stage=1, adapter="linear", resize="none", lr=0.002, seed=0,
                     top1=40.0, macs=None))
    for model, (top1, macs) in ORIGINALS.items():
        rows.append(_row(kind="original", source=model, destination=model, source_stage=None,
                         destination_stage=None, gap=None, adapter=None, resize=None, lr=None, seed=0,
                         top1=top1, macs=macs, epochs=0))
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return make_results()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, results) -> Path:
    """One run directory per row (some nested), plus unfinished, damaged and duplicated runs."""
    root = tmp_path_factory.mktemp("runs")
    for i, row in results.iterrows():
        run = root / ("sweep_a" if i % 2 else "sweep_b") / f"run{i:03d}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"run_id: {row['run_id']}\nkind: {row['kind']}\n")
        pd.DataFrame([row]).to_csv(run / "result.csv", index=False)
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text("run_id: still-training\n")
    (root / "damaged").mkdir()
    (root / "damaged" / "config.yaml").write_text("run_id: damaged\n")
    (root / "damaged" / "result.csv").write_text("run_id,kind\n")  # header only: zero rows
    # an older copy of run 0 (e.g. a rerun elsewhere) with a different value: the newer one must win
    old = results.iloc[[0]].copy()
    old["top1"] = 1.0
    old["finished_at"] = "2024-06-01T00:00:00+00:00"
    (root / "old_copy").mkdir()
    (root / "old_copy" / "config.yaml").write_text("run_id: copy\n")
    old.to_csv(root / "old_copy" / "result.csv", index=False)
    return root


@pytest.fixture(scope="module")
def results_csv(tmp_path_factory, results) -> Path:
    path = tmp_path_factory.mktemp("csv") / "results.csv"
    results.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ collect

def test_collect_counts_and_problems(runs_dir, results):
    df, problems = collect(runs_dir)
    assert len(df) == len(results)
    assert list(df.columns[:len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    kinds = sorted(p.kind for p in problems)
    assert kinds == ["damaged", "duplicate", "unfinished"]
    by_kind = {p.kind: p for p in problems}
    assert by_kind["unfinished"].path == runs_dir / "unfinished"
    assert by_kind["damaged"].path == runs_dir / "damaged"
    assert "1 row" in by_kind["damaged"].message
    assert by_kind["duplicate"].path == runs_dir / "old_copy"
    kept = df[df["run_id"] == results["run_id"].iloc[0]]
    assert len(kept) == 1 and kept["top1"].iloc[0] == pytest.approx(results["top1"].iloc[0])
    assert df["source_stage"].dtype == "Int64" and df["top1"].dtype == "float64"
    assert df.loc[df["kind"] == "original", "source_stage"].isna().all()


def test_collect_cli(runs_dir, tmp_path):
    out = tmp_path / "out" / "results.csv"
    proc = subprocess.run([sys.executable, "-m", "stitching.collect", str(runs_dir), "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    counts = dict(re.findall(r"^(\w+):\s+(\d+)$", proc.stdout, re.M))
    assert counts == {"finished": str(len(make_results())), "unfinished": "1", "damaged": "1", "duplicate": "1"}
    assert str(runs_dir / "damaged") in proc.stdout and str(runs_dir / "unfinished") in proc.stdout
    written = load_results(out)
    assert len(written) == len(make_results())
    assert list(written.columns[:len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert not list(out.parent.glob("*.tmp"))

    missing = subprocess.run([sys.executable, "-m", "stitching.collect", str(tmp_path / "nope")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "does not exist" in missing.stderr


# ------------------------------------------------------------------------------------------ aggregation

def test_labels():
    assert method_label("stitched", "bottleneck", "bilinear") == "Downsample, Bottleneck"
    assert method_label("stitched", "linear_relu", "none") == "No Downsample, Linear + ReLU"
    assert method_label("stitched", "conv3x3", "strided") == "Integrated Downsample, Conv3x3"
    assert method_label("finetune", "finetune", "none") == "Fine-Tuning"
    assert [arch_name(a) for a in ("resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t",
                                   "resnet18", "mystery_net")] == \
        ["ResNet-50", "MobileNetV3-L", "ViT-S", "Swin-T", "ResNet-18", "mystery_net"]


def test_aggregate_mean_and_standard_error(results):
    agg = aggregate(results)
    one = agg[(agg["method"] == "Downsample, Bottleneck") & (agg["source"] == "resnet50")
              & (agg["destination"] == "resnet50") & (agg["source_stage"] == 1) & (agg["destination_stage"] == 4)]
    assert len(one) == 1
    one = one.iloc[0]
    assert one["n"] == 3
    assert one["top1_mean"] == pytest.approx(67.4)
    assert one["top1_se"] == pytest.approx(SE3)
    assert one["macs_mean"] == pytest.approx(1.67e9) and one["macs_se"] == pytest.approx(0.0)
    # fine-tuning lrs stay separate scenarios in aggregate(); n = 1 gives se 0
    trap = agg[(agg["method"] == "Fine-Tuning") & (agg["source_stage"] == 1) & (agg["destination_stage"] == 3)]
    assert len(trap) == 3
    mid = trap[np.isclose(trap["lr"], 0.002)].iloc[0]
    assert mid["top1_mean"] == pytest.approx(np.mean(FT_TRAP[0.002]))
    assert mid["top1_se"] == pytest.approx(np.std(FT_TRAP[0.002], ddof=1) / math.sqrt(3))
    single = agg[agg["destination"] == "vit_small_patch16_224"].iloc[0]
    assert single["n"] == 1 and single["top1_se"] == 0.0


def test_best_finetune_lr_uses_the_mean(results):
    chosen = best_finetune_lr(results)
    ft = chosen[chosen["kind"] == "finetune"]
    trap = ft[(ft["source_stage"] == 1) & (ft["destination_stage"] == 3)]
    assert len(trap) == 3 and np.allclose(trap["lr"], 0.0002)  # best mean 74.3, not the 79.0 single seed
    assert sorted(trap["top1"]) == FT_TRAP[0.0002]
    assert ft.groupby(["source_stage", "destination_stage"])["lr"].nunique().eq(1).all()
    assert len(chosen[chosen["kind"] != "finetune"]) == len(results[results["kind"] != "finetune"])


def test_prepare_shares_resize_free_gaps(results):
    prepared = prepare(results)
    line = prepared[(prepared["method"] == "Downsample, Bottleneck") & (prepared["destination"] == "resnet50")
                    & (prepared["source_stage"] == 1)]
    assert sorted(line["destination_stage"].unique()) == [1, 2, 3, 4]
    assert line[line["destination_stage"] == 1]["resize_shared"].all()
    assert not line[line["destination_stage"] > 1]["resize_shared"].any()


# ------------------------------------------------------------------------------------------ table 1

def test_table1(results, tmp_path):
    table = table1(results)
    assert list(table.columns) == ["Model", "Accuracy", "MACs"]
    models = list(table["Model"])
    # originals and stitched rows interleaved, sorted by MACs
    assert models[:3] == ["ResNet-50 Stage 1 → 4", "ResNet-18", "ResNet-50 Stage 1 → 3"]
    assert "ResNet-34" in models and "Swin-T" in models
    row = table[table["Model"] == "ResNet-50 Stage 1 → 4"].iloc[0]
    assert row["Accuracy"] == "67.4 ± 0.1" and row["MACs"] == "1.67e09"
    assert table[table["Model"] == "ResNet-18"].iloc[0].tolist() == ["ResNet-18", "71.5", "1.81e09"]
    # 1 -> 1 needs no resize: its (shared) run appears too
    assert "ResNet-50 Stage 1 → 1" in models

    md, tex = write_table1(results, tmp_path)
    text = md.read_text()
    for expected in ("| ResNet-50 Stage 1 → 2", "78.3 ± 0.1", "3.58e09", "80.4", "4.09e09"):
        assert expected in text
    latex = tex.read_text()
    assert r"\begin{tabular}" in latex and r"$\pm$" in latex and "1.67e09" in latex


# ------------------------------------------------------------------------------------------ figures

def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_write_png(results, tmp_path):
    _png(plot_accuracy_vs_stage(results, "resnet50", "resnet50", tmp_path / "stage.png"))
    _png(plot_accuracy_vs_stage(results, "resnet50", "swin_t", tmp_path / "stage_swin.png"))
    _png(plot_accuracy_vs_macs(results, "resnet50", "resnet50", tmp_path / "macs.png"))
    _png(plot_cross_architecture(results, tmp_path / "cross.png"))


def test_draw_all_skips_missing_data(results, tmp_path):
    written = draw_all(results, tmp_path)
    names = sorted(p.name for p in written)
    assert "accuracy_vs_stage_resnet50_to_resnet50.png" in names
    assert "accuracy_vs_macs_resnet50_to_swin_t.png" in names
    assert "cross_architecture.png" in names and "table1.md" in names and "table1.tex" in names
    # the single run without MACs still gets its stage figure, but no MACs figure
    assert "accuracy_vs_stage_resnet50_to_vit_small_patch16_224.png" in names
    assert "accuracy_vs_macs_resnet50_to_vit_small_patch16_224.png" not in names
    for path in written:
        assert path.is_file() and path.stat().st_size > 0


def test_plot_results_script(results_csv, tmp_path):
    out = tmp_path / "figures"
    script = str(REPO / "scripts" / "plot_results.py")
    proc = subprocess.run([sys.executable, script, str(results_csv), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files, _, selection = proc.stdout.partition("\n\n")     # the files written, then what they show
    printed = [Path(line) for line in files.splitlines()]
    assert out / "cross_architecture.png" in printed and all(p.is_file() for p in printed)
    assert out / "selection.md" in printed and selection.startswith("selection: ")

    for bad in (tmp_path / "missing.csv", tmp_path / "empty.csv"):
        if bad.name == "empty.csv":
            bad.write_text("")
        proc = subprocess.run([sys.executable, script, str(bad), "--out", str(out)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr


# ------------------------------------------------------------------------------------------ notebook

def test_notebook_executes(results_csv, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True, timeout=60)
    nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook with outputs cleared"
    env = {**os.environ, "STITCHING_RESULTS": str(results_csv), "PYTHONPATH": str(REPO)}
    old = {k: os.environ.get(k) for k in ("STITCHING_RESULTS", "PYTHONPATH")}
    os.environ.update({k: env[k] for k in old})
    try:
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3


def test_rows_that_resample_nothing_stand_for_every_resize_mode():
    """A pair run only where sizes already match (resize recorded as none, resamples False) still shows up
    as "Downsample, Bottleneck" in the cross-architecture figure; a real no-resize row does not."""
    import pandas as pd

    from stitching.plots.aggregate import prepare, share_resize_free
    from stitching.plots.figures import best_adapter_rows
    from stitching.results.schema import RESULT_COLUMNS

    base = {c: "" for c in RESULT_COLUMNS}
    rows = []
    for seed, top1 in [(0, 41.0), (1, 43.0)]:
        rows.append({**base, "run_id": f"a{seed}", "kind": "stitched", "source": "vit_tiny_patch16_224",
                     "destination": "resnet18", "source_stage": 1, "destination_stage": 3, "gap": "1->3",
                     "adapter": "bottleneck", "resize": "none", "resamples": False, "seed": seed, "top1": top1,
                     "top5": 90.0, "macs": 1e8, "lr": 0.002})
        rows.append({**base, "run_id": f"b{seed}", "kind": "stitched", "source": "resnet18",
                     "destination": "vit_tiny_patch16_224", "source_stage": 1, "destination_stage": 3, "gap": "1->3",
                     "adapter": "bottleneck", "resize": "none", "resamples": True, "seed": seed, "top1": top1 + 10,
                     "top5": 90.0, "macs": 2e8, "lr": 0.002})
    df = pd.DataFrame(rows)
    shared = share_resize_free(df)
    free = shared[shared["source"] == "vit_tiny_patch16_224"]
    assert sorted(free["resize"]) == ["bilinear", "bilinear", "none", "none", "strided", "strided"]
    assert set(shared[shared["source"] == "resnet18"]["resize"]) == {"none"}
    prepared = prepare(df)
    assert len(best_adapter_rows(prepared, "vit_tiny_patch16_224", "resnet18")) == 2
    assert best_adapter_rows(prepared, "resnet18", "vit_tiny_patch16_224").empty


def test_a_no_downsample_run_stands_for_itself_only():
    """``resize_modes`` says which modes build a row's module. A real no-downsample run (the larger map flows
    on: resize none, nothing resampled, ``resize_modes`` "none") is its own row only -- its MACs and accuracy
    are not the downsampling method's; a resize-free gap ("none|bilinear|strided") stands for all three.
    ("none" must not be read as an empty, unknown cell: it once put no-downsample rows into Table 1.)"""
    import pandas as pd

    from stitching.plots.aggregate import share_resize_free
    from stitching.results.schema import RESULT_COLUMNS

    base = {c: "" for c in RESULT_COLUMNS}
    common = {"kind": "stitched", "source": "resnet18", "destination": "resnet18", "source_stage": 1,
              "adapter": "bottleneck", "seed": 0, "top5": 99.0, "lr": 0.002}
    df = pd.DataFrame([
        {**base, **common, "run_id": "flows-on", "destination_stage": 2, "gap": "1->2", "resize": "none",
         "resamples": False, "resize_modes": "none", "top1": 85.0, "macs": 3.8e8},
        {**base, **common, "run_id": "downsampled", "destination_stage": 2, "gap": "1->2", "resize": "bilinear",
         "resamples": True, "resize_modes": "bilinear", "top1": 80.0, "macs": 1.2e8},
        {**base, **common, "run_id": "same-size", "destination_stage": 1, "gap": "1->1", "resize": "none",
         "resamples": False, "resize_modes": "none|bilinear|strided", "top1": 97.0, "macs": 1.3e8},
    ])
    shared = share_resize_free(df)
    rows = {(r.run_id, r.resize) for r in shared.itertuples()}
    assert rows == {("flows-on", "none"), ("downsampled", "bilinear"),
                    ("same-size", "none"), ("same-size", "bilinear"), ("same-size", "strided")}


# ------------------------------------------------------------------------------------------ recipes

def _two_recipes(results: pd.DataFrame) -> pd.DataFrame:
    """The fixture's runs twice: once with the code's adapters, once with the text's (5 points worse)."""
    code = results.assign(adapter_style="code", frozen_bn="eval")
    text = results[results["kind"] != "original"].assign(adapter_style="text", frozen_bn="eval")
    text = text.assign(top1=text["top1"] - 5.0, run_id=text["run_id"] + "-text")
    return pd.concat([code, text], ignore_index=True)


def test_two_recipes_in_one_csv_are_never_averaged(results, tmp_path):
    path = tmp_path / "results.csv"
    _two_recipes(results).to_csv(path, index=False)
    df = load_results(path)                                   # through the CSV: 10 vs "10" vs 10.0 agree
    agg = aggregate(prepare(df))
    one = agg[(agg["source"] == "resnet50") & (agg["destination"] == "resnet50") & (agg["source_stage"] == 1)
              & (agg["destination_stage"] == 4) & (agg["method"] == method_label("stitched", "bottleneck",
                                                                                   "bilinear"))]
    assert sorted(one["adapter_style"]) == ["code", "text"] and list(one["n"]) == [3, 3]
    by_style = one.set_index("adapter_style")["top1_mean"]
    assert by_style["code"] == pytest.approx(67.4) and by_style["text"] == pytest.approx(62.4)
    # the fine-tuning lr is chosen per recipe, by the best mean within it
    ft = agg[(agg["kind"] == "finetune") & (agg["source_stage"] == 1) & (agg["destination_stage"] == 3)]
    assert sorted(zip(ft["adapter_style"], ft["lr"])) == [("code", 0.0002), ("text", 0.0002)]
    # a recipe key the CSV spells in different ways (10 / 10.0) is still one recipe
    same = df.assign(epochs=df["epochs"].astype(float))
    assert len(aggregate(prepare(same))) == len(aggregate(prepare(df)))
    # a second batch size is a second recipe too
    other = results.assign(per_device_batch_size=256)
    other.loc[other.index[:10], "per_device_batch_size"] = 128
    assert aggregate(other)["per_device_batch_size"].nunique() == 2


def test_figures_and_table1_name_their_recipe_and_refuse_mixed_ones(results, tmp_path):
    from stitching.results.recipe import MixedRecipes

    from stitching.plots import FigureOptions

    single = results.assign(adapter_style="code", frozen_bn="train", per_device_batch_size=256)
    whole = ("Recipe:", "10 epochs", "batch 512", "256/device", "wd 0.05", "224 px", "bf16", "adapters: code",
             "frozen BN: train")
    # the legend's title: the short recipe (dataset, epochs, image size); the whole one with the footer option
    title = plot_accuracy_vs_stage(single, "resnet50", "resnet50").legends[0].get_title().get_text()
    assert title.startswith("imagenet · 10 epochs · 224 px\n") and "batch 512" not in title
    footer = FigureOptions(footer=True)
    title = plot_accuracy_vs_stage(single, "resnet50", "resnet50", options=footer).legends[0].get_title().get_text()
    assert all(part in title.replace("\n", " ") for part in whole)
    assert "adapters: code" in plot_cross_architecture(single, options=footer).legends[0].get_title().get_text() \
        .replace("\n", " ")
    # the whole recipe in every figure's caption
    draw_all(single, tmp_path / "single")
    captions = (tmp_path / "single" / "captions.md").read_text().split("\n\n")
    assert len(captions) == 6 and all(all(part in c for part in whole) for c in captions)
    written = write_table1(single, tmp_path / "one")
    assert "adapters: code · frozen BN: train" in written[0].read_text().replace("\n", " ")

    mixed = _two_recipes(results)
    for draw in (lambda: plot_accuracy_vs_stage(mixed, "resnet50", "resnet50"),
                 lambda: plot_accuracy_vs_macs(mixed, "resnet50", "swin_t"),
                 lambda: plot_cross_architecture(mixed), lambda: table1(mixed)):
        with pytest.raises(MixedRecipes, match="adapter_style: code, text"):
            draw()
    # one recipe's rows of the mixed table draw fine, and only that recipe's numbers are in them
    text_only = mixed[(mixed["adapter_style"] == "text") | (mixed["kind"] == "original")]
    t = table1(text_only)
    assert "62.4 ± 0.1" in set(t["Accuracy"]) and "67.4 ± 0.1" not in set(t["Accuracy"])
    # draw_all splits: one folder per recipe, each saying which
    files = draw_all(mixed, tmp_path / "all")
    folders = sorted({f.parent.name for f in files} - {"all"})
    assert folders == ["recipe-1", "recipe-2"] and tmp_path / "all" / "selection.md" in files   # one list of runs
    notes = {d: (tmp_path / "all" / d / "recipe.txt").read_text() for d in folders}
    assert "adapter_style: code" in notes["recipe-1"] and "adapter_style: text" in notes["recipe-2"]
    for d in folders:
        assert (tmp_path / "all" / d / "accuracy_vs_stage_resnet50_to_resnet50.png").is_file()
        assert f"adapters: {notes[d].split('adapter_style: ')[1].split()[0]}" in \
            (tmp_path / "all" / d / "table1.md").read_text()
        assert "ResNet-50" in (tmp_path / "all" / d / "table1.md").read_text()   # originals in both


def test_upsampling_integrated_rows_share_the_bilinear_row():
    """ViT-S -> ResNet-50 1->1 must upsample: the strided ("integrated") chain is the bilinear module, the row
    names both modes, and the plots draw it on both lines (no hole)."""
    from stitching.validate import load_config
    from stitching.results.recipe import resize_modes

    def modes(**model):
        cfg = load_config(REPO / "configs" / "paper" / "imagenet.yaml",
                          updates={f"model.{k}": v for k, v in model.items()}, check=False)
        return resize_modes(cfg)

    vit_r50 = dict(source="vit_small_patch16_224", destination="resnet50", source_stage=1)
    assert modes(**vit_r50, destination_stage=1, adapter="bottleneck", resize="strided") == "bilinear|strided"
    assert modes(**vit_r50, destination_stage=1, adapter="bottleneck", resize="bilinear") == "bilinear|strided"
    assert modes(**vit_r50, destination_stage=4, adapter="bottleneck", resize="strided") == "strided"
    assert modes(**vit_r50, destination_stage=3, adapter="conv3x3", resize="bilinear") == "none|bilinear|strided"
    assert modes(source="resnet50", source_stage=2, destination_stage=2, adapter="linear",
                 resize="none") == "none|bilinear"
    assert modes(source="resnet50", source_stage=1, destination_stage=2, adapter="linear",
                 resize="none") == "none"

    base = dict.fromkeys(RESULT_COLUMNS, "")
    rows = [{**base, "run_id": f"r{t}{seed}", "kind": "stitched", "source": "vit_small_patch16_224",
             "destination": "resnet50", "source_stage": 1, "destination_stage": t, "gap": f"1->{t}",
             "adapter": "bottleneck", "resize": resize, "resamples": True, "resize_modes": rm, "seed": seed,
             "top1": 50.0 + t + seed, "top5": 90.0, "macs": 1e9 * t, "lr": 0.002}
            for t, resize, rm in [(1, "bilinear", "bilinear|strided"), (2, "bilinear", "bilinear|strided"),
                                  (3, "none", "none|bilinear|strided"), (4, "strided", "strided"),
                                  (4, "bilinear", "bilinear")]
            for seed in (0, 1)]
    agg = aggregate(prepare(pd.DataFrame(rows)))
    strided = agg[agg["method"] == method_label("stitched", "bottleneck", "strided")]
    bilinear = agg[agg["method"] == method_label("stitched", "bottleneck", "bilinear")]
    assert list(strided["destination_stage"]) == [1, 2, 3, 4] == list(bilinear["destination_stage"])
    assert list(strided["n"]) == [2, 2, 2, 2]
    assert strided["top1_mean"].iloc[0] == bilinear["top1_mean"].iloc[0] == 51.5


def test_a_trained_run_writes_its_recipe(tmp_path):
    """The real trainer on a tiny synthetic run: the result row carries the recipe and the resize modes."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stitching.train", "--config", str(REPO / "configs" / "synthetic" / "tiny.yaml"),
         f"output.dir={out}", "model.adapter_style=text", "train.lr_schedule_unit=epoch",
         "train.per_device_batch_size=32", "train.max_steps_per_epoch=1", "data.train_size=64",
         "data.val_size=32", "data.normalize=imagenet", "data.eval_crop_pct=0.875", "output.save_model=false",
         "data.label=Synthetic shapes",
         "train.device=cpu"],   # it asserts fp32, the CPU's precision
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "result.csv", dtype=str).iloc[0]
    assert list(row.index) == RESULT_COLUMNS
    expected = {"adapter_style": "text", "frozen_bn": "eval", "lr_schedule": "cosine", "lr_schedule_unit": "epoch",
                "batch_size": "64", "per_device_batch_size": "32", "epochs": "1", "lr": "0.002",
                "weight_decay": "0.05", "img_size": "32", "precision": "fp32", "normalize": "imagenet",
                "eval_crop_pct": "0.875", "max_steps_per_epoch": "1", "auto_augment": "False",
                "dataset": "synthetic", "resize_modes": "bilinear", "resize": "bilinear",   # downsamples
                "pos_embed": "none", "data_label": "Synthetic shapes"}
    assert {k: row[k] for k in expected} == expected


# every config key is either part of the recipe or says here why not: a new key must be classified
NOT_RECIPE = {
    "model.source": "structure (scenario key)", "model.destination": "structure", "model.source_stage": "structure",
    "model.destination_stage": "structure", "model.source_block": "structure (source_block column)",
    "model.destination_block": "structure (destination_block column)", "model.adapter": "structure",
    "model.resize": "structure",
    "model.schedule": "structure (its own result column)", "model.source_weights": "-> pretrained",
    "model.code_quirks": "-> adapter_style (code+quirks)",
    "model.destination_weights": "-> pretrained", "model.pretrained": "-> pretrained",
    "model.source_kwargs": "-> model_kwargs", "model.destination_kwargs": "-> model_kwargs",
    "model.init_images": "-> init_images (least_squares only)",
    "model.code_quirks": "-> adapter_style (code+quirks)",
    "data.name": "-> dataset", "data.root": "-> dataset", "data.label": "a display name (data_label column)", "data.num_classes": "-> num_classes",
    "data.train_size": "synthetic data only", "data.val_size": "synthetic data only",
    "data.seed": "synthetic data only", "data.workers": "execution",
    "data.pipeline": "execution (same augmentation distribution)", "data.decode": "execution (same draws)",
    "data.bad_images": "unreadable files only",
    "train.seed": "averaged over", "train.device": "execution", "train.precision": "-> precision (resolved)",
    "train.channels_last": "execution (same numbers)", "train.fold_bn": "execution (same function)",
    "train.distill_temperature": "-> distill_temperature (distill only)",
    "train.match_epochs": "-> match_epochs (match_then_task only, resolved)",
    "train.similarity_images": "measurement (its own column similarity_images)",
    "train.compile": "execution", "train.log_every": "logging", "train.preempt_check_every": "execution",
    "train.per_device_batch_size":
    "-> per_device_batch_size (resolved)", "output.dir": "where", "output.save_model": "what is kept",
    "output.log_to": "logging (live curves)",
}


def test_every_config_key_is_recipe_or_says_why_not():
    from stitching.config import SECTIONS
    from stitching.results.recipe import RECIPE

    keys = {f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.__dataclass_fields__}
    in_recipe = {k for k in RECIPE.values() if k is not None}
    assert not in_recipe & set(NOT_RECIPE)
    assert keys == in_recipe | set(NOT_RECIPE), sorted(keys ^ (in_recipe | set(NOT_RECIPE)))


def test_a_mode_also_run_on_its_own_is_not_doubled():
    base = dict.fromkeys(RESULT_COLUMNS, "")
    rows = [{**base, "run_id": f"{resize}{seed}", "kind": "stitched", "source": "vit_small_patch16_224",
             "destination": "resnet50", "source_stage": 1, "destination_stage": 1, "gap": "1->1",
             "adapter": "bottleneck", "resize": resize, "resamples": True, "resize_modes": "bilinear|strided",
             "seed": seed, "top1": top1 + seed, "top5": 90.0, "macs": 1e9, "lr": 0.002}
            for resize, top1 in (("bilinear", 50.0), ("strided", 60.0)) for seed in (0, 1)]
    agg = aggregate(prepare(pd.DataFrame(rows)))
    assert sorted(zip(agg["resize"], agg["n"], agg["top1_mean"])) == [("bilinear", 2, 50.5), ("strided", 2, 60.5)]


def test_collect_says_how_many_recipes_it_found(results, tmp_path):
    mixed = _two_recipes(results)
    picks = pd.concat([mixed[mixed["adapter_style"] == "code"].head(2), mixed[mixed["adapter_style"] == "text"].head(1)])
    for i, (_, row) in enumerate(picks.iterrows()):
        (tmp_path / "runs" / f"r{i}").mkdir(parents=True)
        pd.DataFrame([row]).to_csv(tmp_path / "runs" / f"r{i}" / "result.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "stitching.collect", str(tmp_path / "runs"), "-o",
                           str(tmp_path / "results.csv")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "recipes:    2 recipes (they differ in adapter_style: code, text)" in proc.stdout


def test_a_recipe_column_an_older_result_lacks_is_read_from_its_config_or_its_baseline(tmp_path):
    """A result.csv written before a recipe column existed (here ``hflip``) is collected with the value its
    run's config.yaml holds, or, where the config lacks the key too, the key's identity baseline (0.5: the
    flip every run had before the key existed); a results CSV without the column reads as the baseline."""
    from stitching.config import Config
    from stitching.plots.aggregate import load_results

    row = pd.DataFrame([_row(kind="stitched", source="resnet50", destination="resnet50", source_stage=1,
                             destination_stage=2, adapter="bottleneck", resize="bilinear", lr=0.002, seed=0,
                             top1=70.0, macs=3.58e9)]).drop(columns=["hflip"])
    config = Config().to_dict()
    for name, hflip in (("unflipped", 0.0), ("older", None)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        cfg = {s: dict(v) for s, v in config.items()}
        if hflip is None:
            cfg["data"].pop("hflip")
        else:
            cfg["data"]["hflip"] = hflip
        cfg["train"]["seed"] = 0 if hflip is None else 1          # two runs, not duplicates
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        row.assign(run_id=name).to_csv(run / "result.csv", index=False)
    df, problems = collect(tmp_path / "runs")
    assert not problems
    assert dict(zip(df["run_id"], df["hflip"].map(float))) == {"unflipped": 0.0, "older": 0.5}
    row.to_csv(tmp_path / "old.csv", index=False)
    assert load_results(tmp_path / "old.csv")["hflip"].map(float).tolist() == [0.5]


def test_models_built_with_other_arguments_share_a_figure_but_are_never_averaged(results, tmp_path):
    """model_kwargs (e.g. a ViT's patch size for small images) is part of what an architecture is: a
    cross-architecture figure shows pairs whose models take different arguments (one recipe), while two runs
    of the same scenario built differently stay two scenarios."""
    from stitching.results.recipe import split_by_recipe

    df = results.copy()
    df["model_kwargs"] = ""
    vit = df["destination"].astype(str).str.startswith("vit")
    assert vit.any() and (~vit & (df["kind"] == "stitched")).any()
    df.loc[vit, "model_kwargs"] = '{"destination": {"patch_size": 8}}'
    assert len(split_by_recipe(df)) == 1
    one = df[(df["kind"] == "stitched") & ~vit].iloc[[0]]
    twin = one.assign(model_kwargs='{"source": {"width": 2}}', top1=one["top1"] + 10)
    agg = aggregate(prepare(pd.concat([df, twin], ignore_index=True)))
    keys = one.iloc[0][["source", "destination", "source_stage", "destination_stage"]].to_dict()
    same = agg[(agg[list(keys)] == pd.Series(keys)).all(axis=1) & (agg["method"] == method_label(
        one.iloc[0]["kind"], one.iloc[0]["adapter"], one.iloc[0]["resize"])) & (agg["lr"] == one.iloc[0]["lr"])]
    assert len(same) == 2 and set(same["model_kwargs"]) == {"", '{"source": {"width": 2}}'}
    written = draw_all(df, tmp_path / "fig")
    assert any(p.name == "cross_architecture.png" for p in map(Path, written))
    assert not any("recipe-" in str(p) for p in written)


# ------------------------------------------------------------------------------- one declaration per column
def test_a_result_column_is_one_declaration_and_collection_types_it_from_there(tmp_path):
    """Every column's type and whether it is required come from its one declaration (``schema.COLUMNS``):
    collection gives each declared int column ``Int64``, each float one ``float64`` and keeps the strings; a
    ``result.csv`` lacking a declared-required column is damaged, naming it; a declared column without its value in
    the row builder is refused, naming it (a new column is its declaration plus its value)."""
    from stitching.results import row as row_module
    from stitching.results.collect import read_result
    from stitching.results.schema import COLUMNS, REQUIRED_COLUMNS

    assert [c.name for c in COLUMNS] == RESULT_COLUMNS and len(set(RESULT_COLUMNS)) == len(RESULT_COLUMNS)
    values = {int: "3", float: "0.5", str: "x"}
    raw = {c.name: values[c.type] for c in COLUMNS} | {"kind": "stitched", "top1": "50.0"}
    pd.DataFrame([raw]).to_csv(tmp_path / "result.csv", index=False)
    df = normalize_columns(read_result(tmp_path / "result.csv"))
    for c in COLUMNS:
        dtype = df[c.name].dtype
        if c.type is str:           # kept as read (object, or pandas' string dtype)
            assert pd.api.types.is_string_dtype(dtype) or dtype == object, (c.name, dtype)
        else:
            assert str(dtype) == {int: "Int64", float: "float64"}[c.type], (c.name, dtype)
    for name in REQUIRED_COLUMNS:
        pd.DataFrame([{k: v for k, v in raw.items() if k != name}]).to_csv(tmp_path / "result.csv", index=False)
        with pytest.raises(DamagedResult, match=f"missing required columns: {name}$"):
            read_result(tmp_path / "result.csv")
    with pytest.MonkeyPatch.context() as mp:       # a column declared, its value not given: said, not written
        mp.setattr(row_module, "RESULT_COLUMNS", [*RESULT_COLUMNS, "a_new_column"])
        with pytest.raises(ValueError, match="a_new_column"):
            row_module.result_row(**_row_values())


def _row_values() -> dict:
    """:func:`stitching.results.row.result_row`'s arguments for an original model's row (no plan, no training)."""
    from stitching.validate import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", check=False)
    return dict(run_id="r", cfg=cfg, kind="original", plan=None, precision="fp32", world_size=1,
                evaluation={"top1": 1.0, "top5": 2.0, "val_loss": 3.0}, train_loss="", init_residual="",
                cost={"macs": 1, "flops": 2, "params": 3, "trainable_params": 0}, train_macs="", before=None,
                after=None, images_per_s=0.0, wall_time_s=1.0, pack="", device="cpu")


def test_the_row_builder_fills_every_declared_column():
    from stitching.results.row import result_row

    row = result_row(**_row_values())
    assert list(row) == RESULT_COLUMNS
    assert row["kind"] == "original" and row["destination"] == row["source"] == "resnet50" and row["gap"] == ""
    assert row["top1"] == 1.0 and row["macs"] == 1 and row["cka_before"] == "" and row["lr"] not in ("", None)


def test_collection_gives_rows_of_older_versions_their_resize_modes(results):
    """Rows written before ``resize_modes`` (and before ``resamples``) get it in collection, so the plots read one
    shape: within a (source, destination, adapter) that used bilinear somewhere, a gap whose every row says
    ``none`` stands for none and bilinear; gaps run with a resize mode, and rows that say it, stay as they are."""
    df = normalize_columns(results)
    stitched = df[df["kind"] == "stitched"]
    gap = (stitched["source"] == "resnet50") & (stitched["destination"] == "resnet50") \
        & (stitched["adapter"] == "bottleneck") & (stitched["source_stage"] == 1)
    assert set(stitched[gap & (stitched["destination_stage"] == 1)]["resize_modes"]) == {"none|bilinear"}
    assert stitched[gap & (stitched["destination_stage"] > 1)]["resize_modes"].isna().all()
    said = results.assign(resize_modes="none")       # a newer row says it: kept
    assert set(normalize_columns(said)[lambda d: d["kind"] == "stitched"]["resize_modes"]) == {"none"}
