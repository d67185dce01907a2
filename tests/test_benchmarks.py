"""The benchmarks run: each script, at a tiny size, through its real command line, ends with its JSON line
whose ratios are the ones its rates give. (A benchmark that stopped running went unnoticed once: a config key
added to the data section broke ``benchmarks/data.py``'s hand-built section; it now takes the real one.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_benchmark_runs_the_framework_pipeline_side_by_side():
    out = _run("data.py", "--images", "24", "--rounds", "1", "--batch-size", "8")
    rates = out["images_per_s"]
    assert {"a", "b", "c"} <= set(rates) and all(v > 0 for v in rates.values())
    assert out["ratio_a_over_b"] == pytest.approx(rates["a"] / rates["b"], abs=2e-3)
    assert out["ratio_a_over_c"] == pytest.approx(rates["a"] / rates["c"], abs=2e-3)
    assert out["node_images_per_s"]["8"]["a"] == pytest.approx(8 * rates["a"], abs=1)
    assert out["images"] == 24 and out["workers"] == 0


def test_train_step_benchmark_times_the_trainers_step_against_the_baselines():
    out = _run("train_step.py", "--source", "resnet18", "--source-stage", "1", "--destination-stage", "3",
               "--batch-size", "4", "--img-size", "64", "--steps", "2", "--warmup", "1", "--matmul-sizes", "64")
    ms = out["ms_per_step"]
    assert set(ms) == {"a", "b", "c"} and all(v > 0 for v in ms.values())
    assert out["speedup_vs_baseline"] == pytest.approx(ms["b"] / ms["a"], rel=0.02)
    assert out["stitch"] == "resnet18 1 -> resnet18 3 (bottleneck, bilinear)" and out["device"] == "cpu"
    # the useful work of a stitched step is less than a full model's training step
    flops = out["stitches"][0]["gflop_per_image"]
    assert 0 < flops["stitched_forward"] and flops["useful"] < flops["full_step"]
