"""How runs end: Ctrl-C (SIGINT) during training and during evaluation, a second Ctrl-C, Ctrl-C under torchrun and
on the local launcher, a run directory that becomes unwritable mid-run, a second copy of the same local sweep, and
``stitching.train()`` from Python giving the process its signal handlers and logging back.

Every trainer here but those of the two ``stitching.train()`` tests (in a user's script; in this process) is the
real CLI in a subprocess of its own session, and a Ctrl-C is SIGINT to that whole process group, as a terminal
sends it (the trainer, its DataLoader workers, torchrun's agent). Where the moment matters (during an evaluation
batch, in the middle of a checkpoint write) the trainer runs under a small wrapper (:func:`_hooked`) that sends the
signal itself at that point and then runs the CLI's ``main`` unchanged.

"Equal" is bit for bit on CPU with the same thread count (``tests/test_preemption.py``); these tests pin
``train.device: cpu`` and ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from stitching import rundir as R
from stitching import rundir_ending
from stitching.rundir_lock import run_lock
from tests.conftest import ROOT, in_background

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# 10 optimizer steps per epoch (640 images, batch 64), 2 epochs, 4 evaluation batches, CPU, two loader workers
COMMON = ["train.device=cpu", "train.epochs=2", "data.train_size=640", "data.val_size=256", "train.log_every=1",
          "data.workers=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), *COMMON, *extra, f"output.dir={out}"]


def _train(out: Path, *extra: str, prefix: tuple = (sys.executable,)) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, "-m", "stitching.train", *_args(out, *extra)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _as_from_a_terminal() -> None:
    """In the child, before it runs: SIGINT's default action, as an interactive shell starts a command (when the
    tests themselves run as a background job of a non-interactive shell, the children would inherit SIGINT
    ignored, and the trainer rightly leaves it so: no Ctrl-C to test)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str]) -> subprocess.Popen:
    """A command in a session of its own (its process group is what a terminal's Ctrl-C reaches)."""
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_as_from_a_terminal)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _row(run: Path) -> dict:
    with (run / R.RESULT).open() as f:
        [row] = list(csv.DictReader(f))
    return row


def _same_numbers(a: Path, b: Path) -> None:
    ra, rb = _row(a), _row(b)
    for key in ("top1", "top5", "val_loss", "train_loss"):
        assert float(ra[key]) == float(rb[key]), (key, ra[key], rb[key])
    with (a / R.METRICS).open() as fa, (b / R.METRICS).open() as fb:
        ma, mb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [(m["step"], m["val_loss"], m["train_loss"]) for m in ma] == \
        [(m["step"], m["val_loss"], m["train_loss"]) for m in mb]


def _position(run: Path) -> dict:
    return torch.load(run / R.CHECKPOINT, weights_only=True)["position"]


def _hooked(tmp_path: Path, hook: str) -> list[str]:
    """``python <wrapper>``: ``hook`` (Python source, may patch the trainer's modules), then the trainer's own
    command line (``stitching.cli.run_cli`` over ``stitching.train.__main__.main``) with the arguments."""
    wrapper = tmp_path / "hooked_train.py"
    wrapper.write_text("import os, signal, sys, time\n" + textwrap.dedent(hook) + textwrap.dedent("""
        from stitching.cli import run_cli
        from stitching.train.__main__ import main
        run_cli(lambda: main(sys.argv[1:]))
    """))
    return [sys.executable, str(wrapper)]


def _no_debris(run: Path) -> None:
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name or p.name.endswith(".new")], sorted(run.iterdir())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted and resumed run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _train(out)
    return out


