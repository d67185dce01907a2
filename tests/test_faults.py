"""Faults of the user's input, each ending in one clear line and the right exit code (2: config/input).

Bad image files in an ImageFolder (stop naming the file, or skip and count by ``data.bad_images``), weights
files that do not fit the config, the summary's cheap check of the weights files, and the local launcher's
placement of parallel runs on the visible GPUs. Everything runs through the real command-line tools.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

EXIT_CONFIG = 2


def cli(module: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error a command printed last on stderr (the whole stderr in the assertion message)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and "error: " in lines[-1], proc.stderr
    return lines[-1][lines[-1].index("error: "):]   # (a progress bar may precede it on the terminal line)


# ------------------------------------------------------------------------------ bad files in an ImageFolder
def _image_folder(root: Path, per_class: int) -> dict[str, Path]:
    """root/{train,val}/{cat,dog}/*.png (real PNGs) plus two bad files in each split."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(40, 40, 3, generator=rng) * 255 * (0.5 + c / 2)).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    # a real JPEG cut in half (PIL opens its header fine, decoding fails) and a text file named .jpg
    full = root / "full.jpg"
    Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(full, quality=90)
    data = full.read_bytes()
    full.unlink()
    bad = {
        "train_truncated": root / "train" / "cat" / "zz_truncated.jpg",
        "train_text": root / "train" / "dog" / "notes.jpg",
        "val_truncated": root / "val" / "dog" / "zz_truncated.jpg",
        "val_text": root / "val" / "cat" / "readme.jpg",
    }
    for key, path in bad.items():
        path.write_bytes(data[: len(data) // 2] if "truncated" in key else b"these are my notes, not an image\n")
    return bad


def _folder_cfg(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "folder.yaml"
    path.write_text(f"""\
model: {{source: resnet18, source_stage: 2, destination_stage: 3, adapter: linear, pretrained: false}}
data: {{name: imagefolder, root: {root}, img_size: 32, num_classes: 2, auto_augment: false}}
train: {{epochs: 1, batch_size: 6, device: cpu, log_every: 1}}
""")
    return path


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "pets"
    # train: 2 x 8 good + 2 bad = 18 files = 3 batches of 6 (no file dropped by drop_last); val: 2 x 4 + 2
    return root, _image_folder(root, per_class=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_stops_the_run_naming_the_file(tmp_path, bad_folder, workers):
    root, bad = bad_folder
    out = tmp_path / "run"
    # the similarity at the join is not measured here: its pass over val would meet a bad file first, in this
    # process; the run must name the training file its loader workers meet
    proc = cli("stitching.train", "--config", _folder_cfg(tmp_path, root), f"output.dir={out}",
               f"data.workers={workers}", "data.bad_images=error", "train.similarity_images=0")
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    line = error_line(proc)
    # one line: the config key, the file, what is wrong with it, and the switch that skips such files
    assert "data.root=" in line and "unreadable image file" in line and "data.bad_images=skip" in line, line
    named = [p for p in bad.values() if str(p) in line]
    assert len(named) == 1 and named[0].parent.parent.name == "train", line   # met while training
    assert "Traceback" not in proc.stderr and "worker" not in line, proc.stderr
    assert not (out / "result.csv").exists()


def test_unreadable_images_skipped_and_counted(tmp_path, bad_folder):
    root, bad = bad_folder
    out = tmp_path / "run"
    proc = cli("stitching.train", "--config", _folder_cfg(tmp_path, root), f"output.dir={out}",
               "data.workers=2", "data.bad_images=skip")
    assert proc.returncode == 0, proc.stderr
    assert (out / "result.csv").is_file()
    log = (out / "train.log").read_text()
    found = re.findall(r"data\.bad_images=skip: (\d+) unreadable file\(s\) left out of this pass over (\w+); "
                       r"first: unreadable image file (\S+)", log)
    # every pass over the images counts its own: the similarity at the join before training (val), the
    # epoch (train), its evaluation (val) and the similarity after training (val)
    assert [(n, split) for n, split, _ in found] == [("2", "val"), ("2", "train"), ("2", "val"), ("2", "val")], log
    for n, split, first in found:
        assert first in {str(p) for k, p in bad.items() if k.startswith(split)}, log
    import csv

    with (out / "metrics.csv").open() as f:
        [metrics] = list(csv.DictReader(f))
    assert metrics["epoch"] == "1" and float(metrics["val_loss"]) > 0


def test_bad_images_switch_is_checked(tmp_path, bad_folder):
    root, _ = bad_folder
    proc = cli("stitching.train", "--config", _folder_cfg(tmp_path, root), "data.bad_images=ignore")
    assert proc.returncode == EXIT_CONFIG
    assert "data.bad_images='ignore': must be one of error, skip" in error_line(proc)


# ------------------------------------------------------------------------------ weights that do not fit
def _weights(tmp_path: Path, name: str, num_classes: int, file: str) -> Path:
    from safetensors.torch import save_file

    from stitching.models.weights import load_model

    path = tmp_path / file
    state = {k: v.contiguous() for k, v in load_model(name, num_classes=num_classes).state_dict().items()}
    if file.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


def _weights_cfg(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "weights.yaml"
    path.write_text(f"""\
model: {{{model}, pretrained: false}}
data: {{name: synthetic, img_size: 32, num_classes: 20, train_size: 64, val_size: 32, workers: 0}}
train: {{epochs: 1, batch_size: 32, device: cpu}}
""")
    return path


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    text = d / "notes.pt"
    text.write_text("not weights\n")
    return {"r18_10": _weights(d, "resnet18", 10, "r18_10.safetensors"),
            "r18_20": _weights(d, "resnet18", 20, "r18_20.pt"),
            "r34_20": _weights(d, "resnet34", 20, "r34_20.safetensors"),
            "text": text}


@pytest.mark.parametrize("model,key,file,message", [
    # classes: a 10-class head where the config wants 20 (data.num_classes)
    ("source: resnet18", "model.source_weights", "r18_10",
     "does not fit resnet18: fc.weight has shape (10, 512), the model expects (20, 512): the file's classifier "
     "has 10 classes, the config 20 (data.num_classes) (and 1 more shape mismatches)"),
    # another architecture's weights as the destination of a stitch
    ("source: resnet18, destination: resnet18, source_stage: 1, destination_stage: 3, adapter: linear",
     "model.destination_weights", "r34_20",
     r"does not fit resnet18: layer1\.2\.\w+\.weight is in the file but not in the model \(and 95 more extra keys\)"),
    # not a weights file at all
    ("source: resnet18", "model.source_weights", "text", "not a safetensors or torch state-dict file"),
])
@pytest.mark.parametrize("command", ["stitching.train", "stitching.summary"])
def test_weights_that_do_not_fit_exit_2_naming_key_and_mismatch(tmp_path, weight_files, model, key, file,
                                                                message, command, capsys):
    """The trainer (loading the file) and the summary (reading only its header) say the same thing. In this
    process (``run_cli`` as ``python -m`` calls it) to keep the suite fast; one case also as a subprocess."""
    import importlib

    from stitching.cli import run_cli

    path = weight_files[file]
    if key == "model.destination_weights":
        extra = [f"model.source_weights={weight_files['r18_20']}", f"{key}={path}"]
    else:
        extra = [f"{key}={path}"]
    argv = ["--config", str(_weights_cfg(tmp_path, model)), f"output.dir={tmp_path / 'run'}", *extra]
    main = importlib.import_module(command if command == "stitching.summary" else command + ".__main__").main
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    assert exit_.value.code == EXIT_CONFIG
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: command line: {key}={str(path)!r}: "), line
    assert re.search(message, line) if "\\" in message else message in line, line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_weights_with_other_classes_exit_2_from_the_command_line(tmp_path, weight_files):
    path = weight_files["r18_10"]
    proc = cli("stitching.train", "--config", _weights_cfg(tmp_path, "source: resnet18"),
               f"model.source_weights={path}")
    assert proc.returncode == EXIT_CONFIG
    assert error_line(proc) == (f"error: command line: model.source_weights={str(path)!r}: does not fit resnet18: "
                                "fc.weight has shape (10, 512), the model expects (20, 512): the file's classifier "
                                "has 10 classes, the config 20 (data.num_classes) (and 1 more shape mismatches)")


def test_weights_that_fit_load_and_train(tmp_path, weight_files):
    out = tmp_path / "run"
    proc = cli("stitching.train", "--config", _weights_cfg(tmp_path, "source: resnet18"), f"output.dir={out}",
               f"model.source_weights={weight_files['r18_20']}", "train.epochs=0")
    assert proc.returncode == 0, proc.stderr
    assert (out / "result.csv").is_file()


# ------------------------------------------------------------------------------ the summary's cheap check
def test_summary_checks_weights_files_exist(tmp_path):
    missing = tmp_path / "nowhere" / "w.safetensors"
    proc = cli("stitching.summary", "--config", _weights_cfg(tmp_path, "source: resnet18"),
               f"model.source_weights={missing}")
    assert proc.returncode == EXIT_CONFIG
    assert error_line(proc) == f"error: command line: model.source_weights={str(missing)!r}: weights file not found"
    proc = cli("stitching.summary", "--config", _weights_cfg(
        tmp_path, "source: resnet18, source_stage: 1, destination_stage: 3, adapter: linear, destination: resnet34"),
        f"model.destination_weights={missing}")
    assert proc.returncode == EXIT_CONFIG
    assert "model.destination_weights=" in error_line(proc) and "weights file not found" in error_line(proc)


def test_summary_reads_no_tensors(tmp_path, weight_files, monkeypatch, capsys):
    """A fitting file passes the summary with every way of loading tensors disabled: only headers are read."""
    import json

    import safetensors.torch

    import stitching.models.weights as weights
    from stitching.summary import main

    def no(*a, **k):
        raise AssertionError("the summary loaded weights")

    monkeypatch.setattr(weights, "read_state_dict", no)
    monkeypatch.setattr(safetensors.torch, "load_file", no)
    assert main(["--json", "--config", str(_weights_cfg(tmp_path, "source: resnet18")),
                 f"model.source_weights={weight_files['r18_20']}"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "original"
    cfg = _weights_cfg(tmp_path, "source: resnet18, source_stage: 1, destination_stage: 3, adapter: linear, "
                                 "destination: resnet34")
    assert main(["--json", "--config", str(cfg), f"model.destination_weights={weight_files['r34_20']}",
                 f"model.source_weights={weight_files['r18_20']}"]) == 0


# ------------------------------------------------------------------------------ GPU placement, local launcher
@pytest.mark.slow
def test_local_launcher_maps_runs_onto_the_visible_gpus_and_shares_the_cpus(tmp_path, monkeypatch):
    """Three runs at a time under a parent ``CUDA_VISIBLE_DEVICES=2,5``: the real launcher starts the real
    trainer through a ``python`` that first records the environment it was given."""
    from stitching.launch.local import run_local, usable_cpus

    from stitching.validate import load_config

    dirs = []
    for i in range(3):
        d = tmp_path / f"run{i}"
        d.mkdir()
        cfg = load_config(ROOT / "configs" / "synthetic" / "tiny.yaml",
                          ["train.epochs=0", "train.device=cpu", f"output.dir={d}"])
        (d / "config.yaml").write_text(cfg.to_yaml())   # as the sweep writes it
        dirs.append(d)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nenv > "$4/env.txt"\nexec {sys.executable} "$@"\n')   # $4: the run dir
    python.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(ROOT)

    result = run_local(dirs, parallel=3, python=str(python))

    codes = {d: e.code for d, e in result.endings.items()}
    assert codes == {str(d): 0 for d in dirs}, [(d / "launcher.log").read_text() for d in dirs]
    envs = [dict(line.split("=", 1) for line in (d / "env.txt").read_text().splitlines() if "=" in line)
            for d in dirs]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5", "2"]   # physical ids, round-robin
    threads = str(max(1, usable_cpus() // 3))
    assert all(e[v] == threads for e in envs for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    assert all((d / "result.csv").is_file() for d in dirs)    # the real trainer ran to the end


def test_visible_gpus_follow_the_parent():
    from stitching.launch.local import least_busy, run_env, visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb,-1,3"}) == ["GPU-aa", "GPU-bb"]
    assert least_busy(["2", "5"], ["2", "5", "2"]) == "5" and least_busy([], []) is None
    env = run_env({"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "2,5"}, "5", 8)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    env = run_env({"MKL_NUM_THREADS": "2"}, None, 8)       # the count a user gave serves the libraries they did not
    assert (env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"], env["OPENBLAS_NUM_THREADS"]) == ("2", "2", "2")
    assert run_env({}, None, 8)["OPENBLAS_NUM_THREADS"] == "8" and "CUDA_VISIBLE_DEVICES" not in run_env({}, None, 8)
