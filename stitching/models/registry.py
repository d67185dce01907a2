"""The model registry: named architectures, their cut points, and loading them once.

A :class:`ModelSpec` says how to build a network (timm or torchvision), how to split it into a stem,
four stages of blocks and a head (:class:`Parts`), and what tensor leaves each cut point (:class:`Cut`:
format, channels, stride). The cut points are those of ``docs/method.md``: *after the first block of stage s*
(``first[s]``, the block that downsamples) and *at the end of stage s* (``end[s]``). Declared cuts are
checked against the real module by :func:`trace_cuts` (tests do it for every entry; the stitcher does it
on every build).

Every block is a cut point too (config ``model.source_block`` / ``destination_block``): :func:`list_blocks`
lists a model's flat list of blocks (``Parts.blocks()``: stage 1's first block is index 0) with each block's
output format and traced shape, checked by :func:`trace_blocks` like the stage cuts.

Hand entries live in :mod:`stitching.models.zoo` (one call to :func:`register` each); any other timm or
torchvision classifier name gets a spec derived from the model itself (:mod:`stitching.models.derive`).
"""

from __future__ import annotations

import functools
import itertools
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from stitching.models.formats import FormatError, is_token, spatial_shape


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


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


_DERIVED: dict[tuple[str, str], ModelSpec] = {}


def available() -> list[str]:
    """The hand-registered names (any timm or torchvision classifier name works too: :func:`get_spec`)."""
    _ensure_zoo()
    return sorted(_REGISTRY)


def get_spec(name: str, kwargs: dict | None = None) -> ModelSpec:
    """The spec of ``name``: its hand entry (without constructor ``kwargs``), else one derived from the model
    (:mod:`stitching.models.derive`, cached). ``KeyError`` for a name no library knows,
    :class:`~stitching.models.derive.SplitError` (one line) for a model that cannot be cut into four stages."""
    _ensure_zoo()
    if name in _REGISTRY and not kwargs:
        return _REGISTRY[name]
    key = (name, repr(sorted((kwargs or {}).items())))
    if key not in _DERIVED:
        from stitching.models.derive import derive_spec

        hand = _REGISTRY.get(name)      # a hand entry with constructor arguments: its family and weights
        _DERIVED[key] = derive_spec(name, kwargs, hand and hand.family, hand and hand.weights.partition(".")[2])
    return _DERIVED[key]


def _ensure_zoo() -> None:
    import stitching.models.zoo  # noqa: F401  (registers the entries)


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; one line naming the file, the model and
    the first mismatch. ``key`` (the config key that named the file, set by the caller) drops the file from
    the message, since an error about a config key already shows the key's value."""

    def __init__(self, file: str, model: str, detail: str):
        super().__init__(file, model, detail)
        self.file, self.model, self.detail = file, model, detail
        self.key: str | None = None

    def __str__(self) -> str:
        fits = f"does not fit {self.model}: " if self.model else ""
        if self.key:
            return f"{fits}{self.detail}"
        return f"weights file {self.file} {fits}{self.detail}" if fits else f"weights file {self.file}: {self.detail}"


class PretrainedError(ValueError):
    """Pretrained weights the model's library cannot provide (an offline node with an empty cache, a hub that
    cannot be reached, a tag without weights): one line naming the model and what the library said, reported
    under :attr:`key` (the config key that asked for them)."""

    key = "model.pretrained"

    def __init__(self, name: str, err: BaseException):
        said = (str(err).strip().splitlines() or [""])[0][:200]
        super().__init__(f"cannot load the pretrained weights of {name} ({type(err).__name__}: {said}); "
                         "without network access, fill the timm / torchvision cache, name a local file in "
                         "model.source_weights / model.destination_weights, or set model.pretrained=false "
                         "(offline, HF_HUB_OFFLINE=1 makes timm's hub fail at once instead of retrying)")


