"""Faults of the run directory, each tried with the real trainer on a tiny model (``configs/synthetic/tiny.yaml``):
a damaged checkpoint, a SIGKILL in the middle of a checkpoint or result write, a full disk, two trainers on
one directory (and the lock a killed one leaves), and a loss that becomes NaN. Each ends in one line, its
exit code (:mod:`stitching.rundir`), and no finished result or good checkpoint lost."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stitching import rundir as R
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# 4 optimizer steps per epoch (256 images, batch 64), CPU
COMMON = ["train.device=cpu", "data.train_size=256", "data.val_size=64", "data.workers=0"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), *COMMON, *extra, f"output.dir={out}"]


def train(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stitching.train", *_args(out, *extra)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def result(out: Path) -> dict:
    with (out / R.RESULT).open() as f:
        [row] = list(csv.DictReader(f))
    return {k: row[k] for k in ("top1", "top5", "val_loss", "train_loss")}


def position(path: Path) -> dict:
    return torch.load(path, weights_only=True)["position"]


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run: what every recovered run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out, "train.epochs=3")
    return out


# ------------------------------------------------------------------------------------ damaged checkpoint
def test_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)                                # checkpoints of epochs 3 and 2 ...
    for name in (R.RESULT, R.MODEL, R.STATE):
        (out / name).unlink()                                     # ... and not finished
    newest = (out / R.CHECKPOINT).read_bytes()
    (out / R.CHECKPOINT).write_bytes(newest[: len(newest) // 2])            # truncated, as by a crash
    older = position(out / R.CHECKPOINT_PREVIOUS)
    proc = train(out, "train.epochs=3")
    [line] = [ln for ln in proc.stderr.splitlines() if "damaged checkpoint" in ln]
    assert "set aside as" in line and R.CHECKPOINT_PREVIOUS not in line.split("(")[0]
    [aside] = list(out.glob(f"{R.CHECKPOINT}.damaged-*"))                     # kept, not deleted
    assert aside.read_bytes() == newest[: len(newest) // 2]
    assert older["epoch"] == 2 and f"resuming {out} at epoch 3" in proc.stderr
    assert result(out) == result(straight)


# ------------------------------------------------------------------------------- SIGKILL during a write
KILLER = textwrap.dedent("""\
    # Runs the trainer and SIGKILLs it at a chosen point of a run-directory write.
    import os, signal, sys
    from pathlib import Path
    import stitching.rundir as R

    point, nth = sys.argv[1], int(sys.argv[2])
    seen = {"n": 0}
    write, replace = R._write_file, os.replace

    def hit():
        seen["n"] += 1
        return seen["n"] == nth

    def slow_write(path, data):                      # half the bytes on disk, then killed
        name = Path(path).name
        if (point == "checkpoint" and R.CHECKPOINT in name or point == "result" and R.RESULT in name) and hit():
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, data)

    def killed_between_renames(src, dst):            # the newest became .prev, the new one not yet in place
        replace(src, dst)
        if point == "rename" and Path(dst).name == R.CHECKPOINT_PREVIOUS and hit():
            os.kill(os.getpid(), signal.SIGKILL)

    R._write_file = slow_write
    os.replace = killed_between_renames
    sys.argv = ["stitching.train", *sys.argv[3:]]
    from stitching.cli import run_cli
    from stitching.train.__main__ import main
    run_cli(main)
