"""``python -m stitching.sweep``: expansion, dry run, local launcher, and real SLURM with requeue."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stitching.sweep.spec import expand
from tests.conftest import ROOT, together

SMOKE = ROOT / "configs" / "sweeps" / "smoke.yaml"


def cpu_smoke(tmp_path: Path) -> Path:
    """The smoke sweep with every run pinned to the CPU (tests assert CPU results; on a GPU node ``auto`` picks
    CUDA)."""
    import yaml

    spec = yaml.safe_load(SMOKE.read_text())
    for block in spec["blocks"]:
        block["base"] = str((SMOKE.parent / block["base"]).resolve())
        block["grid"]["train.device"] = ["cpu"]
    path = tmp_path / SMOKE.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "stitching.sweep", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def collect(runs: Path) -> list[dict]:
    out = runs / "results.csv"
    subprocess.run([sys.executable, "-m", "stitching.collect", str(runs), "-o", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    with out.open() as f:
        return list(csv.DictReader(f))


PAPER = ROOT / "configs" / "sweeps" / "paper.yaml"


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The paper sweep's dry run through the real CLI, and its expansion (no weights: shapes only)."""
    runs = tmp_path_factory.mktemp("paper") / "runs"
    out = sweep(PAPER, "--launcher", "local", "--runs-dir", runs, "--dry-run").stdout
    assert not runs.exists()
    return out, expand(PAPER, runs)[2]


@pytest.mark.slow   # the paper sweep's expansion (shared fixture): ~35 s
def test_paper_dry_run_counts_every_combination_and_writes_nothing(paper):
    out, exp = paper
    dropped = sum(exp.excluded.values()) + sum(exp.impossible.values()) + sum(exp.duplicates.values())
    assert len(exp.runs) + dropped == exp.total
    assert f"total runs: {len(exp.runs)}" in out and f"{exp.total} grid points" in out
    pairs = {r.pair for r in exp.runs if not r.config.is_original}
    assert len(pairs) == 12                                   # the paper's 12 architecture combinations
    assert {r.pair for r in exp.runs if r.config.is_original} == {
        "resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"}
    from stitching.sweep.report import pair_label

    for pair in pairs:
        assert pair_label(pair) in out
    assert "vit_small_patch16_224 (self)" in out and "resnet50 -> swin_t" in out
    assert "duplicates dropped" in out and "model.resize" in out
    # 9 gaps x 3 seeds per method; self-stitched ResNet-50 bottleneck: 3 resize modes, sizes match at s->s
    rb = [r for r in exp.runs if r.pair == "resnet50 -> resnet50" and r.config.model.adapter == "bottleneck"]
    assert len(rb) == 3 * (3 * 1 + 6 * 3)
    ft = [r for r in exp.runs if r.config.model.adapter == "finetune"]
    assert {r.config.train.lr for r in ft} == {0.01, 0.002, 0.0002}
    assert {r.config.model.source for r in ft} == {"resnet50", "mobilenetv3_large_100", "vit_small_patch16_224",
                                                   "swin_t"}
    assert not any(r.config.model.source == "mobilenetv3_large_100" and r.config.model.destination_stage == 4
                   for r in ft)                                # those gaps do not join
    assert sum(r.config.model.adapter == "vit_block" for r in exp.runs) == 27


# The paper code's own sweep, as facts read from its launcher (across-scales/*.yml with the stitchers of
# across-scales/default-stitchers.yml; gaps blocks_to_drop [1,1] [1,2] [1,4] [1,6] [3,3] [3,4] [3,6] [5,5] [5,6]
# = 1->1 1->2 1->3 1->4 2->2 2->3 2->4 3->3 3->4): stitcher -> (adapter/resize) in this framework's terms.
PAPER_STITCHERS = {
    "linear_no_downsample": "linear/none", "linear_relu_no_downsample": "linear_relu/none",
    "bottleneck_no_downsample": "bottleneck/none", "downsample_then_linear": "linear/bilinear",
    "downsample_then_linear_relu": "linear_relu/bilinear", "downsample_then_3x3conv": "conv3x3/bilinear",
    "downsample_then_bottleneck": "bottleneck/bilinear", "conv3x3_with_downsample": "conv3x3/strided",
    "bottleneck_with_downsample": "bottleneck/strided", "finetune": "finetune"}
