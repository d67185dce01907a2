"""Turns the frozen parts of a stitched model into inference graphs, for training speed.

Most of a stitched network is frozen: its prefix and suffix keep their pretrained weights, run in eval mode
and need no weight gradients (the prefix needs no backward pass at all). Such parts can be simplified the
way one would for deployment, without changing what they compute:

- :func:`fold_frozen` returns a *new* :class:`~stitching.stitch.stitcher.StitchedModel` whose prefix and
  suffix are deep copies with every BatchNorm folded into the convolution that feeds it (the conv's weight
  and bias rescaled, the BatchNorm replaced by ``Identity``, or by its activation for timm's
  ``BatchNormAct2d``) and dropout / stochastic depth replaced by identities. Its ``adapters`` are the *same*
  module object as the canonical model's, so training through the folded model trains the canonical
  model's adapters, and checkpoints of the canonical model see every update. The canonical model's frozen
  parts are left untouched. Trainable parts and the fine-tuning baseline (``frozen=False``) are never
  folded.
- :func:`to_channels_last` stores 4-D weights channels-last (NHWC), the layout oneDNN and cuDNN prefer for
  convolutions; :func:`default_channels_last` says per device whether that pays off (measured).
- :func:`prepare_for_training` is the one entry point the trainer and ``benchmarks/train_step.py`` call to
  get the module that runs the training step (fold, channels-last, optional ``torch.compile``).

Conv -> BatchNorm pairs are found per parent module: a BatchNorm registered directly after a convolution
(same parent) whose ``num_features`` equals the conv's ``out_channels``. In an ``nn.Sequential`` the
registration order is the data flow. In any other parent the pair is confirmed with ``torch.fx`` (the BN's
only input is that conv's output, and the conv's output feeds nothing else); where the parent cannot be
traced, registration order plus the channel check is trusted (true of every timm/torchvision block used
here; ``tests/test_fast.py`` checks outputs against the unfolded parts for all four main architectures).
BatchNorms without a foldable conv in front stay (in eval mode, as before).

The folded copies are made from the canonical weights at the time of the call: call again after loading
other weights into the frozen parts.
"""

from __future__ import annotations

import copy
import ctypes
import os
import platform
import sys
from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stitching.stitch.stitcher import StitchedModel

_BN_FOR_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


# ----------------------------------------------------------------------------------------- BN folding
def _conv_kind(module: nn.Module) -> type | None:
    """The plain ``nn.ConvNd`` class a (non-transposed) convolution derives from, else None."""
    for kind in _BN_FOR_CONV:
        if isinstance(module, kind):
            return kind
    return None


