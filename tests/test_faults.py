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
    proc = cli("stitching.train", "--config", _folder_cfg(tmp_path, root), f"output.dir={out}",
               f"data.workers={workers}", "data.bad_images=error")
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
    assert sorted((n, split) for n, split, _ in found) == [("2", "train"), ("2", "val")], log
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
