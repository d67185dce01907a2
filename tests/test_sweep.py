"""``python -m stitching.sweep``: expansion, dry run, local launcher, and real SLURM with requeue."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stitching.sweep.spec import expand
from tests.conftest import ROOT

SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"


def sweep(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def collect(runs: Path) -> list[dict]:
    out = runs / "results.csv"
    subprocess.run([sys.executable, "-m", "stitching.collect", str(runs), "-o", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    with out.open() as f:
        return list(csv.DictReader(f))


def test_paper_dry_run_counts_every_combination_and_writes_nothing(tmp_path):
    runs = tmp_path / "paper"
    out = sweep(ROOT / "configs" / "sweeps" / "paper.yaml", "--launcher", "local", "--runs-dir", runs,
                "--dry-run").stdout
    assert not runs.exists()
    _, _, exp = expand(ROOT / "configs" / "sweeps" / "paper.yaml", runs)
    dropped = sum(exp.excluded.values()) + sum(exp.impossible.values()) + sum(exp.duplicates.values())
    assert len(exp.runs) + dropped == exp.total
    assert f"total runs: {len(exp.runs)}" in out and f"{exp.total} grid points" in out
    pairs = {r.pair for r in exp.runs if not r.config.is_original}
    assert len(pairs) == 12                                   # the paper's 12 architecture combinations
    assert {r.pair for r in exp.runs if r.config.is_original} == {
        "resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"}
    for pair in pairs:
        assert pair in out
    assert "duplicates dropped" in out and "model.resize" in out
    # 9 gaps x 3 seeds per method; self-stitched ResNet-50 bottleneck: 3 resize modes, sizes match at s->s
    rb = [r for r in exp.runs if r.pair == "resnet50 -> resnet50" and r.config.model.adapter == "bottleneck"]
    assert len(rb) == 3 * (3 * 1 + 6 * 3)
    ft = [r for r in exp.runs if r.config.model.adapter == "finetune"]
    assert {r.config.train.lr for r in ft} == {0.01, 0.002, 0.0002}
    assert {r.config.model.source for r in ft} == {"resnet50", "mobilenetv3_large_100", "vit_small_patch16_224",
                                                   "swin_t"}
    assert not any(r.config.model.source == "mobilenetv3_large_100" and r.config.model.destination_stage == 4
                   for r in ft)                                # those gaps do not join
    assert sum(r.config.model.adapter == "vit_block" for r in exp.runs) == 27


def test_duplicates_impossible_and_excluded_are_counted(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}
grid:
  model.source_stage: [2]
  model.destination_stage: [1, 2, 3]
  model.adapter: [linear, conv3x3]
  model.resize: [none, bilinear, strided]
exclude:
  - {{model.adapter: conv3x3, model.destination_stage: 3}}
""")
    _, _, exp = expand(spec, tmp_path / "runs")
    assert exp.total == 18
    assert sum(exp.excluded.values()) == 3                    # conv3x3 at 2->3
    # 2->1 (6) and linear+strided at 2->2, 2->3 (2)
    assert sum(exp.impossible.values()) == 6 + 2
    # 2->2: linear none == bilinear; conv3x3 none == bilinear == strided
    assert sum(exp.duplicates.values()) == 1 + 2
    assert sorted((r.config.model.adapter, r.config.model.destination_stage) for r in exp.runs) == [
        ("conv3x3", 2), ("linear", 2), ("linear", 3), ("linear", 3)]
    names = [r.name for r in exp.runs]
    assert len(set(names)) == len(names)
    assert [r.name for r in expand(spec, tmp_path / "runs")[2].runs] == names   # stable names


def test_bad_sweep_files_exit_2_with_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}\ngrid:\n  model.adaptor: [linear]\n")
    proc = sweep(spec, "--launcher", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "model.adaptor" in proc.stderr and str(spec) in proc.stderr
    spec.write_text(f"base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}\ngrid:\n  train.lr: [fast]\n")
    proc = sweep(spec, "--launcher", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr


def test_local_sweep_runs_collects_and_never_repeats_a_run(tmp_path):
    runs = tmp_path / "runs"
    out = sweep(SMOKE, "--launcher", "local", "--runs-dir", runs).stdout
    assert "local: 5 done, 0 preempted, 0 failed" in out
    rows = collect(runs)
    assert len(rows) == 5 and sorted(r["kind"] for r in rows) == ["original"] + ["stitched"] * 4
    assert {r["adapter"] for r in rows if r["kind"] == "stitched"} == {"linear", "bottleneck"}
    # re-submitting a finished sweep launches nothing
    assert "nothing to do" in sweep(SMOKE, "--launcher", "local", "--runs-dir", runs).stdout
    # half-finished: one run lost its result (its checkpoint is there) -> only that one runs again
    victim = next(p for p in runs.iterdir() if p.name.startswith("resnet18.1-resnet18.3.linear"))
    (victim / "result.csv").unlink()
    out = sweep(SMOKE, "--launcher", "local", "--runs-dir", runs).stdout
    assert "4 finished" in out and "local: 1 done" in out and out.count("[local] start") == 1
    assert len(collect(runs)) == 5


# ------------------------------------------------------------------------------------- real SLURM
def _wait_for_results(dirs: list[Path], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all((d / "result.csv").is_file() for d in dirs):
            return
        time.sleep(1)
    logs = "\n".join(f"{d}: {sorted(os.listdir(d))}" for d in dirs)
    queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
    raise AssertionError(f"runs not finished after {timeout}s:\n{logs}\n{queue}")


@pytest.mark.slurm
def test_slurm_sweep_end_to_end_and_resubmission(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    first = sweep(SMOKE, "--launcher", "slurm", "--runs-dir", runs).stdout
    assert "submitted job array" in first and "with 5 tasks" in first
    again = sweep(SMOKE, "--launcher", "slurm", "--runs-dir", runs).stdout   # while queued/running
    assert "already queued or running" in again and "submitted job array" not in again
    dirs = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    assert len(dirs) == 5
    _wait_for_results(dirs, timeout=600)
    rows = collect(runs)
    assert len(rows) == 5
    for row in rows:
        assert row["run_id"] in {d.name for d in dirs} and 0 <= float(row["top1"]) <= 100
        assert float(row["macs"]) > 0 and row["device"] == "cpu"
    assert "nothing to do" in sweep(SMOKE, "--launcher", "slurm", "--runs-dir", runs).stdout


@pytest.mark.slurm
def test_slurm_requeued_task_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    from stitching.launch import slurm

    spec = tmp_path / "long.yaml"
    spec.write_text(f"""
base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}
grid:
  train.epochs: [4]
  data.train_size: [1024]
slurm: {{cpus_per_task: 1, mem: 2G, time: "00:20:00"}}
""")
    runs = tmp_path / "runs"
    out = sweep(spec, "--launcher", "slurm", "--runs-dir", runs).stdout
    job = out.split("submitted job array ")[1].split()[0]
    [run] = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.csv").is_file():
        time.sleep(0.5)
    assert (run / "metrics.csv").is_file() and not (run / "result.csv").exists()
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True, text=True)
    _wait_for_results([run], timeout=600)
    log = (run / "train.log").read_text()
    assert "resuming" in log and "epoch 4/4" in log
    info = slurm.job_info(job)
    assert int(info[0]["Restarts"]) >= 1
