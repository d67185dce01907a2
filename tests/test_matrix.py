"""``python -m stitching.matrix``: a 2x2 stitching matrix with its random-init controls through the real CLI --
dry run, local launch interrupted and resumed, collection and the drawn heatmaps -- and ``model.random_init``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def _weights(path: Path) -> Path:
    """A ResNet-18 (10 classes) with its own random weights: the 'trained' network of the tests' matrices."""
    from safetensors.torch import save_file

    from stitching.models.weights import load_model

    torch.manual_seed(123)
    model = load_model("resnet18", False, None, 10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def matrix_file(tmp_path) -> Path:
    """A 2x2 matrix (sender stages 1, 2 x receiver stages 2, 3) with all three controls: 16 tiny runs."""
    weights = _weights(tmp_path / "resnet18.safetensors")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "base": str(TINY),
        "model": {"source_weights": str(weights), "adapter": "linear"},
        "data": {"train_size": 64, "val_size": 32},
        "train": {"batch_size": 32, "max_steps_per_epoch": 2, "device": "cpu", "similarity_images": 0},
        "output": {"save_model": False},
    }))
    path = tmp_path / "m.yaml"
    path.write_text("name: two_by_two\nbase: base.yaml\nsenders: [1, 2]\nreceivers: [2, 3]\n")
    return path


