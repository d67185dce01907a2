"""``model.code_quirks``: the network the paper's published code built, shape for shape (docs/method.md).

The expected shapes below are the paper code's own numbers (branch ``unireps-2025`` of
uvm-neurobotics-lab/stitching), each with where in that code it comes from:

- ``launch_scaling_experiments.py``, ``get_tensor_shape_sequence``: the channels and sizes of a chain
  (``sizes = max(in_size // 2**i, out_size)``; a ``bert`` source doubles its channels and, being a sequence,
  uses the square root of its token count as its size);
- ``make_adapter_series`` (``pre_downsample=True``): adapter i's ``in_format`` is ``[img, [ch_i, size_i+1,
  size_i+1]]``, so ``Assembly.reformat`` (``assembly.py``) resizes whatever arrives to that size first;
- ``src/adapters.py``, ``SimpleAdapter``: ``nn.Conv2d(..., kernel_size=1, padding=1)`` (``padding=1`` is its
  default): every linear adapter's map grows by 2 px;
- ``stitch`` keeps the destination's ``in_format`` size (``across-scales/*.yml``), so the last map is resized to
  it; ``stitch_no_downsample`` sets the destination's size to the source's (``dest_format[1][1:] =
  src_format[1][1:]``: for a ViT source ``[196]``, its token count) and strips the destination blocks' sizes,
  so the last map flows on as it is.

The shapes are read from the built network itself (forward hooks, on the meta device: no compute) at 224 px.
"""

from __future__ import annotations

import json

import pytest
import torch

from stitching.config import ModelConfig
from stitching.models.registry import get_spec
from stitching.stitch.adapters import Adapter
from stitching.stitch.plan import plan_stitch
from stitching.stitch.stitcher import build_model
from tests.conftest import ROOT
from tests.test_commands import error_line, run
from tests.test_paper_fidelity import CASES

R50, VIT, SWIN = "resnet50", "vit_small_patch16_224", "swin_t"
CODE = ROOT / "configs" / "paper" / "imagenet_code.yaml"


class _Stop(Exception):
    pass


def traced_shapes(source, destination, s, t, adapter, resize, img_size=224) -> list[tuple]:
    """Per adapter (what it receives, what its core computes on, what it hands on), then what the destination's
    first remaining block receives: (C, H, W) each, from the built code-quirks network run on the meta device."""
    mcfg = ModelConfig(source=source, destination=None if destination == source else destination,
                       source_stage=s, destination_stage=t, adapter=adapter, resize=resize, code_quirks=True,
                       pretrained=False)
    net = build_model(mcfg, img_size, 1000).model.eval().to("meta")
    seen = []
    for module in net.adapters:
        if isinstance(module, Adapter):
            module.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape[1:]), tuple(o.shape[1:]))))
            module.core.register_forward_pre_hook(lambda m, i: seen.append(tuple(i[0].shape[1:])))

    def stop(m, i):
        seen.append(tuple(i[0].shape[1:]))
        raise _Stop

    net.suffix[0].register_forward_pre_hook(stop)
    with pytest.raises(_Stop), torch.no_grad():
        net(torch.zeros(1, 3, img_size, img_size, device="meta"))
    steps = [(io[0], core, io[1]) for core, io in zip(seen[:-1:2], seen[1:-1:2])]
    return steps + [seen[-1]]


def test_a_linear_chain_has_the_paper_codes_shapes():
    # across-scales/resnet-50.yml, gap blocks_to_drop [1, 6] (1 -> 4), num_downsamples 3:
    # channels [256, 512, 1024, 2048], sizes [56, 28, 14, 7]
    # downsample_then_linear: each map resized to the adapter's size (28, 14, 7), grown by 2 by its 1x1 conv,
    # and the last resized to layer4.1's in_format [img, [2048, 7, 7]]
    assert traced_shapes(R50, R50, 1, 4, "linear", "bilinear") == [
        ((256, 56, 56), (256, 28, 28), (512, 30, 30)),
        ((512, 30, 30), (512, 14, 14), (1024, 16, 16)),
        ((1024, 16, 16), (1024, 7, 7), (2048, 9, 9)),
        (2048, 7, 7)]
    # linear_no_downsample: sizes all 56 (the destination's size set to the source's); each grown map resized
    # back to 56 by the next adapter's in_format; layer4.1 (its sizes stripped) receives the grown 58 x 58 map
    assert traced_shapes(R50, R50, 1, 4, "linear", "none") == [
        ((256, 56, 56), (256, 56, 56), (512, 58, 58)),
        ((512, 58, 58), (512, 56, 56), (1024, 58, 58)),
        ((1024, 58, 58), (1024, 56, 56), (2048, 58, 58)),
        (2048, 58, 58)]


