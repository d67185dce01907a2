"""Fidelity to the network the paper's published code built (docs/method.md, "Deviations").

The table below holds, as facts read from the paper's code, the channel chain of every adapter chain it
trained: the widths the tensor has at the source cut, between adapters and at the destination cut
("768-1536-2048-2048" is three adapters 768->1536, 1536->2048, 2048->2048), for the eight pairs of its
study, at each of its nine gaps, with bilinear downsampling. It is the same for bottleneck and linear
adapters (ViT <-> ViT: linear and ViT-block), so 8 pairs x 9 gaps x 2 adapters = 144 chains.
"""

from __future__ import annotations

import pytest
import torch

from stitching.models.registry import get_spec
from stitching.stitch.adapters import Adapter
from stitching.stitch.plan import PlanError, Step, plan_stitch
from stitching.stitch.stitcher import build_model
from tests.conftest import model_cfg

R50, MNV3, SWIN, VIT = "resnet50", "mobilenetv3_large_100", "swin_t", "vit_small_patch16_224"
PAPER_CODE_CHAINS = {
    # resnet50 -> resnet50
    (R50, R50, 1, 1): "256-256", (R50, R50, 1, 2): "256-512", (R50, R50, 1, 3): "256-512-1024", (R50, R50, 1, 4): "256-512-1024-2048",
    (R50, R50, 2, 2): "512-512", (R50, R50, 2, 3): "512-1024", (R50, R50, 2, 4): "512-1024-2048",
    (R50, R50, 3, 3): "1024-1024", (R50, R50, 3, 4): "1024-2048",
    # mobilenetv3_large_100 -> mobilenetv3_large_100
    (MNV3, MNV3, 1, 1): "24-24", (MNV3, MNV3, 1, 2): "24-40", (MNV3, MNV3, 1, 3): "24-48-80", (MNV3, MNV3, 1, 4): "24-48-96-160",
    (MNV3, MNV3, 2, 2): "40-40", (MNV3, MNV3, 2, 3): "40-80", (MNV3, MNV3, 2, 4): "40-80-160",
    (MNV3, MNV3, 3, 3): "80-112", (MNV3, MNV3, 3, 4): "80-160",
    # swin_t -> swin_t
    (SWIN, SWIN, 1, 1): "96-96", (SWIN, SWIN, 1, 2): "96-192", (SWIN, SWIN, 1, 3): "96-192-384", (SWIN, SWIN, 1, 4): "96-192-384-768",
    (SWIN, SWIN, 2, 2): "192-192", (SWIN, SWIN, 2, 3): "192-384", (SWIN, SWIN, 2, 4): "192-384-768",
    (SWIN, SWIN, 3, 3): "384-384", (SWIN, SWIN, 3, 4): "384-768",
    # vit_small_patch16_224 -> vit_small_patch16_224
    (VIT, VIT, 1, 1): "384-384", (VIT, VIT, 1, 2): "384-384", (VIT, VIT, 1, 3): "384-384-384", (VIT, VIT, 1, 4): "384-384-384-384",
    (VIT, VIT, 2, 2): "384-384", (VIT, VIT, 2, 3): "384-384", (VIT, VIT, 2, 4): "384-384-384",
    (VIT, VIT, 3, 3): "384-384", (VIT, VIT, 3, 4): "384-384",
    # resnet50 -> swin_t
    (R50, SWIN, 1, 1): "256-96", (R50, SWIN, 1, 2): "256-192", (R50, SWIN, 1, 3): "256-384-384", (R50, SWIN, 1, 4): "256-512-768-768",
    (R50, SWIN, 2, 2): "512-192", (R50, SWIN, 2, 3): "512-384", (R50, SWIN, 2, 4): "512-768-768",
    (R50, SWIN, 3, 3): "1024-384", (R50, SWIN, 3, 4): "1024-768",
    # resnet50 -> vit_small_patch16_224
    (R50, VIT, 1, 1): "256-384", (R50, VIT, 1, 2): "256-384", (R50, VIT, 1, 3): "256-384-384", (R50, VIT, 1, 4): "256-384-384-384",
    (R50, VIT, 2, 2): "512-384", (R50, VIT, 2, 3): "512-384", (R50, VIT, 2, 4): "512-384-384",
    (R50, VIT, 3, 3): "1024-384", (R50, VIT, 3, 4): "1024-384",
    # vit_small_patch16_224 -> resnet50
    (VIT, R50, 1, 1): "768-256", (VIT, R50, 1, 2): "768-512", (VIT, R50, 1, 3): "768-1024-1024", (VIT, R50, 1, 4): "768-1536-2048-2048",
    (VIT, R50, 2, 2): "768-512", (VIT, R50, 2, 3): "768-1024", (VIT, R50, 2, 4): "768-1536-2048",
    (VIT, R50, 3, 3): "768-1024", (VIT, R50, 3, 4): "768-2048",
    # vit_small_patch16_224 -> swin_t
    (VIT, SWIN, 1, 1): "768-96", (VIT, SWIN, 1, 2): "768-192", (VIT, SWIN, 1, 3): "768-384-384", (VIT, SWIN, 1, 4): "768-768-768-768",
    (VIT, SWIN, 2, 2): "768-192", (VIT, SWIN, 2, 3): "768-384", (VIT, SWIN, 2, 4): "768-768-768",
    (VIT, SWIN, 3, 3): "768-384", (VIT, SWIN, 3, 4): "768-768",
}
PAIRS = [(R50, R50), (MNV3, MNV3), (SWIN, SWIN), (VIT, VIT), (R50, SWIN), (R50, VIT), (VIT, R50), (VIT, SWIN)]
GAPS = [(s, t) for s in (1, 2, 3) for t in range(s, 5)]
CASES = [(a, b, s, t, adapter) for a, b in PAIRS for s, t in GAPS
         for adapter in (("linear", "vit_block") if a == b == VIT else ("bottleneck", "linear"))]


