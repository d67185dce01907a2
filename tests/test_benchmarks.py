"""The benchmarks run: each script, at a tiny size, through its real command line, ends with its JSON line
whose ratios are the ones its rates give. (A benchmark that stopped running went unnoticed once: a config key
added to the data section broke ``benchmarks/data.py``'s hand-built section; it now takes the real one.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(script: str, *args: str) -> list[str]:
    """The benchmark's stdout lines (its last one is its JSON summary)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


def test_data_benchmark_runs_the_framework_pipeline_side_by_side():
    out = json.loads(_run("data.py", "--images", "24", "--rounds", "1", "--batch-size", "8")[-1])
    rates = out["images_per_s"]
    assert {"a", "b", "c"} <= set(rates) and all(v > 0 for v in rates.values())
    assert out["ratio_a_over_b"] == pytest.approx(rates["a"] / rates["b"], abs=2e-3)
    assert out["ratio_a_over_c"] == pytest.approx(rates["a"] / rates["c"], abs=2e-3)
    assert out["node_images_per_s"]["8"]["a"] == pytest.approx(8 * rates["a"], abs=1)
    assert out["images"] == 24 and out["workers"] == 0


@pytest.mark.slow          # a training-step benchmark and a loader benchmark, tiny: ~40 s
def test_keep_up_runs_the_training_step_and_the_loader_at_the_default_workers():
    """``keep_up.py`` = ``train_step.py`` (the trainer's step against the baselines) + ``data.py`` with the
    trainer's default loader workers, wall clock; its verdicts are the ratios of the two benchmarks' rates."""
    from stitching.data.loaders import default_workers

    lines = _run("keep_up.py", "--device", "cpu", "--batch-size", "4", "--img-size", "64", "--images", "32",
                 "--rounds", "1", "--source", "resnet18", "--steps", "2", "--warmup", "1", "--matmul-sizes", "64")
    out = json.loads(lines[-1])
    step = json.loads(next(line for line in lines if line.startswith('{"stitch"')))
    ms = step["ms_per_step"]
    assert set(ms) == {"a", "b", "c"} and all(v > 0 for v in ms.values())
    assert step["speedup_vs_baseline"] == pytest.approx(ms["b"] / ms["a"], rel=0.02)
    assert step["stitch"] == "resnet18 1 -> resnet18 3 (bottleneck, bilinear)" and step["device"] == "cpu"
    flops = step["stitches"][0]["gflop_per_image"]
    assert 0 < flops["stitched_forward"] and flops["useful"] < flops["full_step"]
    # the verdicts: the loader's wall-clock rate at the trainer's default workers over the step's rate
    assert out["workers"] == default_workers() and out["device"] == "cpu"
    [row] = out["stitches"]
    assert row["train_images_per_s"] == {"stitched": step["images_per_s"]["a"], "full": step["images_per_s"]["c"]}
    for key, headroom in row["headroom"].items():
        pipeline, model = key.split("/")
        feed = out["loader_images_per_s"][pipeline]
        assert headroom == pytest.approx(feed / row["train_images_per_s"][model], abs=1e-3)
        assert row["keeps_up"][key] == (feed >= row["train_images_per_s"][model])


def test_gpu_check_without_cuda_checks_its_arguments_then_says_so_in_one_line(tmp_path):
    """``benchmarks/gpu_check.py`` on a machine without CUDA (CI): bad arguments are exit 2 naming the option;
    good ones give one line and exit 0, with nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.py would run the whole check")
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    bad = subprocess.run([sys.executable, script, "--parts", "tests,nothing"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--parts='tests,nothing': unknown part 'nothing'" in bad.stderr
    bad = subprocess.run([sys.executable, script, "--out", str(tmp_path / "missing" / "g.json")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a writable directory" in bad.stderr
    out = tmp_path / "g.json"
    ok = subprocess.run([sys.executable, script, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert not out.exists()


@pytest.mark.slow          # 3 trainer processes and the paper sweep's expansion: ~1-2 min
def test_pack_benchmark_trains_separately_packed_and_ideal_through_the_trainer():
    """``pack.py``: the gaps trained one after another and as one pack by the real trainer, the ideal packed time
    in the process; its ratios are its timings', and the paper sweep's totals fall by at least 10x at --pack 16."""
    out = json.loads(_run("pack.py", "--source", "resnet18", "--gaps", "2", "--img-size", "32", "--batch-size", "4",
                          "--steps", "4")[-1])
    t = out["timed_s"]
    assert all(t[k] > 0 for k in "abc") and out["gaps"] == 2 and out["timed_steps"] == 2
    # (the timings are rounded to the millisecond in the JSON line, the ratios are not)
    assert out["speedup_packed"] == pytest.approx(t["a"] / t["b"], rel=0.05)
    assert out["overhead_vs_ideal"] == pytest.approx(t["b"] / t["c"], rel=0.05)
    assert out["images_per_s"]["b"] == pytest.approx(2 * 2 * 4 / t["b"], rel=0.05)   # timed steps x batch x runs
    assert len(out["ideal_parts_s"]["branches"]) == 2
    for key in ("jobs", "data_passes"):
        assert out["paper_sweep"]["paper"][key]["ratio"] >= 10 and out["paper_sweep"]["full"][key]["ratio"] >= 10
