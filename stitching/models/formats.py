"""Tensor formats at cut points and the conversions between every pair of them.

Formats
-------
``image``       (B, C, H, W)      convolutional networks (ResNet, MobileNet, ConvNeXt, ...)
``bhwc``        (B, H, W, C)      channels-last feature maps (Swin)
``tokens``      (B, N, C)         a token sequence with N = H * W (row-major grid), no prefix token
``tokens_cls``  (B, 1 + N, C)     one prefix token, the class token, then the N grid tokens (ViT)
``tokens+P``    (B, P + N, C)     P >= 2 prefix tokens, then the grid: the class token first, then the others
                                  (DeiT's distillation token: ``tokens+2``; a ViT with 4 registers: ``tokens+5``)

The prefix count is part of the format (:func:`token_format` spells it, :func:`prefix_tokens` reads it), so
a cut carries it. Rules (``docs/method.md``, "Tensor formats"), for P source and Q destination prefix tokens:
image<->bhwc is a permute; image<->tokens a row-major flatten / reshape to the grid (a token count that is
not the grid is an error, never a silent truncation). Out of a prefixed sequence (P >= 1) into a format
without prefix tokens, the class token (the first prefix token) is concatenated onto every grid token, so
the channel count doubles (:func:`channels_after` says so, and adapters account for it); the other prefix
tokens (distillation, registers) are dropped. Into a prefixed sequence (Q >= 1), prefix token q is the
source's prefix token q where the source has one, else the source's class token (P >= 1), else the mean of
the grid tokens (P = 0). Grid tokens pass unchanged between two token formats.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

FORMATS = ("image", "bhwc", "tokens", "tokens_cls", "tokens+P")   # tokens+P: P >= 2 prefix tokens
_PREFIXED = re.compile(r"tokens\+([0-9]+)")


def token_format(prefix: int) -> str:
    """The token format with ``prefix`` leading non-grid tokens: ``tokens``, ``tokens_cls``, ``tokens+P``."""
    if prefix < 0:
        raise FormatError(f"a token sequence cannot have {prefix} prefix tokens")
    return "tokens" if prefix == 0 else "tokens_cls" if prefix == 1 else f"tokens+{prefix}"


def is_token(fmt: str) -> bool:
    """Whether ``fmt`` is a token sequence (B, N, C) rather than a feature map."""
    _check(fmt)
    return fmt.startswith("tokens")


def prefix_tokens(fmt: str) -> int:
    """How many non-grid tokens lead a sequence of format ``fmt`` (class, distillation, register tokens)."""
    _check(fmt)
    if fmt in ("image", "bhwc", "tokens"):
        return 0
    return 1 if fmt == "tokens_cls" else int(_PREFIXED.fullmatch(fmt).group(1))


class FormatError(ValueError):
    """A tensor does not have the shape its declared format requires."""


def channels_after(src: str, dst: str, channels: int) -> int:
    """Channel count after converting a ``src`` tensor of ``channels`` channels to ``dst``."""
    _check(src), _check(dst)
    return 2 * channels if prefix_tokens(src) > 0 and prefix_tokens(dst) == 0 else channels


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
    """Any format -> (B, C, H, W). A prefixed sequence concatenates its class token onto every grid token
    (its other prefix tokens are dropped)."""
    _check(fmt)
    if fmt == "image":
        _ndim(x, 4, fmt)
        return x
    if fmt == "bhwc":
        _ndim(x, 4, fmt)
        return x.permute(0, 3, 1, 2)
    _ndim(x, 3, fmt)
    p = prefix_tokens(fmt)
    if p:
        cls, x = x[:, :1], x[:, p:]
        x = torch.cat([x, cls.expand(-1, x.shape[1], -1)], dim=2)
    b, n, c = x.shape
    h, w = grid_of(n, grid)
    return x.transpose(1, 2).reshape(b, c, h, w)


def from_image(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """(B, C, H, W) -> any format. A prefixed sequence gets every prefix token = the mean of the tokens."""
    _check(fmt)
    _ndim(x, 4, "image")
    if fmt == "image":
        return x
    if fmt == "bhwc":
        return x.permute(0, 2, 3, 1)
    tokens = x.flatten(2).transpose(1, 2)
    return _with_prefix(tokens, None, prefix_tokens(fmt))


def _with_prefix(grid: torch.Tensor, prefix: torch.Tensor | None, q: int) -> torch.Tensor:
    """``q`` prefix tokens, then ``grid``: ``prefix``'s tokens where it has them, else its class token, else
    (no prefix at all) the mean of the grid tokens."""
    if q == 0:
        return grid
    if prefix is None or prefix.shape[1] == 0:
        prefix = grid.mean(dim=1, keepdim=True)
    if prefix.shape[1] < q:
        prefix = torch.cat([prefix, prefix[:, :1].expand(-1, q - prefix.shape[1], -1)], dim=1)
    return torch.cat([prefix[:, :q], grid], dim=1)


def convert(x: torch.Tensor, src: str, dst: str, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Convert ``x`` from format ``src`` to ``dst`` by the rules in the module docstring."""
    _check(src), _check(dst)
    if src == dst:
        return x
    if is_token(src) and is_token(dst) and prefix_tokens(dst) > 0:
        _ndim(x, 3, src)
        p = prefix_tokens(src)
        return _with_prefix(x[:, p:], x[:, :p], prefix_tokens(dst))
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
    n = x.shape[1] - prefix_tokens(fmt)
    h, w = grid_of(n)
    return x.shape[2], h, w


def _check(fmt: str) -> None:
    if fmt not in FORMATS[:4] and not (_PREFIXED.fullmatch(fmt) and int(fmt[7:]) >= 2):
        raise FormatError(f"unknown tensor format {fmt!r}; expected one of {', '.join(FORMATS)} (P >= 2)")


def _ndim(x: torch.Tensor, n: int, fmt: str) -> None:
    if x.ndim != n:
        raise FormatError(f"format {fmt!r} needs a {n}-d tensor, got shape {tuple(x.shape)}")