def can_fold(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` (in eval mode) can be folded into ``conv``: matching dimensionality and channels,
    and running statistics to fold (a BatchNorm without them normalises with batch statistics)."""
    kind = _conv_kind(conv)
    if kind is None or not isinstance(bn, _BatchNorm):
        return False
    if not isinstance(bn, (_BN_FOR_CONV[kind], nn.SyncBatchNorm)):
        return False
    return (bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
            and bn.num_features == conv.out_channels)


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``conv`` computing ``bn(conv(x))`` with eval-mode ``bn`` (math in float64).

    ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta`` per output channel.
    """
    fused = copy.deepcopy(conv)
    w = conv.weight.double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    shape = (-1,) + (1,) * (w.dim() - 1)
    fused.weight = nn.Parameter((w * scale.reshape(shape)).to(conv.weight.dtype),
                                requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return fused


def bn_replacement(bn: nn.Module) -> nn.Module:
    """What stands in for a folded BatchNorm: its activation for norm+act modules (timm's
    ``BatchNormAct2d``: BN -> drop -> act, where drop is an identity in eval mode), else ``Identity``."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


class _LeafTracer(torch.fx.Tracer):
    """An fx tracer that keeps convolutions and BatchNorms (timm's subclasses included) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.modules.conv._ConvNd, _BatchNorm)) or super().is_leaf_module(m, qualname)


def _confirmed_by_fx(parent: nn.Module, pairs: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """The pairs whose BN reads exactly the conv's output (and nothing else reads it); None if untraceable."""
    try:
        graph = _LeafTracer().trace(parent)
    except Exception:  # noqa: BLE001 - any tracing failure means "cannot confirm", not an error
        return None
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    ok = []
    for conv_name, bn_name in pairs:
        conv_calls, bn_calls = calls.get(conv_name, []), calls.get(bn_name, [])
        if len(conv_calls) != 1 or len(bn_calls) != 1:
            continue
        conv_node, bn_node = conv_calls[0], bn_calls[0]
        if list(conv_node.users) == [bn_node] and bn_node.args[:1] == (conv_node,):
            ok.append((conv_name, bn_name))
    return ok


def conv_bn_pairs(part: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv_name, bn_name)`` for every conv -> BatchNorm pair in ``part`` that can be folded."""
    parents = list(part.modules())
    # a module registered under two parents (shared) is never folded: folding it once would change both
    seen = Counter(id(child) for p in parents for child in p.children())
    found = []
    for parent in parents:
        children = list(parent.named_children())
        pairs = [(cn, bn) for (cn, c), (bn, b) in zip(children, children[1:])
                 if can_fold(c, b) and seen[id(c)] == 1 and seen[id(b)] == 1]
        if not pairs:
            continue
        if not isinstance(parent, nn.Sequential):
            confirmed = _confirmed_by_fx(parent, pairs)
            pairs = pairs if confirmed is None else confirmed
        found += [(parent, cn, bn) for cn, bn in pairs]
    return found


def fold_batchnorms(part: nn.Module) -> int:
    """Fold every foldable BatchNorm of ``part`` into its conv, in place; returns how many were folded."""
    pairs = conv_bn_pairs(part)
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fold_conv_bn(conv, bn))
        setattr(parent, bn_name, bn_replacement(bn))
    return len(pairs)


# ----------------------------------------------------------------------------- eval-only simplifications
class Dropped(nn.Identity):
    """Identity standing in for a dropout or stochastic-depth module of a frozen part.

    ``p = 0`` because some modules read their dropout's rate (timm's attention: ``attn_drop.p``).
    """

    p = 0.0


def _stochastic_types() -> tuple[type, ...]:
    types: list[type] = [nn.modules.dropout._DropoutNd]
    try:
        from timm.layers import DropBlock2d, DropPath

        types += [DropPath, DropBlock2d]
    except ImportError:
        pass
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except ImportError:
        pass
    return tuple(types)


def drop_stochastic(part: nn.Module) -> int:
    """Replace dropout / drop-path / stochastic-depth modules of ``part`` by identities (eval semantics)."""
    types = _stochastic_types()
    count = 0
    for parent in list(part.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, types):
                setattr(parent, name, Dropped())
                count += 1
    return count


def inference_copy(part: nn.Module) -> nn.Module:
    """A deep copy of a frozen ``part`` as an inference graph: BatchNorms folded, stochastic layers
    removed, eval mode, ``requires_grad=False``."""
    part = copy.deepcopy(part)
    fold_batchnorms(part)
    drop_stochastic(part)
    return part.eval().requires_grad_(False)


def fold_frozen(model: StitchedModel) -> StitchedModel:
    """A new stitched model whose frozen prefix and suffix are inference copies (see module docstring),
    sharing ``model.adapters`` (the same object). The fine-tuning baseline is returned unchanged."""
    if not isinstance(model, StitchedModel):
        raise TypeError(f"fold_frozen takes a StitchedModel, not {type(model).__name__}")
    if not model.frozen:
        return model
    fast = StitchedModel(inference_copy(model.prefix), model.adapters, inference_copy(model.suffix),
                         frozen=True, plan=model.plan)
    fast.training = model.training  # the adapters keep their own mode; frozen parts stay in eval mode
    return fast


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


# ------------------------------------------------------------------------------- layout and compilation
def to_channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s 4-D parameters and buffers channels-last (in place; returns ``model``).

    Only convolution weights are 4-D, so this is harmless for token models. Parameter objects stay the
    same (optimizers keep working); a shared module (the adapters of :func:`fold_frozen`) is converted
    for its canonical model too. Channels-last tensors are not ``is_contiguous()``: save state dicts with
    ``.contiguous()`` (safetensors requires it).
    """
    return model.to(memory_format=torch.channels_last)


# Measured 2026-11-20 on an AMD EPYC (Zen 5) VM, 2 cores, torch 2.15 (oneDNN 3.13), fp32, batch 16, 224 px,
# ResNet-50 1->3 bottleneck+bilinear, framework step (interleaved steps, median of 6; benchmarks/README.md):
#   folded + channels_last 513 ms | folded, NCHW 655 ms | unfolded + channels_last 553 ms |
#   folded + channels_last + torch.compile 581 ms (so compile stays off by default on CPU).
# oneDNN's NHWC convolutions (and its 1x1 GEMM: 441 vs 346 GFLOP/s NCHW) are the fast path on this CPU.
# CUDA: channels-last is cuDNN's native layout for (b)f16 tensor-core convolutions (not measured here: no GPU
# was lent to this task; run benchmarks/train_step.py --device cuda --precision bf16 to check).
_CHANNELS_LAST_DEFAULT = {"cpu": True, "cuda": True}


def default_channels_last(device: torch.device | str) -> bool:
    """Whether ``channels_last`` (the ``auto`` setting) is on for ``device``'s type, as measured."""
    return _CHANNELS_LAST_DEFAULT.get(torch.device(device).type, False)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in glibc's heap between training steps (process-wide; Linux/glibc only).

    PyTorch's CPU allocator is plain ``malloc``: glibc serves large blocks with ``mmap`` and returns them to
    the OS on ``free``, so every step page-faults its activations in again (seconds of system time per
    minute). Fixing the mmap threshold at its maximum (32 MiB) and the trim threshold at 1 GiB keeps them.
    Measured on the ResNet-50 1->3 step (CPU, batch 16): ~495 ms and steady against 550-650 ms with glibc's
    defaults, peak RSS unchanged. Skipped when ``MALLOC_*`` tunables are set in the environment. Returns
    whether the setting is in effect.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("GLIBC_TUNABLES"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
    return _allocator_tuned


def _on_cpu(model: nn.Module) -> bool:
    p = next(iter(model.parameters()), None)
    return p is not None and p.device.type == "cpu"


def prepare_for_training(model: nn.Module, *, fold_bn: bool, channels_last: bool, compile: bool,
                         tune_allocator: bool | None = None) -> nn.Module:
    """The module that runs the training step for ``model`` (the canonical model, already on its device).

    - ``fold_bn``: a stitched model's frozen parts become inference copies (:func:`fold_frozen`); ignored for
      the fine-tuning baseline and original models, which train every weight.
    - ``channels_last``: :func:`to_channels_last` on the returned module. The caller must convert its
      inputs too: ``x = x.contiguous(memory_format=torch.channels_last)``.
    - ``compile``: ``torch.compile`` of the whole returned module.
    - ``tune_allocator``: :func:`tune_cpu_allocator` (process-wide); ``None``: when ``model`` is on the CPU.

    Optimise ``model``'s trainable parameters: they are the returned module's (shared, not copied), so
    checkpoints and evaluation of ``model`` see the training. Without fold, layout or compile ``model``
    itself is returned.
    """
    if tune_allocator or (tune_allocator is None and _on_cpu(model)):
        tune_cpu_allocator()
    runner = model
    if fold_bn and isinstance(model, StitchedModel):
        runner = fold_frozen(model)
    if channels_last:
        to_channels_last(runner)
    if compile:
        runner = torch.compile(runner)
    return runner
