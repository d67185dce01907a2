"""The representations at a join and ``python -m stitching.summary --similarity N`` (real CLI, tiny models)."""

import json
import subprocess
import sys

import torch

from stitching.validate import load_config
from stitching.stitch.join import destination_at_join, source_at_join
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT, together

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def _built(*overrides):
    cfg = load_config(TINY, list(overrides))
    return build_model(cfg.model, cfg.data.img_size, cfg.num_classes)


def test_the_destination_side_is_the_destinations_own_activation_at_the_receiving_point():
    built = _built()                                    # resnet18 1 -> 3, self-stitch
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    built.model.eval()
    with torch.no_grad():
        whole = built.model.suffix(destination_at_join(built, x))
        own = built.model.suffix.__class__(*built.target, *built.model.suffix)(x)
    assert torch.equal(whole, own)
    dst = built.plan.destination_cut
    assert destination_at_join(built, x).shape == (3, dst.channels, dst.height, dst.width)
    # the source side is resized to the destination's size (8x8 -> 2x2 here), its own channels kept
    assert source_at_join(built, x).shape == (3, built.plan.source_cut.channels, dst.height, dst.width)
    with torch.no_grad():   # ... by bilinear interpolation of the source's features at its cut
        resized = torch.nn.functional.interpolate(built.model.prefix(x), size=(dst.height, dst.width),
                                                  mode="bilinear", align_corners=False)
    assert torch.equal(source_at_join(built, x), resized)


def test_a_cnn_source_reaches_a_vit_destination_in_its_token_format():
    built = _built("model.destination=vit_tiny_patch16_224", "model.adapter=linear")
    x = torch.randn(4, 3, 32, 32)
    a, b = source_at_join(built, x), destination_at_join(built, x)
    assert a.shape == (4, 1 + 4, 64) and b.shape == (4, 1 + 4, 192)       # class token + 2x2 grid
    assert torch.allclose(a[:, 0], a[:, 1:].mean(1))                          # the mean token, as the chain does


def test_summary_prints_similarity_before_training():
    proc, original = together(   # two independent commands side by side
        lambda: subprocess.run([sys.executable, "-m", "stitching.summary", "--json", "--config", str(TINY), "--similarity", "40",
                                "model.destination=vit_tiny_patch16_224", "model.adapter=linear"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300),
        lambda: subprocess.run([sys.executable, "-m", "stitching.summary", "--config", str(TINY), "--similarity",
                                "8", "model.source_stage=null", "model.destination_stage=null"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300))
    assert proc.returncode == 0, proc.stderr
    sim = json.loads(proc.stdout)["similarity_before"]
    assert sim["n"] == 40 and set(sim) == {"cka", "ls_residual", "n"}
    assert 0 < sim["cka"] <= 1 and 0 <= sim["ls_residual"] <= 1
    assert original.returncode == 2 and original.stdout == ""
    assert len(original.stderr.strip().splitlines()) == 1 and "model.source_stage" in original.stderr
