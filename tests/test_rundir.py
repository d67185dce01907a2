"""``stitching.rundir``: one identity rule (directory names, "same run", duplicates in collection), a run's
status from its files, the lock's holder check, and the requeue request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from stitching import rundir as R
from stitching.rundir_lock import LOCK_STALE_S, Lock
from stitching.config import IDENTITY, IDENTITY_BASELINE, Config
from stitching.validate import load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"

#: Keys whose IDENTITY_BASELINE entry is NOT today's default, each with why. Adding a key, or changing a
#: default, makes the table test below fail until you decide: a new key gets an entry with the value runs
#: written before it existed had (normally its default); a changed default keeps its old entry (the runs
#: written with the former default are still those runs) and is listed here.
CHANGED_DEFAULTS = {
    "data.pipeline",            # introduced with default fast; earlier runs had the torchvision transforms
    "train.similarity_images",  # introduced with default 1024; earlier runs measured no similarity (0)
}


def test_every_identity_key_has_a_frozen_baseline_equal_to_its_default_unless_listed():
    defaults = {f"{s}.{k}": v for s, values in R.identity_sections(Config().to_dict()).items()
                for k, v in values.items()}
    assert sorted(k for k in defaults if k not in IDENTITY_BASELINE) == [], \
        "a new config key needs an IDENTITY_BASELINE entry in stitching/config.py (see its comment)"
    # the defaults' identity is exactly the keys whose default is not their baseline
    assert sorted(R.identity(Config().to_dict(), IDENTITY)) == sorted(CHANGED_DEFAULTS), \
        "a default differs from its IDENTITY_BASELINE entry: keep the entry and list the key in CHANGED_DEFAULTS"
    with pytest.raises(TypeError):
        IDENTITY_BASELINE["data.hflip"] = 0.0       # frozen
    assert "output.dir" not in IDENTITY_BASELINE and "output.save_model" not in IDENTITY_BASELINE


def test_a_key_missing_from_an_older_config_counts_as_its_baseline():
    new = load_config(TINY).to_dict()
    old = yaml.safe_load(load_config(TINY).to_yaml())
    del old["data"]["hflip"], old["model"]["random_init"]        # written before these keys existed
    assert R.same_run(old, new, IDENTITY) and R.run_key(old, IDENTITY) == R.run_key(
        new, IDENTITY)
    assert "data.hflip" not in R.identity(new, IDENTITY)   # at its baseline: not part of the identity
    no_flip = load_config(TINY, ["data.hflip=0"]).to_dict()
    assert not R.same_run(old, no_flip, IDENTITY)
    assert R.differing_keys(old, no_flip, IDENTITY) == ["data.hflip"]
    assert R.identity(no_flip, IDENTITY)["data.hflip"] == 0.0
    random = load_config(TINY, ["model.random_init=source"]).to_dict()
    assert R.differing_keys(old, random, IDENTITY) == ["model.random_init"]
    # a key the table does not know is always part of the identity; a bool never equals a number
    assert R.differing_keys({"data": {"new_key": 1}}, {"data": {}}, IDENTITY) == ["data.new_key"]
    assert R.differing_keys({"train": {"compile": 0}}, {"train": {}}, IDENTITY) == ["train.compile"]
    # the default of a key whose baseline is another value (the value runs had before it existed)
    pipeline = load_config(TINY, ["data.pipeline=torchvision"]).to_dict()
    assert R.differing_keys(old, new, IDENTITY) == []
    del old["data"]["pipeline"]
    assert R.differing_keys(old, new, IDENTITY) == ["data.pipeline"]
    assert R.same_run(old, pipeline, IDENTITY)


def test_keys_a_run_never_reads_are_not_its_identity():
    """Operational keys (loader workers, logging, the DDP preemption poll) never change a run; a key that only
    another key's value makes read (config.READ_ONLY_WHEN) counts only then."""
    from stitching.config import OPERATIONAL_KEYS, READ_ONLY_WHEN
    from stitching.stitch.lsinit import INIT_MODES
    from stitching.train.objective import OBJECTIVES

    base = load_config(TINY)
    same = load_config(TINY, ["data.workers=3", "train.log_every=1", "train.preempt_check_every=7",
                              "model.init_images=64", "train.distill_temperature=2", "train.match_epochs=1",
                              "data.label=Digits #2"])
    assert R.differing_keys(base.to_dict(), same.to_dict(), IDENTITY) == []
    assert R.run_dir_name(base, IDENTITY) == R.run_dir_name(same, IDENTITY)
    assert not set(OPERATIONAL_KEYS) & set(R.identity(same.to_dict(), IDENTITY))
    # read under the other key's value: part of the identity then (and only the key itself differs)
    for other, key, value in ((["model.init=least_squares"], "model.init_images", 64),
                              (["train.objective=distill"], "train.distill_temperature", 2.0),
                              (["train.objective=match_then_task", "train.epochs=3"], "train.match_epochs", 1)):
        a = load_config(TINY, other).to_dict()
        b = load_config(TINY, [*other, f"{key}={value}"]).to_dict()
        assert R.differing_keys(a, b, IDENTITY) == [key] and R.identity(b, IDENTITY)[key] == value
    # an older config.yaml without the deciding key reads it at its baseline (model.init: default)
    older = yaml.safe_load(load_config(TINY, ["model.init_images=64"]).to_yaml())
    del older["model"]["init"]
    assert R.same_run(older, base.to_dict(), IDENTITY)
    # the table's keys and values are real: every key has a baseline, every value is a mode of its key
    modes = {"model.init": INIT_MODES, "train.objective": OBJECTIVES}
    for key, (other, values) in READ_ONLY_WHEN.items():
        assert key in IDENTITY_BASELINE and set(values) <= set(modes[other])
    assert set(OPERATIONAL_KEYS) <= set(IDENTITY_BASELINE)