def test_the_table_covers_the_papers_study():
    assert len(PAPER_CODE_CHAINS) == 8 * 9 and len(CASES) == 144
    assert set(PAPER_CODE_CHAINS) == {(a, b, s, t) for a, b in PAIRS for s, t in GAPS}


@pytest.mark.parametrize("source,destination,s,t,adapter", CASES)
def test_adapter_chain_equals_the_paper_code(source, destination, s, t, adapter):
    plan = plan_stitch(get_spec(source), get_spec(destination), s, t, adapter, "bilinear", "paper")
    widths = [int(c) for c in PAPER_CODE_CHAINS[(source, destination, s, t)].split("-")]
    assert [(st.c_in, st.c_out) for st in plan.steps] == list(zip(widths, widths[1:]))
    if source == destination == VIT:
        assert plan.working_format == "tokens_cls"          # the chain never leaves the token sequence


def test_token_to_token_linear_adapter_keeps_a_learned_class_token(cached_models):
    torch.manual_seed(0)
    built = build_model(model_cfg(source=VIT, source_stage=2, destination_stage=2, adapter="linear"), img_size=64)
    adapter = built.model.adapters[1]
    assert isinstance(adapter.core, torch.nn.Linear) and adapter.core.in_features == adapter.core.out_features == 384
    assert isinstance(adapter.norm_in, torch.nn.LayerNorm) and isinstance(adapter.norm_out, torch.nn.LayerNorm)
    x = torch.randn(2, 1 + 16, 384, requires_grad=True)      # class token + a 4x4 grid at 64 px
    y = built.model.adapters(x)
    assert y.shape == x.shape
    assert not torch.allclose(y[:, 0], y[:, 1:].mean(dim=1), atol=1e-3)      # not the mean of the patches
    # (a LayerNorm's outputs sum to a constant: weigh them before summing)
    (y[:, 0] * torch.randn_like(y[:, 0])).sum().backward()                   # the class token's gradient ...
    assert x.grad[:, 0].abs().sum() > 0                                       # ... reaches its input token
    assert adapter.core.weight.grad.abs().sum() > 0
    # per-token: the class token's output depends on the class token only
    assert torch.count_nonzero(x.grad[:, 1:]) == 0


@pytest.mark.parametrize("adapter", ["conv3x3", "bottleneck"])
def test_conv_adapters_between_two_token_formats_are_refused(adapter):
    with pytest.raises(PlanError, match="feature map") as err:
        plan_stitch(get_spec(VIT), get_spec(VIT), 1, 2, adapter, "bilinear", "paper")
    assert err.value.key == "model.adapter"


def test_integrated_upsampling_is_the_bilinear_module():
    vit, res = get_spec(VIT), get_spec(R50)
    for s, t in [(1, 1), (1, 2), (2, 2)]:
        strided = plan_stitch(vit, res, s, t, "bottleneck", "strided", "paper")
        bilinear = plan_stitch(vit, res, s, t, "bottleneck", "bilinear", "paper")
        assert strided.signature() == bilinear.signature() and strided.effective_resize == "bilinear"
        assert [(st.resize, st.stride) for st in strided.steps] == [("bilinear", 1)]
        assert strided.steps[0].size_out == {1: (56, 56), 2: (28, 28)}[t]
    # a larger destination is reached by the first adapter (the paper's code), not by doubling
    assert [st.size_out for st in plan_stitch(vit, res, 1, 1, "linear", "bilinear", "paper").steps] == [(56, 56)]


def _same_shape_step(c=64, size=8) -> Step:
    return Step(c, c, (size, size), (size, size), "none")


