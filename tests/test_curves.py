"""Live curves (``output.log_to``, ``stitching/train/curves.py``) through the real trainer: TensorBoard read back
with its own event-file reader, a resumed run without a duplicate step, rank 0 only, W&B offline, a missing extra
as one line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stitching import rundir as R
from stitching.validate import load_config
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
COMMON = ["train.device=cpu", "train.similarity_images=0", "output.save_model=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(out: Path, *overrides, prefix=(sys.executable,), env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*prefix, "-m", "stitching.train", "--config", str(TINY), *COMMON, *overrides,
                           f"output.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    with (out / R.METRICS).open() as f:
        return list(csv.DictReader(f))


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run's TensorBoard files, as TensorBoard itself reads them (purged steps hidden)."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'stitching[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / R.TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def same_curves(out: Path) -> None:
    """TensorBoard holds each metrics.csv column but the position, one point per epoch, the file's values."""
    rows, curves = metrics(out), scalars(out)
    assert set(curves) == set(rows[0]) - {"epoch", "step"}
    for tag, points in curves.items():
        assert [s for s, _ in points] == [int(r["epoch"]) for r in rows], tag
        assert [v for _, v in points] == pytest.approx([float(r[tag]) for r in rows], rel=1e-6), tag


def test_tensorboard_gets_every_epochs_metrics_through_the_trainer(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'stitching[tensorboard]'")
    out = tmp_path / "my runs #2" / "run"                     # a path with a space and a '#'
    train(out, "output.log_to=[tensorboard]", "train.epochs=2")
    same_curves(out)
    assert len(metrics(out)) == 2 and len(list((out / R.TENSORBOARD_DIR).iterdir())) == 1


def test_curves_are_off_by_default_and_not_the_runs_identity():
    from stitching.rundir import identity
    from stitching.config import IDENTITY

    plain, logged = load_config(TINY), load_config(TINY, ["output.log_to=[tensorboard, wandb]"])
    assert plain.output.log_to is None and logged.output.log_to == ["tensorboard", "wandb"]
    assert identity(plain.to_dict(), IDENTITY) == identity(logged.to_dict(), IDENTITY)


@pytest.mark.parametrize("value, says", [("[tensorbord]", "'tensorbord' is not a tracker; choose from tensorboard, "
                                          "wandb"), ("[wandb, wandb]", "names a tracker twice"),
                                         ("tensorboard", "must be a list [a, b, ...] or null")])
def test_a_wrong_tracker_is_a_config_error(value, says):
    from stitching.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"output.log_to={value}"])
    assert err.value.key == "output.log_to" and says in str(err.value)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_before_anything_is_built(tmp_path, tracker):
    """Without the extra (here: a module of that name that cannot be imported, first on the path), the trainer stops
    with one line naming the key and the extra to install, exit 2, nothing written; so does the sweep, before it
    writes or runs anything."""
    from tests.test_commands import error_line

    shadow = tmp_path / "no-extras"
    shadow.mkdir()
    (shadow / f"{tracker}.py").write_text(f"raise ModuleNotFoundError(\"No module named '{tracker}'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    proc = train(tmp_path / "run", f"output.log_to=[{tracker}]", env=env, check=False)
    line = error_line(proc)
    assert proc.returncode == R.EXIT_CONFIG and "Traceback" not in proc.stderr
    assert f"output.log_to=['{tracker}']: {tracker} needs the optional extra: pip install 'stitching[{tracker}]'" \
        in line
    assert not (tmp_path / "run").exists()
    if tracker != "tensorboard":
        return
    spec = tmp_path / "s.yaml"
    spec.write_text(f"base: {TINY}\ngrid: {{output.log_to: [[{tracker}]], train.device: [cpu]}}\n")
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", str(spec), "--launcher", "local", "--runs-dir",
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == R.EXIT_CONFIG and "needs the optional extra" in error_line(proc)
    assert not list((tmp_path / "runs").glob("*/" + R.CONFIG))


@pytest.mark.slow   # three short trainings: ~40 s
def test_a_resumed_run_appends_its_curves_without_a_duplicate_step(tmp_path):
    """A run killed after it logged an epoch but before that epoch's checkpoint was written trains the epoch
    again: TensorBoard shows it once, with the values of the epoch that counts. Here the run finished (3 epochs)
    and then lost its result and newest checkpoint (what such a kill leaves), so it resumes from epoch 2's."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'stitching[tensorboard]'")
    out = tmp_path / "run"
    train(out, "output.log_to=[tensorboard]", "train.epochs=3", "train.lr_schedule=constant")
    first = metrics(out)
    (out / R.RESULT).unlink()
    (out / R.CHECKPOINT).unlink()                             # the newest is gone: checkpoint.prev.pt, epoch 2
    proc = train(out, "output.log_to=[tensorboard]", "train.epochs=3", "train.lr_schedule=constant")
    assert "resuming" in proc.stderr and "at epoch 3" in proc.stderr
    again = metrics(out)
    assert [r["epoch"] for r in again] == ["1", "2", "3"] and again[:2] == first[:2]
    same_curves(out)                                          # epochs 1, 2, 3: each once, epoch 3 the new one


@pytest.mark.slow   # torchrun with 2 processes: ~40 s
def test_only_the_main_process_logs(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'stitching[tensorboard]'")
    out = tmp_path / "run"
    train(out, "output.log_to=[tensorboard]", "train.epochs=2", "train.per_device_batch_size=32", "data.workers=0",
          prefix=TORCHRUN)
    assert len(list((out / R.TENSORBOARD_DIR).iterdir())) == 1
    same_curves(out)


@pytest.mark.slow   # W&B's service starts twice: ~60 s
def test_wandb_logs_offline_and_a_resumed_run_continues_its_wandb_run(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra: pip install 'stitching[wandb]'")
    from stitching.train.curves import wandb_id

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}    # nothing configured
    run = [sys.executable, "-m", "stitching.train", "--config", str(TINY), *COMMON, "output.log_to=[wandb]",
           "train.epochs=3", f"output.dir={out}"]
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = sorted((out / R.WANDB_DIR).glob("offline-run-*"))
    assert [d.name.rsplit("-", 1)[1] for d in offline] == [wandb_id(out)]        # offline, this run's id
    data = (offline[0] / f"run-{wandb_id(out)}.wandb").read_bytes()
    assert all(column.encode() in data for column in metrics(out)[0] if column not in ("epoch", "step"))
    (out / R.RESULT).unlink()
    (out / R.CHECKPOINT).unlink()                             # as in the TensorBoard test: epoch 3 trains again
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = sorted((out / R.WANDB_DIR).glob("offline-run-*"))
    assert len(again) == 2 and {d.name.rsplit("-", 1)[1] for d in again} == {wandb_id(out)}   # resumed: one id
