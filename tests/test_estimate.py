"""What a run costs before it runs (``stitching/stitch/cost.py``, ``stitching/sweep/estimate.py``): the counted
training step against the trainer's own step, the grouped-convolution fix, and the sweep's ``--dry-run`` cost
through its command line."""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from stitching.validate import load_config
from stitching.stitch import cost as C
from stitching.stitch.stitcher import build_model
from stitching.sweep import estimate as E
from stitching.train.step import build_step
from stitching.train.objective import Objective, objective_at, step_macs
from stitching.train.step import train_step
from tests.conftest import ROOT

TINY = ROOT / "configs" / "synthetic" / "tiny.yaml"
VIT_64 = ["data.img_size=64", "model.adapter=linear"]


def trainer_step_macs(cfg) -> int:
    """MACs per image of one step of the trainer's own code (``build_step`` + ``train_step``, the objective of
    epoch 1) on the config's real model, counted by the counter the estimate uses (attention unfused, as
    everywhere the framework counts: the counter cannot see a fused CPU kernel)."""
    torch.manual_seed(0)
    built = build_model(cfg.model, cfg.data.img_size, cfg.num_classes, frozen_bn=cfg.train.frozen_bn)
    st = build_step(built.model, cfg, built.kind, torch.device("cpu"), "fp32", 1, 1)
    st.objective = Objective(cfg, built, "cpu", st.channels_last).at(0)
    x, y = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size), torch.tensor([1, 2])   # (BatchNorm: 2 images)
    with C._unfused_attention(st.runner), C._counter() as counter:
        train_step(st, x, y, 0)
    return counter.get_total_flops() // 2 // 2


@pytest.mark.parametrize("overrides", [
    [],                                                                      # ResNet-18 1 -> 3, bottleneck
    ["train.objective=match"],
    ["train.objective=distill"],
    ["model.adapter=finetune", "model.resize=none"],
    ["model.source_stage=null", "model.destination_stage=null"],             # an original trained whole
    ["model.destination=vit_tiny_patch16_224", "model.destination_kwargs={img_size: 64}", "model.destination_stage=2",
     *VIT_64],                                                               # a ViT suffix: attention's gradients
    ["model.source=vit_tiny_patch16_224", "model.source_kwargs={img_size: 64}", "model.destination=resnet18",
     "model.destination_kwargs={}", *VIT_64],
    ["model.source=mobilenetv3_small_100", "model.adapter=conv3x3", "data.img_size=64"],   # depthwise convolutions
    ["model.adapter=linear", "model.resize=none"],          # "no downsample": the suffix runs on the larger map
    ["model.source=vit_tiny_patch16_224", "model.source_kwargs={img_size: 64}", "model.destination=resnet18",
     "model.destination_kwargs={}", "model.resize=none", "model.code_quirks=true", *VIT_64],   # the N x N map
], ids=["task", "match", "distill", "finetune", "original", "to-vit", "from-vit", "mobilenet", "no-downsample",
        "quirks-from-vit"])
def test_the_estimated_step_is_what_the_trainers_step_computes(overrides):
    """The estimate counts the parts apart, on the meta device, with norms as stand-ins; the trainer's step counted
    whole on real tensors (folded BatchNorm, the objective's extra passes, AdamW) gives the same MACs."""
    cfg = load_config(TINY, [*overrides, "train.epochs=1", "train.device=cpu"])
    cost = C.stitch_cost(cfg.model, cfg.data.img_size, cfg.num_classes)
    assert step_macs(cost, objective_at(cfg, 0)) == trainer_step_macs(cfg)
    assert cost.forward == C.count_cost(build_model(cfg.model, cfg.data.img_size, cfg.num_classes).model,
                                        cfg.data.img_size)["macs"]


