"""The CUDA-only paths, run on a GPU (``pytest -m gpu``; ``benchmarks/gpu_check.py`` runs them with the GPU
figures). Without a CUDA device every test here is skipped (tests/conftest.py), so CI passes over them.

- the training step under bf16 and fp16 autocast (fp16 through the gradient scaler), frozen BatchNorm folded,
  against the same step in fp32;
- ``train.compile``: the compiled step against the eager one;
- the real trainer on ``cuda``: fused AdamW in the checkpoint, SIGTERM -> checkpoint -> resume, the result
  against an uninterrupted run (to float tolerance: bilinear resizing's backward uses atomic adds on CUDA);
- ``data.decode: gpu`` (nvJPEG) against the CPU decode of the same samples, and the uint8 batch normalised on
  the device against the same on the CPU;
- a one-process NCCL group: the trainer's collective helpers and a DDP step with gradient accumulation;
- the local launcher placing runs on the GPU.

``STITCHING_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (gloo for the group), to check the tests' own
logic on a machine without a GPU; the CUDA-only assertions (fused AdamW, the device's name) are skipped then.
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from stitching import rundir as R
from stitching.validate import load_config
from stitching.stitch.stitcher import build_model
from stitching.train import distributed as D
from stitching.train.step import build_step
from stitching.train.step import train_step
from tests.conftest import ROOT

pytestmark = pytest.mark.gpu

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
ON_CPU = os.environ.get("STITCHING_GPU_TESTS_ON_CPU") == "1"


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The device the tests run on: CUDA (the conftest skips them without it), or the CPU on request."""
    return torch.device("cpu" if ON_CPU else "cuda")


def _tiny(*overrides: str):
    return load_config(TINY, ["train.device=cpu" if ON_CPU else "train.device=cuda", *overrides])


