"""Preemption end to end on the configurations users run, with the real trainer and the real local SLURM.

- several processes: the SLURM task runs ``torch.distributed.run`` with 2 processes (gloo, CPU); the time-limit
  signal (USR1 to the batch shell) reaches both workers, they checkpoint, rank 0 writes the requeue request
  (``torchrun`` itself exits 1), the task requeues itself, resumes, and its result equals an uninterrupted
  run's;
- DataLoader workers (``data.workers: 2``): SLURM's SIGTERM to every process of the job (``scancel --full``)
  no longer kills the workers under the main process: it checkpoints, exits 75, the task requeues and the
  result equals an uninterrupted run's;
- a run checkpointed by 2 processes resumes in 1 (fewer devices; per-rank RNG states);
- 2 processes agree on a SIGUSR1 only every ``train.preempt_check_every`` steps (no host sync per step):
  they stop together within that many steps of it and resume exactly.

Exactness: on CPU a resumed run equals an uninterrupted one bit for bit (same world size). On CUDA the
backward of bilinear resizing uses atomic adds and is not deterministic, so there the numbers agree to
float tolerance only (see docs/reliability.md); these tests pin ``train.device: cpu``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stitching import rundir as R
from tests.conftest import ROOT, in_background

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# 10 optimizer steps per epoch (640 images, batch 64: long enough that a signal sent when the first epoch's
# metrics appear lands in the second), 3 epochs, CPU
COMMON = ["train.device=cpu", "train.epochs=3", "data.train_size=640", "data.val_size=64", "train.log_every=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _row(run: Path) -> dict:
    with (run / R.RESULT).open() as f:
        [row] = list(csv.DictReader(f))
    return row


def _metrics(run: Path) -> list[dict]:
    with (run / R.METRICS).open() as f:
        return list(csv.DictReader(f))


def _same_numbers(a: Path, b: Path) -> None:
    ra, rb = _row(a), _row(b)
    for key in ("top1", "top5", "val_loss", "train_loss"):
        assert float(ra[key]) == float(rb[key]), (key, ra[key], rb[key])
    assert [(m["step"], m["val_loss"], m["train_loss"]) for m in _metrics(a)] == \
        [(m["step"], m["val_loss"], m["train_loss"]) for m in _metrics(b)]


def _train(prefix: list[str], out: Path, *extra: str) -> None:
    proc = subprocess.run([*prefix, "-m", "stitching.train", "--config", str(TINY), *COMMON, *extra,
                           f"output.dir={out}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _first_epoch_done(run: Path) -> bool:
    return (run / R.METRICS).is_file()


# --------------------------------------------------------------------------------------- without SLURM
@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints(tmp_path):
    """What SLURM does on preemption, reproduced without it: SIGTERM to the trainer *and* its DataLoader
    workers. Before the workers ignored it, the main process died with exit 1 and no checkpoint."""
    extra = ("data.workers=2",)
    straight = in_background(lambda: _train([sys.executable], tmp_path / "straight", *extra))
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(TINY), *COMMON, *extra,
                             f"output.dir={out}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait(lambda: _first_epoch_done(out) or proc.poll() is not None, 300, "the first epoch")
    os.killpg(proc.pid, signal.SIGTERM)               # in epoch 2, the workers busy
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == R.EXIT_PREEMPTED, stderr[-3000:]
    assert "checkpoint saved" in stderr and "Error" not in stderr
    assert R.status(out) == R.PREEMPTED
    _train([sys.executable], out, *extra)
    straight.result()
    _same_numbers(tmp_path / "straight", out)


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(tmp_path):
    """Fewer devices on resume: every rank's RNG is saved for its own device, and a run checkpointed by 2
    processes continues in 1 (with gradient accumulation keeping the effective batch)."""
    out = tmp_path / "r"
    per = "train.per_device_batch_size=32"
    proc = subprocess.Popen([*TORCHRUN, "-m", "stitching.train", "--config", str(TINY), *COMMON, per,
                             "data.workers=0", f"output.dir={out}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait(lambda: _first_epoch_done(out) or proc.poll() is not None, 300, "the first epoch")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    ckpt = torch.load(out / R.CHECKPOINT, weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["position"]["epoch"] >= 1
    _train([sys.executable], out, per, "data.workers=0")
    row = _row(out)
    assert row["world_size"] == "1" and 0 <= float(row["top1"]) <= 100
    assert [m["step"] for m in _metrics(out)] == ["10", "20", "30"]


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux ``/proc``): torchrun's workers."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
def test_two_processes_agree_on_a_signal_every_k_steps_and_resume_exactly(tmp_path):
    """SIGUSR1 to both workers (what SLURM's batch shell forwards) in the middle of epoch 2: they look at it
    together every 4th optimizer step only (``train.preempt_check_every=4``), stop at the same step boundary,
    at most 3 steps after rank 0 first saw it, and the resumed run equals an uninterrupted one."""
    extra = ("train.per_device_batch_size=32", "data.workers=0", "train.preempt_check_every=4",
             "data.train_size=1280", "train.epochs=2")         # 20 steps per epoch
    _train(TORCHRUN, tmp_path / "straight", *extra)
    out = tmp_path / "resumed"
    proc = subprocess.Popen([*TORCHRUN, "-m", "stitching.train", "--config", str(TINY), *COMMON, *extra,
                             f"output.dir={out}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait(lambda: _first_epoch_done(out) or proc.poll() is not None, 300, "the first epoch")
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=120)
    log = (out / R.LOG).read_text()
    assert "checkpoint saved" in log, stderr[-3000:]
    position = torch.load(out / R.CHECKPOINT, weights_only=True)["position"]
    assert position["step"] % 4 == 0 and 20 < position["step"] <= 40, position
    seen = log.split("(seen after step ")[1].split(")")[0]     # None: only the other rank had it in time
    assert seen == "None" or 0 <= position["step"] - int(seen) < 4, (seen, position["step"])
    _train(TORCHRUN, out, *extra)
    _same_numbers(tmp_path / "straight", out)


# --------------------------------------------------------------------------------------- real SLURM
def _submit(tmp_path: Path, run: Path, command: str) -> str:
    """Submit one task; sbatch exports this environment, so the job runs with the uninterrupted runs'
    thread count (a different count changes the float summation order, and so the last digits)."""
    from stitching.launch import slurm

    res = slurm.SlurmResources(cpus_per_task=2, mem="4G", time="00:15:00")   # no GPU asked for
    task_file = tmp_path / "tasks.txt"
    slurm.write_task_file(task_file, [run])
    script = tmp_path / "array.sbatch"
    script.write_text(slurm.render_array_script(task_file, 1, res, tmp_path / "logs", "preempt", command,
                                                chdir=ROOT))
    os.environ["OMP_NUM_THREADS"] = _env()["OMP_NUM_THREADS"]
    try:
        return slurm.submit(script)
    finally:
        os.environ.pop("OMP_NUM_THREADS")


def _logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))


def _write_config(run: Path, *extra: str) -> None:
    from stitching.validate import load_config

    cfg = load_config(TINY, [*COMMON, *extra, f"output.dir={run}"])
    run.mkdir(parents=True)
    (run / R.CONFIG).write_text(cfg.to_yaml())


def _finish_on_slurm(tmp_path: Path, run: Path, job: str) -> None:
    from stitching.launch import slurm

    states = slurm.wait_for(job, timeout_s=400, poll_s=1)
    logs = _logs(tmp_path)
    assert states == {0: "COMPLETED"}, logs[-4000:]
    assert int(slurm.job_info(job)[0]["Restarts"]) >= 1, logs[-4000:]
    assert (run / R.RESULT).is_file(), logs[-4000:]
    assert not (run / R.REQUEUE_REQUEST).exists() and not (run / R.LOCK).exists()
    log = (run / R.LOG).read_text()
    assert "checkpoint saved" in log and "resuming" in log, log


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_torchrun_task_signalled_requeues_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    from stitching.launch import slurm

    extra = ("train.per_device_batch_size=32", "data.workers=1")
    _train(TORCHRUN, tmp_path / "straight", *extra)
    run = tmp_path / "run"
    _write_config(run, *extra)
    command = slurm.train_command(sys.executable, 2)
    assert "torch.distributed.run" in command and "--nproc_per_node=2" in command
    job = _submit(tmp_path, run, command)
    _wait(lambda: _first_epoch_done(run), 300, f"the first epoch\n{_logs(tmp_path)}")
    # what --signal=B:USR1@N does before the time limit: the batch shell, which forwards it to the workers
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True, capture_output=True)
    _finish_on_slurm(tmp_path, run, job)
    logs = _logs(tmp_path)
    assert "requeue requested" in (run / R.LOG).read_text()
    assert "command exited with status 1" in logs            # torchrun hides the workers' 75 ...
    assert "scontrol requeue" in logs                        # ... the request file did not
    assert _row(run)["world_size"] == "2"
    _same_numbers(tmp_path / "straight", run)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sigterm_to_every_process_with_loader_workers_requeues(slurm_cluster, tmp_path):
    from stitching.launch import slurm

    extra = ("data.workers=2",)
    straight = in_background(lambda: _train([sys.executable], tmp_path / "straight", *extra))
    run = tmp_path / "run"
    _write_config(run, *extra)
    job = _submit(tmp_path, run, slurm.train_command(sys.executable, 1))
    _wait(lambda: _first_epoch_done(run), 300, f"the first epoch\n{_logs(tmp_path)}")
    # preemption / scancel: SIGTERM to the batch shell and every process under it, loader workers included
    subprocess.run(["scancel", "--signal=TERM", "--full", f"{job}_0"], check=True, capture_output=True)
    _finish_on_slurm(tmp_path, run, job)
    assert f"status {R.EXIT_PREEMPTED}" in _logs(tmp_path)
    straight.result()
    _same_numbers(tmp_path / "straight", run)


@pytest.mark.slow
def test_frozen_batchnorm_in_train_mode_checkpoints_the_whole_model(tmp_path):
    """``train.frozen_bn: train`` re-estimates the frozen parts' BatchNorm statistics: the checkpoint holds
    the whole model (not only the adapters), so a resumed run still equals an uninterrupted one."""
    extra = ("train.frozen_bn=train", "train.fold_bn=false", "data.workers=0")
    straight = in_background(lambda: _train([sys.executable], tmp_path / "straight", *extra))
    out = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(TINY), *COMMON, *extra,
                             f"output.dir={out}"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait(lambda: _first_epoch_done(out) or proc.poll() is not None, 300, "the first epoch")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == R.EXIT_PREEMPTED, stderr[-3000:]
    _train([sys.executable], out, *extra)
    straight.result()
    keys = torch.load(tmp_path / "straight" / R.CHECKPOINT, weights_only=True)["trainable"]
    assert any(k.startswith("prefix.") and k.endswith("running_mean") for k in keys)
    assert any(k.startswith("adapters.") for k in keys)
    _same_numbers(tmp_path / "straight", out)