# ----------------------------------------------------------------------------------------- the trainer
@pytest.mark.slow
def test_ctrl_c_during_training_checkpoints_exits_130_and_the_rerun_resumes_exactly(tmp_path, straight):
    """Before: a KeyboardInterrupt traceback, exit -2, no checkpoint, state.json 'failed' with exit_code null."""
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "stitching.train", *_args(out)])
    _wait(lambda: (out / R.METRICS).is_file() or proc.poll() is not None, 300, "the first epoch")
    os.killpg(proc.pid, signal.SIGINT)                # in epoch 2, the loader workers busy
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == R.EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]   # no worker tracebacks either
    assert "Ctrl-C: stopping at the next step with a checkpoint" in stderr
    [line] = [ln for ln in stderr.splitlines() if "interrupted by Ctrl-C" in ln]
    assert "checkpoint saved in epoch 2 at step" in line and "run the same command again" in line
    assert f"python -m stitching.train --run-dir {out}" in line
    position = _position(out)
    assert position["epoch"] == 1 and 10 < position["step"] < 20
    state = R.RunDir(out).read_state()
    assert R.status(out) == R.INTERRUPTED and state["exit_code"] == R.EXIT_INTERRUPTED
    assert state["message"].startswith("Ctrl-C (SIGINT): checkpoint saved in epoch 2 at step")
    assert not (out / R.LOCK).exists() and not (out / R.REQUEUE_REQUEST).exists()
    _no_debris(out)

    rerun = _train(out)
    assert (f"resuming {out} at epoch 2, batch {position['step'] - 10} (step {position['step']} of 20); "
            f"the last trainer: interrupted: Ctrl-C (SIGINT)") in rerun.stderr
    _same_numbers(straight, out)


