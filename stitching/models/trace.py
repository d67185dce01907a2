"""A model's cut points traced on the real module: the stage cuts checked against their declaration
(:func:`trace_cuts`) and every block listed with its output format and shape (:func:`list_blocks`).

Every block is a cut point too (config ``model.source_block`` / ``destination_block``): :func:`list_blocks`
lists a model's flat list of blocks (``Parts.blocks()``: stage 1's first block is index 0) with each block's
output format and traced shape, checked by :func:`trace_blocks` like the stage cuts.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from stitching.models.formats import FormatError, is_token, spatial_shape
from stitching.models.registry import get_spec
from stitching.models.spec import ModelSpec, Parts

def split_model(name: str, model: nn.Module, kwargs: dict | None = None) -> Parts:
    return get_spec(name, kwargs).split(model)


def _eval_mode(*roots: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Put ``roots`` and all their sub-modules in eval mode for a trace; returns every module's own mode.

    A split's stem or head may be a wrapper made by the split (a ``Sequential`` of the network's modules, in
    train mode whatever the network's), so each module's mode is recorded and restored by itself: restoring the
    wrapper's would set the network's own modules (its BatchNorms) back to train mode."""
    was = [(m, m.training) for root in roots for m in root.modules()]
    for root in roots:
        root.eval()
    return was


def _restore_mode(was: list[tuple[nn.Module, bool]]) -> None:
    """Each module back in the mode :func:`_eval_mode` recorded, set on the module alone (not its children)."""
    for m, mode in was:
        m.training = mode


