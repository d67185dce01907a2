"""Block cuts: every registered family lists its blocks with traced shapes, a stitch at any pair of blocks builds
and runs (random init, small images), a stage gap is the same chain as its block cut, the config refuses mixed or
impossible keys, and a block-cut config trains through the real command line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.models.formats import spatial_shape
from stitching.models.registry import get_spec
from stitching.models.trace import list_blocks, trace_blocks, trace_cuts
from stitching.models.weights import load_model
from stitching.stitch.plan import PlanError, plan_blocks, plan_stitch
from stitching.stitch.stitcher import build_model
from tests.conftest import model_cfg, together

ROOT = Path(__file__).resolve().parents[1]

# one small member per registered family, and derived ones of every cut format (name, kwargs, image size)
FAMILIES = {
    "ResNet": ("resnet18", None, 64),
    "MobileNetV3": ("mobilenetv3_small_100", None, 64),
    "ViT": ("vit_tiny_patch16_224", None, 64),
    "ViT, 4 px patches": ("vit_tiny_patch16_224", {"patch_size": 4, "img_size": 32}, 32),
    "Swin (torchvision)": ("swin_t", None, 64),
    "ConvNeXt (derived)": ("convnext_atto", None, 64),
    "ResNet (torchvision, derived)": ("torchvision:resnet18", None, 64),
    "DeiT distilled (derived)": ("deit_tiny_distilled_patch16_224", None, 64),
    "Swin V2 (timm, derived)": ("swinv2_tiny_window8_256", {"img_size": 64}, 64),
}
SLOW = ("Swin (torchvision)", "Swin V2 (timm, derived)", "ConvNeXt (derived)", "ViT",
        "ResNet (torchvision, derived)")     # 20-35 s each on a loaded 2-core machine


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_tracing_leaves_every_module_in_its_mode_and_the_batchnorm_statistics_alone(name, mode):
    """A split's stem is a wrapper of the network's own modules (in train mode whatever the network's): tracing
    restores each module's own mode, never the wrapper's onto the network's BatchNorms (a closed-form matrix
    traces block cuts after putting its frozen networks in eval mode; before, its stem BatchNorms went back to
    train mode there, computed the fit's targets with batch statistics and overwrote their running ones)."""
    spec = get_spec(name)
    model = load_model(name, False, None, 10)
    parts = spec.split(model)
    model.train(mode == "train")
    modes = {id(m): m.training for m in model.modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    trace_cuts(spec, parts, 32)
    trace_blocks(spec, parts, 32, model)
    assert {id(m): m.training for m in model.modules()} == modes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES])
