"""The model registry: named architectures, their cut points, and loading them once.

A :class:`ModelSpec` says how to build a network (timm or torchvision), how to split it into a stem,
four stages of blocks and a head (:class:`Parts`), and what tensor leaves each cut point (:class:`Cut`:
format, channels, stride). The cut points are those of SPEC.md: *after the first block of stage s*
(``first[s]``, the block that downsamples) and *at the end of stage s* (``end[s]``). Declared cuts are
checked against the real module by :func:`trace_cuts` (tests do it for every entry; the stitcher does it
on every build).

Entries live in :mod:`stitching.models.zoo`; adding an architecture is one call to :func:`register` there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from stitching.models.formats import spatial_shape


@dataclass(frozen=True)
class Cut:
    """The tensor at a cut point: its format, channel count and stride w.r.t. the input image."""

    format: str
    channels: int
    stride: int


@dataclass
class Parts:
    """A network split for stitching. ``stages[s-1][0]`` is the first (downsampling) block of stage s."""

    stem: nn.Module
    stages: list[list[nn.Module]]
    head: nn.Module

    def blocks(self) -> list[nn.Module]:
        return [b for stage in self.stages for b in stage]

    def index_after_first(self, stage: int) -> int:
        """Position in :meth:`blocks` just after the first block of ``stage`` (1-based)."""
        return sum(len(s) for s in self.stages[: stage - 1]) + 1

    def index_end(self, stage: int) -> int:
        """Position in :meth:`blocks` just after the last block of ``stage``."""
        return sum(len(s) for s in self.stages[:stage])


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    ``build(pretrained, num_classes)`` returns the full network (weights from timm/torchvision when
    ``pretrained``); ``split(model)`` returns its :class:`Parts` (sharing the model's modules);
    ``data_config(model)`` the model's own evaluation preprocessing as a timm data-config dict.
    """

    name: str
    family: str
    library: str
    weights: str
    first: tuple[Cut, Cut, Cut, Cut]
    end: tuple[Cut, Cut, Cut, Cut]
    build: Callable[[bool, int], nn.Module] = field(repr=False)
    split: Callable[[nn.Module], Parts] = field(repr=False)
    data_config: Callable[[nn.Module], dict] = field(repr=False)
    min_img_size: int = 32

    def cut(self, stage: int, where: str) -> Cut:
        return (self.first if where == "first" else self.end)[stage - 1]


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def available() -> list[str]:
    _ensure_zoo()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _ensure_zoo()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _ensure_zoo() -> None:
    import stitching.models.zoo  # noqa: F401  (registers the entries)


def load_model(name: str, pretrained: bool = False, weights_file: str | None = None,
               num_classes: int = 1000) -> nn.Module:
    """Build model ``name``: pretrained from its library, from a local weights file, or random init.

    ``weights_file`` (safetensors or a torch state dict, possibly wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``) takes precedence over ``pretrained`` and serves offline cluster nodes and models
    trained by this framework (their ``model.safetensors``). Loading is strict: a key or shape mismatch is
    an error naming the file.
    """
    spec = get_spec(name)
    if weights_file is not None:
        model = spec.build(False, num_classes)
        state = read_state_dict(weights_file)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0:3]
            raise ValueError(f"weights file {weights_file} does not fit {name}: {' '.join(first)}") from None
        return model
    return spec.build(pretrained, num_classes)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only`` loading)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_model(name: str, model: nn.Module) -> Parts:
    return get_spec(name).split(model)


@torch.no_grad()
def trace_cuts(spec: ModelSpec, parts: Parts, img_size: int) -> dict[tuple[int, str], tuple[int, int, int]]:
    """Run a zero image through ``parts`` and return (channels, H, W) at every cut point.

    Raises ``RuntimeError`` when a traced channel count differs from the declared one: the registry entry
    is wrong for this model, and nothing should be stitched on top of it.
    """
    training = [m.training for m in (parts.stem, parts.head)]
    was = {id(b): b.training for b in parts.blocks()}
    for m in [parts.stem, parts.head, *parts.blocks()]:
        m.eval()
    device = next(iter(p.device for p in parts.stem.parameters()), torch.device("cpu"))
    try:
        x = parts.stem(torch.zeros(1, 3, img_size, img_size, device=device))
        shapes = {}
        for s, stage in enumerate(parts.stages, start=1):
            for i, block in enumerate(stage):
                x = block(x)
                if i == 0:
                    shapes[(s, "first")] = spatial_shape(x, spec.first[s - 1].format)
            shapes[(s, "end")] = spatial_shape(x, spec.end[s - 1].format)
    finally:
        parts.stem.train(training[0]), parts.head.train(training[1])
        for b in parts.blocks():
            b.train(was[id(b)])
    for (s, where), (c, _, _) in shapes.items():
        declared = spec.cut(s, where)
        if c != declared.channels:
            raise RuntimeError(f"{spec.name}: stage {s} ({where}) declares {declared.channels} channels, "
                               f"the real model gives {c}")
    return shapes