def cli(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.matrix", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def dry_run(capsys, *args) -> str:
    """The real CLI in this process (no interpreter start-up): its printed output."""
    from stitching.matrix.__main__ import main

    capsys.readouterr()
    assert main([*map(str, args), "--launcher", "local", "--dry-run"]) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------------------------------ random init
def test_random_init_builds_that_side_with_random_weights(tmp_path):
    from stitching.validate import load_config
    from stitching.stitch.stitcher import build_model

    weights = _weights(tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    stem = load_file(str(weights))["conv1.weight"]
    suffix_key = "layer4.1.conv2.weight"
    tail = load_file(str(weights))[suffix_key]

    def build(random_init):
        cfg = load_config(TINY, [f"model.source_weights={weights}", f"model.random_init={random_init}"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.data.img_size, cfg.num_classes).model
        return model.prefix[0][0].weight, model.suffix[-2].conv2.weight     # stem conv; layer4's last conv

    for random_init, (src_file, dst_file) in {"none": (True, True), "source": (False, True),
                                              "destination": (True, False), "both": (False, False)}.items():
        first, last = build(random_init)
        assert torch.equal(first, stem) == src_file and torch.equal(last, tail) == dst_file, random_init
    # the random weights follow train.seed: the same control rebuilds the same network
    assert torch.equal(build("source")[0], build("source")[0])


def test_random_init_is_validated_and_part_of_the_run_identity():
    from stitching.config import IDENTITY, ConfigError
    from stitching.validate import load_config
    from stitching.rundir import run_key

    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.random_init=sender"])
    assert err.value.key == "model.random_init" and "none, source, destination, both" in str(err.value)
    with pytest.raises(ConfigError, match="no destination"):
        load_config(TINY, ["model.source_stage=null", "model.destination_stage=null", "model.random_init=both"])
    keys = {run_key(load_config(TINY, [f"model.random_init={r}"]).to_dict(), IDENTITY)
            for r in ("none", "source", "destination", "both")}
    assert len(keys) == 4


# ------------------------------------------------------------------------------------------ matrix files
def test_dry_run_prints_every_matrix_and_counts_writing_nothing(tmp_path, capsys):
    spec = tmp_path / "full.yaml"
    spec.write_text(f"base: {TINY}\ncuts: stages\nseeds: [0, 1]\n")
    runs = tmp_path / "runs"
    out = dry_run(capsys, spec, "--runs-dir", runs)
    # 4 x 4 stage cells x 2 seeds per matrix, 4 matrices; stage cuts stitch forwards only: 10 of 16 cells
    assert "4 sender x 4 receiver cuts x 2 seeds = 32 cells per matrix; 4 matrices" in out
    # + the receiver evaluated alone (the calibrated scores' ceiling)
    assert "129 grid points -> 81 runs" in out and "cells that cannot be stitched: 48" in out
    for name in ("trained", "random sender", "random receiver", "random sender and receiver"):
        assert f"{name} (20 runs): rows sender stage, columns receiver stage" in out
    assert "       4  x  x  x ..\n" in out          # sender stage 4: only receiver 4, both seeds to train
    assert "receiver alone (evaluated; the calibrated scores' ceiling): . original.resnet18.ep0" in out
    assert "total runs: 81 (0 finished, 0 preempted, 0 interrupted, 0 started, 0 failed, 81 new)" in out
    assert not runs.exists()
    # stride thins the cuts; controls: [] leaves the trained matrix alone
    spec.write_text(f"base: {TINY}\nstride: 2\ncontrols: []\n")
    out = dry_run(capsys, spec, "--runs-dir", runs)
    assert "2 sender x 2 receiver cuts x 1 seed = 4 cells per matrix; 1 matrices" in out
    assert "total runs: 4 " in out and "random sender" not in out


def test_block_matrix_takes_every_pair_backwards_included(tmp_path, capsys):
    from stitching.models.trace import list_blocks

    spec = tmp_path / "blocks.yaml"
    spec.write_text(f"base: {TINY}\ncuts: blocks\nstride: 3\n")      # the base's stage keys are cleared
    out = dry_run(capsys, spec, "--runs-dir", tmp_path / "runs")
    cuts = [b.index for b in list_blocks("resnet18", None, 32)][::3]
    assert cuts == [0, 3, 6]
    assert "3 sender x 3 receiver cuts x 1 seed = 9 cells per matrix; 4 matrices" in out
    assert "37 grid points -> 37 runs" in out and "cells that cannot be stitched" not in out
    assert "       6  .  .  .\n" in out                          # block 6 into blocks 0 and 3: backwards
    # the stage-granularity matrix with every pair: the first block of each stage on either side
    spec.write_text(f"base: {TINY}\ncuts: blocks\nsenders: stages\nreceivers: stages\ncontrols: []\n")
    firsts = [b.index for b in list_blocks("resnet18", None, 32) if b.first]
    assert firsts == [0, 2, 4, 6]
    out = dry_run(capsys, spec, "--runs-dir", tmp_path / "runs")
    assert "total runs: 17 " in out and "        " + "".join(f"{j:>3}" for j in firsts) + "\n" in out
    spec.write_text(f"base: {TINY}\nsenders: stages\n")
    with pytest.raises(Exception, match="needs cuts: blocks"):
        from stitching.matrix.spec import load_matrix

        load_matrix(spec)
    spec.write_text(f"base: {TINY}\ncuts: blocks\nsenders: [8]\n")
    with pytest.raises(Exception, match=r"senders=\[8\]: must be a non-empty list of distinct cuts of the model: 0..7"):
        from stitching.matrix.spec import load_matrix

        load_matrix(spec)


@pytest.mark.parametrize("name,runs", [("tiny", 41), ("resnet50_imagenet", 65)])   # cells + the receiver alone
def test_shipped_matrix_files_expand(name, runs, capsys, tmp_path):
    out = dry_run(capsys, ROOT / "configs" / "matrix" / f"{name}.yaml", "--runs-dir", tmp_path / "runs")
    assert f"total runs: {runs} (0 finished" in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text,key,value", [
    ("base: {tiny}\ncut: stages\n", "cut", "'stages'"),
    ("base: {tiny}\ncuts: layers\n", "cuts", "'layers'"),
    ("base: {tiny}\nstride: 0\n", "stride", "0"),
    ("base: {tiny}\ncontrols: [sender]\n", "controls", "['sender']"),
    ("base: {tiny}\nsenders: [5]\n", "senders", "[5]"),
    ("base: {tiny}\nseeds: 0\n", "seeds", "0"),
    ("base: nowhere.yaml\n", "base", "'nowhere.yaml'"),
    ("base: {tiny}\nslurm: {{gpus: 1}}\n", "slurm", "{'gpus': 1}"),
])
def test_bad_matrix_keys_name_key_value_and_file(tmp_path, text, key, value):
    from stitching.matrix.spec import MatrixError, load_matrix

    spec = tmp_path / "bad.yaml"
    spec.write_text(text.format(tiny=TINY))
    with pytest.raises(MatrixError) as err:
        load_matrix(spec)
    assert err.value.key == key and str(spec) in str(err.value) and f"{key}={value}" in str(err.value)


def test_bad_matrix_file_exits_2_with_one_line_through_the_cli(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"base: {TINY}\ncuts: layers\n")
    proc = cli(spec, "--launcher", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {spec}: cuts='layers': must be one of stages, blocks"]


def test_a_launch_interrupted_between_runs_is_preempted_not_finished(tmp_path, monkeypatch, capsys):
    """SIGTERM while no trainer runs: the runs not started make the launch exit 75 (so nothing is drawn from a
    half matrix), not 0. The first "trainer" here is a script that signals the launcher and exits."""
    from stitching.launch import local
    from stitching.matrix.__main__ import expand_matrix
    from stitching.matrix.spec import load_matrix
    from stitching.sweep.launching import launch

    spec = tmp_path / "m.yaml"
    spec.write_text(f"base: {TINY}\nsenders: [1]\nreceivers: [2, 3, 4]\ncontrols: []\n")
    matrix = load_matrix(spec)
    runs = expand_matrix(matrix, tmp_path / "runs").runs
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -TERM $PPID\nexit 0\n")
    fake.chmod(0o755)
    real = local.run_local
    monkeypatch.setattr(local, "run_local", lambda dirs, parallel=1: real(dirs, parallel, python=str(fake)))
    capsys.readouterr()
    assert launch(runs, matrix.blocks(), tmp_path / "runs", "m", "local") == 75
    # 2 cells and the receiver alone
    assert "(3 not started: the launcher was stopped by SIGTERM)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ end to end
def _finished(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/result.csv"))


@pytest.mark.slow   # 16 tiny runs, each its own trainer process (minutes on 2 loaded cores)
def test_matrix_runs_resumes_after_interruption_collects_and_draws(matrix_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    out = dry_run(capsys, matrix_file, "--runs-dir", runs)
    assert "2 sender x 2 receiver cuts x 1 seed = 4 cells per matrix; 4 matrices" in out
    assert "total runs: 17 (" in out and "cells that cannot be stitched" not in out    # + the receiver alone

    # interrupted: SIGTERM (as Ctrl-C or a scheduler would) once a few cells have finished
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stitching.matrix", str(matrix_file), "--launcher", "local",
                             "--runs-dir", str(runs), "--parallel", "2"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(_finished(runs)) < 3 and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=300)
    done = {d: (d / "result.csv").stat().st_mtime_ns for d in _finished(runs)}
    assert 3 <= len(done) < 17, first
    assert proc.returncode == 75, first                     # rundir.EXIT_PREEMPTED: run it again to resume
    assert not (runs / "results.csv").exists()              # nothing drawn from a half matrix

    second = cli(matrix_file, "--launcher", "local", "--runs-dir", runs, "--parallel", "2").stdout
    assert f"total runs: 17 ({len(done)} finished" in second
    started = [line.split("start ")[1].split(",")[0] for line in second.splitlines() if "[local] start" in line]
    assert len(started) == 17 - len(done) and not {str(d) for d in done} & set(started)
    assert {d: (d / "result.csv").stat().st_mtime_ns for d in done} == done   # finished cells never redone
    assert len(_finished(runs)) == 17

    # collected: every cell's identity is in its result row; drawn: the heatmaps show those accuracies
    results = pd.read_csv(runs / "results.csv")
    assert len(results) == 17 and (results["kind"] == "original").sum() == 1
    receiver = results[results["kind"] == "original"]["top1"].item()
    results = results[results["kind"] == "stitched"]
    cells = {(r.random_init, r.source_stage, r.destination_stage): r.top1 for r in results.itertuples()}
    assert set(cells) == {(c, s, t) for c in ("none", "source", "destination", "both") for s in (1, 2)
                          for t in (2, 3)}
    table = pd.read_csv(runs / "matrix.csv")
    assert {(r.control, r.sender_cut, r.receiver_cut): r.top1_mean for r in table.itertuples()} == cells
    assert (table["depth_difference"] > 0).all()       # stage cuts: the receiver is deeper than the sender
    assert (table["fit"] == "trained").all() and (table["receiver_top1"] == receiver).all()
    for png in ("matrix_heatmaps.png", "accuracy_vs_depth.png"):
        assert (runs / "figures" / png).stat().st_size > 10_000

    from stitching.plots.matrix import plot_matrix_heatmaps

    fig = plot_matrix_heatmaps(table, None, "stages", [1, 2], [2, 3], ["none", "source", "destination", "both"])
    panels = [ax for ax in fig.axes if ax.images and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["trained", "random sender", "random receiver",
                                                 "random sender and receiver"]
    for ax, control in zip(panels, ("none", "source", "destination", "both")):
        drawn = ax.images[0].get_array()
        for (i, s), (j, t) in ((a, b) for a in enumerate((1, 2)) for b in enumerate((2, 3))):
            assert drawn[i, j] == pytest.approx(cells[(control, s, t)])
            assert ax.texts[2 * i + j].get_text() == f"{cells[(control, s, t)]:.0f}" or \
                ax.texts[2 * i + j].get_text() == f"{cells[(control, s, t)]:.1f}"

    # a finished matrix launches nothing
    third = cli(matrix_file, "--launcher", "local", "--runs-dir", runs).stdout
    assert "nothing to do: every cell has finished" in third and "[local] start" not in third


@pytest.mark.slow   # 2 tiny runs, each its own trainer process
def test_block_matrix_trains_a_backwards_cell_and_draws_it(matrix_file, tmp_path):
    matrix_file.write_text("name: blocks\nbase: base.yaml\ncuts: blocks\nsenders: [5]\nreceivers: [1, 5]\n"
                           "controls: []\n")
    runs = tmp_path / "runs"
    out = cli(matrix_file, "--launcher", "local", "--runs-dir", runs, "--parallel", "2").stdout
    assert "local: 3 done, 0 preempted, 0 failed" in out       # the two cells and the receiver alone
    results = pd.read_csv(runs / "results.csv")
    results = results[results["kind"] == "stitched"]
    assert sorted(zip(results["source_block"], results["destination_block"])) == [(5, 1), (5, 5)]
    assert results["source_stage"].isna().all() and set(results["gap"]) == {"b5->b1", "b5->b5"}
    table = pd.read_csv(runs / "matrix.csv").set_index(["sender_cut", "receiver_cut"])
    # resnet18 has 8 blocks: block i's relative depth is (i + 1) / 8
    assert table.loc[(5, 1), "depth_difference"] == pytest.approx(2 / 8 - 6 / 8)      # backwards: negative
    assert table.loc[(5, 5), "depth_difference"] == 0
    for (i, j), row in table.iterrows():
        assert row["top1_mean"] == results[(results["source_block"] == i)
                                           & (results["destination_block"] == j)]["top1"].item()
    assert (runs / "figures" / "matrix_heatmaps.png").is_file()


# ------------------------------------------------------------------------------------------ real SLURM
@pytest.mark.slurm
def test_slurm_matrix_is_one_job_array_never_resubmitted_then_drawn(slurm_cluster, matrix_file, tmp_path):
    from tests.test_sweep import _wait_for_results

    # one sender x two receivers with the three controls: 8 tasks (the 2x2 matrix runs locally above)
    matrix_file.write_text(matrix_file.read_text().replace("senders: [1, 2]", "senders: [1]")
                           + 'slurm: {cpus_per_task: 1, mem: 2G, time: "00:20:00", max_parallel: 2}\n')
    runs = tmp_path / "runs"
    first = cli(matrix_file, "--launcher", "slurm", "--runs-dir", runs).stdout
    assert "submitted job array" in first and "with 9 tasks" in first and "--draw" in first   # + the receiver
    again = cli(matrix_file, "--launcher", "slurm", "--runs-dir", runs).stdout      # while queued/running
    assert "already queued or running" in again and "submitted job array" not in again
    dirs = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    assert len(dirs) == 9
    _wait_for_results(dirs, timeout=900)
    out = cli(matrix_file, "--draw", "--runs-dir", runs).stdout
    assert "finished:   9\n" in out
    table = pd.read_csv(runs / "matrix.csv")
    assert len(table) == 8 and set(table["control"]) == {"none", "source", "destination", "both"}
    assert set(zip(table["sender_cut"], table["receiver_cut"])) == {(1, 2), (1, 3)}
    assert (runs / "figures" / "matrix_heatmaps.png").is_file()
    assert "nothing to do: every cell has finished" in cli(matrix_file, "--launcher", "slurm", "--runs-dir",
                                                           runs).stdout
