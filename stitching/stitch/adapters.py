"""Adapters: the small trainable modules between a source prefix and a destination suffix.

Each :class:`Adapter` is ``resize -> norm_in -> core -> norm_out -> act``, built from a planned
:class:`~stitching.stitch.plan.Step`, the chain's working format and a construction *style*
(:data:`~stitching.stitch.plan.ADAPTER_STYLES`; method and reasons: ``docs/method.md``):

``code`` (default)  as the paper's published code builds them: the simple adapters (``linear``,
                    ``linear_relu``, ``conv3x3``) are norm -> conv (or per-token Linear) -> norm -> activation,
                    the activation being LeakyReLU(0.1) after the second norm (none for ``linear``);
                    ``bottleneck`` and ``vit_block`` have no norms around them.
``text``            as the paper's text describes them: a norm before and after *every* adapter, ReLU inside
                    the core (before the second norm).

Norms are BatchNorm on feature maps and LayerNorm on token sequences. Which kinds have outer norms and an
activation are traits of their records (:mod:`stitching.kinds`), each naming its core function here. Cores:

``linear``       1x1 conv with bias, no padding (feature maps) or an ``nn.Linear`` applied to every token
``linear_relu``  the same with an activation
``conv3x3``      3x3 conv (padding 1, stride = the strided-resize factor) with an activation (maps only)
``bottleneck``   ResNet bottleneck: 1x1 to out/4, 3x3 (strided when resizing that way), 1x1 to out, each
                 followed by BatchNorm; projection shortcut (1x1 conv + BatchNorm) when the shape changes;
                 ReLU after the add (maps only)
``vit_block``    pre-norm transformer encoder block (timm's ``Block``) on class-token sequences, with a
                 linear projection first when the width changes

Initialisation (config ``model.init``, :data:`ADAPTER_INITS`), in both styles: ``default``, as the paper's
code: adapter convolutions Kaiming-normal (fan_out), the last BatchNorm of the bottleneck's residual branch
at zero, so a same-shape bottleneck starts as the identity, and the ``vit_block``'s linear layers as ViT
encoders are; ``pytorch``: every module as PyTorch (and timm) construct it (convolutions and linear layers
Kaiming-uniform with a = sqrt 5, norms weight 1, bias 0).

Resizing: ``bilinear`` interpolates to the adapter's output size just before it (the grid of a token
sequence, its leading class token left alone); ``strided`` puts the factor into the 3x3 conv; ``none``
leaves the size alone. Whenever a planned step receives another size than it computes at (also the paper
code's quirks, ``model.code_quirks``: :mod:`stitching.stitch.plan`), the stride-1 adapter resizes its input
bilinearly first; ``Step.pad`` pads the 1x1 convolution of ``linear`` / ``linear_relu`` as the paper's code
does. The bottleneck is written here rather than taken from timm/torchvision because theirs fix the output
width to 4 x the inner width.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from stitching.kinds import AdapterKind, adapter_kind
from stitching.messages import short_repr
from stitching.models.formats import is_token, prefix_tokens
from stitching.stitch.plan import Step

#: config ``model.init`` values that build the adapters (``least_squares`` starts from ``default``, then fits)
ADAPTER_INITS = ("default", "pytorch")
TORCH_INIT = ADAPTER_INITS[1]                            # PyTorch's own initialisation, nothing re-drawn
LEAKY_SLOPE = 0.1                                        # the paper code's LeakyReLU


class Resize(nn.Module):
    """Bilinear resize of a feature map, or of the grid tokens of a token sequence (leading tokens kept)."""

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int], lead: int | None = None):
        super().__init__()
        self.size_in, self.size_out, self.lead = tuple(size_in), tuple(size_out), lead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lead is None:
            return F.interpolate(x, size=self.size_out, mode="bilinear", align_corners=False)
        head, grid = x[:, : self.lead], x[:, self.lead:]
        b, n, c = grid.shape
        grid = grid.transpose(1, 2).reshape(b, c, *self.size_in)
        grid = F.interpolate(grid, size=self.size_out, mode="bilinear", align_corners=False)
        return torch.cat([head, grid.flatten(2).transpose(1, 2)], dim=1)

    def extra_repr(self) -> str:
        return f"{self.size_in} -> {self.size_out}" + (f", tokens (+{self.lead} leading)" if self.lead is not None
                                                        else "")


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, zero_last: bool = True):
        super().__init__()
        mid = max(1, c_out // 4)
        self.conv1, self.bn1 = nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        if zero_last:
            nn.init.zeros_(self.bn3.weight)   # the residual branch starts at zero: identity when shapes match

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class TokenBlock(nn.Module):
    """Width projection (if needed) and a timm ViT encoder block, its linear layers initialised as ViT
    encoders are (Xavier-uniform weights, near-zero biases; ``vit_init=False``: PyTorch's own)."""

    def __init__(self, c_in: int, c_out: int, vit_init: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.proj = nn.Linear(c_in, c_out) if c_in != c_out else nn.Identity()
        # ViT's 64-wide heads (ViT-Ti/S/B: 3/6/12 heads); one head for widths below 128
        heads = max(h for h in range(1, c_out + 1) if c_out % h == 0 and (c_out // h >= 64 or h == 1))
        self.block = Block(dim=c_out, num_heads=heads, mlp_ratio=4.0, qkv_bias=True)
        for m in self.block.modules() if vit_init else ():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(x))


def linear_core(c_in: int, c_out: int, stride: int = 1, tokens: bool = False, pad: int = 0,
                init: str = "default") -> nn.Module:
    """A 1x1 convolution with bias (``pad``: its padding) on feature maps, an ``nn.Linear`` on every token."""
    return nn.Linear(c_in, c_out) if tokens else nn.Conv2d(c_in, c_out, 1, padding=pad, bias=True)


def conv3x3_core(c_in: int, c_out: int, stride: int = 1, tokens: bool = False, pad: int = 0,
                 init: str = "default") -> nn.Module:
    """A 3x3 convolution with bias, padding 1, stride the strided-resize factor."""
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True)


def bottleneck_core(c_in: int, c_out: int, stride: int = 1, tokens: bool = False, pad: int = 0,
                    init: str = "default") -> nn.Module:
    return Bottleneck(c_in, c_out, stride, zero_last=init != TORCH_INIT)


def vit_block_core(c_in: int, c_out: int, stride: int = 1, tokens: bool = False, pad: int = 0,
                   init: str = "default") -> nn.Module:
    return TokenBlock(c_in, c_out, vit_init=init != TORCH_INIT)


def _record(kind: str) -> AdapterKind:
    record = adapter_kind(kind)
    if record is None:
        raise ValueError(f"unknown adapter {short_repr(kind)}")
    return record


def core_builder(record: AdapterKind):
    """The function that builds ``record``'s core (its :attr:`~stitching.kinds.AdapterKind.core`, imported)."""
    module, _, name = record.core.partition(":")
    return getattr(importlib.import_module(module), name)


def make_core(kind: str, c_in: int, c_out: int, stride: int = 1, tokens: bool = False,
              relu_inside: bool = False, pad: int = 0, init: str = "default") -> nn.Module:
    """The adapter's core, built by its kind's record (:mod:`stitching.kinds`); ``relu_inside`` puts a ReLU at its
    end (the text style's activated adapters); ``pad`` is the 1x1 convolution's padding (1: the paper's code);
    ``init`` one of :data:`ADAPTER_INITS`."""
    record = _record(kind)
    if record.feature_map and tokens:
        raise ValueError(f"{kind} needs a feature map, not a token sequence")
    layer = core_builder(record)(c_in, c_out, stride=stride, tokens=tokens, pad=pad, init=init)
    return nn.Sequential(layer, nn.ReLU(inplace=True)) if relu_inside else layer


class Adapter(nn.Module):
    """One adapter of a chain, built from its planned step in the chain's working format, style and
    initialisation (:data:`ADAPTER_INITS`)."""

    def __init__(self, kind: str, step: Step, working_format: str = "image", style: str = "code",
                 init: str = "default"):
        super().__init__()
        tokens = is_token(working_format)
        self.kind, self.step, self.style = kind, step, style
        resize = step.size_in != step.size_out and step.stride == 1    # a strided adapter resizes in its conv
        lead = prefix_tokens(working_format) if tokens else None
        self.resize = Resize(step.size_in, step.size_out, lead) if resize else nn.Identity()
        record = _record(kind)
        outer = style == "text" or record.outer_norms
        norm = nn.LayerNorm if tokens else nn.BatchNorm2d
        self.norm_in = norm(step.c_in) if outer else nn.Identity()
        self.core = make_core(kind, step.c_in, step.c_out, step.stride, tokens,
                              relu_inside=style == "text" and record.activated, pad=step.pad, init=init)
        self.norm_out = norm(step.c_out) if outer else nn.Identity()
        self.act = (nn.LeakyReLU(LEAKY_SLOPE, inplace=True) if style == "code" and record.activated
                    else nn.Identity())
        for m in self.core.modules() if init != TORCH_INIT else ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm_out(self.core(self.norm_in(self.resize(x)))))
