"""``scripts/toy_study.py``: the sweep it writes expands (the study itself is too slow for the tests)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import yaml

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "toy_study.py"


def _script():
    spec = importlib.util.spec_from_file_location("toy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory):
    """Random-init weights of both models, saved where the trained ones would be."""
    from safetensors.torch import save_file

    from stitching.models import load_model

    toy = _script()
    out = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    for model in toy.MODELS:
        path = toy.weights_path(out, model)
        path.parent.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in load_model(model, num_classes=10).state_dict().items()}
        save_file(state, str(path))
    return out


def test_written_sweep_expands_into_the_study(fake_weights, tmp_path):
    from stitching.validate import check_files
    from stitching.sweep.spec import expand

    toy = _script()
    sweep = toy.write_sweep(fake_weights)
    assert sweep == fake_weights / "toy.yaml"
    _, blocks, exp = expand(sweep, tmp_path / "sweep")
    per_block = Counter(r.block for r in exp.runs)
    assert per_block == {
        "resnet18_self": 7 * 2 * 2,               # gaps 1->1..4, 2->2..4; linear, bottleneck; 2 seeds
        "resnet18_self_no_resize": 2 * 2,
        "resnet18_finetune": 3 * 2,               # 3 gaps x 2 lrs
        "resnet18_to_vit_tiny": 3 * 2,            # 1->2..4, 2 seeds
        "vit_tiny_to_resnet18": 3 * 2,
        "original_resnet18": 1,
        "original_vit_tiny": 1,
        # extension part: each option against the default run above with the same seeds
        "resnet18_self_least_squares": 2 * 2 * 2,  # 1->2, 1->3; linear, bottleneck; 2 seeds
        "resnet18_self_objectives": 2 * 2,         # match, distill at 1->3
        "resnet18_self_frozen_bn_train": 2,
        "resnet18_to_vit_tiny_reinject": 3 * 2,
    }
    extension = {r.block for r in exp.runs if r.part == "extension"}
    assert extension == {"resnet18_self_least_squares", "resnet18_self_objectives",
                         "resnet18_self_frozen_bn_train", "resnet18_to_vit_tiny_reinject"}
    assert sum(exp.impossible.values()) == 4 and not exp.duplicates     # 2->1 dropped
    weights = {m: str(toy.weights_path(fake_weights, m).resolve()) for m in toy.MODELS}
    for run in exp.runs:
        cfg, m = run.config, run.config.model
        check_files(cfg)                                                 # the weights files exist
        assert m.source_weights == weights[m.source] and not m.pretrained
        assert m.destination_weights in (None, weights.get(m.destination))
        assert cfg.data.img_size == 64 and cfg.num_classes == 10
        if cfg.is_original:
            assert cfg.train.epochs == 0
        else:
            assert 1 <= cfg.train.epochs <= 2
    assert {r.config.model.destination for r in exp.runs if r.block.endswith("_to_resnet18")} == {"resnet18"}
    # written again: nothing changes, the same run directories come out (finished runs are found again)
    text = sweep.read_text()
    assert toy.write_sweep(fake_weights) == sweep and sweep.read_text() == text
    assert [r.name for r in expand(sweep, tmp_path / "sweep")[2].runs] == [r.name for r in exp.runs]


def test_trained_model_configs_train_the_originals():
    from stitching.validate import load_config

    toy = _script()
    for model, (_, config) in toy.MODELS.items():
        cfg = load_config(config)
        assert cfg.is_original and cfg.model.source == model and cfg.train.epochs > 0
        assert not cfg.model.pretrained and cfg.model.source_weights is None
    with open(toy.SWEEP_TEMPLATE) as f:
        assert yaml.safe_load(f)["name"] == "toy"


def test_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--out" in proc.stdout and "--figures" in proc.stdout


def test_mnist_study_sweep_and_matrices_expand(tmp_path):
    """``--data mnist``: the written sweep and both matrices expand, every run builds its ViT-Ti with the small
    patches its training used and reads the ImageFolder (fake weights of the right shapes stand in)."""
    from safetensors.torch import save_file

    from stitching.validate import check_files
    from stitching.matrix.spec import load_matrix
    from stitching.models import load_model
    from stitching.sweep.spec import expand

    toy = _script()
    kwargs = toy.model_kwargs("mnist")
    assert kwargs["vit_tiny_patch16_224"] == {"patch_size": 8, "img_size": 32} and kwargs["resnet18"] == {}
    out, root = tmp_path / "mnist", tmp_path / "data"
    torch.manual_seed(0)
    for model in toy.MODELS:
        path = toy.weights_path(out, model)
        path.parent.mkdir(parents=True)
        net = load_model(model, num_classes=10, kwargs=kwargs[model] or None)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    for split in ("train", "val"):
        (root / split / "0").mkdir(parents=True)

    sweep = toy.write_sweep(out, study="mnist", data_root=root)
    assert sweep == out / "mnist.yaml"
    # the longer-training check (configs/sweeps/mnist_long.yaml) expands next to the study's base configs
    long = out / "mnist_long.yaml"
    shutil.copy(ROOT / "configs" / "sweeps" / "mnist_long.yaml", long)
    _, _, longer = expand(long, tmp_path / "long")
    assert len(longer.runs) == 9 * 2 * 2 and sum(longer.impossible.values()) == 3 * 2 * 2   # 9 forward pairs; 3 backward
    assert {(r.config.train.epochs, r.config.train.max_steps_per_epoch) for r in longer.runs} == {(8, 50)}
    assert {r.config.model.source_weights for r in longer.runs} == {str(toy.weights_path(out, "resnet18").resolve())}
    _, _, exp = expand(sweep, tmp_path / "sweep")
    per_block = Counter(r.block for r in exp.runs)
    assert per_block["vit_tiny_self"] == 3 * 2 and per_block["resnet18_to_vit_tiny_reinject"] == 3 * 2
    resizes = Counter(r.config.model.resize for r in exp.runs if r.block == "resnet18_self")
    assert resizes["strided"] > 0 and resizes["bilinear"] > 0        # separate and integrated downsampling
    for run in exp.runs:
        cfg, m = run.config, run.config.model
        check_files(cfg)
        assert cfg.data.name == "imagefolder" and cfg.data.root == str(root.resolve()) and cfg.data.img_size == 32
        sides = [(m.source, m.source_kwargs)] + ([(m.destination, m.destination_kwargs)]
                                                 if m.destination and m.destination != m.source else [])
        for name, given in sides:
            assert (given or {}) == kwargs[name], (run.name, name, given)

    matrices = toy.write_matrices(out, "mnist")
    assert [p.name for p in matrices] == ["matrix_resnet18_to_vit_tiny.yaml", "matrix_vit_tiny_to_resnet18.yaml"]
    for path in matrices:
        matrix = load_matrix(path)
        assert matrix.cuts == "blocks" and matrix.cells == 4 * 4
        assert matrix.controls == ["none", "source", "destination", "both"]
        from stitching.validate import load_config

        cell = load_config(matrix.base)
        assert cell.train.epochs == toy.MATRIX_EPOCHS and cell.data.root == str(root.resolve())
        assert cell.train.similarity_images == toy.MATRIX_TRAIN["similarity_images"] == 0 and cell.data.hflip == 0


# a step that takes a second to stop on Ctrl-C (as a trainer saving its checkpoint), and the script running it
_SLOW_TO_STOP = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(1.0)
    pathlib.Path(sys.argv[1], "saved").write_text("checkpoint")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
pathlib.Path(sys.argv[1], "started").write_text("")
time.sleep(120)
"""
_STUDY_STEP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("toy_study", sys.argv[1])
toy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(toy)
toy._run([sys.executable, sys.argv[2], sys.argv[3]], "sweep", {}, check=False)
print("went on to the next step")
"""


def test_ctrl_c_lets_the_running_step_stop_itself_and_ends_the_study_with_130(tmp_path):
    """Ctrl-C reaches the study script and its running step alike (one process group, as from a terminal): the
    script waits while the step saves its checkpoint (it used to kill it 0.25 s later, mid-save, with a
    traceback), then ends with exit 130 and one line saying how to resume, running no further step."""
    step, study = tmp_path / "step.py", tmp_path / "study.py"
    step.write_text(_SLOW_TO_STOP)
    study.write_text(_STUDY_STEP)
    proc = subprocess.Popen([sys.executable, study, SCRIPT, step, tmp_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)            # what a terminal's Ctrl-C does
    out, err = proc.communicate(timeout=60)
    assert (tmp_path / "saved").read_text() == "checkpoint", err
    assert proc.returncode == 130, err
    assert "went on" not in out and "Traceback" not in err, (out, err)
    assert "interrupted (Ctrl-C) in sweep (exit 130): run the same command again to resume" in err