@pytest.mark.parametrize("adapter", ["linear", "bottleneck"])
def test_vit_to_resnet50_no_downsample_has_the_paper_codes_shapes(adapter):
    # across-scales/vit-s-resnet-50.yml, gap [1, 6] (1 -> 4), linear_no_downsample / bottleneck_no_downsample:
    # src_format [bert, [384, 196]]; the destination's [img, [2048, 7, 7]] becomes [img, [2048, 196]];
    # get_tensor_shape_sequence: channels 2 x 384 = 768 -> [768, 1536, 2048, 2048], in_size sqrt(196) = 14,
    # out_size 196: sizes [196, 196, 196, 196]. bert2img (class token concatenated: 768@14x14), then resized to
    # the first adapter's in_format 196 x 196; the linear adapters grow each map to 198, resized back to 196 by
    # the next in_format; ResNet-50's layer4.1 receives the last map as it is
    grow = 2 if adapter == "linear" else 0
    side = 196 + grow
    assert traced_shapes(VIT, R50, 1, 4, adapter, "none") == [
        ((768, 14, 14), (768, 196, 196), (1536, side, side)),
        ((1536, side, side), (1536, 196, 196), (2048, side, side)),
        ((2048, side, side), (2048, 196, 196), (2048, side, side)),
        (2048, side, side)]


def _plan(src, dst, s, t, adapter, resize, quirks):
    return plan_stitch(get_spec(src), get_spec(dst), s, t, adapter, resize, "paper", quirks=quirks)


def test_the_quirks_change_exactly_the_code_chains_they_name():
    """Bottleneck, conv3x3 and token chains are the same module with or without the quirks, except the
    'no downsample' of a ViT into a feature-map destination; every feature-map linear chain is another one."""
    changed = []
    for source, destination, s, t, adapter in CASES:
        for resize in ("none", "bilinear"):
            off = _plan(source, destination, s, t, adapter, resize, False)
            on = _plan(source, destination, s, t, adapter, resize, True)
            if off.signature() != on.signature():
                changed.append((source, destination, adapter, resize))
    changed = sorted(set(changed))
    pairs = [(R50, R50), ("mobilenetv3_large_100",) * 2, (SWIN, SWIN), (R50, SWIN), (R50, VIT), (VIT, R50),
             (VIT, SWIN)]
    assert changed == sorted({(a, b, "linear", r) for a, b in pairs for r in ("none", "bilinear")}
                             | {(VIT, b, "bottleneck", "none") for b in (R50, SWIN)})


def test_no_downsample_is_its_own_module_under_the_quirks():
    # 1 -> 1, sizes already match: without the quirks the three modes build one module (a sweep trains it once)
    for adapter in ("linear", "linear_relu"):
        plans = {r: _plan(R50, R50, 1, 1, adapter, r, True) for r in ("none", "bilinear")}
        assert plans["none"].signature() != plans["bilinear"].signature()
        assert [plans[r].effective_resize for r in ("none", "bilinear")] == ["none", "bilinear"]
        off = {r: _plan(R50, R50, 1, 1, adapter, r, False) for r in ("none", "bilinear")}
        assert off["none"].signature() == off["bilinear"].signature() and off["bilinear"].effective_resize == "none"
    # ViT-S -> ResNet-50 3 -> 3: 14 x 14 either side; under the quirks "none" runs on 196 x 196, so bilinear and
    # strided (still one module) are "bilinear"
    plans = {r: _plan(VIT, R50, 3, 3, "bottleneck", r, True) for r in ("none", "bilinear", "strided")}
    assert plans["bilinear"].signature() == plans["strided"].signature() != plans["none"].signature()
    assert [plans[r].effective_resize for r in ("none", "bilinear", "strided")] == ["none", "bilinear", "bilinear"]
    assert [st.size_out for st in plans["none"].steps] == [(196, 196)]


