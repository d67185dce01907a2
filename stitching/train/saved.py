"""What a finished run leaves of its model: ``model.safetensors`` (:func:`save_model`: the weights, with the
config that rebuilds them in its metadata) and :func:`load_trained`, which rebuilds the model from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from stitching import rundir as R
from stitching.config import Config
from stitching.validate import load_config
from stitching.stitch.stitcher import build_model


def save_model(rundir: R.RunDir, model: nn.Module, cfg: Config, kind: str) -> None:
    """``model.safetensors``: the whole model's weights (native key names for an original model, so
    ``model.source_weights`` can point at it) with the config that rebuilds it in the metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    rundir.write_bytes(R.MODEL, save(tensors, metadata={"config": cfg.to_yaml(), "kind": kind}))


def load_trained(run_dir: str | Path) -> nn.Module:
    """Rebuild a finished run's model from its ``model.safetensors`` (weights and config inside)."""
    d = R.RunDir(run_dir)
    file = d.file(R.MODEL)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    cfg = load_config(d.config, check=False, run_dir=True)
    mcfg = dataclasses.replace(cfg.model, pretrained=False, source_weights=None, destination_weights=None)
    built = build_model(mcfg, cfg.data.img_size, cfg.num_classes)
    if meta.get("kind") != built.kind:
        raise ValueError(f"{file} holds a {meta.get('kind')} model but {d.config} builds a {built.kind} one")
    built.model.load_state_dict(load_file(str(file)), strict=True)
    return built.model.eval()
