"""Closed-form stitching matrices (``python -m stitching.matrix FILE --closed-form``, stitching/matrix/closed_form.py):
the shared-pass fit of every cell equals the one-cell least-squares initialisation, a cell's result equals the
trainer's run of its config, an interrupted group resumed equals an uninterrupted one, the calibrated scores
equal hand-computed values, the predictors' comparison, and the refusals."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stitching import rundir as R
from stitching import rundir_ending
from stitching.validate import load_config
from stitching.matrix import closed_form as CF
from stitching.matrix import passes as P
from stitching.stitch.lsinit import fit
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
VIT = {"patch_size": 8, "img_size": 32}
#: a result row's columns that say when and how long, not what
TIMING = {"run_id", "wall_time_s", "finished_at"}


def _weights(path: Path, name: str = "resnet18", kwargs=None) -> Path:
    """A network (10 classes) with its own random weights, as a weights file: the 'trained' network."""
    from safetensors.torch import save_file

    from stitching.models.weights import load_model

    torch.manual_seed(123)
    model = load_model(name, False, None, 10, kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _images(n_batches=3, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_batches)]
    return lambda: iter(batches)


# ------------------------------------------------------------------------------------------ the shared pass
BLOCKS = ["model.source_stage=null", "model.destination_stage=null"]     # cuts (i, j) below: block cuts


@pytest.mark.parametrize("overrides,cuts", [
    # ResNet-18 with itself (one network: one forward per batch), one- and two-adapter chains, a strided
    # bottleneck, the destination schedule
    (["model.adapter=linear"], [(1, 2), (1, 3), (3, 4)]),
    (["model.adapter=bottleneck", "model.resize=strided", "model.schedule=destination"], [(1, 3), (2, 4)]),
    # ResNet-18 -> ViT (two networks, a token destination) with its position embedding re-injected; and back
    (["model.adapter=linear", "model.destination=vit_tiny_patch16_224",
      f"model.destination_kwargs={VIT}", "model.pos_embed=reinject"], [(1, 1), (2, 2)]),
    (["model.adapter=linear_relu", "model.source=vit_tiny_patch16_224", f"model.source_kwargs={VIT}",
      "model.destination=resnet18", "model.destination_kwargs={}", "model.schedule=destination"],
     [(2, 3), (3, 3)]),
    # block cuts: chains across stage boundaries, each intermediate link fitted to the destination's first block
    # of the stage between -- forwards (paper schedule: its shapes are ResNet-18's own), and backwards from ViT
    # blocks into ResNet-18 (destination schedule), besides one-adapter cells
    ([*BLOCKS, "model.adapter=linear"], [(0, 4), (1, 7), (2, 3), (5, 5)]),
    ([*BLOCKS, "model.adapter=bottleneck", "model.source=vit_tiny_patch16_224", f"model.source_kwargs={VIT}",
      "model.destination=resnet18", "model.destination_kwargs={}", "model.schedule=destination"],
     [(11, 0), (6, 1), (3, 4), (0, 3)]),
])
def test_the_shared_pass_fit_of_every_cell_equals_its_one_cell_least_squares_init(overrides, cuts):
    keys = ("source_block", "destination_block") if BLOCKS[0] in overrides else ("source_stage", "destination_stage")
    cfgs = [load_config(TINY, ["model.init=least_squares", "train.epochs=0", "model.random_init=none",
                               *overrides, f"model.{keys[0]}={s}", f"model.{keys[1]}={t}"])
            for s, t in cuts]
    nets, cells = CF.build_cells(cfgs)
    images = _images(2, 8)
    passes = P.fit_cells(cells, P.SharedForward(nets, P.parts_of(nets), cells[0].built.destination_input), images,
                          "cpu")
    assert passes == max(len(c.chain) for c in cells) + 1
    for cfg, cell in zip(cfgs, cells):
        torch.manual_seed(cfg.train.seed)       # the trainer's build, then its fit on the same batches
        one = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
        out = fit(one, images)
        assert cell.residual == pytest.approx(out["residual"], rel=1e-9, abs=1e-12)
        assert [link["residual"] for link in cell.links] == pytest.approx([link["residual"] for link in out["links"]],
                                                                          rel=1e-9, nan_ok=True)
        mine, theirs = cell.built.model.adapters.state_dict(), one.model.adapters.state_dict()
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=f"{cfg.model} {k}")
    # one network stitched to itself runs once per batch; two networks once each
    assert nets.same == ("model.destination=vit_tiny_patch16_224" not in overrides
                         and "model.source=vit_tiny_patch16_224" not in overrides)


@pytest.mark.parametrize("budget", [0, 10_000, P.FIT_CACHE_BYTES])
def test_the_kept_activations_give_the_streamed_fit_and_spare_the_later_passes_their_forwards(budget):
    """Chains of 1-3 links (4 passes): with the activations kept (the default budget), only the first pass runs
    the networks; with none kept (0), or a budget the first batches overflow, every pass runs them; the fitted
    adapters and residuals are the same numbers whichever way."""
    cuts = [(0, 4), (7, 1), (2, 3), (5, 5)]
    cfgs = [load_config(TINY, ["model.init=least_squares", "train.epochs=0", *BLOCKS, "model.adapter=bottleneck",
                               "model.schedule=destination", f"model.source_block={s}", f"model.destination_block={t}"])
            for s, t in cuts]
    images = _images(3, 8)

    def run(cache_bytes):
        nets, cells = CF.build_cells(cfgs)
        shared = P.SharedForward(nets, P.parts_of(nets), cells[0].built.destination_input)
        calls = []
        counted = lambda x, *a: (calls.append(1), P.SharedForward.__call__(shared, x, *a))[1]  # noqa: E731
        passes = P.fit_cells(cells, counted, images, "cpu", cache_bytes=cache_bytes)
        return passes, len(calls), cells

    passes, forwards, cells = run(budget)
    _, streamed_forwards, streamed = run(0)
    assert passes == 4 and streamed_forwards == 4 * 3          # 3 batches a pass
    assert forwards == (3 if budget == P.FIT_CACHE_BYTES else 12)
    for a, b in zip(cells, streamed):
        assert a.residual == b.residual
        assert [x["residual"] for x in a.links] == pytest.approx([x["residual"] for x in b.links], rel=0, abs=0,
                                                                 nan_ok=True)     # (nan: nothing fitted)
        for (k, v), w in zip(a.built.model.adapters.state_dict().items(), b.built.model.adapters.state_dict().values()):
            assert torch.equal(v, w), k


# ------------------------------------------------------------------------------------------ the command
@pytest.fixture
def matrix_file(tmp_path) -> Path:
    """A 2x2 closed-form matrix (sender stages 1, 2 x receiver stages 2, 3; 1 -> 3 is a chain of two) with the
    random-receiver control, on a path with a space and a '#'."""
    home = tmp_path / "my runs #1"
    home.mkdir()
    weights = _weights(home / "resnet18.safetensors")
    (home / "base.yaml").write_text(yaml.safe_dump({
        "base": str(TINY),
        "model": {"source_weights": str(weights), "adapter": "linear"},
        "data": {"train_size": 64, "val_size": 48},
        "train": {"batch_size": 32, "max_steps_per_epoch": 2, "device": "cpu", "similarity_images": 0},
    }))
    path = home / "m.yaml"
    path.write_text("name: two_by_two\nbase: base.yaml\nsenders: [1, 2]\nreceivers: [2, 3]\ncontrols: [destination]\n")
    return path


def cli(*args, module="stitching.matrix", check=True, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _row(d: Path) -> dict:
    return pd.read_csv(d / R.RESULT, dtype=str, keep_default_na=False).iloc[0].to_dict()


def _same_value(x: str, y: str) -> bool:
    """Equal strings, or numbers equal to 1e-9 relative (the group's process may run on another thread count than
    the trainer's: sums in another order)."""
    if x == y:
        return True
    try:
        return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return False


def _same_rows(a: dict, b: dict) -> None:
    differ = {k: (a[k], b[k]) for k in a if k not in TIMING and not _same_value(a[k], b[k])}
    assert not differ


@pytest.mark.slow       # one matrix (2 groups of 4 cells, the receiver alone) and one trainer run (~40 s here)
def test_the_cli_computes_draws_and_each_cell_equals_the_trainers_run_of_its_config(matrix_file, tmp_path):
    runs = matrix_file.parent / "runs"
    out = cli(matrix_file, "--closed-form", "--launcher", "local", "--runs-dir", runs).stdout
    assert "2 groups (one per control and seed" in out and "total runs: 9 (0 finished" in out
    assert "trained.seed0: fitted 4 cells on 64 training images in 3 shared passes" in out
    results = pd.read_csv(runs / "results.csv")
    assert len(results) == 9 and (results["kind"] == "original").sum() == 1      # 8 cells + the receiver
    cells = results[results["kind"] == "stitched"]
    assert (cells["init"] == "least_squares").all() and (cells["epochs"] == 0).all()
    assert cells["init_residual"].between(0, 1).all() and cells["cka_before"].notna().all()
    assert (cells["similarity_images"] == 48).all()      # the base switched it off: the closed form measures it
    table = pd.read_csv(runs / "matrix.csv")
    assert len(table) == 8 and (table["fit"] == "closed_form").all()
    receiver = results[results["kind"] == "original"]["top1"].item()
    assert (table["receiver_top1"] == receiver).all() and table["cka"].notna().all()
    for png in ("matrix_heatmaps.png", "accuracy_vs_depth.png", "calibrated_heatmaps.png",
                "similarity_heatmaps.png"):
        assert (runs / "figures" / png).stat().st_size > 10_000
    # a cell (two chained adapters, random receiver) computed by the trainer from its config.yaml alone
    cell = next((runs / "random-receiver.seed0").glob("resnet18.1-resnet18.3.*"))
    alone = tmp_path / "alone #2"
    alone.mkdir()
    (alone / R.CONFIG).write_text((cell / R.CONFIG).read_text())
    cli("--run-dir", alone, module="stitching.train")
    _same_rows(_row(cell), _row(alone))
    # a finished matrix computes nothing
    again = cli(matrix_file, "--closed-form", "--launcher", "local", "--runs-dir", runs).stdout
    assert "nothing to do: every cell has finished" in again and "[closed form] group" not in again


def _group(tmp_path, name: str, cuts=((1, 2), (1, 3), (2, 2), (2, 3))) -> Path:
    """A group directory of closed-form cells, written as the matrix command writes them."""
    weights = tmp_path / "w.safetensors"
    if not weights.exists():
        _weights(weights)
    group = tmp_path / name
    for s, t in cuts:
        cfg = load_config(TINY, ["model.init=least_squares", "train.epochs=0", "model.adapter=linear",
                                 f"model.source_weights={weights}", "data.train_size=64", "data.val_size=32",
                                 "train.batch_size=16", "train.device=cpu", "train.similarity_images=32",
                                 "output.save_model=false", f"model.source_stage={s}", f"model.destination_stage={t}"])
        R.RunDir(group / f"cell{s}{t}").write_text(R.CONFIG, cfg.to_yaml())
    return group


@pytest.mark.slow       # three group computations of four tiny cells (~25 s here)
def test_an_interrupted_group_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = _group(tmp_path, "whole")
    assert CF.run_group(whole) == R.EXIT_OK
    expected = {d.name: _row(d) for d in CF.cell_dirs(whole)}
    # interrupted: a SIGTERM in the middle of the first fit pass; the group stops, writing nothing
    cut = _group(tmp_path, "cut")
    real = CF.lsinit.LinkFit.update
    seen = []

    def update(self, h, y):
        seen.append(1)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, h, y)

    monkeypatch.setattr(CF.lsinit.LinkFit, "update", update)
    assert CF.run_group(cut) == R.EXIT_PREEMPTED
    assert not list(cut.glob(f"*/{R.RESULT}")) and not (cut / R.LOCK).exists()
    monkeypatch.setattr(CF.lsinit.LinkFit, "update", real)
    # killed while writing: two cells had their result written, two not
    assert CF.run_group(cut) == R.EXIT_OK
    for d in CF.cell_dirs(cut)[2:]:
        (d / R.RESULT).unlink()
    kept = {d.name: (d / R.RESULT).stat().st_mtime_ns for d in CF.cell_dirs(cut)[:2]}
    said = []
    assert CF.run_group(cut, say=said.append) == R.EXIT_OK
    assert "wrote 2 cells (2 were finished)" in said[-1]
    assert {d.name: (d / R.RESULT).stat().st_mtime_ns for d in CF.cell_dirs(cut)[:2]} == kept   # left alone
    for d in CF.cell_dirs(cut):
        _same_rows(expected[d.name], _row(d))
    # a finished group is skipped
    said.clear()
    assert CF.run_group(cut, say=said.append) == R.EXIT_OK and said == ["cut: all 4 cells finished"]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_interrupts_a_group_with_130_and_its_state_says_so(tmp_path, monkeypatch, presses):
    """Ctrl-C as the trainer takes it (stitching.train.stop): the first stops the group at the next batch, a
    second at once; either way exit 130 (not 75: the local launcher reports the group interrupted, not
    preempted), nothing written for its cells, the lock released, the signal handlers back, and the group's
    state.json says how it ended (what rundir_ending.ending reads for the launcher)."""
    group = _group(tmp_path, "g", cuts=((1, 2),))
    before = signal.getsignal(signal.SIGINT)
    real = CF.lsinit.LinkFit.update
    seen = []

    def update(self, h, y):
        seen.append(1)
        if len(seen) == 1:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, h, y)

    monkeypatch.setattr(CF.lsinit.LinkFit, "update", update)
    assert CF.run_group(group) == R.EXIT_INTERRUPTED
    assert not list(group.glob(f"*/{R.RESULT}")) and not (group / R.LOCK).exists()
    assert signal.getsignal(signal.SIGINT) is before
    ending = rundir_ending.ending(group, R.EXIT_INTERRUPTED, os.getpid())
    assert ending.status == R.INTERRUPTED and "computed when it runs again" in ending.message


