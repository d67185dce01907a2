"""``--status`` of ``python -m stitching.sweep`` and ``python -m stitching.matrix``: where the runs stand, read from
their directories, on a real sweep whose runs finished, failed, run, were killed or never started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stitching import rundir as R
from stitching.rundir_lock import live_status
from stitching.sweep.spec import expand
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def cli(program: str, *args, check: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", program, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def status(capsys, *args) -> tuple[int, str]:
    """The real ``--status`` in this process (no interpreter start-up): exit code and output."""
    from stitching.sweep.__main__ import main

    capsys.readouterr()
    code = main([*map(str, args), "--status"])
    return code, capsys.readouterr().out


def counts(out: str, label: str = "total") -> dict[str, int]:
    """A status table row as {column: count}."""
    head = next(line for line in out.splitlines() if "not started" in line)
    columns = ["done", "running", "preempted", "interrupted", "killed", "failed", "not started", "total"]
    row = next(line for line in out.splitlines() if line.strip().startswith(label + " "))
    cells = row.strip()[len(label):].split()
    assert len(cells) == len(columns) and all(c in head for c in columns), (head, row)
    return {c: 0 if v == "-" else int(v) for c, v in zip(columns, cells)}


SWEEP = f"""
blocks:
  - name: short
    base: {TINY}
    grid: {{train.lr: [0.002, 1.0e+30], train.device: [cpu], train.log_every: [1]}}
"""
LONG = f"""
  - name: long
    base: {TINY}
    grid: {{train.epochs: [500], train.seed: [0, 1], train.device: [cpu]}}
"""


@pytest.mark.slow   # two tiny runs through the local launcher and a trainer started and killed: ~60 s
def test_status_of_a_sweep_with_runs_done_failed_running_killed_and_not_started(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(SWEEP)
    runs = tmp_path / "runs dir #1"                      # a path with a space and a '#'
    cli("stitching.sweep", spec, "--launcher", "local", "--runs-dir", runs, check=R.EXIT_FAILED)   # lr 1e30: NaN
    code, out = status(capsys, spec, "--runs-dir", runs)
    assert code == R.EXIT_FAILED
    assert counts(out) == {"done": 1, "running": 0, "preempted": 0, "interrupted": 0, "killed": 0, "failed": 1,
                           "not started": 0, "total": 2}
    failed = next(r for r in expand(spec, runs)[2].runs if r.config.train.lr > 1)
    lines = out.splitlines()
    at = lines.index(f"  {failed.config.output.dir}")     # its directory, then the last line of its error
    assert lines[at + 1].strip().startswith("the loss became NaN/Inf at epoch 1, step ")

    spec.write_text(SWEEP + LONG)                          # two more runs: not started
    code, out = status(capsys, spec, "--runs-dir", runs)
    assert (code, counts(out)["not started"], counts(out)["total"]) == (R.EXIT_FAILED, 2, 4)

    long = next(r for r in expand(spec, runs)[2].runs if r.config.train.epochs == 500 and r.config.train.seed == 0)
    trainer = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(TINY), "train.epochs=500",
                                "train.seed=0", "train.device=cpu", f"output.dir={long.config.output.dir}"],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while live_status(long.config.output.dir) != R.RUNNING:
            assert trainer.poll() is None and time.time() < deadline, "the trainer did not start"
            time.sleep(0.5)
        code, out = status(capsys, spec, "--runs-dir", runs)
        assert counts(out) == {"done": 1, "running": 1, "preempted": 0, "interrupted": 0, "killed": 0, "failed": 1,
                               "not started": 1, "total": 4}
    finally:
        trainer.send_signal(signal.SIGKILL)                # killed without a word: its lock is left behind
        trainer.wait()
    assert R.status(long.config.output.dir) == R.STARTED and (Path(long.config.output.dir) / R.LOCK).exists()
    code, out = status(capsys, spec, "--runs-dir", runs)
    assert counts(out)["killed"] == 1 and counts(out)["running"] == 0

    # the exit codes through the command line: 0 when every run has finished, 75 while some are to finish
    only_done = tmp_path / "done.yaml"
    only_done.write_text(SWEEP.replace("[0.002, 1.0e+30]", "[0.002]"))
    proc = cli("stitching.sweep", only_done, "--status", "--runs-dir", runs, check=R.EXIT_OK)
    assert "1 of 1 runs done (exit 0)" in proc.stdout
    only_long = tmp_path / "long.yaml"
    only_long.write_text("blocks:" + LONG)
    proc = cli("stitching.sweep", only_long, "--status", "--runs-dir", runs, check=R.EXIT_PREEMPTED)
    assert counts(proc.stdout) == {"done": 0, "running": 0, "preempted": 0, "interrupted": 0, "killed": 1,
                                   "failed": 0, "not started": 1, "total": 2}


def test_a_failed_runs_error_line_comes_from_its_log_when_the_error_was_unexpected(tmp_path):
    """``state.json`` says only that the error was unexpected: the last line the trainer wrote (the traceback's) is
    found in ``launcher.log``, or in the SLURM task's log that its ``slurm_job`` marker names."""
    from stitching.launch.slurm import sweep_dir, task_log
    from stitching.sweep.status import failure

    runs = tmp_path / "runs"
    run = runs / "a"
    R.RunDir(run).write_state(R.FAILED, R.EXIT_FAILED, R.UNEXPECTED)
    assert failure(str(run), runs).startswith("an unexpected error, and no log of it here")
    (run / R.SLURM_MARKER).write_text("123_4\n")
    log = task_log(sweep_dir(runs.absolute()), "123_4")
    log.parent.mkdir(parents=True)
    log.write_text("epoch 1:  50%|#####     | 2/4 [00:01<00:01, 1.9it/s]\rTraceback (most recent call last):\n"
                   '  File "x.py", line 1\nRuntimeError: CUDA error: an illegal memory access was encountered\n'
                   "[stitching] 2026-12-05 12:00:00 task 4: exit 1\n")
    assert failure(str(run), runs) == "RuntimeError: CUDA error: an illegal memory access was encountered"
    (run / R.LAUNCHER_LOG).write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
    assert failure(str(run), runs) == "KeyError: 'x'"               # the local launcher's log comes first
    R.RunDir(run).write_state(R.FAILED, R.EXIT_CONFIG, "command line: train.lr='x': must be float")
    assert failure(str(run), runs) == "command line: train.lr='x': must be float"


def test_matrix_status_counts_each_matrix(tmp_path, capsys):
    from stitching.matrix.__main__ import main

    capsys.readouterr()
    code = main([str(ROOT / "configs" / "matrix" / "tiny.yaml"), "--runs-dir", str(tmp_path / "runs"), "--status"])
    out = capsys.readouterr().out
    assert code == R.EXIT_PREEMPTED and not (tmp_path / "runs").exists()
    assert counts(out, "trained") == {"done": 0, "running": 0, "preempted": 0, "interrupted": 0, "killed": 0,
                                      "failed": 0,
                                      "not started": 10, "total": 10}
    assert counts(out, "random sender and receiver")["not started"] == 10
    assert counts(out, "receiver")["not started"] == 1 and counts(out)["total"] == 41     # the receiver alone