R50, MN, VIT, SWIN = "resnet50", "mobilenetv3_large_100", "vit_small_patch16_224", "swin_t"
PAPER_CONFIGS = [(R50, R50), (MN, MN), (SWIN, SWIN), (VIT, VIT), (R50, SWIN), (R50, VIT), (VIT, R50), (VIT, SWIN)]
GAPS = ["1->1", "1->2", "1->3", "1->4", "2->2", "2->3", "2->4", "3->3", "3->4"]


def paper_code_runs() -> list[tuple[str, str, str]]:
    """(pair, method, gap) of every run the paper's launcher builds for one seed (its lr: 0.002)."""
    out = []
    for src, dst in PAPER_CONFIGS:
        for gap in GAPS:
            for stitcher, method in PAPER_STITCHERS.items():
                if method == "finetune" and (src != dst or (src == MN and gap in ("3->3", "3->4"))):
                    continue    # finetune_stitch returns None: the cut shapes differ
                if src == dst == VIT and method.split("/")[0] in ("conv3x3", "bottleneck"):
                    continue    # conv3x3 / bottleneck adapters return None between two token formats
                out.append((f"{src} -> {dst}", method, gap))
    return out


def where(exp) -> dict:
    """(pair, method, gap, lr, seed) -> the run that stands for it (its own grid point or a duplicate's)."""
    return {(p["pair"], p["method"], p["gap"], p["lr"], p["seed"]): r for r in exp.runs for p in r.points}


@pytest.mark.slow   # the paper sweep's expansion (shared fixture): ~35 s
def test_paper_part_is_the_paper_codes_637_runs_per_seed_each_difference_counted(paper):
    out, exp = paper
    code = paper_code_runs()
    assert len(code) == 637
    index = where(exp)
    for seed in (0, 1, 2):
        hit = [index.get((pair, method, gap, 0.002, seed)) for pair, method, gap in code]
        # the framework refuses 2 of them: MobileNetV3 fine-tuning 1->4 and 2->4 joins 80 to 112 channels
        # (the paper's launcher checks only the ends of the gap; those runs crashed)
        refused = [c for c, r in zip(code, hit) if r is None]
        assert refused == [(f"{MN} -> {MN}", "finetune", "1->4"), (f"{MN} -> {MN}", "finetune", "2->4")]
        kept = {r.name for r in hit if r is not None}
        assert all(r.part == "paper" for r in hit if r is not None)
        # 130 of them build a module another of them builds (trained once here, the row shared)
        assert len(kept) == 505 and 637 - 2 - len(kept) == 130
        own = [r for r in exp.part("paper") if r.config.train.seed == seed and not r.config.is_original]
        extra = sorted((r.method, r.config.train.lr) for r in own if r.name not in kept)
        # the paper's protocol beyond its launcher's configs: fine-tuning at two more learning rates (its
        # Figure 8; 32 joinable gaps) and the ViT-block adapter of its ViT-S figures (block stitchers are
        # commented out in default-stitchers.yml)
        assert extra == sorted([("finetune", 0.0002)] * 32 + [("finetune", 0.01)] * 32 + [("vit_block/none", 0.002)] * 9)
        assert len(own) == 505 + 64 + 9
    originals = [r for r in exp.part("paper") if r.config.is_original]
    per_seed = [len([r for r in exp.part("paper") if r.config.train.seed == s]) for s in (0, 1, 2)]
    assert per_seed == [578 + len(originals), 578, 578] and len(originals) == 4
    full = [len([r for r in exp.runs if r.config.train.seed == s]) for s in (0, 1, 2)]
    # the dry run prints both totals, per seed and overall
    assert f"{'paper only':28}" + "".join(f"{n:>10}" for n in per_seed) + f"{sum(per_seed):>10}" in out
    assert f"{'full (paper + extensions)':28}" + "".join(f"{n:>10}" for n in full) + f"{len(exp.runs):>10}" in out
    assert sum(full) == len(exp.runs) > sum(per_seed)


