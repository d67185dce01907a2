"""Cost of a model: MACs (the paper's "FLOPs"), FLOPs (= 2 x MACs), parameters, trainable parameters.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of a single image (it counts
convolutions and matrix products, like torchtnt did for the paper; norms, activations and resizes are
free). Fused scaled-dot-product attention on the CPU is invisible to the counter, so timm's fused
attention is switched off while counting (torchvision's Swin computes attention with explicit matmuls).
:func:`human` writes a count for people (``1.67 G``), :func:`share` one cost as a part of another (``41%``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def _unfused_attention(model: nn.Module):
    toggled = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in toggled:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in toggled:
            m.fused_attn = True


def count_params(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, trainable


@torch.no_grad()
def count_cost(model: nn.Module, img_size: int = 224) -> dict[str, int]:
    """MACs/FLOPs of one ``img_size`` forward pass and parameter counts, with the model left as it was."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with _unfused_attention(model), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    params, trainable = count_params(model)
    return {"macs": flops // 2, "flops": flops, "params": params, "trainable_params": trainable}


def human(n: float, unit: str = "") -> str:
    """A count for people, three significant digits and an SI prefix: ``human(1674e6, "MACs")`` is
    ``"1.67 GMACs"``, ``human(119680)`` is ``"120 K"``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale * 0.9995:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def share(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``: whole percent from 10 % on, one decimal below (``"41%"``,
    ``"3.2%"``, ``"120%"``)."""
    pct = 100 * part / whole if whole else float("nan")
    return f"{pct:.0f}%" if pct >= 9.95 else f"{pct:.1f}%"