def load_model(name: str, pretrained: bool = False, weights_file: str | None = None,
               num_classes: int = 1000, kwargs: dict | None = None) -> nn.Module:
    """Build model ``name``: pretrained from its library, from a local weights file, or random init.

    ``weights_file`` (safetensors or a torch state dict, possibly wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``) takes precedence over ``pretrained`` and serves offline cluster nodes and models
    trained by this framework (their ``model.safetensors``). Loading is strict: a file that is not a state
    dict, or a key or shape that differs from the model's, is a :class:`WeightsError` naming the file and the
    first mismatch (e.g. ``fc.weight has shape (10, 512), the model expects (1000, 512)``). ``kwargs`` are
    constructor arguments (config ``model.source_kwargs`` / ``destination_kwargs``). Pretrained weights the
    library cannot fetch or find in its cache are a :class:`PretrainedError` (one line).
    """
    spec = get_spec(name, kwargs)
    if weights_file is not None:
        model = spec.build(False, num_classes)
        try:
            state = read_state_dict(weights_file)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever torch/safetensors say about a bad file
            raise WeightsError(weights_file, "", _unreadable(err)) from None
        check_fit(name, model, {k: tuple(v.shape) for k, v in state.items()}, weights_file, num_classes, kwargs)
        model.load_state_dict(state, strict=True)
        return model
    if not pretrained:
        return spec.build(False, num_classes)
    try:
        return spec.build(True, num_classes)
    except (OSError, RuntimeError, ValueError) as err:  # the download or the cache (urllib, huggingface_hub)
        raise PretrainedError(name, err) from None