def test_same_shape_bottleneck_starts_as_the_identity():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 64, 8, 8))             # what a ReLU network hands over
    code = Adapter("bottleneck", _same_shape_step(), "image", "code").eval()
    with torch.no_grad():
        torch.testing.assert_close(code(x), x, rtol=0, atol=0)
    text = Adapter("bottleneck", _same_shape_step(), "image", "text").eval()
    assert isinstance(text.norm_in, torch.nn.BatchNorm2d) and isinstance(text.norm_out, torch.nn.BatchNorm2d)
    with torch.no_grad():
        # fresh eval-mode BatchNorms only divide by sqrt(1 + eps): the identity up to its outer norms
        torch.testing.assert_close(text(x), x / (1 + 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(code.core.bn3.weight) == 0


def test_adapter_init_and_styles():
    torch.manual_seed(0)
    step = Step(256, 512, (16, 16), (8, 8), "bilinear")
    code = Adapter("conv3x3", step, "image", "code")
    text = Adapter("conv3x3", step, "image", "text")
    assert isinstance(code.act, torch.nn.LeakyReLU) and code.act.negative_slope == 0.1
    assert isinstance(code.core, torch.nn.Conv2d)                          # activation after the second norm
    assert isinstance(text.core[1], torch.nn.ReLU) and isinstance(text.act, torch.nn.Identity)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * 3 * 3))
    std = code.core.weight.std().item()
    assert abs(std - (2 / (512 * 9)) ** 0.5) / std < 0.05
    linear = Adapter("linear", step, "image", "code")
    assert isinstance(linear.act, torch.nn.Identity) and linear.core.padding == (0, 0)
    block = Adapter("vit_block", Step(384, 384, (4, 4), (4, 4), "none"), "tokens_cls", "code")
    assert isinstance(block.norm_in, torch.nn.Identity) and isinstance(block.norm_out, torch.nn.Identity)
    block = Adapter("vit_block", Step(384, 384, (4, 4), (4, 4), "none"), "tokens_cls", "text")
    assert isinstance(block.norm_in, torch.nn.LayerNorm)


CODE_PRESET_RUN = """\
base: {root}/configs/paper/imagenet_code.yaml
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
  train_size: 64
  val_size: 32
  workers: 0
  auto_augment: false
train:
  epochs: 1
  batch_size: 16
  per_device_batch_size: 16
  device: cpu
"""


@pytest.mark.slow
@pytest.mark.parametrize("frozen_bn", ["eval", "train"])
def test_code_preset_frozen_bn_option_through_the_trainer(tmp_path, frozen_bn):
    """The code-faithful preset with ``train.frozen_bn=train`` re-estimates the destination's BatchNorm
    statistics while every frozen weight stays bit-identical; the default changes neither."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from stitching.validate import load_config
    from tests.conftest import ROOT

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(CODE_PRESET_RUN.format(root=ROOT))
    overrides = [f"train.frozen_bn={frozen_bn}", f"train.fold_bn={frozen_bn == 'eval'}".lower(),
                 f"output.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "stitching.train", "--config", str(cfg_file), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))

    cfg = load_config(cfg_file, overrides)
    assert (cfg.model.adapter_style, cfg.train.lr_schedule_unit, cfg.train.precision, cfg.data.normalize) == \
        ("code", "epoch", "fp32", "imagenet")
    torch.manual_seed(cfg.train.seed)                      # the trainer's seed before it builds the model
    initial = build_model(cfg.model, cfg.data.img_size, cfg.num_classes).model.state_dict()
    frozen = [k for k in initial if k.startswith(("prefix.", "suffix."))]
    weights = [k for k in frozen if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in frozen if k.startswith("suffix.") and k.endswith("running_mean")]
    assert weights and stats
    assert all(torch.equal(trained[k], initial[k]) for k in weights)          # frozen weights: bit-identical
    moved = [k for k in stats if not torch.equal(trained[k], initial[k])]
    if frozen_bn == "train":
        assert len(moved) == len(stats), "every destination BatchNorm re-estimates its statistics"
    else:
        assert moved == []


def test_the_token_rule_is_general_any_token_join_any_width(cached_models):
    tiny, small = get_spec("vit_tiny_patch16_224"), get_spec(VIT)
    plan = plan_stitch(tiny, small, 1, 3, "linear_relu", "bilinear", "paper")
    assert plan.working_format == "tokens_cls"
    assert [(st.c_in, st.c_out) for st in plan.steps] == [(192, 384), (384, 384)]
    built = build_model(model_cfg(source="vit_tiny_patch16_224", destination=VIT, source_stage=1,
                                  destination_stage=3, adapter="linear_relu"), img_size=64)
    assert all(isinstance(a.core, torch.nn.Linear) for a in built.model.adapters[1:-1])
    assert built.model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
