"""Packed runs (stitching.train.pack, stitching.sweep.packs) the way a user runs them: the real CLI in subprocesses,
real run directories.

- the pack rule (validate.pack_key / pack_refusal) on configs that must and must not pack;
- 3 different stitches (cuts, adapters, lr, objective) trained as one pack equal, in every result.csv and
  metrics.csv value but the timings and the pack column, the same 3 runs trained alone (CPU, 1 thread);
- a pack preempted by SIGTERM checkpoints every branch at the same step; resumed as a pack whose runs stand at
  different positions (one finished alone meanwhile, one half-way, one new), each ends equal to its run alone;
- Ctrl-C checkpoints every branch at one step (exit 130, each state.json ``interrupted``), and the same command
  resumes each to the result of its run alone;
- a branch whose loss turns NaN stops alone (exit 65 in its own state.json) while the other finishes;
- runs that cannot pack are refused with one line (exit 2) before anything is written;
- ``stitching.sweep --pack K`` trains the smoke sweep in packs and its dry run prints the savings; the paper
  sweep's jobs and data passes fall by at least 10x with ``--pack 16``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stitching import rundir as R
from stitching.validate import load_config, pack_key, pack_refusal
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
# 10 optimizer steps per epoch, 2 epochs, CPU, the loss read every step
COMMON = ["train.device=cpu", "train.epochs=2", "data.train_size=320", "data.val_size=64", "train.batch_size=32",
          "train.log_every=1"]
#: three different stitches of one source: cut, adapter, lr, objective
BRANCHES = {
    "a": "",
    "b": "model: {source_stage: 2, destination_stage: 2, adapter: linear}\ntrain: {lr: 0.0003}\n",
    "c": "model: {source_stage: 3, destination_stage: 4, adapter: linear, resize: none}\ntrain: {objective: distill}\n",
}
#: what differs between a packed run and its run alone: the timings, the pack's name, the time it finished
TIMING = {"images_per_s", "epoch_time_s", "wall_time_s", "pack", "finished_at"}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _configs(where: Path, names=("a", "b", "c"), extra: dict | None = None) -> dict[str, Path]:
    """A config file per branch under ``where`` (a path with a space and '#'), its output.dir ``where/<name>``."""
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        text = (extra or {}).get(name, BRANCHES.get(name, ""))
        path = where / f"{name}.yaml"
        path.write_text(f"base: {json.dumps(str(TINY))}\n{text}output: {{dir: {json.dumps(str(where / name))}}}\n")
        out[name] = path
    return out


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stitching.train", *args, *COMMON], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _assert_same_run(packed: Path, alone: Path) -> None:
    """Every value of result.csv and metrics.csv but the timings and the pack column equal, bit for bit."""
    for name in (R.RESULT, R.METRICS):
        a, b = _rows(packed / name), _rows(alone / name)
        assert len(a) == len(b) and a, (name, len(a), len(b))
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            differ = {k: (ra[k], rb[k]) for k in ra if k not in TIMING and ra[k] != rb[k]}
            assert not differ, (packed / name, differ)
    [row] = _rows(packed / R.RESULT)
    assert row["pack"].startswith("resnet18.seed0.") and _rows(alone / R.RESULT)[0]["pack"] == ""


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict[str, Path]:
    """The 3 runs trained alone, each in its own process (2 at a time)."""
    cfgs = _configs(tmp_path_factory.mktemp("alone") / "runs #1")
    procs = []
    for name, cfg in cfgs.items():
        if len(procs) == 2:
            procs.pop(0).wait(timeout=600)
        procs.append(subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(cfg), *COMMON],
                                      cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(timeout=600)
    for name, cfg in cfgs.items():
        assert R.status(cfg.parent / name) == R.FINISHED, name
    return {name: cfg.parent / name for name in cfgs}


# ------------------------------------------------------------------------------------------ the rule
def _cfg(*overrides: str) -> dict:
    return load_config(TINY, list(overrides)).to_dict()


@pytest.mark.parametrize("overrides", [
    ["model.source_stage=2", "model.destination_stage=4"], ["model.adapter=linear"], ["model.resize=none"],
    ["train.lr=0.1"], ["train.weight_decay=0"], ["train.objective=distill"], ["train.label_smoothing=0.1"],
    ["model.destination=resnet34"], ["model.random_init=destination"], ["model.adapter=finetune"],
    ["train.lr_schedule=constant"],
    # operational keys never split a pack
    ["data.workers=2", "train.log_every=3"],
])
def test_runs_that_differ_only_in_their_stitch_pack(overrides):
    base, other = _cfg(), _cfg(*overrides)
    assert pack_refusal(base, other) is None and pack_refusal(other, base) is None
    assert pack_key(base) == pack_key(other) is not None


@pytest.mark.parametrize("overrides, key", [
    (["train.seed=1"], "train.seed"), (["model.source=resnet34"], "model.source"),
    (["data.img_size=64"], "data.img_size"), (["train.batch_size=32"], "train.batch_size"),
    (["train.epochs=2"], "train.epochs"), (["train.precision=bf16"], "train.precision"),
    (["data.train_size=512"], "data.train_size"), (["data.auto_augment=true"], "data.auto_augment"),
    (["model.random_init=source"], "model.random_init"), (["train.device=cpu"], "train.device"),
    (["model.source_stage=null", "model.destination_stage=null", "train.epochs=0"], "model.source_stage"),
    (["train.compile=true"], "train.compile"),
])
def test_runs_that_see_different_inputs_do_not_pack(overrides, key):
    base, other = _cfg(), _cfg(*overrides)
    refused = pack_refusal(base, other)
    assert refused is not None and refused[0] == key, refused
    assert pack_refusal(other, base)[0] == key
    assert pack_key(base) != pack_key(other)


def test_a_pack_of_runs_that_cannot_share_is_refused_before_anything_is_written(tmp_path):
    where = tmp_path / "dir with space #2"
    cfgs = _configs(where, ("a", "e"), {"e": "train: {seed: 1}\n"})
    proc = _train("--config", str(cfgs["a"]), "--config", str(cfgs["e"]), check=False)
    assert proc.returncode == R.EXIT_CONFIG
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "train.seed" in line and str(cfgs["e"]) in line and "cannot train in one pack" in line, line
    assert not (where / "a").exists() and not (where / "e").exists()


def test_a_closed_form_matrix_with_packs_is_one_line(tmp_path):
    """``--closed-form`` trains nothing, so ``--pack`` has no meaning there: one line naming it, exit 2, nothing
    written (before: the packs were silently ignored)."""
    runs = tmp_path / "m #1"
    proc = subprocess.run([sys.executable, "-m", "stitching.matrix", str(ROOT / "configs" / "matrix" / "tiny.yaml"),
                           "--launcher", "local", "--closed-form", "--pack", "4", "--runs-dir", str(runs)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == R.EXIT_CONFIG
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("error: command line: --pack=4: ") and "--closed-form" in line, line
    assert not runs.exists()


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.slow
def test_three_packed_stitches_equal_their_runs_alone(tmp_path, alone):
    cfgs = _configs(tmp_path / "packed #1")
    proc = _train(*[a for c in cfgs.values() for a in ("--config", str(c))])
    assert "3 runs over one data pass" in proc.stderr
    names = set()
    for name, cfg in cfgs.items():
        _assert_same_run(cfg.parent / name, alone[name])
        names.add(_rows(cfg.parent / name / R.RESULT)[0]["pack"])
        state = json.loads((cfg.parent / name / R.STATE).read_text())
        assert state["exit_code"] == R.EXIT_OK and not (cfg.parent / name / R.LOCK).exists()
    assert len(names) == 1          # one pack, named in each result row


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_preempted_pack_resumes_each_branch_from_its_own_position(tmp_path, alone):
    cfgs = _configs(tmp_path / "resumed #1")
    dirs = {name: cfg.parent / name for name, cfg in cfgs.items()}
    proc = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(cfgs["a"]), "--config",
                             str(cfgs["b"]), *COMMON], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: all((dirs[n] / R.METRICS).is_file() for n in "ab"), 300, "the first epoch's metrics", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == R.EXIT_PREEMPTED, err[-3000:]
    steps = set()
    for n in "ab":
        state = json.loads((dirs[n] / R.STATE).read_text())
        assert state["exit_code"] == R.EXIT_PREEMPTED and not (dirs[n] / R.RESULT).exists()
        steps.add(torch.load(dirs[n] / R.CHECKPOINT, weights_only=False)["position"]["step"])
    [step] = steps                  # every branch checkpointed at the same step
    assert 10 <= step < 20, step    # in the second epoch
    _train("--run-dir", str(dirs["a"]))                        # a finishes alone; b stays half-way; c is new
    assert R.status(dirs["a"]) == R.FINISHED and R.status(dirs["b"]) == R.PREEMPTED
    before = (dirs["a"] / R.RESULT).read_bytes()
    proc = _train("--run-dir", str(dirs["a"]), "--run-dir", str(dirs["b"]), "--config", str(cfgs["c"]))
    assert (dirs["a"] / R.RESULT).read_bytes() == before      # a finished run is left as it is
    for n in "bc":
        _assert_same_run(dirs[n], alone[n])
    # a: its pack's checkpoint, finished by a single run (its result row says it ended alone), equals it too
    assert R.status(dirs["a"]) == R.FINISHED and _rows(dirs["a"] / R.RESULT)[0]["pack"] == ""
    for name in (R.RESULT, R.METRICS):
        a, b = _rows(dirs["a"] / name), _rows(alone["a"] / name)
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == \
               [{k: v for k, v in r.items() if k not in TIMING} for r in b]


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # (a background test run's children inherit SIGINT ignored)


@pytest.mark.slow
def test_ctrl_c_stops_a_pack_like_a_run_and_the_same_command_resumes_it(tmp_path, alone):
    """Ctrl-C (SIGINT to the trainer's process group, as a terminal sends it) in epoch 2: every branch is
    checkpointed at the same step and says ``interrupted`` (exit 130, no lock left), one line says how to resume
    the pack; the same command resumes each branch from there, each ending equal to its run alone."""
    cfgs = _configs(tmp_path / "ctrl-c #1", ("a", "b"))
    dirs = {name: cfg.parent / name for name, cfg in cfgs.items()}
    command = [sys.executable, "-m", "stitching.train", "--config", str(cfgs["a"]), "--config", str(cfgs["b"]),
               *COMMON]
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_as_from_a_terminal)
    try:
        _wait(lambda: all((d / R.METRICS).is_file() for d in dirs.values()), 300, "the first epoch's metrics", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == R.EXIT_INTERRUPTED, err[-3000:]
    steps = set()
    for d in dirs.values():
        state = json.loads((d / R.STATE).read_text())
        assert state["status"] == R.INTERRUPTED and state["exit_code"] == R.EXIT_INTERRUPTED, state
        assert state["message"].startswith("Ctrl-C (SIGINT): checkpoint saved in epoch 2 at step"), state
        assert not (d / R.LOCK).exists() and not (d / R.RESULT).exists()
        steps.add(torch.load(d / R.CHECKPOINT, weights_only=False)["position"]["step"])
    [step] = steps                  # every branch at the same step, in the second epoch
    assert 10 <= step < 20, step
    assert "to resume the pack, run the same command again (or: python -m stitching.train --run-dir" in err
    rerun = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stderr.count("the last trainer: interrupted: Ctrl-C (SIGINT): checkpoint saved") == 2
    for name, d in dirs.items():
        _assert_same_run(d, alone[name])


@pytest.mark.slow
def test_a_diverging_branch_stops_alone_and_the_others_go_on(tmp_path, alone):
    cfgs = _configs(tmp_path / "nan #1", ("a", "d"), {"d": "train: {lr: 1.0e+30}\n"})
    proc = _train("--config", str(cfgs["a"]), "--config", str(cfgs["d"]), check=False)
    assert proc.returncode == R.EXIT_NONFINITE, proc.stderr[-3000:]
    d, a = cfgs["d"].parent / "d", cfgs["a"].parent / "a"
    state = json.loads((d / R.STATE).read_text())
    assert state["exit_code"] == R.EXIT_NONFINITE and "NaN/Inf" in state["message"]
    assert not (d / R.RESULT).exists() and not (d / R.LOCK).exists()
    assert any("NaN/Inf" in line and str(d) in line for line in proc.stderr.splitlines())
    _assert_same_run(a, alone["a"])
    assert json.loads((a / R.STATE).read_text())["exit_code"] == R.EXIT_OK


# ------------------------------------------------------------------------------------------ launch by packs
def _sweep(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _table(out: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for line in out.splitlines():
        for label, key in (("jobs (", "jobs"), ("passes over", "passes"), ("prefix per training image", "gmacs")):
            if label in line:
                sep, packed = line.split()[-3:-1]
                rows[key] = (float(sep.replace(",", "")), float(packed.replace(",", "")))
    return rows


@pytest.mark.slow
def test_sweep_trains_in_packs_and_its_dry_run_counts_the_savings(tmp_path):
    runs = tmp_path / "sweep #1"
    sweep = ROOT / "configs" / "sweeps" / "smoke.yaml"
    bad = subprocess.run([sys.executable, "-m", "stitching.sweep", str(sweep), "--launcher", "local", "--runs-dir",
                          str(runs), "--pack", "0"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert bad.returncode == R.EXIT_CONFIG and "--pack=0: must be >= 1" in bad.stderr and not runs.exists()
    dry = _sweep(str(sweep), "--launcher", "local", "--runs-dir", str(runs), "--pack", "4", "--dry-run")
    # 2 adapters x 2 seeds + the original: the adapters of a seed pack together, the original trains alone (and
    # evaluates only: no pass over the training data)
    assert _table(dry.stdout)["jobs"] == (5, 3) and _table(dry.stdout)["passes"] == (4, 2), dry.stdout
    assert not runs.exists()
    proc = _sweep(str(sweep), "--launcher", "local", "--runs-dir", str(runs), "--pack", "4")
    assert "5 runs in 3 jobs" in proc.stdout and "local: 5 done, 0 preempted, 0 failed" in proc.stdout, proc.stdout
    packs = [_rows(d / R.RESULT)[0]["pack"] for d in sorted(runs.iterdir()) if (d / R.RESULT).is_file()]
    assert len(packs) == 5 and packs.count("") == 1 and len(set(packs) - {""}) == 2, packs


@pytest.mark.slow
def test_paper_sweep_packed_by_16_has_ten_times_fewer_jobs_and_data_passes(tmp_path):
    proc = _sweep(str(ROOT / "configs" / "sweeps" / "paper.yaml"), "--launcher", "slurm", "--dry-run",
                  "--runs-dir", str(tmp_path / "paper"), "--pack", "16")
    table = _table(proc.stdout)
    for key in ("jobs", "passes"):
        separate, packed = table[key]
        assert separate >= 10 * packed, (key, table)
    assert table["jobs"][0] == 2749 and table["gmacs"][0] > table["gmacs"][1] > 0


def test_a_slurm_task_line_of_a_pack_trains_its_run_directories_as_one_pack(tmp_path):
    """The array script (run by bash as SLURM would, without a cluster) hands a task line's run directories -- a
    pack's, tab-separated, paths with spaces and '#' -- to one trainer as ``--run-dir`` each; a one-run line as
    one ``--run-dir``."""
    from stitching.launch import slurm

    record = tmp_path / "argv.txt"
    fake = tmp_path / "fake python"
    fake.write_text(f'#!/bin/bash\nfor a in "$@"; do echo "$a"; done >> {json.dumps(str(record))}\necho --- >> '
                    f'{json.dumps(str(record))}\n')
    fake.chmod(0o755)
    runs = tmp_path / "runs #1"
    pack, alone = [runs / "r a", runs / "r #b", runs / "c"], runs / "d"
    for d in [*pack, alone]:
        d.mkdir(parents=True)
    tasks = tmp_path / "tasks.txt"
    lines = slurm.write_task_file(tasks, [pack, alone])
    assert lines[0].count("\t") == 2 and "\t" not in lines[1]
    script = tmp_path / "array.sbatch"
    script.write_text(slurm.render_array_script(tasks, 2, slurm.SlurmResources(), tmp_path, "t",
                                                slurm.train_command(str(fake), 1, pack=True)))
    for i in range(2):
        proc = subprocess.run(["bash", str(script)], env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = record.read_text().split("---\n")[:-1]
    expect = [["-m", "stitching.train", *[a for d in pack for a in ("--run-dir", str(d))]],
              ["-m", "stitching.train", "--run-dir", str(alone)]]
    assert [c.splitlines() for c in calls] == expect