def test_a_grouped_convolutions_weight_gradient_costs_its_forward_pass():
    """PyTorch's formula charges a depthwise convolution's weight gradient ``groups`` times over; ours counts each
    gradient as the forward convolution it mirrors -- the same as the dense convolutions of its groups."""
    grouped = nn.Conv2d(32, 32, 3, padding=1, groups=8, bias=False)
    dense = nn.Conv2d(4, 4, 3, padding=1, bias=False)                          # one group of it
    x = torch.zeros(1, 32, 28, 28)
    g, _ = C.count_pass(grouped, x)
    d, _ = C.count_pass(dense, x[:, :4])
    assert g.forward == 8 * d.forward == 32 * 4 * 9 * 28 * 28
    assert (g.backward_input, g.backward_weights, g.backward_all) == (g.forward, g.forward, 2 * g.forward)
    assert (d.backward_weights, d.backward_all) == (d.forward, 2 * d.forward)
    with FlopCounterMode(display=False) as torch_own:                      # what the fix is for
        y = grouped(x.requires_grad_(True))
        torch.autograd.grad(y.sum(), [grouped.weight])
    assert torch_own.get_total_flops() // 2 > g.forward + g.backward_weights


def test_norm_stand_ins_keep_the_gradients_autograd_computes():
    """A conv after a norm with weights computes its input gradient (for the norm's weights) even where the
    adapter's own input needs none: the stand-in keeps that, so the count equals the plain counter's."""
    chain = nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1), nn.LayerNorm([16, 8, 8]),
                          nn.Conv2d(16, 8, 1)).eval()
    x = torch.zeros(1, 8, 8, 8)
    ours, _ = C.count_pass(chain, x, backward=("weights",))
    with C._counter() as plain:
        y = chain(x)
        torch.autograd.grad(y.sum(), list(chain.parameters()))
    assert ours.forward + ours.backward_weights == plain.get_total_flops() // 2
    assert ours.backward_input is None and ours.backward_all is None        # not asked for


def dry_run(capsys, *args) -> str:
    from stitching.sweep.__main__ import main

    capsys.readouterr()
    assert main([*map(str, args), "--dry-run"]) == 0
    return capsys.readouterr().out


def flat(out: str) -> str:
    """The output with its wrapped lines joined."""
    return " ".join(out.split())


def table_row(out: str, label: str) -> list[str]:
    """The cells of the cost table's first row labelled ``label``."""
    cost = out.split("\ncost: ")[1]
    line = next(ln for ln in cost.splitlines() if re.match(rf"\s*{re.escape(label)}\s+\d", ln))
    return line.strip()[len(label):].split()


def image_folder(root, classes: int, per_class: int):
    """root/{train,val}/<class>/<i>.jpg: what an ImageFolder lists (the files are never read to be counted)."""
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                (root / split / f"c{c}" / f"{i}.jpg").write_bytes(b"")
    return root