@pytest.mark.slow   # the paper sweep's expansion (shared fixture): ~35 s
def test_paper_part_has_no_hole_and_upsampling_integrated_runs_share_the_bilinear_row(paper):
    from stitching.models.registry import get_spec
    from stitching.stitch.plan import plan_stitch

    out, exp = paper
    index = where(exp)
    lines = {(pair, method) for pair, method, _ in paper_code_runs()}
    lines |= {(f"{VIT} -> {VIT}", "vit_block/none"), (f"{VIT} -> {VIT}", "vit_block/bilinear")}
    for pair, method in lines:
        for gap in GAPS:
            for seed in (0, 1, 2):
                lrs = (0.01, 0.002, 0.0002) if method == "finetune" else (0.002,)
                for lr in lrs:
                    if method == "finetune" and pair == f"{MN} -> {MN}" and gap in ("1->4", "2->4", "3->3", "3->4"):
                        assert (pair, method, gap, lr, seed) not in index      # refused: shapes do not join
                        continue
                    run = index.get((pair, method, gap, lr, seed))
                    assert run is not None and run.part == "paper", (pair, method, gap, lr, seed)
    # ViT-S -> ResNet-50 / Swin-T at 1->1, 1->2, 2->2 must upsample: "integrated" is bilinear then a stride-1
    # adapter, the bilinear module itself -- one run, two rows
    for dst in (R50, SWIN):
        for adapter in ("conv3x3", "bottleneck"):
            for gap in ("1->1", "1->2", "2->2"):
                run = index[(f"{VIT} -> {dst}", f"{adapter}/strided", gap, 0.002, 0)]
                assert run.method == f"{adapter}/bilinear"
                assert [p["method"] for p in run.points] == [f"{adapter}/bilinear", f"{adapter}/strided"]
                s, t = map(int, gap.split("->"))
                plans = [plan_stitch(get_spec(VIT), get_spec(dst), s, t, adapter, r, "paper")
                         for r in ("bilinear", "strided")]
                assert plans[0].signature() == plans[1].signature()
    # the table says so: ViT-S -> ResNet-50 bottleneck/strided is 9 runs + 18 shared rows (3 upsampling gaps
    # and 3 where the sizes already match, x 3 seeds)
    row = next(line for line in out.splitlines() if line.startswith(f"{VIT} -> {R50}"))
    assert "9+18" in row.split() and "18+9" in row.split()
    # every paper line has its 9 gaps x 3 seeds in the table (own runs + shared rows)
    paper_table = out.split("paper part:")[1].split("\n\n")[0]
    rows = [re.match(r"^(\S+ -> \S+|\S+ \(self\))\s+(.*)$", line) for line in paper_table.splitlines()]
    rows = [m for m in rows if m]
    assert len(rows) == 8                           # the paper's 8 stitched configurations
    for row in rows:
        for cell in row.group(2).split()[:-1]:      # (the last: the row's total)
            assert cell == "-" or sum(map(int, cell.split("+"))) in (27, 81, 45), row.group(0)
    # and the table fits a terminal
    assert max(map(len, out.splitlines())) <= 120


def dry_run(capsys, *args) -> str:
    """The real CLI in this process (no interpreter start-up): its printed output."""
    from stitching.sweep.__main__ import main

    capsys.readouterr()
    assert main([*map(str, args), "--launcher", "local", "--dry-run"]) == 0
    return capsys.readouterr().out


