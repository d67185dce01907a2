"""Adapter kinds and run kinds (``stitching/kinds.py``): the built-in records keep the traits the planner, the
adapters, the least-squares fit and the plots had; a kind is declared once; a NEW adapter kind declared in one
place outside the package (``tests/kinds_plugin.py``: its record and its core) trains through the real trainer,
and the plan, the config checks, the cost, the result row and the figures' labels all take it."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys

import pytest
from torch import nn

from stitching import kinds
from stitching.kinds import FINETUNE, ORIGINAL, RUN_KINDS, STITCHED, kinds_with
from stitching.plots.labels import add_labels, method_sort_key, method_style
from stitching.stitch.plan import PlanError, plan_config
from tests.conftest import ROOT, model_cfg
from tests.kinds_plugin import CONV1X1_GELU


def test_the_builtin_kinds_keep_their_traits():
    assert RUN_KINDS == ("stitched", "finetune", "original") == (STITCHED, FINETUNE, ORIGINAL)
    assert kinds.adapter_choices() == ("linear", "linear_relu", "conv3x3", "bottleneck", "vit_block", "finetune")
    assert kinds_with("strided") == ("conv3x3", "bottleneck")
    assert kinds_with("feature_map") == ("conv3x3", "bottleneck")
    assert kinds_with("per_token") == ("linear", "linear_relu")
    assert kinds_with("sequence") == ("vit_block",)
    assert kinds_with("outer_norms") == ("linear", "linear_relu", "conv3x3")
    assert kinds_with("activated") == ("linear_relu", "conv3x3")
    assert kinds_with("fit") == ("linear", "linear_relu", "conv3x3", "bottleneck")
    assert kinds_with("padded") == ("linear", "linear_relu")
    assert [kinds.ADAPTER_KINDS[k].color for k in ("conv3x3", "bottleneck")] == ["tab:green", "tab:orange"]


def test_a_kind_is_declared_once():
    with pytest.raises(ValueError, match="already declared"):
        kinds.register(dataclasses.replace(kinds.LINEAR, label="Another"))
    with pytest.raises(ValueError, match="already declared"):      # the fine-tuning baseline is a run kind
        kinds.register(dataclasses.replace(CONV1X1_GELU, name=FINETUNE))
    with pytest.raises(ValueError, match="fit must be"):
        kinds.register(dataclasses.replace(CONV1X1_GELU, fit="all of it"))
    assert CONV1X1_GELU.name not in kinds.ADAPTER_KINDS and FINETUNE not in kinds.ADAPTER_KINDS


@pytest.fixture
def new_kind():
    kinds.register(CONV1X1_GELU)
    yield CONV1X1_GELU
    kinds.unregister(CONV1X1_GELU.name)


def test_a_new_kind_is_planned_by_its_traits(new_kind):
    m = model_cfg(source="resnet18", source_stage=1, destination_stage=3, adapter=new_kind.name)
    assert plan_config(m, 64).num_adapters == 2
    with pytest.raises(PlanError, match="conv3x3 or bottleneck"):       # not strided
        plan_config(dataclasses.replace(m, resize="strided"), 64)
    vit = dataclasses.replace(m, source="vit_tiny_patch16_224", source_stage=1, destination_stage=2)
    with pytest.raises(PlanError, match="need a feature map"):          # between two token formats
        plan_config(vit, 64)


CONFIG = """\
model: {{source: resnet18, source_stage: 1, destination_stage: 3, adapter: conv1x1_gelu, pretrained: false,
        init: {init}}}
data: {{name: synthetic, img_size: 32, num_classes: 10, train_size: 128, val_size: 64, workers: 0}}
train: {{epochs: 1, batch_size: 64, device: cpu}}
"""
#: a user's launcher: the kind registered, then ``python -m stitching.train`` itself with the same arguments
LAUNCHER = ("import runpy; from stitching.kinds import register; from tests.kinds_plugin import CONV1X1_GELU; "
            "register(CONV1X1_GELU); runpy.run_module('stitching.train', run_name='__main__', alter_sys=True)")


def _train(tmp_path, init: str = "default") -> subprocess.CompletedProcess:
    cfg = tmp_path / "my run #1.yaml"
    cfg.write_text(CONFIG.format(init=init))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", LAUNCHER, "--config", str(cfg), f"output.dir={tmp_path / 'r'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_new_adapter_kind_trains_through_the_trainer(tmp_path, new_kind):
    from stitching.results.collect import read_result
    from stitching.train.saved import load_trained

    proc = _train(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (tmp_path / "r" / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["kind"] == STITCHED and row["adapter"] == new_kind.name and row["num_adapters"] == "2"
    assert 0 < int(row["trainable_params"]) < int(row["params"]) and int(row["macs"]) > 0
    assert 0 <= float(row["top1"]) <= 100
    model = load_trained(tmp_path / "r")                                  # its core, rebuilt from the record
    assert sum(isinstance(m, nn.GELU) for m in model.adapters.modules()) == 2
    labelled = add_labels(read_result(tmp_path / "r" / "result.csv"))
    assert labelled["method"].tolist() == ["Downsample, Conv1x1 + GELU"]
    assert method_style(STITCHED, new_kind.name, "bilinear")["color"] == "tab:olive"
    assert method_sort_key(STITCHED, new_kind.name, "bilinear") > method_sort_key(STITCHED, "vit_block", "bilinear")


@pytest.mark.slow
def test_a_new_kind_without_a_map_to_fit_refuses_least_squares_in_one_line(tmp_path, new_kind):
    proc = _train(tmp_path, init="least_squares")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "model.init" in line and "conv1x1_gelu adapters have no linear map" in line and "my run #1.yaml" in line
    assert not (tmp_path / "r").exists()