def _unreadable(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"not a safetensors or torch state-dict file ({type(err).__name__}: {first[:200]})"


def weights_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape of the tensors in a weights file, read without loading the tensors (the safetensors
    header; a torch file memory-mapped). None when the shapes cannot be had cheaply (old torch format).
    Raises ``FileNotFoundError`` or :class:`WeightsError` (not a weights file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                if f.read(2) == b"\x80\x02":  # torch's legacy (pre-1.6, pickle) format cannot be mapped
                    return None
            raise ValueError("neither a safetensors file (by its name) nor a torch zip archive")
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001
        raise WeightsError(path, "", _unreadable(err)) from None
    state = _unwrap(obj, path)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_fit(name: str, model: nn.Module, shapes: dict[str, tuple[int, ...]], file: str,
              num_classes: int | None = None, kwargs: dict | None = None) -> None:
    """:class:`WeightsError` naming the first key of ``shapes`` (a weights file's) that does not fit ``model``
    (an instance of registry entry ``name``, possibly on the meta device): a shape mismatch (with the class
    counts when it is the classifier head), a key the model lacks, or one the file lacks."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k in want if k in shapes and shapes[k] != want[k]]
    missing = [k for k in want if k not in shapes]
    extra = sorted((k for k in shapes if k not in want),  # a weight first: the clearest name to show
                   key=lambda k: 0 if k.endswith(".weight") else 2 if k.endswith("num_batches_tracked") else 1)
    more = lambda items, what: f" (and {len(items) - 1} more {what})" if len(items) > 1 else ""  # noqa: E731
    if wrong:
        k = wrong[0]
        detail = f"{k} has shape {_shape(shapes[k])}, the model expects {_shape(want[k])}"
        if k in _head_keys(name, model, kwargs) and shapes[k][:1] != want[k][:1] and num_classes:
            detail += (f": the file's classifier has {shapes[k][0]} classes, the config {num_classes} "
                       "(data.num_classes)")
        raise WeightsError(file, name, detail + more(wrong, "shape mismatches"))
    if missing and len(missing) == len(want):
        raise WeightsError(file, name, f"none of its {len(want)} keys are in the file (the model has e.g. "
                                       f"{missing[0]}, the file {extra[0] if extra else 'nothing'}): "
                                       "weights of another architecture?")
    if missing:
        raise WeightsError(file, name, f"{missing[0]} is missing from the file{more(missing, 'missing keys')}")
    if extra:
        raise WeightsError(file, name, f"{extra[0]} is in the file but not in the model{more(extra, 'extra keys')}")


def check_weights_file(name: str, file: str, num_classes: int = 1000, kwargs: dict | None = None) -> None:
    """Check, without loading its tensors, that ``file`` holds weights that fit model ``name`` (keys and shapes
    from the file's header, against the model built on the meta device): :class:`WeightsError` or
    ``FileNotFoundError`` otherwise. A file whose shapes cannot be read cheaply passes."""
    shapes = weights_shapes(file)
    if shapes is None:
        return
    spec = get_spec(name, kwargs)
    try:
        with torch.device("meta"):
            model = spec.build(False, num_classes)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta: build it for real
        model = spec.build(False, num_classes)
    check_fit(name, model, shapes, file, num_classes, kwargs)


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _head_keys(name: str, model: nn.Module, kwargs: dict | None = None) -> set[str]:
    """State-dict keys of the classifier head (as the registry splits the model)."""
    try:
        head = {id(m) for m in get_spec(name, kwargs).split(model).head.modules()}
    except Exception:  # noqa: BLE001 - only used to word a message
        return set()
    keys = set()
    for mod_name, mod in model.named_modules():
        if id(mod) in head:
            keys.update(f"{mod_name}.{k}" if mod_name else k for k, _ in
                        itertools.chain(mod.named_parameters(recurse=False), mod.named_buffers(recurse=False)))
    return keys


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only`` loading)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(path, "", "holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def split_model(name: str, model: nn.Module, kwargs: dict | None = None) -> Parts:
    return get_spec(name, kwargs).split(model)


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
        parts.stem.train(training[0]), parts.head.train(training[1])
        for b in parts.blocks():
            b.train(was[id(b)])
    for (s, where), (c, _, _) in shapes.items():
        declared = spec.cut(s, where)
        if c != declared.channels:
            raise RuntimeError(f"{spec.name}: stage {s} ({where}) declares {declared.channels} channels, "
                               f"the real model gives {c}")
    return shapes


# ---------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Block:
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
def trace_blocks(spec: ModelSpec, parts: Parts, img_size: int, model: nn.Module | None = None) -> list[Block]:
    """Run a zero image through ``parts`` and describe every block's output (:class:`Block`).

    A block outputs its stage's format (the first block: the stage's ``first`` cut format; the others: the
    stage's ``end`` format). ``RuntimeError`` (one line, naming the model and the block) when a block's
    tensor does not have that format's layout (dimensions, a square token grid), or when a stage's first or
    last block gives other channels than the spec declares: nothing should be stitched there.
    """
    blocks = parts.blocks()
    was = [m.training for m in (parts.stem, parts.head, *blocks)]
    for m in (parts.stem, parts.head, *blocks):
        m.eval()
    params = itertools.chain(*(m.parameters() for m in (parts.stem, *blocks)))
    device = next(iter(p.device for p in params), torch.device("cpu"))
    names = block_names(parts, model)
    out: list[Block] = []
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
                out.append(Block(i, names[i], s, k == 0, fmt, c, h, w, 0.0))
                i += 1
    finally:
        for m, mode in zip((parts.stem, parts.head, *blocks), was):
            m.train(mode)
    n = len(out)
    return [Block(**{**b.__dict__, "relative_depth": (b.index + 1) / n}) for b in out]


def list_blocks(name: str, kwargs: dict | None = None, img_size: int = 224) -> list[Block]:
    """The flat block list of model ``name`` (constructor ``kwargs`` as in the config's ``model.*_kwargs``)
    at ``img_size``: one :class:`Block` per block, in order -- index, name (module path), stage, whether it
    is its stage's first block, output format, (channels, H, W) and relative depth. These are the block cut
    points: config ``model.source_block: i`` cuts after block i (the source's stem and blocks 0..i run),
    ``model.destination_block: j`` receives after block j (the destination's blocks j+1.. and head run).

    Shapes are traced on a random-init model built on the meta device (no weights, no compute; a real CPU
    build where meta fails), cached per (name, kwargs, img_size). ``KeyError`` / ``SplitError`` as
    :func:`get_spec`; ``RuntimeError`` when a block does not output its stage's format."""
    return list(_blocks_cached(name, repr(sorted((kwargs or {}).items())), img_size, _Kwargs(kwargs)))


class _Kwargs:
    """Carries the kwargs dict past the cache key (the repr is the key)."""

    def __init__(self, kwargs):
        self.kwargs = kwargs

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Kwargs)


@functools.lru_cache(maxsize=64)
def _blocks_cached(name: str, key: str, img_size: int, kwargs: _Kwargs) -> tuple[Block, ...]:
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
