"""Least-squares initialisation (``model.init: least_squares``, stitching/stitch/lsinit.py): known maps are
recovered from noiseless activations, every link of a chain is fitted, refusals are one line, and the real
trainer writes the residual into result.csv."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stitching.config import ConfigError
from stitching.validate import load_config
from stitching.similarity import LeastSquares, channels_last_samples
from stitching.stitch.lsinit import fit
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT, in_background, together

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"


def _built(*overrides):
    cfg = load_config(TINY, ["model.init=least_squares", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.data.img_size, cfg.num_classes)


def _images(n_batches=4, batch=16, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(batch, 3, size, size, generator=g) for _ in range(n_batches)]
    return lambda: iter(batches)


class _KnownMap(nn.Module):
    """A destination whose activation at the receiving point is a known affine map ``W x + b`` of the
    source's features at the join (sampled every ``stride`` positions), non-negative so that an activation
    after the map changes nothing."""

    def __init__(self, built, stride=1, seed=2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        c_in, c_out = built.plan.source_cut.channels, built.plan.destination_cut.channels
        self.w = torch.rand(c_out, c_in, generator=g) / c_in
        self.b = torch.rand(c_out, generator=g)
        self.built, self.stride = built, stride

    def forward(self, x):
        plan = self.built.plan
        src = self.built.model.prefix(x)
        if self.stride > 1:
            src = src[:, :, ::self.stride, ::self.stride]
        else:
            src = F.interpolate(src, size=(plan.destination_cut.height, plan.destination_cut.width),
                                mode="bilinear", align_corners=False)
        return torch.einsum("oc,bchw->bohw", self.w, src) + self.b[:, None, None]


def _affine(module, c_in):
    """(W, b) of a module that is affine in eval mode, read off by probing it with 0 and the unit vectors."""
    probe = torch.cat([torch.zeros(1, c_in), torch.eye(c_in)])[:, :, None, None]
    with torch.no_grad():
        out = module.eval()(probe)[:, :, 0, 0]
    return (out[1:] - out[0]).T, out[0]


@pytest.mark.parametrize("adapter,resize,style", [
    ("linear", "bilinear", "code"), ("linear", "bilinear", "text"), ("linear_relu", "bilinear", "code"),
    ("conv3x3", "strided", "code"), ("bottleneck", "bilinear", "code"), ("bottleneck", "strided", "code"),
    ("bottleneck", "bilinear", "text")])
def test_a_known_linear_map_is_recovered(adapter, resize, style):
    built = _built(f"model.adapter={adapter}", f"model.resize={resize}", f"model.adapter_style={style}",
                   "model.destination_stage=2")          # resnet18 1 -> 2: 64@8x8 -> 128@4x4, one adapter
    stride = 2 if resize == "strided" else 1
    known = _KnownMap(built, stride)
    built.target = known
    out = fit(built, _images())
    assert out["residual"] < 1e-6 and out["links"][0]["residual"] < 1e-6
    a = built.model.adapters[1]
    if adapter == "bottleneck":
        # the projection shortcut is the map (the residual branch is zero), in both construction styles
        assert a.core.bn3.weight.abs().max() == 0
        w, b = _affine(a.core.shortcut, known.w.shape[1])
        if style == "text":
            w, b = _affine(nn.Sequential(a.norm_in, a.core.shortcut, a.norm_out), known.w.shape[1])
    elif adapter == "conv3x3":
        w, b = _affine(nn.Sequential(a.norm_in, a.core, a.norm_out), known.w.shape[1])
        assert a.core.weight[:, :, 0].abs().max() == 0                       # only the centre tap
    else:
        w, b = _affine(nn.Sequential(a.norm_in, a.core, a.norm_out), known.w.shape[1])
    torch.testing.assert_close(w, known.w, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(b, known.b, atol=1e-4, rtol=1e-3)
    # the whole stitched model then runs the destination's activation through the suffix
    x = _images(1, 4, seed=3)().__next__()
    built.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(built.model.adapters(built.model.prefix(x)), known(x), atol=1e-4, rtol=1e-4)


def test_batch_statistics_agree_with_the_running_ones_after_the_fit():
    """Training mode (BatchNorm batch statistics) starts from the same map as eval mode: on the fit's own
    images as one batch the two are equal."""
    built = _built("model.adapter=linear", "model.destination_stage=2")
    known = _KnownMap(built)
    built.target = known
    images = _images()
    fit(built, images)
    x = torch.cat(list(images()))
    adapters = built.model.adapters
    with torch.no_grad():
        features = built.model.prefix.eval()(x)
        torch.testing.assert_close(adapters.train()(features), known(x), atol=1e-4, rtol=1e-4)


def _relative(a, b):
    return float(((a - b) ** 2).sum() / ((b - b.mean((0, 2, 3), keepdim=True)) ** 2).sum())


@pytest.mark.parametrize("adapter", ["linear", "bottleneck"])
def test_every_link_of_a_destination_schedule_chain_is_fitted(adapter):
    """resnet18 1 -> 3 with the destination's own shapes in between: adapter 1 lands on the destination after
    the first block of stage 2, adapter 2 at the receiving point; each is fitted to the destination's own
    activation there (checked on images the fit did not see)."""
    built = _built("model.schedule=destination", f"model.adapter={adapter}")
    chain = list(built.model.adapters)[1:3]
    parts = built.destination_parts
    stage2 = nn.Sequential(parts.stem, *parts.blocks()[:parts.index_after_first(2)]).eval()
    x = _images(1, 64, seed=7)().__next__()

    def errors():
        built.model.eval()
        with torch.no_grad():
            h = chain[0](built.model.adapters[0](built.model.prefix(x)))
            return _relative(h, stage2(x)), _relative(chain[1](h), built.target(x))

    before = errors()
    images = _images(6, 32)
    out = fit(built, images)
    after = errors()
    assert [link["link"] for link in out["links"]] == [1, 2]
    assert all(0 < link["residual"] < 1 for link in out["links"])
    # adapter 1's fit is the best affine map from the source's (resized) features to stage 2's activation
    reference = LeastSquares()
    with torch.no_grad():
        for xb in images():
            reference.update(channels_last_samples(source_at(built, xb, (4, 4)), "image"),
                             channels_last_samples(stage2(xb), "image"))
    assert out["links"][0]["residual"] == pytest.approx(reference.value(), abs=1e-6)
    if adapter == "linear":          # the chain's output is adapter 2's fitted map: the same residual
        assert out["residual"] == pytest.approx(out["links"][1]["residual"], abs=1e-6)
    # on images the fit did not see, both links are closer to the destination's own activations than before
    assert after[0] < before[0] / 2 and after[1] < min(before[1], 1.0)


def source_at(built, x, size):
    return F.interpolate(built.model.prefix(x), size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("overrides,key,says", [
    (["model.init=zero"], "model.init", "must be one of default, least_squares"),
    (["model.init_images=0"], "model.init_images", ">= 1"),
    (["model.adapter=vit_block", "model.destination=vit_tiny_patch16_224"], "model.init", "no linear map"),
    (["model.source_stage=null", "model.destination_stage=null"], "model.init", "needs a stitched config"),
    (["model.adapter=finetune", "model.destination_stage=1"], "model.init", "needs a stitched config"),
    # the paper's schedule halves ResNet-50's widths differently from its own stage 2: no target for link 1
    (["model.destination=resnet50", "model.adapter=linear"], "model.schedule", "use model.schedule=destination"),
    # without resizing adapter 1 outputs 8x8 where the destination has 4x4
    (["model.adapter=linear", "model.resize=none", "model.schedule=destination"], "model.resize",
     "sizes differ"),
])
def test_refusals_name_key_value_and_file(overrides, key, says):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.init=least_squares", *overrides])
    assert err.value.key == key and says in err.value.message
    assert err.value.source in (str(TINY), "command line")


def _train(tmp_path, name, *overrides):
    out = tmp_path / name
    # one thread, as the interrupted run below: a resume is exact at a fixed thread count (sums in other orders)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.train", "--config", str(TINY), f"output.dir={out}",
                           "train.device=cpu", "data.workers=0", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    return proc, out


def test_a_link_without_target_stops_the_cli_in_one_line(tmp_path):
    proc, out = _train(tmp_path, "bad", "model.init=least_squares", "model.destination=resnet50",
                       "model.adapter=linear")
    assert proc.returncode == 2 and proc.stdout == ""
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and f"{TINY}: model.schedule='paper'" in line
    assert not out.exists()


def _row(out):
    with (out / "result.csv").open() as f:
        return next(csv.DictReader(f))


def _confident_weights(path):
    """Random ResNet-18 weights with a head scaled up, so that its predictions are confident and depend on
    every detail of its features (a random network's logits are otherwise nearly uniform)."""
    from safetensors.torch import save_file

    from stitching.models.weights import load_model

    torch.manual_seed(0)
    model = load_model("resnet18", False, None, 10)
    model.fc.weight.data *= 300
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow          # three trainer processes (about 15 s unloaded)
def test_the_cli_writes_the_residual_and_a_self_stitch_starts_as_the_original(tmp_path):
    """ResNet-18 stitched to itself 2 -> 2 (random weights, whose last BatchNorm in each block starts at zero:
    the block the adapter replaces is the identity): least squares finds that map, so before any training
    the stitched model is the original one (same top-1, same loss), which a default-initialised adapter is
    not: it starts at a higher loss. (Random weights: the accuracy is chance, the loss tells the networks
    apart.)"""
    weights = f"model.source_weights={_confident_weights(tmp_path / 'resnet18.safetensors')}"
    gap = ["model.source_stage=2", "model.destination_stage=2", "model.adapter=linear", "train.epochs=0", weights]
    runs = {}
    scenarios = [("original", ["model.source_stage=null", "model.destination_stage=null",
                               "model.adapter=bottleneck", "train.epochs=0", weights]),
                 ("default", gap), ("least_squares", [*gap, "model.init=least_squares", "model.init_images=128"])]
    done = together(*(lambda name=name, extra=extra: _train(tmp_path, name, *extra) for name, extra in scenarios))
    for (name, _), (proc, out) in zip(scenarios, done):
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = _row(out)
    ls, default, original = runs["least_squares"], runs["default"], runs["original"]
    assert ls["init"] == "least_squares" and default["init"] == "default"
    assert float(ls["init_residual"]) < 1e-6 and default["init_residual"] == ""
    assert ls["top1"] == original["top1"]
    assert float(ls["val_loss"]) == pytest.approx(float(original["val_loss"]), rel=1e-4)
    assert float(default["val_loss"]) > 1.1 * float(ls["val_loss"])        # default: another network
    assert "least-squares init on 128 training images" in (tmp_path / "least_squares" / "train.log").read_text()


def test_a_trained_least_squares_run_keeps_its_residual(tmp_path):
    proc, out = _train(tmp_path, "trained", "model.init=least_squares", "model.adapter=linear",
                       "model.schedule=destination", "model.init_images=64", "train.max_steps_per_epoch=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = _row(out)
    assert 0 <= float(row["init_residual"]) < 1 and row["init"] == "least_squares"
    log = (out / "train.log").read_text()
    assert "adapter 1: 1x1 map" in log and "adapter 2: 1x1 map" in log


def test_a_sweep_axis_over_init_gives_distinct_runs(tmp_path):
    """``model.init`` is part of a run's identity: a sweep over it keeps every value (no duplicate), names
    each run apart, and drops the combinations least squares cannot fit (counted, with the key)."""
    from stitching.config import IDENTITY
    from stitching.rundir import run_key
    from stitching.sweep.spec import expand

    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
base: {TINY}
grid:
  model.destination_stage: [2]
  model.adapter: [linear, vit_block]
  model.destination: [resnet18, vit_tiny_patch16_224]
  model.init: [default, least_squares]
exclude:
  - {{model.adapter: vit_block, model.destination: resnet18}}
""")
    _, _, exp = expand(spec, tmp_path / "runs")
    kept = sorted((r.config.model.adapter, r.config.model.destination, r.config.model.init) for r in exp.runs)
    assert kept == [("linear", "resnet18", "default"), ("linear", "resnet18", "least_squares"),
                    ("linear", "vit_tiny_patch16_224", "default"),
                    ("linear", "vit_tiny_patch16_224", "least_squares"),
                    ("vit_block", "vit_tiny_patch16_224", "default")]
    assert sum(exp.duplicates.values()) == 0
    assert [key for (_, key) in exp.impossible] == ["model.init: vit_block adapters have no linear map to fit in "
                                                    "closed form (fitted: linear, linear_relu, conv3x3, bottleneck)"]
    assert len({r.name for r in exp.runs}) == 5
    assert len({run_key(r.config.to_dict(), IDENTITY) for r in exp.runs}) == 5


@pytest.mark.slow          # two trainer runs of 2 x 10 steps
def test_a_resumed_run_does_not_fit_again_and_matches_an_uninterrupted_one(tmp_path):
    import os
    import signal
    import time

    common = ["model.init=least_squares", "model.adapter=linear", "model.schedule=destination",
              "model.init_images=64", "train.epochs=2", "data.train_size=640", "data.val_size=64",
              "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = in_background(lambda: _train(tmp_path, "straight", *common))
    out = tmp_path / "resumed"
    run = subprocess.Popen([sys.executable, "-m", "stitching.train", "--config", str(TINY), f"output.dir={out}",
                            "train.device=cpu", "data.workers=0", *common], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "metrics.csv").is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)                     # in epoch 2: checkpoint, exit 75
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 75, stderr[-2000:]
    proc, _ = _train(tmp_path, "resumed", *common)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, straight = first.result()
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert log.count("least-squares init on") == 1 and "resuming" in log
    a, b = _row(straight), _row(out)
    for key in ("init_residual", "top1", "val_loss", "train_loss"):
        assert float(a[key]) == float(b[key]), key


VIT = {"patch_size": 8, "img_size": 32}


@pytest.mark.parametrize("normalize", ["model", "imagenet"])
def test_the_fit_target_is_the_destination_on_its_own_preprocessing(normalize):
    """The stitched model sees images preprocessed for its source (ViT-Ti: mean/std 0.5); the target the fit,
    the similarity and the matching objectives compare with is the destination's activation on ITS preprocessing
    (ResNet-18: ImageNet's), as the destination computes it alone: the same images through each model's own
    evaluation transform (their crops made equal; a difference of crop or interpolation is not undone). (Before, the destination ran on the source's normalisation: on the MNIST study's
    ViT-Ti -> ResNet-18, ResNet-18's own suffix then classified its own activation at 21 % instead of 98 %, and
    every fitted cell was near chance.)"""
    from PIL import Image

    from stitching.data.transforms import build_transforms
    from stitching.stitch.stitcher import Renormalize

    cfg = load_config(TINY, ["model.init=least_squares", "model.source=vit_tiny_patch16_224",
                             f"model.source_kwargs={VIT}", "model.destination=resnet18", "model.source_stage=2",
                             "model.destination_stage=3", f"data.normalize={normalize}",
                             # the same geometry for both models (crop, interpolation): normalisation alone differs
                             "data.eval_crop_pct=1.0", "data.eval_interpolation=bilinear"])
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes, normalize=normalize)
    assert isinstance(built.destination_input, Renormalize if normalize == "model" else nn.Identity)
    assert built.target[0] is built.destination_input
    g = torch.Generator().manual_seed(3)
    pictures = [Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy())
                for _ in range(4)]

    def seen_by(model_name, kwargs):
        from stitching.models.registry import get_spec
        from stitching.models.weights import load_model

        spec = get_spec(model_name, kwargs)
        _, evaluation = build_transforms(spec.data_config(load_model(model_name, False, None, 10, kwargs)), cfg.data)
        return torch.stack([evaluation(p) for p in pictures])

    x_source, x_destination = seen_by("vit_tiny_patch16_224", VIT), seen_by("resnet18", None)
    assert not torch.allclose(x_source, x_destination) or normalize == "imagenet"
    own = nn.Sequential(*list(built.target)[1:]).eval()      # the destination's stem and blocks, alone
    with torch.no_grad():
        torch.testing.assert_close(built.target.eval()(x_source), own(x_destination), rtol=1e-4, atol=1e-4)
    # a network stitched to itself takes its own preprocessing already
    self_built = build_model(load_config(TINY).model, 32, 10, normalize="model")
    assert isinstance(self_built.destination_input, nn.Identity)
