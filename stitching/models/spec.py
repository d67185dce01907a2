"""What a model is to the framework: :class:`ModelSpec` (how to build it, split it into a stem, four stages of
blocks and a head -- :class:`Parts` -- and what tensor leaves each cut point -- :class:`Cut`) and the table of
hand-registered specs (:func:`register`).

The cut points are those of ``docs/method.md``: *after the first block of stage s* (``first[s]``, the block
that downsamples) and *at the end of stage s* (``end[s]``). Hand entries live in :mod:`stitching.models.zoo`;
:mod:`stitching.models.registry` looks names up (hand entry, else derived).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

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
    kwargs: tuple = ()                  # constructor arguments, as sorted (key, value) pairs (derived specs)
    layout: object = field(default=None, repr=False)   # derived specs: the module paths of each part

    def cut(self, stage: int, where: str) -> Cut:
        return (self.first if where == "first" else self.end)[stage - 1]


HAND: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in HAND:
        raise ValueError(f"model {spec.name!r} registered twice")
    HAND[spec.name] = spec
    return spec


