"""Shared fixtures: random-init models loaded once per session and handed out as deep copies."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "scripts" / "slurm" / "start_local_slurm.sh"
STOP = ROOT / "scripts" / "slurm" / "stop_local_slurm.sh"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CACHE: dict = {}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one (``STITCHING_GPU_TESTS_ON_CPU=1`` runs them
    on the CPU instead, to check their own logic; tests/test_gpu.py)."""
    if torch.cuda.is_available() or os.environ.get("STITCHING_GPU_TESTS_ON_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU: python benchmarks/gpu_check.py)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cached_models(monkeypatch):
    """Make ``build_model`` reuse one random-init instance per (name, num_classes) (deep-copied)."""
    import stitching.stitch.stitcher as stitcher
    from stitching.models.weights import load_model

    def cached(name, pretrained=False, weights_file=None, num_classes=1000, kwargs=None):
        assert not pretrained and weights_file is None
        key = (name, num_classes, repr(sorted((kwargs or {}).items())))
        if key not in _CACHE:
            torch.manual_seed(0)
            _CACHE[key] = load_model(name, False, None, num_classes, kwargs)
        return copy.deepcopy(_CACHE[key])

    monkeypatch.setattr(stitcher, "load_model", cached)
    return cached


def model_cfg(**kw):
    """A config's ``model`` section: the defaults of :class:`stitching.config.ModelConfig`, random init."""
    import dataclasses

    from stitching.config import ModelConfig

    d = dataclasses.asdict(ModelConfig(pretrained=False))
    unknown = set(kw) - set(d)
    assert not unknown, f"not model config keys: {unknown}"
    d.update(kw)
    return ModelConfig(**d)


# ------------------------------------------------------------------------------------------ SLURM
# One real single-node SLURM for the session (scripts/slurm/start_local_slurm.sh installs slurm-wlm and
# munge with apt if needed, starts the daemons; they are stopped at the end). With STITCHING_SLURM=1 or
# CI set, failing to start it is an error; otherwise the SLURM tests are skipped when it cannot be had.
# STITCHING_SLURM_KEEP=1 leaves it running after the session.
def _must_run() -> bool:
    return os.environ.get("STITCHING_SLURM") == "1" or bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def slurm_cluster():
    must = _must_run()
    if os.geteuid() != 0 and not must:
        pytest.skip("starting the local SLURM cluster needs root (or set STITCHING_SLURM=1 / CI)")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        msg = (
            f"{START.name} failed (exit {proc.returncode}) after {time.monotonic() - t0:.0f}s:\n"
            f"{proc.stderr[-4000:]}"
        )
        if not must and shutil.which("sbatch") is None:
            pytest.skip("SLURM is not installed and could not be installed: " + msg)
        pytest.fail(msg)
    exports = [ln for ln in proc.stdout.splitlines() if ln.startswith("export SLURM_CONF=")]
    assert exports, f"no 'export SLURM_CONF=' line in:\n{proc.stdout}"
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = exports[-1].split("=", 1)[1]
    print(f"local SLURM started in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        if os.environ.get("STITCHING_SLURM_KEEP") != "1":
            subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


# ------------------------------------------------------------------------------- independent CLI runs at once
# Runs that do not depend on each other (an uninterrupted reference run and the interrupted one it is compared
# with; the scenarios of a shared fixture) go side by side, two at a time on the 2 CI cores: each call is the
# same blocking helper (a real CLI process, waited for, its failure raised) the test would call one after another.
# Every process pins OMP_NUM_THREADS=1, so its numbers do not depend on what runs beside it.
def together(*calls, at_once: int = 2) -> list:
    """Call the zero-argument ``calls`` ``at_once`` at a time; their results in order (the first failure is
    raised once all have ended)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def in_background(call):
    """Start the zero-argument ``call`` in a thread; ``.result()`` waits for it and raises its failure."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future
