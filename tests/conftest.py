"""Shared fixtures: random-init models loaded once per session and handed out as deep copies."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_CACHE: dict = {}


@pytest.fixture
def cached_models(monkeypatch):
    """Make ``build_model`` reuse one random-init instance per (name, num_classes) (deep-copied)."""
    import stitching.stitch.stitcher as stitcher
    from stitching.models.registry import load_model

    def cached(name, pretrained=False, weights_file=None, num_classes=1000):
        assert not pretrained and weights_file is None
        key = (name, num_classes)
        if key not in _CACHE:
            torch.manual_seed(0)
            _CACHE[key] = load_model(name, False, None, num_classes)
        return copy.deepcopy(_CACHE[key])

    monkeypatch.setattr(stitcher, "load_model", cached)
    return cached


def model_cfg(**kw) -> SimpleNamespace:
    d = dict(source="resnet50", destination=None, source_stage=None, destination_stage=None,
             adapter="bottleneck", resize="bilinear", schedule="paper", pretrained=False,
             source_weights=None, destination_weights=None)
    d.update(kw)
    return SimpleNamespace(**d)