""")


@pytest.mark.slow
@pytest.mark.parametrize("point,nth,resume_epoch", [("checkpoint", 2, 2), ("rename", 1, 2), ("result", 1, 4)])
def test_sigkill_during_a_write_resumes_from_the_last_complete_file(tmp_path, straight, point, nth, resume_epoch):
    """Killed while writing the 2nd checkpoint, between the renames of the 2nd checkpoint (the 1st is the
    newest complete one then), or while writing result.csv: the rerun resumes from the last complete
    checkpoint and reproduces the uninterrupted run."""
    out = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(killer), point, str(nth), *_args(out, "train.epochs=3")], cwd=ROOT,
                          env={**_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / R.RESULT).exists()
    proc = train(out, "train.epochs=3")
    assert f"at epoch {resume_epoch}," in proc.stderr, proc.stderr[-3000:]
    assert result(out) == result(straight)


# ------------------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("target", [R.CHECKPOINT, R.RESULT])
def test_disk_full_stops_with_one_line_and_keeps_the_earlier_files(tmp_path, monkeypatch, capsys, target):
    from stitching.train.__main__ import main

    out = tmp_path / "run"
    write = R._write_file
    writes = {"n": 0}

    def full(path, data):
        if target in Path(path).name:
            writes["n"] += 1
            if writes["n"] == 2 or target == R.RESULT:
                with open(path, "wb") as f:
                    f.write(data[:100])                     # what fitted
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(R, "_write_file", full)
    code = main(_args(out, "train.epochs=2"))
    err = capsys.readouterr().err
    assert code == R.EXIT_IO
    line = error_line(err)
    assert "disk full" in line and target in line
    assert position(out / R.CHECKPOINT)["epoch"] == (1 if target == R.CHECKPOINT else 2)   # intact
    assert not (out / R.RESULT).exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]                             # no debris
    assert R.status(out) == R.FAILED and "disk full" in R.RunDir(out).read_state()["message"]
    monkeypatch.setattr(R, "_write_file", write)                                          # space again
    assert main(_args(out, "train.epochs=2")) == 0 and (out / R.RESULT).is_file()


# -------------------------------------------------------------------------------- one trainer at a time
@pytest.mark.slow
def test_second_trainer_refused_and_a_killed_ones_lock_taken_over(tmp_path, straight):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "stitching.train", *_args(out, "train.epochs=3")], cwd=ROOT,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / R.LOCK).is_file():
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)              # alive, holding the lock
    try:
        proc = train(out, "train.epochs=3", check=False)
        assert proc.returncode == R.EXIT_BUSY
        line = error_line(proc.stderr)
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in line
    finally:
        first.kill()                                # SIGKILL: its lock stays behind
        first.communicate(timeout=60)
    assert (out / R.LOCK).is_file() and f'"pid": {first.pid}' in (out / R.LOCK).read_text()
    proc = train(out, "train.epochs=3")
    assert f"took over the stale lock of pid {first.pid}" in proc.stderr
    assert result(out) == result(straight) and not (out / R.LOCK).exists()


# ------------------------------------------------------------------------------------------ NaN loss
def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """A loss that turns NaN at step 6 (epoch 2): exit EXIT_NONFINITE naming both, no result row, the epoch-1
    checkpoint untouched."""
    import stitching.train.loop as loop
    from stitching.train.__main__ import main

    step = loop.train_step

    def poisoned(st, x, y, micro):
        return step(st, x * float("nan") if st.step == 5 else x, y, micro)

    monkeypatch.setattr(loop, "train_step", poisoned)
    out = tmp_path / "run"
    code = main(_args(out, "train.epochs=3", "train.log_every=10"))
    assert code == R.EXIT_NONFINITE
    line = error_line(capsys.readouterr().err)
    assert "NaN/Inf at epoch 2, step 6 of 12" in line
    assert not (out / R.RESULT).exists() and R.status(out) == R.FAILED
    ckpt = torch.load(out / R.CHECKPOINT, weights_only=True)
    assert ckpt["position"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["trainable"].values()
                                                  if v.is_floating_point())


def test_exploding_learning_rate_stops_with_its_own_exit_code(tmp_path):
    out = tmp_path / "run"
    proc = train(out, "train.epochs=1", "train.lr=1.0e+30", "train.log_every=1", check=False)
    assert proc.returncode == R.EXIT_NONFINITE, proc.stderr[-3000:]
    assert "NaN/Inf at epoch 1, step" in error_line(proc.stderr)
    assert not (out / R.RESULT).exists() and not (out / R.CHECKPOINT).exists()
