"""Adapters: the small trainable modules between a source prefix and a destination suffix.

Each :class:`Adapter` is ``resize -> norm_in -> core -> norm_out`` (BatchNorm on feature maps, LayerNorm on
tokens, as in Bansal et al.). Cores:

``linear``       1x1 conv with bias, no padding
``linear_relu``  1x1 conv + ReLU
``conv3x3``      3x3 conv (padding 1, stride = the strided-resize factor) + ReLU
``bottleneck``   ResNet bottleneck: 1x1 to out/4, 3x3 (strided when resizing that way), 1x1 to out;
                 projection shortcut when the shape changes; ReLU after the add
``vit_block``    pre-norm transformer encoder block (timm's ``Block``) on class-token sequences, with a
                 linear projection first when the width changes

Resizing: ``bilinear`` interpolates to the adapter's output size just before it; ``strided`` puts the
factor into the 3x3 conv; ``none`` leaves the size alone. The bottleneck is written here rather than taken
from timm/torchvision because theirs fix the output width to 4 x the inner width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stitching.stitch.plan import Step


class Resize(nn.Module):
    """Bilinear resize of a feature map (``image``) or of the grid tokens of a ``tokens_cls`` sequence."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int], tokens: bool = False):
        super().__init__()
        self.size_in, self.size_out, self.tokens = tuple(size_in), tuple(size_out), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tokens:
            return F.interpolate(x, size=self.size_out, mode="bilinear", align_corners=False)
        cls, grid = x[:, :1], x[:, 1:]
        b, n, c = grid.shape
        h, w = self.size_in
        grid = grid.transpose(1, 2).reshape(b, c, h, w)
        grid = F.interpolate(grid, size=self.size_out, mode="bilinear", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def extra_repr(self) -> str:
        return f"{self.size_in} -> {self.size_out}" + (", tokens" if self.tokens else "")


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        mid = max(1, c_out // 4)
        self.conv1, self.bn1 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class TokenBlock(nn.Module):
    """Width projection (if needed) and a timm ViT encoder block."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.proj = nn.Linear(c_in, c_out) if c_in != c_out else nn.Identity()
        # ViT's 64-wide heads (ViT-Ti/S/B: 3/6/12 heads); one head for widths below 128
        heads = max(h for h in range(1, c_out + 1) if c_out % h == 0 and (c_out // h >= 64 or h == 1))
        self.block = Block(dim=c_out, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(x))


def make_core(kind: str, c_in: int, c_out: int, stride: int = 1) -> nn.Module:
    if kind == "linear":
        return nn.Conv2d(c_in, c_out, 1, padding=0, bias=True)
    if kind == "linear_relu":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, padding=0, bias=True), nn.ReLU(inplace=True))
    if kind == "conv3x3":
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True), nn.ReLU(inplace=True))
    if kind == "bottleneck":
        return Bottleneck(c_in, c_out, stride)
    if kind == "vit_block":
        return TokenBlock(c_in, c_out)
    raise ValueError(f"unknown adapter {kind!r}")


class Adapter(nn.Module):
    """One adapter of a chain, built from its planned :class:`~stitching.stitch.plan.Step`."""

    def __init__(self, kind: str, step: Step):
        super().__init__()
        tokens = kind == "vit_block"
        self.kind, self.step = kind, step
        resize = step.resize == "bilinear" and step.size_in != step.size_out
        self.resize = Resize(step.size_in, step.size_out, tokens) if resize else nn.Identity()
        norm = nn.LayerNorm if tokens else nn.BatchNorm2d
        self.norm_in = norm(step.c_in)
        self.core = make_core(kind, step.c_in, step.c_out, step.stride)
        self.norm_out = norm(step.c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.core(self.norm_in(self.resize(x))))
