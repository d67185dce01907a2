"""Declared cut points against the real modules, for every registered architecture."""

import pytest
import torch

from stitching.models.registry import available, get_spec

from stitching.models.trace import trace_cuts

from stitching.models.weights import load_model, read_state_dict

MAIN = ["resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"]


def test_the_papers_four_architectures_and_their_families_are_registered():
    names = set(available())
    assert set(MAIN) <= names
    assert {"resnet18", "resnet34", "resnet101", "mobilenetv3_small_100", "vit_tiny_patch16_224",
            "vit_base_patch16_224", "swin_s", "swin_b"} <= names
    assert get_spec("resnet50").weights == "resnet50.a1_in1k"
    assert get_spec("vit_small_patch16_224").weights == "vit_small_patch16_224.augreg_in1k"
    assert get_spec("swin_t").library == "torchvision"


@pytest.mark.parametrize("name", sorted(available()))
def test_declared_cuts_match_the_real_model_and_split_reassembles_it(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = load_model(name).eval()
    parts = spec.split(model)
    shapes = trace_cuts(spec, parts, 224)
    for s in range(1, 5):
        for where in ("first", "end"):
            cut = spec.cut(s, where)
            c, h, w = shapes[(s, where)]
            assert c == cut.channels and h == w == 224 // cut.stride, (s, where)
    # stem + every block + head is exactly the original network
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        h = parts.stem(x)
        for block in parts.blocks():
            h = block(h)
        torch.testing.assert_close(parts.head(h), model(x), rtol=0, atol=0)


def test_paper_stage_boundaries():
    resnet = get_spec("resnet50").split(load_model("resnet50"))
    assert [len(s) for s in resnet.stages] == [3, 4, 6, 3]
    mnv3 = get_spec("mobilenetv3_large_100")
    m = load_model("mobilenetv3_large_100")
    parts = mnv3.split(m)
    assert parts.stages[2][0] is m.blocks[3][0] and parts.stages[3][0] is m.blocks[5][0]
    assert parts.stages[3][-1] is m.blocks[6][0]
    vit = load_model("vit_small_patch16_224")
    assert [s[0] for s in get_spec("vit_small_patch16_224").split(vit).stages] == [vit.blocks[i] for i in (0, 3, 6, 9)]
    swin = load_model("swin_t")
    assert [s[0] for s in get_spec("swin_t").split(swin).stages] == [swin.features[i] for i in (0, 2, 4, 6)]


def test_a_wrong_declaration_is_caught(monkeypatch):
    import dataclasses

    spec = get_spec("resnet18")
    bad = dataclasses.replace(spec, first=(spec.first[0], dataclasses.replace(spec.first[1], channels=99),
                                           *spec.first[2:]))
    with pytest.raises(RuntimeError, match="declares 99 channels"):
        trace_cuts(bad, spec.split(load_model("resnet18")), 64)


def test_local_weights_files_load_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = load_model("resnet18", num_classes=10)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        model = load_model("resnet18", weights_file=str(tmp_path / f), num_classes=10)
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        load_model("resnet50", weights_file=str(tmp_path / "w.safetensors"), num_classes=10)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(str(tmp_path / "nope.pt"))


def test_eval_preprocessing_is_each_models_own():
    vit = get_spec("vit_small_patch16_224").data_config(load_model("vit_small_patch16_224"))
    res = get_spec("resnet50").data_config(load_model("resnet50"))
    swin = get_spec("swin_t").data_config(load_model("swin_t"))
    assert tuple(vit["mean"]) == (0.5, 0.5, 0.5) and vit["interpolation"] == "bicubic"
    assert tuple(res["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert swin["crop_pct"] == pytest.approx(224 / 232) and swin["interpolation"] == "bicubic"


# ------------------------------------------------------------------------- a model family added by a user
FAMILY_CONFIG = """\
model: {source: tinycnn, source_stage: 1, destination_stage: 3, adapter: linear, pretrained: false}
data: {name: synthetic, img_size: 32, num_classes: 10, train_size: 128, val_size: 64, workers: 0}
train: {epochs: 1, batch_size: 64, device: cpu}
"""
#: a user's launcher: the family registered, then ``python -m stitching.train`` itself with the same arguments
FAMILY_LAUNCHER = ("import runpy; from tests.family_plugin import register_family; register_family(); "
                   "runpy.run_module('stitching.train', run_name='__main__', alter_sys=True)")


def test_a_hand_registered_family_is_checked_against_its_real_model():
    """docs/architecture.md's recipe, step 2: the declared cuts are traced on the real model (and a wrong stride
    is caught by the same check)."""
    from tests.family_plugin import spec

    good = spec()
    shapes = trace_cuts(good, good.split(good.build(False, 10)), 32)
    assert shapes[(2, "first")] == (16, 8, 8) and shapes[(4, "end")] == (32, 2, 2)
    bad = spec(strides=(2, 4, 8, 8))
    with pytest.raises(RuntimeError, match="stride"):
        trace_cuts(bad, bad.split(bad.build(False, 10)), 32)


@pytest.mark.slow
def test_a_hand_registered_family_trains_through_the_trainer(tmp_path):
    """The recipe's step 3: a family registered outside the package (tests/family_plugin.py) stitched and trained
    by ``stitching.train`` in a process that registered it first, its result row naming it."""
    import csv
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = tmp_path / "tiny family.yaml"
    cfg.write_text(FAMILY_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", FAMILY_LAUNCHER, "--config", str(cfg), f"output.dir={tmp_path / 'r'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (tmp_path / "r" / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert (row["source"], row["destination"], row["source_stage"], row["destination_stage"]) == \
        ("tinycnn", "tinycnn", "1", "3")
    assert row["num_adapters"] == "2" and 0 < int(row["trainable_params"]) < int(row["params"])
    assert 0 <= float(row["top1"]) <= 100
