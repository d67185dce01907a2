"""Specs derived from the model itself: the hand entries agree with the derivation, and a stitched model to and
from ResNet-50 builds for every tested family (random init, 64 px), its parts reproducing the library's forward."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.models.derive import derive_spec
from stitching.models.registry import available, get_spec
from stitching.models.weights import load_model
from stitching.stitch.stitcher import build_model

ROOT = Path(__file__).resolve().parents[1]
IMG = 64

# family -> (model name, constructor arguments): the smallest variant of each family; models whose
# position / window tables are built for one input size get img_size (the others take any size).
FAMILIES = {
    "ConvNeXt": ("convnext_atto", {}),
    "ConvNeXt V2": ("convnextv2_atto", {}),
    "EfficientNet": ("efficientnet_b0", {}),
    "EfficientNetV2": ("tf_efficientnetv2_b0", {}),
    "RegNetY": ("regnety_002", {}),
    "ResNeXt": ("resnext26ts", {}),
    "ResNet-D": ("resnet18d", {}),
    "DenseNet": ("densenet121", {}),
    "DeiT (distilled)": ("deit_tiny_distilled_patch16_224", {}),
    "ViT with registers (DINOv2)": ("vit_small_patch14_reg4_dinov2", {"img_size": 56}),
    "EVA-02": ("eva02_tiny_patch14_224", {"img_size": 56}),
    "Swin V2 (timm)": ("swinv2_tiny_window8_256", {"img_size": IMG}),
    "MaxViT": ("maxvit_pico_rw_256", {"img_size": IMG}),
    "MobileViT": ("mobilevit_xxs", {}),
    "MobileNetV3 (torchvision)": ("torchvision:mobilenet_v3_small", {}),
    "RegNetY (torchvision)": ("torchvision:regnet_y_400mf", {}),
}
# (family, expected cut format): token sequences carry their prefix tokens
FORMATS = {"DeiT (distilled)": "tokens+2", "ViT with registers (DINOv2)": "tokens+5", "EVA-02": "tokens_cls",
           "Swin V2 (timm)": "bhwc"}


def _size(name, kwargs):
    return 56 if kwargs.get("img_size") == 56 else IMG


@pytest.mark.parametrize("name", sorted(available()))
def test_derivation_agrees_with_every_hand_entry(name):
    """Same cuts (format, channels, stride), the very same blocks in each stage, same stem and head."""
    hand = get_spec(name)
    derived = derive_spec(name)
    assert derived.first == hand.first and derived.end == hand.end
    torch.manual_seed(0)
    model = load_model(name).eval()
    a, b = hand.split(model), derived.split(model)
    for s in range(4):
        assert len(a.stages[s]) == len(b.stages[s]) and all(x is y for x, y in zip(a.stages[s], b.stages[s])), s
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        stem = a.stem(x)
        assert torch.equal(stem, b.stem(x))
        for block in a.blocks():
            stem = block(stem)
        assert torch.equal(a.head(stem), b.head(stem))
        assert torch.equal(b.head(stem), model(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_is_cut_from_the_model_itself_and_stitches_to_and_from_resnet50(family):
    name, kwargs = FAMILIES[family]
    size = _size(name, kwargs)
    spec = get_spec(name, kwargs or None)
    if family in FORMATS:
        assert {c.format for c in spec.first + spec.end} == {FORMATS[family]}
    # stem + blocks + head is exactly the library's own forward, at the test resolution
    torch.manual_seed(0)
    model = load_model(name, num_classes=10, kwargs=kwargs or None).eval()
    parts = spec.split(model)
    assert all(len(stage) >= 1 for stage in parts.stages)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        h = parts.stem(x)
        for block in parts.blocks():
            h = block(h)
        assert torch.equal(parts.head(h), model(x))
    # stitched both ways with ResNet-50, built from a config as a user would
    for source, destination, s, t in ((name, "resnet50", 2, 3), ("resnet50", name, 1, 3)):
        over = [f"model.source={source}", f"model.destination={destination}", f"model.source_stage={s}",
                f"model.destination_stage={t}", "model.adapter=linear", "model.pretrained=false",
                f"data.img_size={size}"]
        if kwargs:
            role = "source" if source == name else "destination"
            over.append(f"model.{role}_kwargs={json.dumps(kwargs)}")
        cfg = load_config(None, over)
        built = build_model(cfg.model, size, cfg.num_classes)
        assert built.kind == "stitched" and built.plan.num_adapters == t - s
        with torch.no_grad():
            out = built.model.eval()(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all(), (source, destination)
        assert sum(p.numel() for p in built.model.adapters.parameters() if p.requires_grad) > 0
        assert not any(p.requires_grad for p in built.model.prefix.parameters())


def test_the_derivation_speaks_one_line_where_it_cannot(tmp_path):
    with pytest.raises(ConfigError, match=r"model.source=.test_vit.*6 blocks cannot be split into four equal"):
        load_config(None, ["model.source=test_vit"])
    with pytest.raises(ConfigError, match=r"model.source=.no_such_net.*not a timm model"):
        load_config(None, ["model.source=no_such_net"])
    with pytest.raises(ConfigError, match=r"model.source_kwargs=.*constructor refuses"):
        load_config(None, ["model.source=convnext_atto", "model.source_kwargs={no_such_arg: 1}"])
    with pytest.raises(ConfigError, match=r"model.source_kwargs=.*must be a mapping .* or null"):
        load_config(None, ["model.source=convnext_atto", "model.source_kwargs=3"])
    with pytest.raises(ConfigError, match=r"model.source_kwargs=.*img_size 56 differs from data.img_size 64"):
        load_config(None, ["model.source=eva02_tiny_patch14_224", "model.source_kwargs={img_size: 56}",
                           "data.img_size=64"])
    with pytest.raises(ConfigError, match=r"model.source_kwargs=.*building and tracing it failed"):
        load_config(None, ["model.source=convnext_atto", "model.source_kwargs={depths: [1, 1]}"])
    with pytest.raises(ConfigError, match=r"model.destination_kwargs=.*needs model.source_stage"):
        load_config(None, ["model.source=convnext_atto", "model.destination_kwargs={drop_rate: 0.1}"])


def test_constructor_arguments_reach_the_model_and_preprocessing_comes_from_its_pretrained_cfg():
    cfg = load_config(None, ["model.source=deit_tiny_distilled_patch16_224", "model.pretrained=false",
                             "model.source_kwargs={img_size: 32, drop_path_rate: 0.1}", "data.img_size=32"])
    built = build_model(cfg.model, 32, 10)
    assert built.kind == "original" and tuple(built.model.patch_embed.img_size) == (32, 32)
    assert built.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    own = built.model.pretrained_cfg                  # deit_tiny_distilled_patch16_224.fb_in1k's own preprocessing
    assert built.data_config["mean"] == tuple(own["mean"]) and built.data_config["crop_pct"] == own["crop_pct"]
    assert built.data_config["interpolation"] == own["interpolation"] == "bicubic"
    tv = get_spec("torchvision:mobilenet_v3_small")
    assert tv.library == "torchvision" and tv.weights == "torchvision:mobilenet_v3_small.IMAGENET1K_V1"
    assert tv.data_config(None)["crop_pct"] == 224 / 256
    assert get_spec("convnext_atto.d2_in1k").weights == "convnext_atto.d2_in1k"


def test_pretrained_weights_go_through_the_library(monkeypatch):
    """``pretrained: true`` asks timm / torchvision for the named weights (no download here: intercepted)."""
    import timm
    import torchvision

    asked = []
    monkeypatch.setattr(timm, "create_model", lambda n, pretrained, **kw: asked.append((n, pretrained)) or
                        torch.nn.Linear(1, 1))
    monkeypatch.setattr(torchvision.models, "get_model", lambda n, weights, **kw: asked.append((n, weights)) or
                        torch.nn.Linear(1, 1000))
    spec = get_spec("convnext_atto.d2_in1k")
    spec.build(True, 10)
    get_spec("torchvision:mobilenet_v3_small").build(True, 10)
    assert asked == [("convnext_atto.d2_in1k", True), ("mobilenet_v3_small", "DEFAULT")]


def test_summary_works_for_a_derived_model_by_name(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {source: convnext_atto, destination: resnet50, source_stage: 1, destination_stage: 3,\n"
                   "        adapter: linear, pretrained: false}\ndata: {img_size: 64}\n")
    from tests.conftest import together

    proc, bad = together(   # two independent commands side by side
        lambda: subprocess.run([sys.executable, "-m", "stitching.summary", "--json", "--config", str(cfg)], cwd=ROOT,
                               capture_output=True, text=True, timeout=300),
        lambda: subprocess.run([sys.executable, "-m", "stitching.summary", "--config", str(cfg),
                                "model.source=test_vit"], cwd=ROOT, capture_output=True, text=True, timeout=300))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"] == "convnext_atto" and out["num_adapters"] == 2 and out["macs"] > 0
    assert out["joins"][0]["shape"] == [40, 16, 16] and out["joins"][-1]["shape"] == [1024, 4, 4]
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "6 blocks cannot be split into four equal stages" in bad.stderr


def test_the_trainer_runs_a_derived_pair_with_constructor_arguments(tmp_path):
    """A real run: DeiT (distilled, built for 32 px) -> ConvNeXt, trained, its result row naming the arguments."""
    import csv
    import os

    from stitching.train.saved import load_trained

    cfg = tmp_path / "run.yaml"
    cfg.write_text("""\