def test_a_group_refuses_cells_of_another_group_or_not_closed_form(tmp_path):
    from stitching.config import ConfigError

    group = _group(tmp_path, "g", cuts=((1, 2),))
    other = load_config(TINY, ["model.init=least_squares", "train.epochs=0", "model.adapter=bottleneck",
                               "model.source_stage=1", "model.destination_stage=3"])
    R.RunDir(group / "stranger").write_text(R.CONFIG, other.to_yaml())
    with pytest.raises(ConfigError, match=r"is not of the same group as .* \(differs in .*model.adapter"):
        CF.run_group(group)
    trained = load_config(TINY, ["model.source_stage=1", "model.destination_stage=2"])
    R.RunDir(group / "stranger").write_text(R.CONFIG, trained.to_yaml())
    with pytest.raises(ConfigError, match=r"model.init='default': a closed-form cell is the run"):
        CF.run_group(group)
    assert not list(group.glob(f"*/{R.RESULT}"))


def test_the_cli_refuses_adapters_without_a_map_in_one_line(tmp_path):
    base = tmp_path / "vit.yaml"
    base.write_text(yaml.safe_dump({"base": str(TINY), "model": {
        "source": "vit_tiny_patch16_224", "source_kwargs": VIT, "adapter": "vit_block"}}))
    spec = tmp_path / "m.yaml"
    spec.write_text("base: vit.yaml\ncontrols: []\n")
    proc = cli(spec, "--closed-form", "--launcher", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {base}: model.adapter='vit_block': --closed-form fits the adapters by least squares: linear, "
        "linear_relu, conv3x3, bottleneck have a map to fit"]


