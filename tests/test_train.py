"""``python -m stitching.train``: run directory, learning, resume after SIGTERM, torchrun, bad configs."""

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

from tests.conftest import ROOT, in_background, together

BASE = """\
model:
  source: resnet18
  source_stage: 1
  destination_stage: 3
  adapter: bottleneck
  pretrained: false
data:
  name: synthetic
  img_size: 32
  num_classes: 10
  train_size: 512
  val_size: 256
  workers: 0
train:
  epochs: 2
  batch_size: 64
  log_every: 1
  device: cpu          # the tests assert CPU results (fp32, bit-exact resume); on a GPU node auto picks CUDA
"""


def write_cfg(tmp_path: Path, text: str = BASE, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def train(*args, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_run_writes_every_file_with_sane_values(tmp_path):
    from stitching.results.schema import RESULT_COLUMNS

    out = tmp_path / "r"
    proc = train("--config", write_cfg(tmp_path), f"output.dir={out}")
    assert f"results in {out / 'result.csv'}" in proc.stdout
    for f in ("config.yaml", "metrics.csv", "result.csv", "checkpoint.pt", "model.safetensors", "train.log"):
        assert (out / f).is_file(), f
    [row] = rows(out / "result.csv")
    assert list(row) == RESULT_COLUMNS
    assert row["kind"] == "stitched" and row["gap"] == "1->3" and row["num_adapters"] == "2"
    assert row["resize"] == "bilinear" and row["resamples"] == "True"
    assert 0 <= float(row["top1"]) <= 100 and float(row["top5"]) >= float(row["top1"])
    assert float(row["val_loss"]) > 0 and float(row["train_loss"]) > 0
    assert 0 < int(row["trainable_params"]) < int(row["params"]) and int(row["flops"]) == 2 * int(row["macs"])
    assert float(row["images_per_s"]) > 0 and row["world_size"] == "1" and row["device"] == "cpu"
    assert row["precision"] == "fp32" and row["epochs"] == "2" and row["batch_size"] == "64"
    metrics = rows(out / "metrics.csv")
    assert [m["epoch"] for m in metrics] == ["1", "2"] and metrics[-1]["step"] == "16"
    assert float(metrics[-1]["lr"]) == pytest.approx(0.0, abs=1e-9)   # cosine to 0 at the last step
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 2 and ckpt["position"]["step"] == 16
    # the position's keys on disk are those the trainer wrote before its position became a dataclass
    assert set(ckpt["position"]) == {"epoch", "batch", "step", "wall", "train_time", "train_images", "sums",
                                     "world_size", "similarity_before"}
    assert all(k.startswith(("0.", "1.", "2.", "3.")) for k in ckpt["trainable"])   # adapters only
    from stitching.train.saved import load_trained

    model = load_trained(out)
    assert model.plan.num_adapters == 2
    log = (out / "train.log").read_text()
    assert "epoch 2/2" in log and "top1" in log


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """BASE trained for one epoch, once: the tests below each get a copy of its run directory."""
    root = tmp_path_factory.mktemp("one_epoch")
    train("--config", write_cfg(root, BASE.replace("epochs: 2", "epochs: 1")), f"output.dir={root / 'r'}")
    return root / "r"


def _copy_of(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run`` (its directory, as the trainer left it) and its config, under ``tmp_path``."""
    import shutil

    out = tmp_path / "r"
    shutil.copytree(run, out)
    return out, write_cfg(tmp_path, BASE.replace("epochs: 2", "epochs: 1"))


def test_a_checkpoint_of_the_old_position_dict_resumes(tmp_path, one_epoch_run):
    """A checkpoint whose ``position`` is the plain dict earlier versions wrote (their key set; one written before
    per-rank sums and ``world_size``, with a key this version does not know) resumes: the run finishes from it
    (its evaluation), with the numbers of the run that wrote it, and the unknown key is carried along."""
    import torch

    from stitching.train.checkpoint import Position

    out, cfg = _copy_of(one_epoch_run, tmp_path)
    [done] = rows(out / "result.csv")
    (out / "result.csv").unlink()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    new = ckpt["position"]
    old = {"epoch": new["epoch"], "batch": 0, "step": new["step"], "wall": new["wall"],
           "train_time": new["train_time"], "train_images": new["train_images"], "sums": [0.0, 0.0, 0.0],
           "similarity_before": new["similarity_before"], "from_another_version": 7}
    assert Position.from_dict(old).to_dict() == old             # the same keys and values back
    torch.save({**ckpt, "position": old}, out / "checkpoint.pt")
    proc = train("--config", cfg, f"output.dir={out}")
    assert "at epoch 2, batch 0" in proc.stderr and "resuming" in (out / "train.log").read_text()
    [again] = rows(out / "result.csv")
    for col in ("top1", "top5", "val_loss", "train_loss", "cka_before", "images_per_s"):
        assert again[col] == done[col], col
    assert float(again["wall_time_s"]) >= float(done["wall_time_s"])


def test_a_finished_run_is_skipped_and_force_keeps_the_old_files(tmp_path, one_epoch_run):
    out, cfg = _copy_of(one_epoch_run, tmp_path)
    before = (out / "result.csv").read_text()
    proc = train("--config", cfg, f"output.dir={out}")
    assert "already finished" in proc.stdout and (out / "result.csv").read_text() == before
    proc = train("--config", cfg, f"output.dir={out}", "--force")
    [archived] = list((out / "previous").iterdir())
    assert (archived / "result.csv").read_text() == before and (out / "result.csv").is_file()


def _interrupted_and_resumed(tmp_path: Path, cfg: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(cfg), f"output.dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.csv").is_file():
        time.sleep(0.05)
    assert (out / "metrics.csv").is_file(), proc.communicate()
    proc.send_signal(signal.SIGTERM)          # during epoch 2 (after the first epoch's checkpoint)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "checkpoint saved" in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["position"]["epoch"] == 1 and not (out / "result.csv").exists()
    proc = train("--config", cfg, f"output.dir={out}")
    assert "resuming" in proc.stderr


def test_sigterm_then_rerun_equals_an_uninterrupted_run(tmp_path):
    """Bit for bit on CPU (pinned above). On CUDA the same state is restored but the backward of bilinear
    resizing is not deterministic, so there a resumed run agrees to float tolerance only (docs/reliability.md,
    "Reliability")."""
    text = BASE.replace("epochs: 2", "epochs: 3").replace("train_size: 512", "train_size: 1024")
    cfg = write_cfg(tmp_path, text)
    straight = in_background(lambda: train("--config", cfg, f"output.dir={tmp_path / 'straight'}"))
    _interrupted_and_resumed(tmp_path, cfg, tmp_path / "resumed")
    straight.result()
    [a] = rows(tmp_path / "straight" / "result.csv")
    [b] = rows(tmp_path / "resumed" / "result.csv")
    for key in ("top1", "top5", "val_loss", "train_loss"):
        assert float(a[key]) == float(b[key]), key
    ma, mb = rows(tmp_path / "straight" / "metrics.csv"), rows(tmp_path / "resumed" / "metrics.csv")
    assert [m["val_loss"] for m in ma] == [m["val_loss"] for m in mb]
    assert [m["step"] for m in ma] == [m["step"] for m in mb]


def test_torchrun_two_processes_same_steps_one_row(tmp_path, one_epoch_run):
    cfg = write_cfg(tmp_path, BASE.replace("epochs: 2", "epochs: 1"))
    one = one_epoch_run            # the same config in one process
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stitching.train", "--config", str(cfg), f"output.dir={two}",
                           "train.per_device_batch_size=16"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows(two / "result.csv")) == 1 and rows(two / "result.csv")[0]["world_size"] == "2"
    steps_one = torch.load(one / "checkpoint.pt", weights_only=True)["position"]["step"]
    steps_two = torch.load(two / "checkpoint.pt", weights_only=True)["position"]["step"]
    assert steps_one == steps_two == 512 // 64
    assert rows(two / "metrics.csv")[-1]["step"] == str(steps_one)


@pytest.mark.parametrize("override,key", [
    ("train.bogus=1", "train.bogus"),
    ("train.per_device_batch_size=48", "train.batch_size"),
    ("data.root=/nonexistent/imagenet", "data.root"),
    ("model.source_weights=/nonexistent/w.safetensors", "model.source_weights"),
])
def test_bad_configs_stop_before_training_and_keep_earlier_results(tmp_path, one_epoch_run, override, key):
    out, cfg = _copy_of(one_epoch_run, tmp_path)
    snapshot = {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}
    extra = ["data.name=imagefolder"] if key == "data.root" else []
    proc = train("--config", cfg, f"output.dir={out}", override, *extra, "--force", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()} == snapshot
    assert not (out / "previous").exists()


def test_a_different_config_does_not_overwrite_a_run_dir(tmp_path, one_epoch_run):
    out, cfg = _copy_of(one_epoch_run, tmp_path)
    before = (out / "result.csv").read_text()
    # keys that change how a run is carried out, not what it computes (config.OPERATIONAL_KEYS), or that the
    # run never reads (model.init_images under model.init: default): the same run, already finished
    proc = train("--config", cfg, f"output.dir={out}", "data.workers=1", "train.log_every=3",
                 "train.preempt_check_every=2", "model.init_images=7")
    assert "run already finished" in proc.stdout and (out / "result.csv").read_text() == before
    # a finished run of another config: refused, not reported as "already finished" with the other run's result
    proc = train("--config", cfg, f"output.dir={out}", "train.lr=0.1", check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "different run" in proc.stderr
    assert "already finished" not in proc.stdout and (out / "result.csv").read_text() == before
    (out / "result.csv").unlink()       # an unfinished run of another config
    proc = train("--config", cfg, f"output.dir={out}", "train.lr=0.1", check=False)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "different run" in proc.stderr


def test_trained_small_model_stitched_to_itself_recovers_accuracy(tmp_path):
    """Train a small ResNet fully, then stitch it to itself from its saved weights (stage 1 -> 3)."""
    full = tmp_path / "full"
    text = """\
model:
  source: resnet18
  pretrained: false
data:
  name: synthetic
  img_size: 32
  num_classes: 10
  train_size: 2048
  val_size: 512
  workers: 0
  auto_augment: false        # AutoAugment and 8% crops erase 32-px shapes: 47% vs 69% top-1 here
  min_crop_scale: 0.35
train:
  epochs: 4
  batch_size: 64
  device: cpu
"""
    train("--config", write_cfg(tmp_path, text, "full.yaml"), f"output.dir={full}")
    [orig] = rows(full / "result.csv")
    assert orig["kind"] == "original" and float(orig["top1"]) > 50          # chance is 10%
    stitched = BASE.replace("pretrained: false", f"pretrained: false\n  source_weights: {full / 'model.safetensors'}")
    stitched = stitched.replace("train_size: 512", "train_size: 2048").replace("val_size: 256", "val_size: 512")
    stitched = stitched.replace("workers: 0", "workers: 0\n  auto_augment: false\n  min_crop_scale: 0.35")
    stitched += "  similarity_images: 64     # measured, not the point here (tests/test_similarity_runs.py)\n"
    cfg = write_cfg(tmp_path, stitched, "stitch.yaml")
    together(lambda: train("--config", cfg, f"output.dir={tmp_path / 'untrained'}", "train.epochs=0"),
             lambda: train("--config", cfg, f"output.dir={tmp_path / 'stitched'}", "train.epochs=2"))
    [untrained] = rows(tmp_path / "untrained" / "result.csv")
    [trained] = rows(tmp_path / "stitched" / "result.csv")
    assert float(untrained["top1"]) < 25
    assert float(trained["top1"]) > 0.75 * float(orig["top1"])
    assert trained["pretrained"] == "weights_file" and int(trained["trainable_params"]) < int(trained["params"])