def test_a_sweep_counts_grid_points_differing_only_in_unread_keys_as_duplicates(tmp_path):
    from stitching.sweep.spec import expand

    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
base: {TINY}
grid:
  data.workers: [0, 1]
  model.init: [default, least_squares]
  model.init_images: [64, 128]
""")
    _, _, exp = expand(spec, tmp_path / "runs")
    kept = sorted((r.config.model.init, r.config.model.init_images) for r in exp.runs)
    assert kept == [("default", 64), ("least_squares", 64), ("least_squares", 128)]
    assert sum(exp.duplicates.values()) == 5 and len({r.name for r in exp.runs}) == 3
    assert sorted(len(r.points) for r in exp.runs) == [2, 2, 4]


def test_one_identity_rule_for_names_same_run_and_collection(tmp_path):
    from stitching.results.collect import collect

    a = load_config(TINY, ["output.dir=/x", "output.save_model=false"])
    b = load_config(TINY, ["output.dir=/elsewhere"])
    c = load_config(TINY, ["train.lr=0.01"])
    B = IDENTITY
    assert R.same_run(a.to_dict(), b.to_dict(), B) and R.run_key(a.to_dict(), B) == R.run_key(b.to_dict(), B)
    assert not R.same_run(a.to_dict(), c.to_dict(), B)
    assert R.differing_keys(a.to_dict(), c.to_dict(), B) == ["train.lr"]
    assert R.run_dir_name(a, B).endswith("." + R.run_key(a.to_dict(), B)) and R.run_dir_name(a, B) == \
        R.run_dir_name(b, B)
    # two finished directories of the same run (another output.dir, another run_id): one is a duplicate
    for name, cfg, when in (("first", a, "2026-01-01T00:00:00+00:00"), ("again", b, "2026-01-02T00:00:00+00:00"),
                            ("other", c, "2026-01-01T00:00:00+00:00")):
        d = tmp_path / name
        d.mkdir()
        (d / R.CONFIG).write_text(cfg.to_yaml())
        (d / R.RESULT).write_text("run_id,kind,source,destination,source_stage,destination_stage,adapter,resize,"
                                  f"lr,seed,top1,macs,finished_at\n{name},stitched,resnet18,resnet18,1,3,bottleneck,"
                                  f"bilinear,0.002,0,50,1,{when}\n")
    df, problems = collect(tmp_path)
    assert sorted(df["run_id"]) == ["again", "other"]
    [dup] = problems
    assert dup.kind == "duplicate" and dup.path == tmp_path / "first"


def test_collection_counts_an_older_versions_directory_as_the_same_run(tmp_path):
    """A finished directory whose ``config.yaml`` an older version wrote (no ``data.hflip``, no
    ``model.random_init``) and a new one of the same run are duplicates; a run without the flip is not."""
    from stitching.results.collect import collect

    older = yaml.safe_load(load_config(TINY).to_yaml())
    del older["data"]["hflip"], older["model"]["random_init"]
    for name, config, when in (("older", yaml.safe_dump(older), "2026-01-01T00:00:00+00:00"),
                               ("newer", load_config(TINY).to_yaml(), "2026-01-02T00:00:00+00:00"),
                               ("no_flip", load_config(TINY, ["data.hflip=0"]).to_yaml(), "2026-01-01T00:00:00+00:00")):
        d = tmp_path / name
        d.mkdir()
        (d / R.CONFIG).write_text(config)
        (d / R.RESULT).write_text("run_id,kind,source,destination,source_stage,destination_stage,adapter,resize,"
                                  f"lr,seed,top1,macs,finished_at\n{name},stitched,resnet18,resnet18,1,3,bottleneck,"
                                  f"bilinear,0.002,0,50,1,{when}\n")
    assert "hflip" not in (tmp_path / "older" / R.CONFIG).read_text()
    df, problems = collect(tmp_path)
    assert sorted(df["run_id"]) == ["newer", "no_flip"]
    assert [(p.kind, p.path.name) for p in problems] == [("duplicate", "older")]


def test_status_follows_the_files(tmp_path):
    d = R.RunDir(tmp_path / "run")
    assert R.status(d.path) == R.NEW
    d.write_text(R.CONFIG, "model: {}\n")
    assert d.status() == R.NEW
    d.write_checkpoint(b"not really a checkpoint")
    assert d.status() == R.STARTED
    d.write_state(R.PREEMPTED, R.EXIT_PREEMPTED)
    assert d.status() == R.PREEMPTED
    d.write_state(R.FAILED, R.EXIT_NONFINITE, "the loss became NaN/Inf")
    assert d.status() == R.FAILED
    d.write_rows(R.RESULT, ["top1"], [{"top1": 1.0}])
    assert d.status() == R.FINISHED
    d.write_checkpoint(b"newer")           # the former newest is kept as the previous one
    assert [p.name for p in d.checkpoint_candidates()] == [R.CHECKPOINT, R.CHECKPOINT_PREVIOUS]
    assert (d.path / R.CHECKPOINT_PREVIOUS).read_bytes() == b"not really a checkpoint"


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    path = tmp_path / R.LOCK
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "then"}))
        with pytest.raises(R.BusyError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            Lock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = Lock(path)
    lock.acquire()                          # that process is gone: stale
    assert lock.took_over["pid"] == holder.pid and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    # a lock from another host counts as alive until it has not been touched for LOCK_STALE_S
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(R.BusyError, match="on host elsewhere"):
        Lock(path).acquire()
    old = path.stat().st_mtime - LOCK_STALE_S - 1
    os.utime(path, (old, old))
    Lock(path).acquire()


def test_requeue_request_only_when_asked(tmp_path):
    assert R.request_requeue({}) is None
    target = tmp_path / R.REQUEUE_REQUEST
    assert R.request_requeue({R.REQUEUE_ENV: str(target)}) == target and target.is_file()


def test_sweep_prints_every_status(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": str(TINY), "grid": {"train.seed": [0, 1]}}))
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", str(spec), "--launcher", "local", "--runs-dir",
                           str(tmp_path / "runs"), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "total runs: 2 (0 finished, 0 preempted, 0 interrupted, 0 started, 0 failed, 2 new)" in proc.stdout


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _make_older(run_dir, new_name: str | None = None):
    """What a version before ``data.hflip`` and ``model.random_init`` left: its ``config.yaml`` without them,
    no ``result.csv`` (stopped with a checkpoint), and (``new_name``) a directory named by that version's key."""
    config = yaml.safe_load((run_dir / R.CONFIG).read_text())
    del config["data"]["hflip"], config["model"]["random_init"]
    (run_dir / R.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / R.RESULT).unlink()
    assert (run_dir / R.CHECKPOINT).is_file() and R.status(run_dir) == R.STARTED
    if new_name is None:
        return run_dir
    return run_dir.rename(run_dir.with_name(new_name))