def test_the_dry_run_prices_every_run(tmp_path, capsys):
    """A sweep of a stitch (two objectives), a fine-tuning run and an evaluated original, at a stated rate: the
    table's MACs are the runs' steps x images x epochs plus their forward passes, the GPU-hours that at the rate,
    the wall time the throttle's; nothing is written."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
slurm: {{max_parallel: 2, gpus_per_task: 1, time: "00:30:00"}}
blocks:
  - name: stitched
    base: {TINY}
    grid: {{train.objective: [task, distill], train.epochs: [2], train.similarity_images: [32]}}
  - name: finetune
    base: {TINY}
    grid: {{model.adapter: [finetune], model.resize: [none]}}
  - name: original
    base: {TINY}
    grid: {{model.source_stage: [null], model.destination_stage: [null], train.epochs: [0]}}
""")
    runs = tmp_path / "runs"
    out = dry_run(capsys, spec, "--launcher", "slurm", "--runs-dir", runs, "--rate", "1000")
    assert not runs.exists() and max(map(len, out.splitlines())) <= 120
    assert "--rate: ResNet-50 (224 px) trains at 1000 images/s per GPU (as given)" in flat(out)

    cfg = lambda *o: load_config(TINY, list(o))                             # noqa: E731
    stitched, finetuned, original = (C.stitch_cost(c.model, 32, 10) for c in (
        cfg(), cfg("model.adapter=finetune", "model.resize=none"), cfg("model.source_stage=null",
                                                                        "model.destination_stage=null")))
    images, val = 256 // 64 * 64, 128                                       # 4 steps of 64 a epoch; 128 to evaluate
    task = 2 * images * step_macs(stitched, "task")
    distill = 2 * images * step_macs(stitched, "distill")
    similarity = 32 * (2 * (stitched.prefix + stitched.target) + stitched.adapters.forward)
    want = {"resnet18 (self)": (3, 5 * images, task + distill + images * finetuned.trained,
                                2 * (2 * val * stitched.forward + similarity) + val * finetuned.forward),
            "resnet18": (1, 0, 0, val * original.forward)}
    for label, (n, trained, train_macs, eval_macs) in want.items():
        row = table_row(out, label)
        assert row[:4] == [str(n), f"{trained:,}", E.macs(train_macs), E.macs(eval_macs)], (label, row)
    total = sum(w[2] + w[3] for w in want.values())
    hours = total / (1000 * E.reference_macs()) / 3600
    assert table_row(out, "total")[4] == E.hours(hours)
    # 4 runs, 2 tasks at a time, 1 GPU each: the GPU time over 2, at least the longest run
    assert re.search(r"wall time: [^(]+\(2 tasks at a time, the job array's slurm.max_parallel", flat(out))
    # the rate table's default, and a GPU by name
    assert "A100: ResNet-50 (224 px) trains at 2470 mixed, 938 fp32 images/s" in flat(dry_run(
        capsys, spec, "--launcher", "slurm", "--runs-dir", runs))
    assert "V100: ResNet-50 (224 px) trains at 1200 mixed, 367 fp32 images/s" in flat(dry_run(
        capsys, spec, "--launcher", "slurm", "--runs-dir", runs, "--rate", "v100"))


def test_imagefolder_counts_come_from_the_folders_or_are_said(tmp_path, capsys):
    """An ImageFolder's images are counted from its root; a 1000-class root that is not here is ImageNet-1k,
    said; another is left out, said, unless ``--images`` gives the counts."""
    from stitching.data.datasets import dataset_sizes

    root = image_folder(tmp_path / "data", classes=2, per_class=3)
    spec = tmp_path / "s.yaml"

    def write(root, classes):
        spec.write_text(f"base: {TINY}\ngrid: {{data.name: [imagefolder], data.root: ['{root}'], "
                        f"data.num_classes: [{classes}], train.batch_size: [2]}}\n")

    write(root, 2)
    train, val = dataset_sizes(load_config(TINY, ["data.name=imagefolder", f"data.root={root}",
                                                  "data.num_classes=2"]).data)
    assert (train, val) == (6, 6)
    out = dry_run(capsys, spec, "--launcher", "local", "--runs-dir", tmp_path / "runs")
    assert table_row(out, "total")[:2] == ["1", f"{train // 2 * 2:,}"] and "note:" not in out
    write(tmp_path / "elsewhere", 1000)
    out = dry_run(capsys, spec, "--launcher", "local", "--runs-dir", tmp_path / "runs")
    assert "taken to be ImageNet-1k (1,281,167 training / 50,000 validation images" in flat(out)
    assert table_row(out, "total")[1] == f"{1_281_167 // 2 * 2:,}"
    write(tmp_path / "elsewhere", 7)
    out = dry_run(capsys, spec, "--launcher", "local", "--runs-dir", tmp_path / "runs")
    assert "its image counts are unknown: its runs are left out" in flat(out) and table_row(out, "total")[1] == "0"
    out = dry_run(capsys, spec, "--launcher", "local", "--runs-dir", tmp_path / "runs", "--images", "100,10")
    assert table_row(out, "total")[1] == "100" and "unknown" not in out