def test_summary_prints_and_costs_the_built_network(tmp_path):
    """``python -m stitching.summary`` of the code-faithful preset: the joins are the shapes the built network
    computes (here at 64 px: ViT-S's 4 x 4 grid becomes a 16 x 16 map) and the MACs are the built network's."""
    args = ["-m", "stitching.summary", "--json", "--config", CODE, "model.pretrained=false", f"model.source={VIT}",
            f"model.destination={R50}", "model.source_stage=2", "model.destination_stage=4", "model.adapter=linear",
            "model.resize=none", "data.img_size=64", "data.num_classes=10"]
    on, off = (run(*args, f"model.code_quirks={q}") for q in ("true", "false"))
    assert on.returncode == 0 and off.returncode == 0, on.stderr[-2000:] + off.stderr[-2000:]
    on, off = json.loads(on.stdout), json.loads(off.stdout)
    shapes = traced_shapes(VIT, R50, 2, 4, "linear", "none", img_size=64)
    assert shapes == [((768, 4, 4), (768, 16, 16), (1536, 18, 18)), ((1536, 18, 18), (1536, 16, 16), (2048, 18, 18)),
                      (2048, 18, 18)]
    adapters = [j for j in on["joins"] if j["at"].startswith("adapter")]
    shown = [(j["in"], j.get("resized_to", j["in"]), j["out"]) for j in adapters]
    assert shown == [tuple("{}@{}x{}".format(*x) for x in step) for step in shapes[:-1]]
    assert all("1x1 padding 1" in j["at"] for j in adapters)
    assert on["joins"][-1]["receives"] == "2048@18x18" and on["joins"][-1]["shape"] == [2048, 2, 2]
    assert off["joins"][-1]["receives"] == "2048@4x4"           # resize none: the source's grid, not the cut's
    mcfg = ModelConfig(source=VIT, destination=R50, source_stage=2, destination_stage=4, adapter="linear",
                       resize="none", code_quirks=True, pretrained=False)
    from stitching.stitch.cost import count_cost

    built = build_model(mcfg, 64, 10).model
    assert on["macs"] == count_cost(built, 64)["macs"] > 3 * off["macs"]
    assert on["params"] - off["params"] == 0 and on["resize"] == off["resize"] == "none"


@pytest.mark.parametrize("extra,message", [
    (["model.adapter_style=text"], "model.code_quirks=True: the paper code's padding and 'no downsample' maps are "
                                   "part of its construction: they need model.adapter_style=code, not text (with text: "
                                   "model.code_quirks=false)"),
    (["model.adapter=linear", "model.init=least_squares", "model.schedule=destination"],
     "model.code_quirks=True: the paper code's padded 1x1 convolutions and 'no downsample' maps change the shapes "
     "the least-squares fit targets: use model.code_quirks=false or model.init=default"),
])
def test_quirks_where_they_mean_nothing_are_one_line(tmp_path, extra, message):
    out = tmp_path / "run"
    proc = run("-m", "stitching.train", "--config", CODE, "model.pretrained=false", "model.source=resnet18",
               "model.source_stage=1", "model.destination_stage=2", *extra, f"output.dir={out}")
    assert proc.returncode == 2
    assert error_line(proc) == f"error: {CODE}: {message}"
    assert not out.exists()


def test_the_key_off_is_every_run_written_before_it():
    """A run directory's ``config.yaml`` written before the key existed (no ``model.code_quirks``) holds the same
    run as today's config: same identity, same run key; the quick start among them."""
    from stitching import rundir as R
    from stitching.config import IDENTITY
    from stitching.validate import load_config

    for path, overrides in ((ROOT / "configs" / "quickstart.yaml", []),
                            (CODE, ["model.code_quirks=false", "model.adapter=linear", "model.source_stage=1",
                                    "model.destination_stage=1", "model.resize=none"])):
        today = load_config(path, overrides).to_dict()
        older = json.loads(json.dumps(today, default=str))
        del older["model"]["code_quirks"]
        assert R.same_run(older, today, IDENTITY)
        assert R.run_key(older, IDENTITY) == R.run_key(today, IDENTITY)
        assert "model.code_quirks" not in R.identity(today, IDENTITY)
    on = load_config(CODE, ["model.source_stage=1", "model.destination_stage=1"]).to_dict()
    assert R.identity(on, IDENTITY)["model.code_quirks"] is True       # the preset: another run