def test_dry_run_counts_the_cells_a_block_matrix_cannot_fit(tmp_path, capsys):
    """Block cuts across stage boundaries chain adapters, each intermediate one fitted to the destination's first
    block of the stage between; the paper schedule's backward chains upsample at once, so their first adapter
    has no such activation: no closed form for them (the trainer refuses model.init=least_squares there too,
    before building), but with the destination schedule."""
    from stitching.config import ConfigError
    from stitching.matrix.__main__ import main

    spec = tmp_path / "m.yaml"
    spec.write_text(f"base: {TINY}\ncuts: blocks\nsenders: stages\nreceivers: stages\nseeds: [0, 1]\n")
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert main([str(spec), "--closed-form", "--launcher", "local", "--runs-dir", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 groups (one per control and seed" in out
    assert "cells that cannot be stitched or fitted in closed form: 24" in out     # 3 of 16 cells x 4 x 2 seeds
    assert ("model.schedule: least-squares init fits adapter 1 to the destination's own activation after the first "
            "block of\n          stage 3 (256@2x2 (image)), but it outputs 256@8x8: use model.schedule=destination") in out
    assert "       0 .. .. .. ..\n" in out         # sender block 0 into every receiver: chains of 1, 2 and 3
    assert "       6  x  x .. ..\n" in out         # sender block 6 (stage 4) back into stages 1 and 2: none
    assert "total runs: 105 (" in out and not runs.exists()
    back = ["model.init=least_squares", *BLOCKS, "model.source_block=6", "model.destination_block=0"]
    with pytest.raises(ConfigError, match="model.schedule='paper': least-squares init fits adapter 1 to the "
                                          "destination's own activation after the first block of stage 3"):
        load_config(TINY, back)
    assert load_config(TINY, [*back, "model.schedule=destination"]).model.schedule == "destination"


# ------------------------------------------------------------------------------------------ calibrated scores
def _results(rows: list[tuple]) -> pd.DataFrame:
    """Result rows (control, sender stage, receiver stage, seed, top1) of a resnet18 matrix, the receiver's."""
    out = [{"kind": "stitched", "source": "resnet18", "destination": "resnet18", "random_init": c,
            "source_stage": s, "destination_stage": t, "seed": seed, "top1": top1, "img_size": 32,
            "model_kwargs": "", "init": "default", "epochs": 1, "cka_before": 0.5, "ls_residual_before": 0.25,
            "init_residual": "", "run_dir": f"{c}{s}{t}{seed}"} for c, s, t, seed, top1 in rows]
    out.append({"kind": "original", "source": "resnet18", "destination": "resnet18", "random_init": "none",
                "top1": 80.0, "run_dir": "receiver"})
    return pd.DataFrame(out)


def test_calibrated_scores_against_hand_computed_values(tmp_path):
    from stitching.matrix.cells import calibrated, cell_table
    from stitching.matrix.spec import load_matrix

    spec = tmp_path / "m.yaml"
    spec.write_text(f"base: {TINY}\nsenders: [1]\nreceivers: [2, 3]\nseeds: [0, 1]\n")
    matrix = load_matrix(spec)
    # cell 1 -> 2, seeds 0 / 1: trained 60 / 70; random sender 20 / 30, random receiver 40 / 70, both 10 / 10;
    # cell 1 -> 3: trained 50 (seed 0 only), random receiver 85 (above the receiver's 80: undefined)
    results = _results([("none", 1, 2, 0, 60.0), ("none", 1, 2, 1, 70.0), ("source", 1, 2, 0, 20.0),
                        ("source", 1, 2, 1, 30.0), ("destination", 1, 2, 0, 40.0), ("destination", 1, 2, 1, 70.0),
                        ("both", 1, 2, 0, 10.0), ("both", 1, 2, 1, 10.0), ("none", 1, 3, 0, 50.0),
                        ("destination", 1, 3, 0, 85.0), ("source", 1, 3, 1, 40.0)])
    table = cell_table(results, matrix).set_index(["control", "sender_cut", "receiver_cut"])
    row = table.loc[("none", 1, 2)]
    assert row["receiver_top1"] == 80.0 and row["fit"] == "trained" and row["n"] == 2
    # by hand: source (60-20)/(80-20) = 2/3 and (70-30)/(80-30) = 4/5; mean 11/15, s.e. |4/5 - 2/3| / 2 = 1/15
    assert row["calibrated_source"] == pytest.approx(11 / 15)
    assert row["calibrated_source_se"] == pytest.approx(1 / 15)
    # destination (60-40)/40 = 1/2 and (70-70)/10 = 0; both (60-10)/70 = 5/7 and (70-10)/70 = 6/7
    assert row["calibrated_destination"] == pytest.approx(1 / 4)
    assert row["calibrated_destination_se"] == pytest.approx(1 / 4)
    assert row["calibrated_both"] == pytest.approx(11 / 14)
    assert row["calibrated_both_se"] == pytest.approx(1 / 14)
    assert row["cka"] == 0.5 and row["ls_residual"] == 0.25
    other = table.loc[("none", 1, 3)]
    assert np.isnan(other["calibrated_destination"])         # the control beats the receiver: undefined
    assert np.isnan(other["calibrated_source"])              # no seed in common (0 vs 1)
    assert np.isnan(other["calibrated_both"])                # no such control cell
    assert table.loc[("source", 1, 2)][["calibrated_source", "calibrated_both"]].isna().all()   # controls: none
    assert calibrated(60, 20, 80) == pytest.approx(2 / 3) and np.isnan(calibrated(60, 80, 80))
    # no receiver row: no calibrated scores
    no_receiver = cell_table(results[results["kind"] == "stitched"], matrix)
    assert no_receiver["receiver_top1"].isna().all() and no_receiver["calibrated_source"].isna().all()


def test_a_one_panel_calibrated_figure_keeps_its_title_inside(tmp_path):
    """The title (the pair, the formula, how to read it) is wrapped to the figure's width: with one control (one
    panel) it ran off both edges."""
    from stitching.matrix.cells import cell_table
    from stitching.matrix.spec import load_matrix
    from stitching.plots.matrix import plot_calibrated_heatmaps

    spec = tmp_path / "m.yaml"
    spec.write_text(f"base: {TINY}\nsenders: [1]\nreceivers: [2]\ncontrols: [destination]\n")
    table = cell_table(_results([("none", 1, 2, 0, 60.0), ("destination", 1, 2, 0, 40.0)]), load_matrix(spec))
    fig = plot_calibrated_heatmaps(table, caption="a recipe")
    fig.canvas.draw()
    width = fig.bbox.width
    assert "calibrated scores" in fig.get_suptitle() and len(fig.texts) == 2      # the title and the caption
    for text in fig.texts:
        box = text.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= width, (text.get_text(), box, width)


# ------------------------------------------------------------------------------------------ prediction
def test_spearman_and_top_agreement_against_hand_computed_values():
    from stitching.matrix.predict import compare, spearman, top_agreement

    # ranks (1, 2, 3, 4) vs (1, 3, 2, 4): d^2 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([10, 20, 30, 40], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2], [1, 2])) and np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert top_agreement([10, 20, 30, 40], [4, 3, 2, 1], 2) == 0.0
    assert top_agreement([10, 20, 30, 40], [1, 2, 4, 3], 2) == 1.0
    assert top_agreement([10, 20, 30, 40], [1, 3, 2, 4], 2) == 0.5

    def table(values, cka, residual):
        return pd.DataFrame({"control": "none", "sender_cut": [1, 1, 2, 2], "receiver_cut": [2, 3, 2, 3],
                             "top1_mean": values, "cka": cka, "ls_residual": residual})

    trained = table([10.0, 20.0, 30.0, 40.0], np.nan, np.nan)
    other = table([1.0, 3.0, 2.0, np.nan], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    rows = compare(trained, other).set_index(["predictor", "scope"])
    # the closed form lacks a cell: three compared, ranks (1, 2, 3) vs (1, 3, 2): rho = 1 - 6 * 2 / 24 = 0.5
    assert rows.loc[("closed-form top-1", "all"), "n"] == 3
    assert rows.loc[("closed-form top-1", "all"), "rho"] == pytest.approx(0.5)
    # a lower residual predicts a better stitch: the residual ranks the cells exactly
    assert rows.loc[("least-squares residual", "trained"), "rho"] == pytest.approx(1.0)
    assert rows.loc[("CKA before training", "all"), "top"] == 1.0


# ------------------------------------------------------------------------------------------ SLURM
@pytest.mark.slow       # one group of two tiny cells through the batch script (~15 s here)
def test_a_slurm_array_task_computes_its_group_through_the_batch_script(tmp_path):
    """The job array's script, run as SLURM would run task 0 (``SLURM_ARRAY_TASK_ID``), computes the group
    its line of the task file names, with the command ``--launcher slurm`` submits."""
    from stitching.launch import slurm

    group = _group(tmp_path, "group #1", cuts=((1, 2), (2, 2)))
    task_file = tmp_path / "tasks.txt"
    slurm.write_task_file(task_file, [group])
    res = slurm.SlurmResources.from_dict({"cpus_per_task": 1, "time": "00:10:00"})
    script = tmp_path / "array.sbatch"
    script.write_text(slurm.render_array_script(task_file, 1, res, tmp_path / "logs", "cf", CF.group_command(),
                                                chdir=ROOT))
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "7", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "group #1: wrote 2 cells (0 were finished)" in proc.stdout
    assert all((d / R.RESULT).is_file() for d in CF.cell_dirs(group))


@pytest.mark.slurm
def test_slurm_closed_form_matrix_is_one_array_of_groups_never_resubmitted_then_drawn(slurm_cluster, matrix_file):
    from tests.test_sweep import _wait_for_results

    matrix_file.write_text(matrix_file.read_text().replace("senders: [1, 2]", "senders: [1]")
                           + 'slurm: {cpus_per_task: 1, mem: 2G, time: "00:20:00", max_parallel: 2, '
                           # held a minute: the second submission finds them queued (a tiny group can finish
                           # within the seconds a second command takes on a busy machine)
                           'extra: ["--begin=now+60"]}\n')
    runs = matrix_file.parent / "runs"
    first = cli(matrix_file, "--closed-form", "--launcher", "slurm", "--runs-dir", runs).stdout
    assert "with 1 tasks" in first                       # the receiver alone, a training-command array
    assert "submitted job array" in first and "with 2 group tasks" in first and "--draw" in first
    again = cli(matrix_file, "--closed-form", "--launcher", "slurm", "--runs-dir", runs).stdout
    assert "already queued or running" in again and "with 2 group tasks" not in again
    dirs = sorted(p.parent for p in runs.glob("**/config.yaml"))
    assert len(dirs) == 5                                # 2 groups x 2 cells + the receiver
    _wait_for_results(dirs, timeout=900)
    out = cli(matrix_file, "--closed-form", "--draw", "--runs-dir", runs).stdout
    assert "finished:   5\n" in out
    table = pd.read_csv(runs / "matrix.csv")
    assert len(table) == 4 and (table["fit"] == "closed_form").all()
    assert "nothing to do: every cell has finished" in cli(matrix_file, "--closed-form", "--launcher", "slurm",
                                                           "--runs-dir", runs).stdout


def test_slurm_launcher_without_slurm_is_one_line_for_a_closed_form_matrix(matrix_file, tmp_path):
    if shutil.which("squeue"):
        pytest.skip("a SLURM client is installed here")
    runs = matrix_file.parent / "runs"
    proc = cli(matrix_file, "--closed-form", "--launcher", "slurm", "--runs-dir", runs, check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: command line: --launcher='slurm': ")
    assert "Traceback" not in proc.stderr
