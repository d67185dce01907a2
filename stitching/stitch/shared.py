"""Frozen networks held once by several stitched models, and the frozen source prefix run once for all of them.

A pack (:mod:`stitching.train.pack`) builds every branch's model exactly as its run alone would
(:func:`stitching.stitch.stitcher.build_model`), then hands it to :class:`SharedFrozen`, which owns:

- **holding each frozen network once** (:meth:`SharedFrozen.share`): a stitched model whose frozen parts stay in
  eval mode (``train.frozen_bn: eval``) has its prefix, suffix and destination target rebound to the modules of
  the first network the pack holds with the same architecture and bit-equal weights (:func:`same_network`: the
  same module types and ``repr``, every tensor ``torch.equal``); its own copy is dropped. The source of a self
  stitch and every destination that is that network are one set of modules.
- **the runners' frozen parts** (:meth:`SharedFrozen.runner`): the module that runs a branch's training step is
  ``CachedPrefix -> the branch's adapters -> its suffix``; with ``train.fold_bn`` the suffix is a slice of one
  folded copy of its held network (:func:`stitching.stitch.fast.inference_copy`), made once -- wherever that
  computes exactly what folding the branch's own suffix would (the same conv -> BatchNorm pairs,
  :func:`stitching.stitch.fast.conv_bn_pairs`: only a pair that straddles the cut could differ); otherwise the
  branch gets its own folded copy, as alone. A branch whose frozen parts are not frozen in eval mode (the
  fine-tuning baseline, ``train.frozen_bn: train``) or whose prefix cannot be shared runs its own module on the
  batch, as alone (it shares the data pass only).
- **the source prefix run once per batch** (:meth:`SharedFrozen.run_prefix`): the deepest prefix any branch
  needs, on the folded (or canonical) copy of the held source, no autograd, eval mode, under the run's autocast;
  its output after every branch's last prefix block is kept in a :class:`PrefixCache`, and each branch's
  :class:`CachedPrefix` returns its depth's output. Running ``stem, block 1..n`` and reading the output after
  block ``k`` is the very computation of the ``k``-block prefix, so a branch's adapters receive the tensor its
  run alone computes.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from stitching.kinds import STITCHED
from stitching.models.spec import Parts
from stitching.stitch import fast
from stitching.stitch.stitcher import BuiltModel, StitchedModel


def chain(parts: Parts) -> list[nn.Module]:
    """A split network as one list: stem, every block, head (a prefix is ``chain[:k]``, a suffix ``chain[k:]``)."""
    return [parts.stem, *parts.blocks(), parts.head]


def parts_of(parts: Parts, modules: list[nn.Module]) -> Parts:
    """``parts`` with its modules replaced by the same positions of ``modules`` (a :func:`chain`)."""
    blocks, i = [], 1
    for stage in parts.stages:
        blocks.append(list(modules[i:i + len(stage)]))
        i += len(stage)
    return Parts(modules[0], blocks, modules[-1])


def outputs_after(modules: list[nn.Module], lengths: set[int], x: torch.Tensor) -> dict[int, torch.Tensor]:
    """One forward of ``modules`` in order on ``x``, up to the longest length asked for: ``{n: the output after the
    first n modules}`` for every n in ``lengths`` (nothing else kept). The one way the package runs a frozen network
    once for several depths: a pack's source prefix (:meth:`SharedFrozen.run_prefix`) and a closed-form matrix's
    activations (:mod:`stitching.matrix.closed_form`)."""
    out, y = {}, x
    for n, module in enumerate(modules[:max(lengths)], start=1):
        y = module(y)
        if n in lengths:
            out[n] = y
    return out


def same_network(a: list[nn.Module], b: list[nn.Module]) -> bool:
    """Whether two :func:`chain` lists compute the same function: the same modules, or modules of the same types
    and ``repr`` (so the same hyper-parameters) whose every parameter and buffer is bit-equal."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if type(x) is not type(y) or repr(x) != repr(y):
            return False
        sx, sy = x.state_dict(), y.state_dict()
        if sx.keys() != sy.keys():
            return False
        for k, t in sx.items():
            u = sy[k]
            if t.dtype != u.dtype or t.shape != u.shape or t.device != u.device or not torch.equal(t, u):
                return False
    return True


