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
from stitching.config import load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def test_one_identity_rule_for_names_same_run_and_collection(tmp_path):
    from stitching.results.collect import collect
    from stitching.sweep.spec import run_dir_name

    a = load_config(TINY, ["output.dir=/x", "output.save_model=false"])
    b = load_config(TINY, ["output.dir=/elsewhere"])
    c = load_config(TINY, ["train.lr=0.01"])
    assert R.same_run(a.to_dict(), b.to_dict()) and R.run_key(a.to_dict()) == R.run_key(b.to_dict())
    assert not R.same_run(a.to_dict(), c.to_dict()) and R.differing_keys(a.to_dict(), c.to_dict()) == ["train.lr"]
    assert run_dir_name(a).endswith("." + R.run_key(a.to_dict())) and run_dir_name(a) == run_dir_name(b)
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
            R.Lock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = R.Lock(path)
    lock.acquire()                          # that process is gone: stale
    assert lock.took_over["pid"] == holder.pid and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    # a lock from another host counts as alive until it has not been touched for LOCK_STALE_S
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(R.BusyError, match="on host elsewhere"):
        R.Lock(path).acquire()
    old = path.stat().st_mtime - R.LOCK_STALE_S - 1
    os.utime(path, (old, old))
    R.Lock(path).acquire()


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
    assert "total runs: 2 (0 finished, 0 preempted, 0 started, 0 failed, 2 new)" in proc.stdout
