"""A new model family declared in one place, outside the package: ``tinycnn``, a four-stage CNN of plain conv
blocks, registered by hand (:func:`stitching.models.spec.register` with its build, split, preprocessing and the
cut points it is expected to have).

:mod:`tests.test_registry` checks the declared cuts against the real model and trains a ``tinycnn`` stitch
through the trainer, in a process that registered the family first (a user's launcher); nothing in the package
is edited. The recipe is docs/architecture.md's "How to add a model family".
"""

from __future__ import annotations

from torch import nn

from stitching.models.spec import HAND, Cut, ModelSpec, Parts, register

WIDTHS = (8, 16, 24, 32)


def _block(c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TinyCNN(nn.Module):
    """Stem (stride 2), four stages of two blocks (the first of each downsamples), pooled linear head."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = _block(3, WIDTHS[0], 2)
        c = WIDTHS[0]
        self.stages = nn.ModuleList()
        for s, w in enumerate(WIDTHS):
            self.stages.append(nn.Sequential(_block(c, w, 1 if s == 0 else 2), _block(w, w, 1)))
            c = w
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def build(pretrained: bool, num_classes: int) -> nn.Module:
    if pretrained:
        raise ValueError("tinycnn has no pretrained weights")
    return TinyCNN(num_classes)


def split(model: TinyCNN) -> Parts:
    return Parts(model.stem, [list(stage) for stage in model.stages], model.head)


def data_config(model: nn.Module) -> dict:
    return {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center"}


def spec(strides=(2, 4, 8, 16)) -> ModelSpec:
    cuts = tuple(Cut("image", c, s) for c, s in zip(WIDTHS, strides))
    return ModelSpec(name="tinycnn", family="tinycnn", library="timm", weights="", first=cuts, end=cuts,
                     build=build, split=split, data_config=data_config)


def register_family() -> None:
    """Register ``tinycnn`` once in this process."""
    if "tinycnn" not in HAND:
        register(spec())