@pytest.mark.parametrize("option, value", [("--rate", "h200"), ("--rate", "-3"), ("--images", "12")])
def test_bad_cost_options_are_one_line(tmp_path, option, value):
    from tests.test_commands import error_line, run

    proc = run("-m", "stitching.sweep", "configs/sweeps/smoke.yaml", "--launcher", "local", "--dry-run",
               "--runs-dir", tmp_path / "runs", option, value, timeout=120)
    assert proc.returncode == 2
    assert error_line(proc).startswith(f"error: command line: {option}={value!r}: ")
    assert "sweep smoke" not in proc.stdout                                 # before any work


def test_a_pack_costs_its_runs_less_the_prefix_it_runs_once(tmp_path, capsys):
    """``--pack K``: a pack (one job) costs its runs' GPU-hours less the frozen source prefix that every run but
    the deepest would run again over the training images and the evaluations; the dry run says so, and its wall
    time is the packs' (the longest pack); an original trains alone."""
    from stitching.sweep.spec import expand

    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
slurm: {{max_parallel: 2, time: "00:30:00"}}
blocks:
  - name: stitched
    base: {TINY}
    grid: {{model.source_stage: [1, 2], model.destination_stage: [3], train.epochs: [2]}}
  - name: original
    base: {TINY}
    grid: {{model.source_stage: [null], model.destination_stage: [null], train.epochs: [0]}}
""")
    runs = tmp_path / "runs"
    out = flat(dry_run(capsys, spec, "--launcher", "slurm", "--runs-dir", runs, "--rate", "1000", "--pack", "4"))
    assert "packed (--pack 4): 3 runs in 2 jobs" in out and "the longest pack" in out and not runs.exists()
    assert "the longest run" in flat(dry_run(capsys, spec, "--launcher", "slurm", "--runs-dir", runs))
    est = E.estimate_runs(expand(spec, runs)[2].runs, E.parse_rate("1000")).runs
    jobs = E.jobs(est, 4)
    stitched = [e for e in est if not e.run.config.is_original]
    [pack] = [j for j in jobs if not j.run.config.is_original]
    shallow = min(C.stitch_cost(e.run.config.model, 32, 10).prefix for e in stitched)
    saved = shallow * (2 * 256 + 2 * 128) / (1000 * E.reference_macs()) / 3600   # 2 epochs of 256, 2 evaluations
    assert 0 < saved and math.isclose(pack.gpu_hours, sum(e.gpu_hours for e in stitched) - saved)
    assert [j for j in jobs if j.run.config.is_original] == [e for e in est if e.run.config.is_original]
    assert E.jobs(est, 1) == est


def test_wall_time_spreads_gpu_hours_over_the_throttle():
    est = [E.Estimate(None, gpu_hours=h) for h in (4.0, 1.0, 1.0, 2.0)]
    wall = E.wall_time([(2, 1, est, 3.0, "03:00:00")])
    assert (wall.hours, wall.longest, wall.over_limit) == (4.0, 4.0, 1)     # the longest run bounds it
    wall = E.wall_time([(2, 2, est, None, "")])                             # 2 GPUs a task: half as long each
    assert (wall.hours, wall.gpus) == (2.0, 2)
    assert math.isclose(E.wall_time([(None, 1, est, None, "")]).hours, 4.0)  # no throttle: the longest run
    assert E.wall_time([(1, 1, [], None, "")]) is None


def test_counting_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[0].weight.requires_grad_(False)
    C.count_pass(model, torch.zeros(1, 3, 8, 8))
    assert model.training and not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert "forward" not in vars(model[1])                                  # the stand-in is gone
    with contextlib.suppress(Exception):
        C.count_pass(model, torch.zeros(1, 5, 8, 8))                        # a failing pass restores it too
    assert model.training and not model[0].weight.requires_grad and "forward" not in vars(model[1])