@pytest.mark.slow
def test_ctrl_c_during_an_evaluation_keeps_the_epochs_training(tmp_path, straight):
    """SIGINT to the trainer and its evaluation loader's workers after batch 3 of the evaluation that follows
    epoch 2: it stops after that batch and checkpoints the end of epoch 2's training (before: the whole epoch
    was lost); the rerun evaluates epoch 2 first and ends equal to an uninterrupted run."""
    hook = """
        import stitching.train.loop as loop
        evaluations = []
        real = loop.evaluate
        def evaluate(st, loader, info, prepare=None, stop=None):
            evaluations.append(1)
            if len(evaluations) == 2:                 # the evaluation after epoch 2
                inner = stop
                def stop(done):
                    if done == 3:
                        os.killpg(0, signal.SIGINT)   # the trainer and its loader workers, as a terminal does
                    return inner(done)
            return real(st, loader, info, prepare, stop)
        loop.evaluate = evaluate
    """
    out = tmp_path / "run"
    proc = _start([*_hooked(tmp_path, hook), *_args(out)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == R.EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert "checkpoint saved after the training of epoch 2, step 20 of 20; its evaluation reruns" in stderr
    position = _position(out)
    assert (position["epoch"], position["batch"], position["step"]) == (1, 10, 20)
    assert len(list(csv.DictReader((out / R.METRICS).open()))) == 1       # epoch 2's row comes with its evaluation
    assert R.status(out) == R.INTERRUPTED

    rerun = _train(out)
    assert f"resuming {out} at epoch 2, batch 10 (step 20 of 20; its evaluation first)" in rerun.stderr
    _same_numbers(straight, out)


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_keeping_the_last_complete_checkpoint(tmp_path, straight):
    """Two SIGINTs while the epoch-2 checkpoint is half written: the trainer stops inside the write, removes
    the partial file, keeps epoch 1's checkpoint, says so in one line and exits 130; the rerun resumes from
    epoch 1 and ends equal to an uninterrupted run."""
    hook = """
        from stitching import rundir as R
        real = R._write_file
        checkpoints = []
        def write(path, data):
            if R.CHECKPOINT in path.name:
                checkpoints.append(path)
                if len(checkpoints) == 2:
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                    os.killpg(0, signal.SIGINT)       # the first Ctrl-C: stop at the next step ...
                    time.sleep(0.5)
                    os.killpg(0, signal.SIGINT)       # ... the second: at once, here
                    time.sleep(30)
            real(path, data)
        R._write_file = write
    """
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = _start([*_hooked(tmp_path, hook), *_args(out)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == R.EXIT_INTERRUPTED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    [line] = [ln for ln in stderr.splitlines() if "second Ctrl-C" in ln and "aborted" in ln]
    assert "the last complete checkpoint (at the end of epoch 1, step 10 of 20) is kept" in line
    assert "run the same command again" in line
    assert time.monotonic() - t0 < 120                 # not after the hook's 30 s sleep (nor anything else)
    assert _position(out)["step"] == 10 and not (out / R.CHECKPOINT_PREVIOUS).exists()
    _no_debris(out)                                     # the half-written temporary file is gone
    state = R.RunDir(out).read_state()
    assert state["status"] == R.INTERRUPTED and state["message"].startswith("aborted by a second Ctrl-C")
    assert not (out / R.LOCK).exists()

    rerun = _train(out)
    assert f"resuming {out} at epoch 2, batch 0 (step 10 of 20)" in rerun.stderr
    _same_numbers(straight, out)


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """A terminal's Ctrl-C reaches torchrun's agent and both workers; the agent forwards it to the workers a
    second time (which is not a second Ctrl-C). The ranks agree at a step boundary (every 4th step here,
    ``train.preempt_check_every``), rank 0 writes the checkpoint and state.json ('interrupted', no requeue
    request), and the rerun under torchrun equals an uninterrupted one."""
    extra = ("train.per_device_batch_size=32", "data.workers=1", "train.preempt_check_every=4", "data.val_size=64")
    straight = in_background(lambda: _train(tmp_path / "straight", *extra, prefix=TORCHRUN))
    out = tmp_path / "run"
    proc = _start([*TORCHRUN, "-m", "stitching.train", *_args(out, *extra)])
    _wait(lambda: (out / R.METRICS).is_file() or proc.poll() is not None, 300, "the first epoch")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    log = (out / R.LOG).read_text()
    assert "interrupted by Ctrl-C: checkpoint saved" in log, stderr[-3000:]
    assert "aborted" not in stderr and "Ctrl-C: stopping at the next step" in stderr
    position = _position(out)
    assert position["step"] % 4 == 0 and 10 <= position["step"] <= 20 and len(position["sums"]) == 2
    state = R.RunDir(out).read_state()
    assert state["status"] == R.INTERRUPTED and state["exit_code"] == R.EXIT_INTERRUPTED
    assert not (out / R.REQUEUE_REQUEST).exists() and not (out / R.LOCK).exists()
    _train(out, *extra, prefix=TORCHRUN)
    straight.result()
    _same_numbers(tmp_path / "straight", out)


def test_ctrl_c_in_stitching_train_from_python_gives_the_process_its_handlers_back(tmp_path):
    """``stitching.train()`` in a user's script or notebook: a Ctrl-C after epoch 1 stops the run with a checkpoint
    (RunFailed, status 'interrupted'); afterwards the process has its own handlers again (before: SIGTERM stayed
    ignored and SIGINT the run's handler, so the third Ctrl-C at the prompt killed the process); the run then
    resumes to its end when called again -- from a thread (before: 'signal only works in main thread')."""
    script = tmp_path / "user script.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, threading
        import stitching
        import stitching.train.loop as loop
        from stitching.train import RunFailed

        kw = dict(train={"device": "cpu", "epochs": 2, "max_steps_per_epoch": 3},
                  data={"train_size": 256, "val_size": 64, "workers": 0}, output={"dir": sys.argv[1]})
        real = loop._end_epoch
        def end_epoch(r, epoch):                  # Ctrl-C once epoch 1 is evaluated
            ev = real(r, epoch)
            if epoch == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return ev
        loop._end_epoch = end_epoch
        try:
            stitching.train(sys.argv[2], **kw)
        except RunFailed as err:
            print("ended:", err.status, err.exit_code, flush=True)
        loop._end_epoch = real
        print("handlers:", signal.getsignal(signal.SIGINT) is signal.default_int_handler,
              signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL,
              flush=True)
        for _ in range(3):                        # Ctrl-C at the prompt, three times
            try:
                os.kill(os.getpid(), signal.SIGINT)
                signal.pause()
            except KeyboardInterrupt:
                print("KeyboardInterrupt", flush=True)
        done = []
        thread = threading.Thread(target=lambda: done.append(stitching.train(sys.argv[2], **kw)))
        thread.start()
        thread.join()
        print("returned:", [str(d) for d in done], flush=True)
    """))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(out), str(TINY)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=_as_from_a_terminal)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:5] == [f"ended: {R.INTERRUPTED} {R.EXIT_INTERRUPTED}", "handlers: True True True",
                         *["KeyboardInterrupt"] * 3], proc.stdout
    assert lines[-1] == f"returned: {[str(out)]}", proc.stdout
    assert f"resuming {out} at epoch 2, batch 1 (step 4 of 6); the last trainer: interrupted" in proc.stderr
    assert R.status(out) == R.FINISHED


def test_stitching_train_in_process_leaves_logging_as_it_found_it(tmp_path, monkeypatch, caplog, request):
    """``stitching.train()`` in this very process (as in a notebook), interrupted by a Ctrl-C and then resumed to
    its end: after each call the trainer's logger has the level, handlers and ``propagate`` it had before, no
    ``train.log`` is left open, and a later record of the trainer's data logger reaches the process's own
    logging (caplog) and not the finished run's log (before: its handlers stayed attached with ``propagate``
    off, ``train.log`` open; a caplog test run after an in-process training saw nothing)."""
    import logging

    import stitching
    import stitching.train.loop as loop
    from stitching.train import RunFailed
    from stitching.train import ending

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)     # as from a terminal (_as_from_a_terminal)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    trainer = logging.getLogger("stitching.train")
    before = (trainer.level, list(trainer.handlers), trainer.propagate)
    out = tmp_path / "run"
    kw = dict(train={"device": "cpu", "epochs": 2},
              data={"train_size": 64, "val_size": 64, "workers": 0}, output={"dir": str(out)})
    real = loop._end_epoch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # (as OMP_NUM_THREADS=1 does for the subprocesses here)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def end_epoch(r, epoch):                    # Ctrl-C once epoch 1 is evaluated
        ev = real(r, epoch)
        if epoch == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return ev

    attached = []                               # the handlers each run attached
    real_setup = ending.setup_logging

    def setup_logging(file):
        was = real_setup(file)
        attached.extend(trainer.handlers)
        return was

    def open_logs() -> list[str]:
        return [h.baseFilename for h in attached if isinstance(h, logging.FileHandler) and h.stream is not None]

    monkeypatch.setattr(ending, "setup_logging", setup_logging)
    monkeypatch.setattr(loop, "_end_epoch", end_epoch)
    with pytest.raises(RunFailed) as err:
        stitching.train(TINY, **kw)
    assert err.value.status == R.INTERRUPTED
    assert (trainer.level, list(trainer.handlers), trainer.propagate) == before
    assert len(attached) == 2 and open_logs() == []
    monkeypatch.setattr(loop, "_end_epoch", real)
    assert stitching.train(TINY, **kw) == out
    assert (trainer.level, list(trainer.handlers), trainer.propagate) == before
    assert len(attached) == 4 and open_logs() == []
    logged = (out / R.LOG).read_text()
    assert "resuming" in logged and "top1" in logged
    with caplog.at_level("WARNING", logger="stitching.train.data"):
        logging.getLogger("stitching.train.data").warning("a later warning, after the run")
    assert "a later warning, after the run" in caplog.text
    assert (out / R.LOG).read_text() == logged


# ----------------------------------------------------------------------------------------- how an ending reads
def test_a_launcher_reads_the_real_ending_never_a_checkpoint_that_was_not_saved(tmp_path):
    """:func:`stitching.rundir_ending.ending` as the local launcher uses it: what the trainer said in state.json when it
    was this process, else only what the exit code and the directory show."""
    d = R.RunDir(tmp_path / "run")
    d.path.mkdir()
    # killed by Ctrl-C while starting (no state of its own): before, "preempted (checkpoint saved)"
    for code in (-signal.SIGINT, R.EXIT_INTERRUPTED, R.EXIT_PREEMPTED):
        ending = rundir_ending.ending(d.path, code, pid=4242)
        assert "checkpoint saved" not in ending.message and "nothing was saved" in ending.message
        assert ending.status == R.NEW and not ending.failed
    (d.path / R.CHECKPOINT).write_bytes(b"x")
    assert "its last checkpoint is kept" in rundir_ending.ending(d.path, -signal.SIGKILL, pid=4242).message
    # what the trainer itself said
    d.write_state(R.INTERRUPTED, R.EXIT_INTERRUPTED, "Ctrl-C (SIGINT): checkpoint saved in epoch 2 at step 14 of 30")
    mine = rundir_ending.ending(d.path, R.EXIT_INTERRUPTED, pid=os.getpid())
    assert (mine.status, mine.message) == (R.INTERRUPTED, "Ctrl-C (SIGINT): checkpoint saved in epoch 2 at step 14 of 30")
    assert R.status(d.path) == R.INTERRUPTED
    # exit 0 without a state of its own: the run was finished by another trainer
    other = rundir_ending.ending(d.path, R.EXIT_OK, pid=4242)
    assert other.status == R.FINISHED and other.elsewhere and f"by pid {os.getpid()}" in other.message
    assert rundir_ending.ending(d.path, R.EXIT_CONFIG, pid=4242).message == "bad config (exit 2)"


# ----------------------------------------------------------------------------------------- the local launcher
def _sweep_file(tmp_path: Path, seeds: int, epochs: int, train_size: int = 640) -> Path:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": str(TINY), "grid": {
        "train.device": ["cpu"], "train.epochs": [epochs], "train.seed": list(range(seeds)),
        "data.train_size": [train_size], "data.val_size": [64], "data.workers": [1], "train.similarity_images": [0],
        "output.save_model": [False]}}))
    return spec


def _sweep(spec: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stitching.sweep", str(spec), "--launcher", "local", "--runs-dir", str(runs),
            *extra]


def _run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / R.CONFIG).is_file())


@pytest.mark.slow
def test_ctrl_c_on_the_local_launcher_stops_its_runs_and_says_how_each_ended(tmp_path):
    """Ctrl-C to the launcher's process group while two of three runs train: the launcher passes it on once,
    each trainer checkpoints and exits interrupted, the launcher reports each run's real ending and the one it
    never started, exits 130; running the sweep again resumes them. Ctrl-C while the trainers are still
    starting: they are reported stopped with nothing saved (before: 'preempted (checkpoint saved)', exit 75)."""
    spec = _sweep_file(tmp_path, seeds=3, epochs=3)
    runs = tmp_path / "runs"
    proc = _start(_sweep(spec, runs, "--parallel", "2"))
    _wait(lambda: runs.is_dir() and sum((d / R.METRICS).is_file() for d in _run_dirs(runs)) == 2
          or proc.poll() is not None, 300, "two runs' first epoch")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == R.EXIT_INTERRUPTED, out + err
    assert "Traceback" not in out + err
    assert "[local] SIGINT: 2 running, stopping them at their next step with a checkpoint" in out
    started = [d for d in _run_dirs(runs) if (d / R.CHECKPOINT).is_file()]
    assert len(started) == 2
    for d in started:
        [line] = [ln for ln in out.splitlines() if ln.startswith(f"[local] interrupted: {d} ")]
        # (Ctrl-C lands in training or, on a fast machine, in the epoch's evaluation: both endings checkpoint)
        assert ("(Ctrl-C (SIGINT): checkpoint saved in epoch" in line
                or "(Ctrl-C (SIGINT): checkpoint saved after the training of epoch" in line), line
        assert "the next launch resumes it" in line, line
        assert R.status(d) == R.INTERRUPTED
    assert "local: 0 done, 0 preempted, 0 failed, 2 interrupted (1 not started: the launcher was stopped by " \
           "SIGINT); run the same command again to resume" in out

    again = subprocess.run(_sweep(spec, runs, "--parallel", "2"), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "local: 3 done, 0 preempted, 0 failed" in again.stdout, again.stdout
    assert "total runs: 3 (0 finished, 0 preempted, 2 interrupted, 0 started, 0 failed, 1 new)" in again.stdout
    for d in started:
        assert "the last trainer: interrupted: Ctrl-C (SIGINT): checkpoint saved" in (d / R.LOG).read_text()

    # Ctrl-C while the trainers are still starting up (importing, building): nothing was saved, nothing is claimed
    early = tmp_path / "early"
    proc = _start(_sweep(spec, early, "--parallel", "2"))
    _wait(lambda: early.is_dir() and sum((d / R.LAUNCHER_LOG).is_file() for d in _run_dirs(early)) == 2
          or proc.poll() is not None, 120, "two runs started")
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == R.EXIT_INTERRUPTED, out + err
    ended = [ln for ln in out.splitlines() if ln.startswith(("[local] stopped:", "[local] interrupted:"))]
    assert len(ended) == 2 and all("checkpoint saved" not in ln for ln in ended), out
    assert "preempted (checkpoint saved)" not in out


@pytest.mark.slow
def test_a_second_copy_of_the_same_local_sweep_waits_for_the_runs_the_first_holds(tmp_path):
    """Two launchers on one sweep (before: the second one's trainer exited 73 on the run the first held, and
    the second launcher reported it FAILED and exited 1 although every run finished): the second waits for
    what the first holds, trains the rest, reports what the other one finished as such; both exit 0, every
    run is finished and reported done by exactly one launcher. The held run trains 150 steps (3 epochs of 3,200
    images), so that it is still held when the second launcher (seconds of start-up) reaches it: 10 steps
    finished first on a quiet machine once the trainers' BLAS threads followed OMP_NUM_THREADS=1, and the second
    launcher found the run done instead of held."""
    spec = _sweep_file(tmp_path, seeds=2, epochs=3, train_size=3200)
    runs = tmp_path / "runs"
    first = _start(_sweep(spec, runs))
    _wait(lambda: runs.is_dir() and any((d / R.LOCK).is_file() for d in _run_dirs(runs))
          or first.poll() is not None, 300, "the first launcher's first trainer to hold its run")
    [held] = [d for d in _run_dirs(runs) if (d / R.LOCK).is_file()]
    holder = json.loads((held / R.LOCK).read_text())["pid"]
    second = subprocess.run(_sweep(spec, runs), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    out1, err1 = first.communicate(timeout=600)
    out2 = second.stdout
    assert first.returncode == 0, out1 + err1
    assert second.returncode == 0, out2 + second.stderr
    assert f"[local] waiting: {held} is in use by pid {holder} on host" in out2
    assert f"[local] finished by pid {holder} on host" in out2 and f"(another trainer): {held}" in out2
    assert "FAILED" not in out1 + out2 and "0 failed" in out1 and "0 failed" in out2
    for d in _run_dirs(runs):
        assert (d / R.RESULT).is_file()
        assert (out1 + out2).count(f"[local] done: {d}\n") == 1, (out1, out2)


# ----------------------------------------------------------------------------------------- unwritable mid-run
def _unwritable(directory: Path):
    """Make ``directory`` refuse new files and renames as the trainer's user would meet it: ``chmod a-w``
    (root ignores that: there the immutable attribute, ``chattr +i``); returns the undo, or skips when neither
    can be had here."""
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        return lambda: directory.chmod(mode)
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("running as root without the immutable attribute (chattr +i): no way to make a directory "
                    "unwritable here")
    return lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.slow
def test_a_run_directory_that_becomes_unwritable_mid_run_is_one_line_exit_74_and_says_so(tmp_path):
    """Before: the write failed with one line, then ``lock.release()`` raised (a traceback, exit 1),
    state.json stayed 'started' and the lock stayed behind."""
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "stitching.train", *_args(out, "data.workers=0", "data.val_size=64")])
    _wait(lambda: (out / R.CHECKPOINT).is_file() or proc.poll() is not None, 300, "the first checkpoint")
    undo = _unwritable(out)
    try:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == R.EXIT_IO, stderr[-3000:]
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        [line] = errors
        assert f"cannot write {out}/" in line and "the lock could not be removed (marked released" in line
        state = R.RunDir(out).read_state()              # rewritten in place: the directory takes no new file
        assert (state["status"], state["exit_code"], state["pid"]) == (R.FAILED, R.EXIT_IO, proc.pid)
        assert R.status(out) == R.FAILED and f"cannot write {out}/" in state["message"]
        assert run_lock(out).holder() is None     # free for the next trainer
        assert _position(out)["epoch"] >= 1               # the checkpoint already there is intact
    finally:
        undo()
    rerun = _train(out, "data.workers=0", "data.val_size=64")
    assert f"took over the stale lock of pid {proc.pid}" in rerun.stderr
    assert (out / R.RESULT).is_file() and not (out / R.LOCK).exists()