model: {source: deit_tiny_distilled_patch16_224, source_kwargs: {img_size: 32}, destination: convnext_atto,
        source_stage: 1, destination_stage: 3, adapter: linear_relu, pretrained: false}
data: {name: synthetic, img_size: 32, num_classes: 10, train_size: 64, val_size: 32, workers: 0}
train: {epochs: 1, batch_size: 32, log_every: 1, device: cpu}
""")
    out = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.train", "--config", str(cfg), f"output.dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with (out / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert row["kind"] == "stitched" and row["source"] == "deit_tiny_distilled_patch16_224"
    assert json.loads(row["model_kwargs"]) == {"source": {"img_size": 32}}
    assert row["num_adapters"] == "2" and 0 < int(row["trainable_params"]) < int(row["params"])
    model = load_trained(out)
    assert model.plan.source_cut.format == "tokens+2" and model.plan.destination == "convnext_atto"


@pytest.mark.parametrize("adapter", ["linear", "vit_block"])
def test_token_chains_between_different_prefix_counts(adapter):
    """DeiT (class + distillation token) -> DINOv2-style ViT (class + 4 registers) and back: the chain works in
    the destination's prefixed format, whose missing prefix tokens start as the source's class token."""
    deit, reg = "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"   # built with dynamic_img_size
    for src, dst in ((deit, reg), (reg, deit)):
        cfg = load_config(None, [f"model.source={src}", f"model.destination={dst}", "model.source_stage=2",
                                 "model.destination_stage=3", f"model.adapter={adapter}", "model.pretrained=false",
                                 "data.img_size=112"])   # 7x7 and 8x8 patches
        built = build_model(cfg.model, 112, 10)
        plan = built.plan
        assert plan.working_format == plan.destination_cut.format == ("tokens+5" if dst == reg else "tokens+2")
        # the first adapter keeps the width: no channel doubling between two prefixed formats
        assert plan.steps[0].c_in == plan.source_cut.channels
        with torch.no_grad():
            out = built.model.eval()(torch.randn(2, 3, 112, 112))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