def test_every_family_lists_its_blocks_and_stitches_at_blocks(family):
    name, kwargs, img = FAMILIES[family]
    spec = get_spec(name, kwargs)
    blocks = list_blocks(name, kwargs, img)
    torch.manual_seed(0)
    model = load_model(name, kwargs=kwargs, num_classes=10).eval()
    parts = spec.split(model)
    # the listing (meta device) is the real model's trace; names are the model's modules
    assert blocks == trace_blocks(spec, parts, img, model)
    assert len(blocks) == len(parts.blocks()) and [b.index for b in blocks] == list(range(len(blocks)))
    for b, module in zip(blocks, parts.blocks()):
        assert getattr(module, "block", module) is model.get_submodule(b.name)
    assert blocks[-1].relative_depth == 1.0 and all(0 < b.relative_depth <= 1 for b in blocks)
    # stage cut points are blocks: the first block of stage s gives the stage's traced cut
    cuts = trace_cuts(spec, parts, img)
    firsts = [b for b in blocks if b.first]
    assert [b.stage for b in firsts] == [1, 2, 3, 4]
    for b in firsts:
        assert b.shape == tuple(cuts[(b.stage, "first")]) and b.format == spec.cut(b.stage, "first").format
    # a block cut, forward and back: sender = second block, receiver = second-to-last, and the reverse
    n = len(blocks)
    adapter = "linear"
    for i, j in ((1, n - 2), (n - 2, 1)):
        built = build_model(model_cfg(source=name, source_kwargs=kwargs, source_block=i, destination_block=j,
                                      adapter=adapter), img_size=img, num_classes=10)
        plan = built.plan
        assert (plan.source_block, plan.destination_block, plan.source_stage) == (i, j, None)
        assert plan.num_adapters == max(abs(blocks[j].stage - blocks[i].stage), 1)
        assert len(built.model.prefix) == 1 + i + 1 and len(built.model.suffix) == (n - j - 1) + 1
        x = torch.randn(2, 3, img, img)
        with torch.no_grad():
            y = built.model.eval()(x)
            inner = built.model.prefix(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        assert spatial_shape(inner, blocks[i].format) == blocks[i].shape    # the sender's block i output


def test_a_stage_gap_plans_the_same_chain_as_its_block_cut():
    pairs = [("resnet50", "swin_t"), ("vit_small_patch16_224", "resnet50"), ("mobilenetv3_large_100", "resnet50"),
             ("resnet50", "vit_small_patch16_224")]
    for src_name, dst_name in pairs:
        src, dst = get_spec(src_name), get_spec(dst_name)
        bs, bd = list_blocks(src_name), list_blocks(dst_name)
        first = lambda blocks, s: next(b.index for b in blocks if b.stage == s and b.first)  # noqa: E731
        last = lambda blocks, s: max(b.index for b in blocks if b.stage == s)  # noqa: E731
        for s in range(1, 5):
            for t in range(s, 5):
                for schedule in ("paper", "destination"):
                    adapter = "linear" if dst.cut(1, "first").format.startswith("tokens") else "bottleneck"
                    stage = plan_stitch(src, dst, s, t, adapter, "bilinear", schedule)
                    j = first(bd, t) if t > s else last(bd, s)
                    block = plan_blocks(src, dst, first(bs, s), j, adapter, "bilinear", schedule, bs, bd)
                    assert block.steps == stage.steps, (src_name, dst_name, s, t, schedule)
                    assert (block.source_cut, block.destination_cut) == (stage.source_cut, stage.destination_cut)


def test_backward_cuts_and_block_plan_errors():
    src = get_spec("resnet18")
    blocks = list_blocks("resnet18", None, 64)
    back = plan_blocks(src, src, 6, 0, "bottleneck", "strided", "destination", blocks, blocks)
    # stage 4 -> stage 1: three adapters landing on stages 3, 2 then 1 (upsampling: bilinear, no stride)
    assert [s.c_out for s in back.steps] == [256, 128, 64] and back.steps[-1].size_out == (16, 16)
    assert {s.resize for s in back.steps} == {"bilinear"} and back.cut_label == "b6->b0"
    with pytest.raises(PlanError, match="0..7 .resnet18 has 8 blocks") as err:
        plan_blocks(src, src, 8, 0, "linear", "bilinear", "paper", blocks, blocks)
    assert err.value.key == "model.source_block"
    with pytest.raises(PlanError, match="stage cuts") as err:
        plan_blocks(src, src, 1, 3, "finetune", "bilinear", "paper", blocks, blocks)
    assert err.value.key == "model.adapter"


def _write(tmp_path, model: str, name="c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"model:\n{model}  pretrained: false\ndata:\n  name: synthetic\n  img_size: 32\n")
    return path


@pytest.mark.parametrize("model, key, words", [
    ("  source: resnet18\n  source_stage: 1\n  source_block: 0\n  destination_block: 3\n",
     "model.source_block", "model.source_stage and model.source_block are both set"),
    ("  source: resnet18\n  source_block: 0\n  destination_block: 3\n  destination_stage: 2\n",
     "model.destination_block", "model.destination_stage and model.destination_block are both set"),
    ("  source: resnet18\n  source_block: 0\n", "model.source_block", "needs model.destination_block"),
    ("  source: resnet18\n  source_block: 0\n  destination_stage: 2\n", "model.source_block",
     "not destination_stage"),
    ("  source: resnet18\n  source_stage: 1\n  destination_block: 2\n", "model.destination_stage",
     "destination_block needs model.source_block"),
    ("  source: resnet18\n  destination_block: 2\n", "model.destination_block", "needs model.source_stage or"),
    ("  source: resnet18\n  source_block: 2\n  destination_block: 8\n", "model.destination_block",
     "0..7 (resnet18 has 8 blocks)"),
    ("  source: resnet18\n  source_block: -1\n  destination_block: 2\n", "model.source_block", "block index"),
    ("  source: resnet18\n  source_block: 1\n  destination_block: 2\n  adapter: finetune\n", "model.adapter",
     "stage cuts"),
    ("  source: resnet18\n  destination: vit_tiny_patch16_224\n  source_block: 1\n  destination_block: 2\n"
     "  adapter: conv3x3\n  destination_kwargs: {patch_size: 4, img_size: 32}\n  source_kwargs: {}\n"
     "  pos_embed: reinject\n", None, None),
])
def test_block_keys_are_checked_before_anything_is_built(tmp_path, model, key, words):
    path = _write(tmp_path, model)
    if key is None:         # a valid mixed-architecture block config (re-injecting into a small-patch ViT)
        cfg = load_config(path)
        assert (cfg.model.source_block, cfg.model.destination_block) == (1, 2) and not cfg.is_original
        return
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key and words in str(err.value) and str(path) in str(err.value)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_block_cut_config_trains_through_the_cli_and_reports_its_blocks(tmp_path):
    cfg = tmp_path / "blocks.yaml"
    cfg.write_text("""\
model:
  source: resnet18
  destination: vit_tiny_patch16_224
  destination_kwargs: {patch_size: 4, img_size: 32}
  source_block: 2
  destination_block: 9
  adapter: linear
  pretrained: false
data: {name: synthetic, img_size: 32, num_classes: 10, train_size: 96, val_size: 32, workers: 0,
       auto_augment: false}
train: {epochs: 1, batch_size: 32, max_steps_per_epoch: 3, device: cpu, log_every: 1}
""")
    run = tmp_path / "run"
    summary, proc, bad = together(  # three independent commands, two at a time
        lambda: _cli("stitching.summary", "--json", "--config", cfg),
        lambda: _cli("stitching.train", "--config", cfg, f"output.dir={run}"),
        lambda: _cli("stitching.train", "--config", cfg, "model.source_stage=1", "model.source_block=3",
                     f"output.dir={tmp_path / 'bad'}"))       # both kinds on one command line: a conflict
    assert summary.returncode == 0, summary.stderr
    out = json.loads(summary.stdout)
    assert (out["source_block"], out["destination_block"], out["gap"]) == (2, 9, "b2->b9")
    assert "source_stage" not in out and out["num_adapters"] == 2     # stage 2 -> stage 4 of the ViT
    assert out["joins"][0]["at"] == "resnet18 block 2 (its output)" and out["joins"][0]["shape"] == [128, 4, 4]
    assert out["joins"][-1]["shape"] == [192, 8, 8] and "after block 9" in out["joins"][-1]["at"]

    assert proc.returncode == 0, proc.stdout + proc.stderr
    with (run / "result.csv").open() as f:
        [row] = list(csv.DictReader(f))
    assert (row["source_block"], row["destination_block"], row["gap"]) == ("2", "9", "b2->b9")
    assert row["source_stage"] == row["destination_stage"] == "" and row["kind"] == "stitched"
    assert float(row["train_loss"]) > 0 and row["num_adapters"] == "2"

    assert bad.returncode == 2 and "model.source_stage and model.source_block are both set" in bad.stderr
    assert not (tmp_path / "bad").exists()