def test_extension_blocks_are_labelled_and_switched_off(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    text = f"""
base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}
blocks:
  - name: ext
    extension: "conv3x3 without resizing: not in the paper's code"
    grid:
      model.source_stage: [1]
      model.destination_stage: [1, 2]
      model.adapter: [conv3x3]
      model.resize: [none, bilinear]
  - name: main
    grid:
      model.source_stage: [1]
      model.destination_stage: [1, 2]
      model.adapter: [conv3x3]
      model.resize: [bilinear]
      train.seed: [0, 1]
"""
    spec.write_text(text)
    _, _, exp = expand(spec, tmp_path / "runs")
    # the paper part is expanded first: the extension's 1->1 runs are its duplicates, never the reverse
    assert [(r.block, r.config.model.destination_stage) for r in exp.runs] == [
        ("main", 1), ("main", 1), ("main", 2), ("main", 2), ("ext", 2)]
    assert [p["part"] for p in exp.runs[0].points] == ["paper", "extension", "extension"]
    _, _, paper_only = expand(spec, tmp_path / "runs", extensions=False)
    assert [r.name for r in paper_only.runs] == [r.name for r in exp.part("paper")]
    out = dry_run(capsys, spec, "--runs-dir", tmp_path / "runs")
    assert "ext: conv3x3 without resizing: not in the paper's code" in out and "total runs: 5 " in out
    assert f"{'paper only':28}{2:>10}{2:>10}{4:>10}" in out
    assert f"{'full (paper + extensions)':28}{3:>10}{2:>10}{5:>10}" in out
    out = dry_run(capsys, spec, "--runs-dir", tmp_path / "runs", "--paper-only")
    assert "total runs: 4 " in out and "extension part (OFF" in out
    assert f"{'full (paper + extensions)':28}{3:>10}{2:>10}{5:>10}" in out      # still shown for reference
    spec.write_text(text.replace("blocks:", "extensions: false\nblocks:"))
    assert "total runs: 4 " in dry_run(capsys, spec, "--runs-dir", tmp_path / "runs")
    assert "total runs: 5 " in dry_run(capsys, spec, "--runs-dir", tmp_path / "runs", "--extensions")
    assert not (tmp_path / "runs").exists()
    spec.write_text(text.replace('"conv3x3 without resizing: not in the paper\'s code"', "[1]"))
    proc = sweep(spec, "--launcher", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and "ext.extension" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_duplicates_impossible_and_excluded_are_counted(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""
base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}
grid:
  model.source_stage: [2]
  model.destination_stage: [1, 2, 3]
  model.adapter: [linear, conv3x3]
  model.resize: [none, bilinear, strided]
exclude:
  - {{model.adapter: conv3x3, model.destination_stage: 3}}
""")
    _, _, exp = expand(spec, tmp_path / "runs")
    assert exp.total == 18
    assert sum(exp.excluded.values()) == 3                    # conv3x3 at 2->3
    # 2->1 (6) and linear+strided at 2->2, 2->3 (2)
    assert sum(exp.impossible.values()) == 6 + 2
    # 2->2: linear none == bilinear; conv3x3 none == bilinear == strided
    assert sum(exp.duplicates.values()) == 1 + 2
    assert sorted((r.config.model.adapter, r.config.model.destination_stage) for r in exp.runs) == [
        ("conv3x3", 2), ("linear", 2), ("linear", 3), ("linear", 3)]
    names = [r.name for r in exp.runs]
    assert len(set(names)) == len(names)
    assert [r.name for r in expand(spec, tmp_path / "runs")[2].runs] == names   # stable names


def test_bad_sweep_files_exit_2_with_one_line(tmp_path):
    spec, lr = tmp_path / "s.yaml", tmp_path / "lr.yaml"
    spec.write_text(f"base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}\ngrid:\n  model.adaptor: [linear]\n")
    lr.write_text(f"base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}\ngrid:\n  train.lr: [fast]\n")
    proc, other = together(lambda: sweep(spec, "--launcher", "local", "--dry-run", check=False),
                           lambda: sweep(lr, "--launcher", "local", "--dry-run", check=False))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "model.adaptor" in proc.stderr and str(spec) in proc.stderr
    assert other.returncode == 2 and "train.lr" in other.stderr


def test_local_sweep_runs_collects_and_never_repeats_a_run(tmp_path):
    runs = tmp_path / "runs"
    smoke = cpu_smoke(tmp_path)
    out = sweep(smoke, "--launcher", "local", "--runs-dir", runs, "--parallel", "2").stdout    # 2 CI cores
    assert "local: 5 done, 0 preempted, 0 failed" in out and out.count("[local] start") == 5
    rows = collect(runs)
    assert len(rows) == 5 and sorted(r["kind"] for r in rows) == ["original"] + ["stitched"] * 4
    assert {r["adapter"] for r in rows if r["kind"] == "stitched"} == {"linear", "bottleneck"}
    # re-submitting a finished sweep launches nothing
    assert "nothing to do" in sweep(smoke, "--launcher", "local", "--runs-dir", runs).stdout
    # half-finished: one run lost its result (its checkpoint is there) -> only that one runs again
    victim = next(p for p in runs.iterdir() if p.name.startswith("resnet18.1-resnet18.3.linear"))
    (victim / "result.csv").unlink()
    out = sweep(smoke, "--launcher", "local", "--runs-dir", runs).stdout
    assert "4 finished" in out and "local: 1 done" in out and out.count("[local] start") == 1
    assert len(collect(runs)) == 5


# ------------------------------------------------------------------------------------- real SLURM
def _wait_for_results(dirs: list[Path], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all((d / "result.csv").is_file() for d in dirs):
            return
        time.sleep(1)
    logs = "\n".join(f"{d}: {sorted(os.listdir(d))}" for d in dirs)
    queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
    raise AssertionError(f"runs not finished after {timeout}s:\n{logs}\n{queue}")


@pytest.mark.slurm
def test_slurm_sweep_end_to_end_and_resubmission(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    smoke = cpu_smoke(tmp_path)
    first = sweep(smoke, "--launcher", "slurm", "--runs-dir", runs).stdout
    assert "submitted job array" in first and "with 5 tasks" in first
    again = sweep(smoke, "--launcher", "slurm", "--runs-dir", runs).stdout   # while queued/running
    assert "already queued or running" in again and "submitted job array" not in again
    dirs = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    assert len(dirs) == 5
    _wait_for_results(dirs, timeout=600)
    rows = collect(runs)
    assert len(rows) == 5
    for row in rows:
        assert row["run_id"] in {d.name for d in dirs} and 0 <= float(row["top1"]) <= 100
        assert float(row["macs"]) > 0 and row["device"] == "cpu"
    assert "nothing to do" in sweep(smoke, "--launcher", "slurm", "--runs-dir", runs).stdout


@pytest.mark.slurm
def test_slurm_requeued_task_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    from stitching.launch import slurm

    spec = tmp_path / "long.yaml"
    spec.write_text(f"""
base: {ROOT / 'configs' / 'synthetic' / 'tiny.yaml'}
grid:
  train.epochs: [4]
  data.train_size: [1024]
  train.device: [cpu]
slurm: {{cpus_per_task: 1, mem: 2G, time: "00:20:00"}}
""")
    runs = tmp_path / "runs"
    out = sweep(spec, "--launcher", "slurm", "--runs-dir", runs).stdout
    job = out.split("submitted job array ")[1].split()[0]
    [run] = [p for p in runs.iterdir() if (p / "config.yaml").is_file()]
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.csv").is_file():
        time.sleep(0.5)
    assert (run / "metrics.csv").is_file() and not (run / "result.csv").exists()
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, capture_output=True, text=True)
    _wait_for_results([run], timeout=600)
    log = (run / "train.log").read_text()
    assert "resuming" in log and "epoch 4/4" in log
    info = slurm.job_info(job)
    assert int(info[0]["Restarts"]) >= 1