def test_the_sweep_reuses_only_a_directory_of_the_same_run_under_an_older_name(tmp_path):
    """What the sweep finds under an older version's names (the same name but the key): the same run is reused
    (and said), another run with the same name is not."""
    from stitching.sweep.spec import expand

    runs = tmp_path / "runs"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": str(TINY), "grid": {"train.seed": [0, 1]}}))
    _, _, exp = expand(spec, runs)
    seed0, seed1 = exp.runs
    older = {}
    for run, flip in ((seed0, None), (seed1, 0.0)):    # seed 1's directory holds a run without the flip
        config = yaml.safe_load(run.config.to_yaml())
        del config["data"]["hflip"], config["model"]["random_init"]
        if flip is not None:
            config["data"]["hflip"] = flip
        older[run.name] = d = runs / (run.name.rsplit(".", 1)[0] + ".0123abcd")
        d.mkdir(parents=True)
        (d / R.CONFIG).write_text(yaml.safe_dump(config))
    proc = _cli("stitching.sweep", spec, "--launcher", "local", "--runs-dir", runs, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "reusing 1 run directories named by an older version's run key" in proc.stdout
    assert f"  {older[seed0.name].name}  (this version names it {seed0.name})" in proc.stdout
    assert older[seed1.name].name not in proc.stdout
    _, _, exp = expand(spec, runs)
    assert [r.config.output.dir for r in exp.runs] == [str(older[seed0.name]), str(runs / seed1.name)]
    assert [r.name for r in exp.runs] == [older[seed0.name].name, seed1.name]
    assert exp.reused == [(seed0.name, older[seed0.name])]

@pytest.mark.slow           # four tiny trainings (two epochs of two steps) through the CLIs: ~60 s
def test_an_older_versions_run_directory_is_resumed_by_the_trainer_and_the_sweep(tmp_path):
    runs = tmp_path / "runs"
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": str(TINY), "grid": {
        "train.device": ["cpu"], "train.epochs": [2], "train.max_steps_per_epoch": [2],
        "train.similarity_images": [0], "output.save_model": [False]}}))
    proc = _cli("stitching.sweep", spec, "--launcher", "local", "--runs-dir", runs)
    assert proc.returncode == 0 and "local: 1 done" in proc.stdout, proc.stdout + proc.stderr
    [run] = [p for p in runs.iterdir() if p.name != "slurm"]
    name = run.name

    # the sweep meets the directory an older version wrote under its own key: reused, resumed, not retrained
    older = _make_older(run, name.rsplit(".", 1)[0] + ".0123abcd")
    proc = _cli("stitching.sweep", spec, "--launcher", "local", "--runs-dir", runs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing 1 run directories named by an older version's run key" in proc.stdout
    assert f"  {older.name}  (this version names it {name})" in proc.stdout
    assert "0 finished, 0 preempted, 0 interrupted, 1 started" in proc.stdout and "local: 1 done" in proc.stdout
    assert sorted(p.name for p in runs.iterdir() if p.name != "slurm") == [older.name]    # no new directory
    log = (older / R.LOG).read_text()
    assert f"resuming {older} at epoch 3" in log and (older / R.RESULT).is_file()
    proc = _cli("stitching.sweep", spec, "--launcher", "local", "--runs-dir", runs)
    assert "nothing to do: every run has finished" in proc.stdout and "reusing 1" in proc.stdout

    # the trainer, given a new config for the older directory: the same run, resumed (not refused) ...
    _make_older(older)
    common = ["--config", TINY, "train.device=cpu", "train.epochs=2", "train.max_steps_per_epoch=2",
              "train.similarity_images=0", "output.save_model=false", f"output.dir={older}"]
    proc = _cli("stitching.train", *common, "data.hflip=0")          # ... but not another run
    assert proc.returncode == R.EXIT_CONFIG and "holds a different run (differs in data.hflip)" in proc.stderr
    proc = _cli("stitching.train", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (older / R.LOG).read_text().count(f"resuming {older} at epoch 3") == 2 and (older / R.RESULT).is_file()
    # ... and --run-dir reads the older config.yaml, its missing keys at their baseline
    _make_older(older)
    proc = _cli("stitching.train", "--run-dir", older)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (older / R.LOG).read_text().count(f"resuming {older} at epoch 3") == 3 and (older / R.RESULT).is_file()
    assert yaml.safe_load((older / R.CONFIG).read_text())["data"]["hflip"] == 0.5
