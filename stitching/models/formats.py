"""Tensor formats at cut points and the conversions between every pair of them.

Formats
-------
``image``       (B, C, H, W)      convolutional networks (ResNet, MobileNet)
``bhwc``        (B, H, W, C)      channels-last feature maps (torchvision Swin)
``tokens``      (B, N, C)         a token sequence with N = H * W (row-major grid), no class token
``tokens_cls``  (B, 1 + N, C)     a class token followed by the N grid tokens (ViT)

Rules (``docs/method.md``, "Tensor formats"): image<->bhwc is a permute; image<->tokens a row-major
flatten / reshape to the grid (a token count that is not the grid is an error, never a silent truncation); going *into*
``tokens_cls`` from a format without a class token, the class token is the mean of the tokens; going
*out of* ``tokens_cls`` into a format without one, the class token is concatenated onto every token, so
the channel count doubles (:func:`channels_after` says so, and adapters account for it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

FORMATS = ("image", "bhwc", "tokens", "tokens_cls")
TOKEN_FORMATS = ("tokens", "tokens_cls")     # sequences: adapters between two of them work per token


def is_token(fmt: str) -> bool:
    """Whether ``fmt`` is a token sequence (B, N, C) rather than a feature map."""
    _check(fmt)
    return fmt in TOKEN_FORMATS


def prefix_tokens(fmt: str) -> int:
    """How many non-grid tokens lead a sequence of format ``fmt`` (the class token of ``tokens_cls``)."""
    _check(fmt)
    return 1 if fmt == "tokens_cls" else 0


class FormatError(ValueError):
    """A tensor does not have the shape its declared format requires."""


def channels_after(src: str, dst: str, channels: int) -> int:
    """Channel count after converting a ``src`` tensor of ``channels`` channels to ``dst``."""
    _check(src), _check(dst)
    return 2 * channels if src == "tokens_cls" and dst != "tokens_cls" else channels


def grid_of(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (H, W) grid of ``num_tokens`` tokens: ``grid`` if given (checked), else a square."""
    if grid is not None:
        if grid[0] * grid[1] != num_tokens:
            raise FormatError(f"{num_tokens} tokens do not form the expected {grid[0]}x{grid[1]} grid")
        return grid
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise FormatError(f"{num_tokens} tokens are not a square grid; pass the grid explicitly")
    return side, side


def to_image(x: torch.Tensor, fmt: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Any format -> (B, C, H, W). ``tokens_cls`` concatenates the class token onto every token."""
    _check(fmt)
    if fmt == "image":
        _ndim(x, 4, fmt)
        return x
    if fmt == "bhwc":
        _ndim(x, 4, fmt)
        return x.permute(0, 3, 1, 2)
    _ndim(x, 3, fmt)
    if fmt == "tokens_cls":
        cls, x = x[:, :1], x[:, 1:]
        x = torch.cat([x, cls.expand(-1, x.shape[1], -1)], dim=2)
    b, n, c = x.shape
    h, w = grid_of(n, grid)
    return x.transpose(1, 2).reshape(b, c, h, w)


def from_image(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """(B, C, H, W) -> any format. ``tokens_cls`` prepends the mean of the tokens as class token."""
    _check(fmt)
    _ndim(x, 4, "image")
    if fmt == "image":
        return x
    if fmt == "bhwc":
        return x.permute(0, 2, 3, 1)
    tokens = x.flatten(2).transpose(1, 2)
    if fmt == "tokens":
        return tokens
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


def convert(x: torch.Tensor, src: str, dst: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Convert ``x`` from format ``src`` to ``dst`` by the rules in the module docstring."""
    _check(src), _check(dst)
    if src == dst:
        return x
    if src == "tokens" and dst == "tokens_cls":
        _ndim(x, 3, src)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
    return from_image(to_image(x, src, grid), dst)


class Convert(nn.Module):
    """A parameter-free module converting between two formats (shown in the stitched model's repr)."""

    def __init__(self, src: str, dst: str, grid: tuple[int, int] | None = None):
        super().__init__()
        _check(src), _check(dst)
        self.src, self.dst, self.grid = src, dst, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convert(x, self.src, self.dst, self.grid)

    def extra_repr(self) -> str:
        return f"{self.src} -> {self.dst}" + (f", grid={self.grid}" if self.grid else "")


def spatial_shape(x: torch.Tensor, fmt: str) -> tuple[int, int, int]:
    """(channels, H, W) of a tensor in format ``fmt`` (token grids must be square)."""
    if fmt == "image":
        return x.shape[1], x.shape[2], x.shape[3]
    if fmt == "bhwc":
        return x.shape[3], x.shape[1], x.shape[2]
    n = x.shape[1] - (1 if fmt == "tokens_cls" else 0)
    h, w = grid_of(n)
    return x.shape[2], h, w


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown tensor format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _ndim(x: torch.Tensor, n: int, fmt: str) -> None:
    if x.ndim != n:
        raise FormatError(f"format {fmt!r} needs a {n}-d tensor, got shape {tuple(x.shape)}")