def test_pytorch_init_builds_the_adapters_as_pytorch_does():
    torch.manual_seed(0)
    base = dict(source="resnet18", source_stage=1, destination_stage=2, adapter="bottleneck", pretrained=False)
    code = build_model(ModelConfig(**base), 64, 10).model.adapters[1].core
    torch.manual_seed(0)
    mine = build_model(ModelConfig(**base, init="pytorch"), 64, 10).model.adapters[1].core
    assert torch.count_nonzero(code.bn3.weight) == 0 and torch.equal(mine.bn3.weight, torch.ones(128))
    # Kaiming-normal fan_out (std sqrt(2 / fan_out)) against PyTorch's Kaiming-uniform a = sqrt 5 (std 1 / sqrt(3
    # fan_in)): conv2 is 32 -> 32 channels, 3 x 3
    fan = 32 * 9
    assert abs(code.conv2.weight.std().item() / (2 / fan) ** 0.5 - 1) < 0.05
    assert abs(mine.conv2.weight.std().item() / (1 / (3 * fan)) ** 0.5 - 1) < 0.05
    block = build_model(ModelConfig(**{**base, "source": VIT, "adapter": "vit_block", "init": "pytorch"}), 64,
                        10).model.adapters[1].core
    assert block.block.attn.qkv.bias.abs().max() > 1e-3          # not ViT's near-zero biases