def _batch(n: int = 16, size: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _step(model, cfg, device, precision: str, steps_per_epoch: int = 4):
    """The trainer's step for the tiny stitched model on ``device``, one micro-batch per optimizer step."""
    return build_step(model.to(device), cfg, "stitched", device, precision, 1, steps_per_epoch)


# ------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_with_folded_batchnorm_follows_fp32(device, precision):
    """Three optimizer steps of the stitched tiny model in ``precision`` (frozen BatchNorm folded; fp16 through
    the gradient scaler) against the same steps in fp32: the losses agree to autocast's tolerance, and the
    adapters moved."""
    cfg = _tiny()
    assert cfg.train.fold_bn
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    ref_model, model = copy.deepcopy(built.model), built.model
    ref, st = _step(ref_model, cfg, device, "fp32"), _step(model, cfg, device, precision)
    assert st.scaler.is_enabled() == (precision == "fp16")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for i in range(3):
        x, y = _batch(seed=i)
        want = train_step(ref, x, y, 0).item()
        got = train_step(st, x, y, 0).item()
        assert abs(got - want) <= 0.05 * abs(want) + 1e-3, (precision, i, got, want)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert st.nonfinite() is None and st.step == 3
    if precision == "fp16":
        assert st.scaler.get_scale() > 0


# -------------------------------------------------------------------------------------------- compile
def test_compiled_step_follows_the_eager_step(device):
    """``train.compile: true``: the compiled runner's losses over three steps equal the eager runner's to
    float tolerance, from the same weights."""
    cfg = _tiny("train.compile=true")
    eager_cfg = _tiny()
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
    compiled, eager = _step(copy.deepcopy(built.model), cfg, device, "fp32"), \
        _step(built.model, eager_cfg, device, "fp32")
    assert compiled.runner is not eager.runner and hasattr(compiled.runner, "_orig_mod")
    for i in range(3):
        x, y = _batch(seed=10 + i)
        a, b = train_step(compiled, x, y, 0).item(), train_step(eager, x, y, 0).item()
        assert a == pytest.approx(b, rel=2e-2, abs=1e-3), (i, a, b)


# ------------------------------------------------------------------------- the trainer: resume on CUDA
COMMON = ["train.epochs=3", "data.train_size=640", "data.val_size=64", "train.log_every=1", "data.workers=2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli(out: Path, *extra: str) -> list[str]:
    dev = "train.device=cpu" if ON_CPU else "train.device=cuda"
    return [sys.executable, "-m", "stitching.train", "--config", str(TINY), dev, *COMMON, *extra,
            f"output.dir={out}"]


def _row(run: Path) -> dict:
    with (run / R.RESULT).open() as f:
        [row] = list(csv.DictReader(f))
    return row


def test_sigterm_checkpoints_fused_adamw_and_the_resumed_run_matches(tmp_path, device):
    """The real trainer on the GPU: an uninterrupted run, and a run stopped by SIGTERM (to the trainer and its
    loader workers) in its second epoch, whose checkpoint holds the fused AdamW state and the precision
    ``auto`` chose, resumed to the end: the two results agree to float tolerance."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = subprocess.run(_cli(straight), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(_cli(resumed), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (resumed / R.METRICS).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == R.EXIT_PREEMPTED, stderr[-3000:]
    ckpt = torch.load(resumed / R.CHECKPOINT, weights_only=True, map_location="cpu")
    groups = ckpt["optimizer"]["param_groups"]
    assert groups and all(g.get("fused") for g in groups) != ON_CPU      # fused on CUDA, not on the CPU
    again = subprocess.run(_cli(resumed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _row(straight), _row(resumed)
    if not ON_CPU:
        assert a["device"] == b["device"] == torch.cuda.get_device_name(0)
        assert a["precision"] in ("bf16", "fp16") and float(a["images_per_s"]) > 0
    for key in ("val_loss", "train_loss"):
        assert float(b[key]) == pytest.approx(float(a[key]), rel=0.05), key
    assert abs(float(a["top1"]) - float(b["top1"])) <= 5.0


# ---------------------------------------------------------------------------------------- decode on GPU
def test_gpu_decode_and_device_normalisation_match_the_cpu(tmp_path, device):
    """``data.decode: gpu``: the same undecoded training and evaluation samples, decoded by nvJPEG and
    augmented on the GPU, against the same device half on the CPU (libjpeg): a level or two apart at most on
    average. And the uint8 batch normalised on the GPU equals the CPU's."""
    from stitching.data import pipeline as P
    from stitching.data.datasets import build_datasets
    from stitching.data.loaders import build_loader
    from stitching.data.seeding import set_epoch
    from stitching.data.transforms import build_transforms
    from tests.test_pipeline import STD, _data, _jpeg, _model_cfg, _photo

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                _jpeg(root / split / f"c{c}" / f"{i}.jpg", _photo(420 + 20 * i, 320, 10 * c + i), quality=90)
    data = _data(name="imagefolder", root=str(root), num_classes=2, img_size=96, bad_images="error", seed=0)
    fast_train, fast_eval = build_transforms(_model_cfg(96), data, torch.device("cpu"))
    encoded = (P.EncodedTrainTransform(fast_train), P.EncodedEvalTransform(fast_eval))
    train, val = build_datasets(data, *encoded)
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for ds, transform, shuffle in ((train, encoded[0], True), (val, encoded[1], False)):
        loader = build_loader(ds, 8, shuffle, 0, 0)
        set_epoch(loader, 0)
        (samples, labels), = list(loader)
        gx, gy = P.batch_to_device(transform, device)(samples, labels)
        cx, cy = P.batch_to_device(transform, torch.device("cpu"))(samples, labels)
        assert gx.device.type == device.type and torch.equal(gy.cpu(), cy)
        levels = ((gx.float().cpu() - cx).abs() * scale).mean((1, 2, 3))
        assert levels.mean() < 2.0 and levels.max() < 4.0, levels

    x = torch.randint(0, 256, (4, 96, 96, 3), dtype=torch.uint8)
    on_device = fast_eval.normalize(x.to(device))
    assert on_device.device.type == device.type
    torch.testing.assert_close(on_device.cpu(), fast_eval.normalize(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ one-process NCCL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_group_runs_the_collectives_and_a_ddp_step(device):
    """A one-process NCCL group (gloo on the CPU): the trainer's collective helpers return what one rank
    holds, and a DDP-wrapped stitched model trains two accumulated micro-batches per optimizer step (the first
    without the gradient all-reduce) to the same loss as the plain model."""
    backend = "gloo" if ON_CPU else "nccl"
    if not ON_CPU:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        info = SimpleNamespace(enabled=True, rank=0, world_size=1, local_rank=0, is_main=True)
        assert D.all_sum([1.5, 2.0], device, info) == [1.5, 2.0]
        assert D.all_max(2.0, device, info) == 2.0
        assert D.all_min(3.0, device, info) == 3.0
        t = torch.tensor([4.0], device=device)
        assert D.all_sum_tensor(t, info).item() == 4.0
        D.barrier(info)

        cfg = _tiny()
        torch.manual_seed(0)
        built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes)
        plain = build_step(copy.deepcopy(built.model).to(device), cfg, built.kind, device, "fp32", 2, 4)
        model = built.model.to(device)
        D.broadcast_module(model, info)
        wrapped = build_step(model, cfg, built.kind, device, "fp32", 2, 4,
                             info=D.DistInfo(rank=0, world_size=2, local_rank=0))   # world > 1: DDP
        assert wrapped.distributed
        for micro in range(4):
            x, y = _batch(seed=20 + micro)
            a, b = train_step(wrapped, x, y, micro).item(), train_step(plain, x, y, micro).item()
            assert a == pytest.approx(b, rel=1e-3, abs=1e-4), (micro, a, b)
        assert wrapped.step == plain.step == 2
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- local placement
def test_local_launcher_places_each_run_on_the_gpu(tmp_path, device):
    """``stitching.sweep --launcher local --parallel 2``: two runs, each started on a GPU this process may
    use, and each run's result names the device it trained on."""
    sweep = tmp_path / "sweep.yaml"
    dev = "cpu" if ON_CPU else "cuda"
    sweep.write_text(f"base: {TINY}\ngrid:\n  train.seed: [0, 1]\n  train.device: [{dev}]\n"
                     "  data.train_size: [128]\n  data.val_size: [64]\n")
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", str(sweep), "--launcher", "local",
                           "--parallel", "2", "--runs-dir", str(tmp_path / "runs")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    starts = [line for line in proc.stdout.splitlines() if line.startswith("[local] start")]
    assert len(starts) == 2
    results = sorted((tmp_path / "runs").rglob(R.RESULT))
    assert len(results) == 2
    if not ON_CPU:
        assert all(" on GPU " in line for line in starts), starts
        for path in results:
            assert _row(path.parent)["device"] == torch.cuda.get_device_name(0)