def _pairs(part: nn.Module) -> set[tuple[int, int]]:
    """The (conv, BatchNorm) module ids :func:`stitching.stitch.fast.fold_batchnorms` would fold in ``part``."""
    return {(id(getattr(p, c)), id(getattr(p, b))) for p, c, b in fast.conv_bn_pairs(part)}


@dataclass
class PrefixCache:
    """The held sources' outputs on the current batch: (held source, prefix length: stem + blocks) -> tensor."""

    outputs: dict = field(default_factory=dict)
    key: tuple | None = None        # (data pointer, shape) of the batch they were computed on

    @staticmethod
    def key_of(x: torch.Tensor) -> tuple:
        return x.data_ptr(), tuple(x.shape), x.device

    def clear(self) -> None:
        self.outputs, self.key = {}, None


class CachedPrefix(nn.Module):
    """A branch's frozen prefix in its runner: the pack's source output after ``length`` modules (stem + blocks)
    on the batch it is given, computed once for every branch (:meth:`SharedFrozen.run_prefix`)."""

    def __init__(self, cache: PrefixCache, source: int, length: int):
        super().__init__()
        self.cache, self.source, self.length = cache, source, length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cache.outputs.get((self.source, self.length))
        if out is None or self.cache.key != PrefixCache.key_of(x):
            raise RuntimeError("a packed branch ran on a batch its pack's source prefix did not run on "
                               "(SharedFrozen.run_prefix first)")
        return out

    def extra_repr(self) -> str:
        return f"the pack's source prefix, {self.length} modules (stem + {self.length - 1} blocks)"


@dataclass
class _Held:
    """A network the pack holds once: its canonical modules and, once asked, its runner copy."""

    modules: list[nn.Module]
    runner: list[nn.Module] | None = None       # folded copy (fold_bn) or the canonical modules
    pairs: set | None = None                    # its conv -> BatchNorm pairs as a whole (fold_bn)