@pytest.mark.slow   # one short training run through the CLI (~25 s here)
def test_a_code_quirks_run_trains_and_reports_the_built_network(tmp_path):
    """The preset with a linear ResNet-18 1 -> 3 chain and PyTorch's init, trained for a step: result.csv
    names the quirks (adapter_style code+quirks) and the init, and its MACs are the summary's."""
    import csv

    out = tmp_path / "run with space"
    common = ["model.pretrained=false", "model.source=resnet18", "model.source_stage=1",
              "model.destination_stage=3", "model.adapter=linear", "model.init=pytorch", "data.name=synthetic",
              "data.img_size=32", "data.num_classes=10", "data.train_size=32", "data.val_size=16", "data.workers=0",
              "data.auto_augment=false", "train.epochs=1", "train.batch_size=16", "train.per_device_batch_size=16",
              "train.device=cpu", "train.similarity_images=16"]
    proc = run("-m", "stitching.train", "--config", CODE, *common, f"output.dir={out}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(csv.DictReader((out / "result.csv").open()))
    assert (row["adapter_style"], row["init"], row["resize"]) == ("code+quirks", "pytorch", "bilinear")
    summary = run("-m", "stitching.summary", "--json", "--config", CODE, *common)
    assert summary.returncode == 0, summary.stderr[-2000:]
    assert int(row["macs"]) == json.loads(summary.stdout)["macs"]
    assert row["cka_after"] != ""                  # the similarity after training compares on the grown grid


PAPER_SWEEP = ROOT / "configs" / "sweeps" / "paper.yaml"


@pytest.mark.slow   # the paper sweep's expansion under the preset (~25 s)
def test_the_papers_sweep_under_the_code_preset_counts_the_codes_runs(tmp_path):
    """``paper.yaml`` on the code-faithful preset: every run of the code's launcher is still there; only the
    duplicates the quirks undo are trained apart: linear and linear+ReLU 'no downsample' where the sizes match
    (20 gaps x 2) and ViT-S -> ResNet-50 / Swin-T bottleneck 'no downsample' at those gaps (6)."""
    import yaml

    from stitching.sweep.spec import expand
    from tests.test_sweep import MN, paper_code_runs, where

    spec = yaml.safe_load(PAPER_SWEEP.read_text())
    spec["base"] = str(CODE)
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    exp = expand(path, tmp_path / "runs", extensions=False)[2]
    assert all(r.config.model.code_quirks for r in exp.runs)
    index = where(exp)
    code = paper_code_runs()
    for seed in (0, 1, 2):
        hit = [index.get((pair, method, gap, 0.002, seed)) for pair, method, gap in code]
        assert [c for c, r in zip(code, hit) if r is None] == [(f"{MN} -> {MN}", "finetune", "1->4"),
                                                              (f"{MN} -> {MN}", "finetune", "2->4")]
        kept = {r.name for r in hit if r is not None}
        assert len(kept) == 505 + 40 + 6 and 637 - 2 - len(kept) == 130 - 46
        nd = list({r.name: r for r in hit if r is not None and r.method in ("linear/none", "linear_relu/none")}
                  .values())
        tokens = [r for r in nd if r.config.model.source == VIT and r.config.model.destination is None]
        assert len(nd) == 8 * 9 * 2 and len(tokens) == 9 * 2
        # on feature maps no longer shared with bilinear; ViT-S -> ViT-S stays a token chain (nn.Linear, no
        # padding): its none and bilinear are still one module
        assert all(len(r.points) == 1 for r in nd if r not in tokens)
        assert all([p["method"] for p in r.points] == [r.method, r.method.replace("none", "bilinear")]
                   for r in tokens)
    own = [r for r in exp.part("paper") if r.config.train.seed == 0 and not r.config.is_original]
    assert len(own) == 551 + 64 + 9
    big = index[(f"{VIT} -> resnet50", "bottleneck/none", "3->3", 0.002, 0)]
    assert big.method == "bottleneck/none" and [p["method"] for p in big.points] == ["bottleneck/none"]
    assert big.config.model.code_quirks is True


def _mnist_quirks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mnist_quirks", ROOT / "scripts" / "mnist_quirks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_deltas_pair_each_seed_and_leave_other_options_at_their_reference():
    import pandas as pd

    script = _mnist_quirks()
    base = {"kind": "stitched", "source": "resnet18", "destination": "resnet18", "gap": "1->3",
            "adapter": "linear", "resize": "bilinear", "epochs": 2, "adapter_style": "code", "frozen_bn": "eval",
            "init": "default"}
    rows = [{**base, "seed": 0, "top1": 60.0}, {**base, "seed": 1, "top1": 70.0},
            {**base, "seed": 0, "top1": 64.0, "adapter_style": "code+quirks"},
            {**base, "seed": 1, "top1": 72.0, "adapter_style": "code+quirks"},
            {**base, "seed": 0, "top1": 10.0, "adapter_style": "code+quirks", "init": "pytorch"},   # not paired
            {**base, "seed": 1, "top1": 75.0, "frozen_bn": "train"}]
    table = script.paired_deltas(pd.DataFrame(rows), "adapter_style", "code", "code+quirks")
    line = table.iloc[0]
    assert (line["n"], line["code"], line["code+quirks"], line["delta"]) == (2, 65.0, 68.0, 3.0)
    assert line["se"] == pytest.approx(1.0)                    # differences 4 and 2: s.d. sqrt 2, / sqrt 2
    assert table.iloc[-1]["source"] == "all stitches, every seed" and len(table) == 2
    frozen = script.paired_deltas(pd.DataFrame(rows), "frozen_bn", "eval", "train")
    assert list(frozen["delta"]) == [5.0, 5.0] and frozen["se"].isna().all()      # one seed paired
    text = script.deltas_markdown(pd.DataFrame(rows))
    assert "| ResNet-18 -> ResNet-18 | 1->3 | linear/bilinear | 2 | 2 | 65.0 | 68.0 | +3.0 ± 1.0 |" in text


def test_the_mnist_quirks_sweep_expands_next_to_the_studys_configs(tmp_path):
    """``configs/sweeps/mnist_quirks.yaml``, copied next to the base configs ``scripts/toy_study.py`` writes (fake
    weights of the right shapes stand in for the trained models): its runs, each comparison's two values."""
    import shutil
    from collections import Counter

    from safetensors.torch import save_file

    from stitching.models import load_model
    from stitching.sweep.spec import expand

    toy = _mnist_quirks()._toy_study()
    out = tmp_path / "mnist"
    kwargs = toy.model_kwargs("mnist")
    for model in toy.MODELS:
        path = toy.weights_path(out, model)
        path.parent.mkdir(parents=True)
        net = load_model(model, num_classes=10, kwargs=kwargs[model] or None)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    toy.write_sweep(out, study="mnist", data_root=tmp_path / "data")
    shutil.copy(ROOT / "configs" / "sweeps" / "mnist_quirks.yaml", out)
    exp = expand(out / "mnist_quirks.yaml", tmp_path / "runs")[2]
    assert len(exp.runs) == 130 and sum(exp.duplicates.values()) == 6
    quirks = Counter((r.block, r.config.model.code_quirks) for r in exp.runs if r.block.startswith("quirks"))
    assert quirks == {("quirks_resnet18_self", False): 8, ("quirks_resnet18_self", True): 8,
                      ("quirks_resnet18_to_vit_tiny", False): 6, ("quirks_resnet18_to_vit_tiny", True): 6,
                      ("quirks_vit_tiny_to_resnet18", False): 12, ("quirks_vit_tiny_to_resnet18", True): 12}
    assert {r.config.train.frozen_bn for r in exp.runs if r.block.startswith("frozen")} == {"eval", "train"}
    assert {(r.config.model.init, r.config.train.epochs) for r in exp.runs if r.block == "init_resnet18_self"} \
        == {("default", 2), ("default", 6), ("pytorch", 2), ("pytorch", 6)}