@torch.no_grad()
def trace_cuts(spec: ModelSpec, parts: Parts, img_size: int) -> dict[tuple[int, str], tuple[int, int, int]]:
    """Run a zero image through ``parts`` and return (channels, H, W) at every cut point.

    Raises ``RuntimeError`` when a traced channel count differs from the declared one, or the traced grid from
    the declared stride (checked where ``img_size`` is a multiple of it): the registry entry is wrong for this
    model, and nothing should be stitched on top of it (the shape plan is made from the declaration).
    """
    was = _eval_mode(parts.stem, parts.head, *parts.blocks())
    params = itertools.chain(*(m.parameters() for m in (parts.stem, *parts.blocks())))
    device = next(iter(p.device for p in params), torch.device("cpu"))     # (a stem may have none: Swin)
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
        _restore_mode(was)
    for (s, where), (c, _, _) in shapes.items():
        declared = spec.cut(s, where)
        if c != declared.channels:
            raise RuntimeError(f"{spec.name}: stage {s} ({where}) declares {declared.channels} channels, "
                               f"the real model gives {c}")
        grid = shapes[(s, where)][1:]
        if img_size % declared.stride == 0 and grid != (img_size // declared.stride,) * 2:
            raise RuntimeError(f"{spec.name}: stage {s} ({where}) declares stride {declared.stride} (a "
                               f"{img_size // declared.stride}x{img_size // declared.stride} grid at {img_size} px), "
                               f"the real model gives {grid[0]}x{grid[1]}")
    return shapes


# ---------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class TracedBlock:
    """One block of a model's flat block list (``Parts.blocks()``) and the tensor it outputs.

    ``index`` is its position (0-based; stage 1's first block is 0), ``name`` its module path in the model,
    ``stage`` the stage holding it (1-4), ``first`` whether it is its stage's first (downsampling) block --
    the stage cut point. ``format``/``channels``/``height``/``width`` describe its output (traced);
    ``relative_depth`` = (index + 1) / number of blocks (1.0: the last block's output, before the head).
    """

    index: int
    name: str
    stage: int
    first: bool
    format: str
    channels: int
    height: int
    width: int
    relative_depth: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


def block_names(parts: Parts, model: nn.Module | None = None) -> list[str]:
    """Module path of each block of ``parts`` in ``model`` (``stage<s>.<k>`` where a block is not a module
    of the model itself, e.g. a wrapper)."""
    paths = {id(m): n for n, m in model.named_modules()} if model is not None else {}
    out = []
    for s, stage in enumerate(parts.stages, start=1):
        for k, block in enumerate(stage):
            inner = getattr(block, "block", block)          # derive.RopeBlock wraps the model's block
            out.append(paths.get(id(block)) or paths.get(id(inner)) or f"stage{s}.{k}")
    return out


@torch.no_grad()
def trace_blocks(spec: ModelSpec, parts: Parts, img_size: int, model: nn.Module | None = None) -> list[TracedBlock]:
    """Run a zero image through ``parts`` and describe every block's output (:class:`TracedBlock`).

    A block outputs its stage's format (the first block: the stage's ``first`` cut format; the others: the
    stage's ``end`` format). ``RuntimeError`` (one line, naming the model and the block) when a block's
    tensor does not have that format's layout (dimensions, a square token grid), or when a stage's first or
    last block gives other channels than the spec declares: nothing should be stitched there.
    """
    blocks = parts.blocks()
    was = _eval_mode(parts.stem, parts.head, *blocks)
    params = itertools.chain(*(m.parameters() for m in (parts.stem, *blocks)))
    device = next(iter(p.device for p in params), torch.device("cpu"))
    names = block_names(parts, model)
    out: list[TracedBlock] = []
    try:
        x = parts.stem(torch.zeros(1, 3, img_size, img_size, device=device))
        i = 0
        for s, stage in enumerate(parts.stages, start=1):
            for k, block in enumerate(stage):
                x = block(x)
                fmt = spec.first[s - 1].format if k == 0 else spec.end[s - 1].format
                where = f"{spec.name}: block {i} ({names[i]}, stage {s})"
                if not isinstance(x, torch.Tensor) or x.ndim != (3 if is_token(fmt) else 4):
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise RuntimeError(f"{where} gives {got}, not a {fmt!r} tensor (its stage's format)")
                try:
                    c, h, w = (int(v) for v in spatial_shape(x, fmt))
                except FormatError as err:
                    raise RuntimeError(f"{where}: {err}") from None
                declared = spec.first[s - 1] if k == 0 else spec.end[s - 1] if k == len(stage) - 1 else None
                if declared is not None and c != declared.channels:
                    raise RuntimeError(f"{where} gives {c} channels, the spec declares {declared.channels}")
                out.append(TracedBlock(i, names[i], s, k == 0, fmt, c, h, w, 0.0))
                i += 1
    finally:
        _restore_mode(was)
    n = len(out)
    return [TracedBlock(**{**b.__dict__, "relative_depth": (b.index + 1) / n}) for b in out]


def list_blocks(name: str, kwargs: dict | None = None, img_size: int = 224) -> list[TracedBlock]:
    """The flat block list of model ``name`` (constructor ``kwargs`` as in the config's ``model.*_kwargs``)
    at ``img_size``: one :class:`TracedBlock` per block, in order -- index, name (module path), stage, whether it
    is its stage's first block, output format, (channels, H, W) and relative depth. These are the block cut
    points: config ``model.source_block: i`` cuts after block i (the source's stem and blocks 0..i run),
    ``model.destination_block: j`` receives after block j (the destination's blocks j+1.. and head run).

    Shapes are traced on a random-init model built on the meta device (no weights, no compute; a real CPU
    build where meta fails), cached per (name, kwargs, img_size). ``KeyError`` / ``SplitError`` as
    :func:`get_spec`; ``RuntimeError`` when a block does not output its stage's format."""
    return list(_blocks_cached(name, repr(sorted((kwargs or {}).items())), img_size, CachedKwargs(kwargs)))


class CachedKwargs:
    """Carries a kwargs dict past an ``lru_cache`` key (the caller passes its repr as the key too): every
    instance hashes and compares equal, so only the repr decides the cache entry."""

    def __init__(self, kwargs):
        self.kwargs = kwargs

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, CachedKwargs)


@functools.lru_cache(maxsize=64)
def _blocks_cached(name: str, key: str, img_size: int, kwargs: CachedKwargs) -> tuple[TracedBlock, ...]:
    spec = get_spec(name, kwargs.kwargs)
    try:
        with torch.device("meta"):
            model = spec.build(False, 10)
        return tuple(trace_blocks(spec, spec.split(model), img_size, model))
    except RuntimeError as err:
        if str(err).startswith(f"{spec.name}: block "):     # the model itself is wrong, not the meta device
            raise
    except Exception:  # noqa: BLE001 - an architecture that cannot be built or run on meta: build it for real
        pass
    model = spec.build(False, 10)
    return tuple(trace_blocks(spec, spec.split(model), img_size, model))