class SharedFrozen:
    """The frozen networks of a pack's branches, held once, and its shared source prefix (module docstring)."""

    def __init__(self, fold_bn: bool, channels_last: bool):
        self.fold_bn, self.channels_last = fold_bn, channels_last
        # the canonical modules are held once unless a runner would change them: without folding, a channels-last
        # runner is the canonical model itself, converted in place as far as that run's own prefix and suffix go
        self.rebind = fold_bn or not channels_last
        self.held: list[_Held] = []
        self.cache = PrefixCache()
        self.lengths: dict[int, set[int]] = {}      # id(held source) -> prefix lengths its branches read
        self.sources: dict[int, _Held] = {}
        self._of: dict[int, tuple[_Held, _Held]] = {}  # id(built) -> its held (source, destination)

    # ------------------------------------------------------------------------------------- holding
    def _hold(self, modules: list[nn.Module]) -> _Held:
        for h in self.held:
            if same_network(h.modules, modules):
                return h
        h = _Held(list(modules))
        self.held.append(h)
        return h

    @staticmethod
    def shareable(built: BuiltModel) -> bool:
        """A stitched model whose prefix and suffix are frozen and stay in eval mode (``frozen_bn: eval``)."""
        m = built.model
        return (built.kind == STITCHED and isinstance(m, StitchedModel) and m.frozen and m.frozen_bn == "eval"
                and built.source_parts is not None and built.destination_parts is not None)

    def share(self, built: BuiltModel) -> bool:
        """Find ``built``'s networks among the held ones (holding its own where the pack has no equal one) and,
        where the canonical modules are held once (:attr:`rebind`), rebind its frozen prefix, suffix,
        destination target and splits to them; False, and nothing changed, for a model that is not
        :meth:`shareable`."""
        if not self.shareable(built):
            return False
        m = built.model
        src, dst = chain(built.source_parts), chain(built.destination_parts)
        n, k = len(m.prefix), len(dst) - len(m.suffix)
        if not (all(a is b for a, b in zip(m.prefix, src)) and all(a is b for a, b in zip(m.suffix, dst[k:]))):
            raise RuntimeError("a stitched model's prefix / suffix are not its networks' modules in order")
        hs, hd = self._hold(src), self._hold(dst)
        self._of[id(built)] = hs, hd
        if not self.rebind:
            return True
        m.prefix = nn.Sequential(*hs.modules[:n]).requires_grad_(False).eval()   # frozen, as StitchedModel makes
        m.suffix = nn.Sequential(*hd.modules[k:]).requires_grad_(False).eval()   # its own (other runs' may not be)
        built.target = nn.Sequential(built.destination_input, *hd.modules[:k])
        built.source_parts = parts_of(built.source_parts, hs.modules)
        built.destination_parts = parts_of(built.destination_parts, hd.modules)
        return True

    def held_count(self) -> int:
        return len(self.held)

    # ------------------------------------------------------------------------------------- runners
    def _runner_copy(self, h: _Held) -> list[nn.Module]:
        """The held network as the runners run it, made once: a folded copy (``fold_bn``); else the canonical
        modules, or, to be converted channels-last, a copy of them (:attr:`rebind`)."""
        if h.runner is None:
            whole = nn.Sequential(*h.modules)
            if self.fold_bn:
                h.pairs = _pairs(whole)
                whole = fast.inference_copy(whole)
            elif self.channels_last:
                whole = copy.deepcopy(whole).eval().requires_grad_(False)
            if self.channels_last:
                fast.to_channels_last(whole)
            h.runner = list(whole)
        return h.runner

    def _slice(self, h: _Held, start: int, stop: int) -> list[nn.Module] | None:
        """``h``'s runner modules ``start:stop``, or None where folding ``h``'s canonical modules ``start:stop``
        on their own would fold other pairs (a conv -> BatchNorm pair straddling the slice's edge)."""
        runner = self._runner_copy(h)
        if self.fold_bn:
            part = nn.Sequential(*h.modules[start:stop])
            inside = {id(x) for x in part.modules()}
            touching = {p for p in h.pairs if p[0] in inside or p[1] in inside}
            if touching != _pairs(part):
                return None
        return runner[start:stop]

    def runner(self, built: BuiltModel) -> tuple[nn.Module, bool]:
        """``(the module that runs built's training step, whether it reads the shared prefix)``. ``built``'s model
        is on its device. A shared branch: ``CachedPrefix -> built's adapters -> its suffix from the held
        destination's runner copy``; any other: :func:`stitching.stitch.fast.prepare_for_training` of its own
        model, as its run alone builds it."""
        m = built.model
        if id(built) in self._of:
            hs, hd = self._of[id(built)]
            n, k = len(m.prefix), len(hd.modules) - len(m.suffix)
            if self._slice(hs, 0, n) is not None:
                if self.rebind:
                    suffix = self._slice(hd, k, len(hd.modules))
                else:                       # the run's own canonical suffix, converted as its run alone converts it
                    fast.to_channels_last(m)
                    suffix = list(m.suffix)
                if suffix is not None:
                    runner = StitchedModel(CachedPrefix(self.cache, id(hs), n), m.adapters, nn.Sequential(*suffix),
                                           frozen=True, plan=m.plan)
                    runner.training = m.training
                    if self.channels_last:
                        fast.to_channels_last(runner)
                    self.sources[id(hs)] = hs
                    self.lengths.setdefault(id(hs), set()).add(n)
                    return runner, True
        return fast.prepare_for_training(m, fold_bn=self.fold_bn and built.kind == STITCHED,
                                         channels_last=self.channels_last, compile=False), False

    # ------------------------------------------------------------------------------------- the prefix
    @torch.no_grad()
    def run_prefix(self, x: torch.Tensor, autocast=contextlib.nullcontext) -> None:
        """Run every held source's runner copy once on ``x`` (already in the runners' layout), up to the longest
        prefix its branches read, keeping the output at each of their lengths (:class:`PrefixCache`)."""
        self.cache.clear()
        outputs = {}
        with autocast():
            for key, lengths in self.lengths.items():
                for n, y in outputs_after(self.sources[key].runner, lengths, x).items():
                    outputs[(key, n)] = y
        self.cache.outputs, self.cache.key = outputs, PrefixCache.key_of(x)
